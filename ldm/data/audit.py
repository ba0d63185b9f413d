"""The audit: every sample decoded once before training, bad ones counted and reported, never crashing a run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from ldm.config.data import DataConfig
from ldm.data.decode import BadSample, Caption, caption_variants, to_rgb
from ldm.data.sources import ShapesSource, Source, open_source
from ldm.errors import ConfigError


@dataclass
class DataReport:
    total: int = 0
    kept: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each kept image, upright

    def note(self, kind: str, name: str, counter: Counter) -> None:
        counter[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(name)

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.total, 1)

    def to_dict(self) -> dict:
        return {"total": self.total, "usable": len(self.kept), "skipped": dict(self.skipped),
                "converted": dict(self.converted), "examples": self.examples}

    def summary(self) -> str:
        lines = [f"data audit: {len(self.kept)} of {self.total} samples usable"]
        for title, counter in (("skipped", self.skipped), ("converted", self.converted)):
            for kind, n in counter.most_common():
                lines.append(f"  {title:9s} {n:6d} × {kind}  e.g. {', '.join(self.examples[kind])}")
        return "\n".join(lines)


AFTER_AUDIT = "went_bad_after_audit"


def record_after_audit(audit_file: Optional[Path], bad: BadSample, where: str) -> None:
    """Count a sample that passed the audit but no longer decodes in `audit_file` (data_audit.json), under
    `went_bad_after_audit`: {name: {"reason", "where"}}, one entry per file however often it is met. Ranks and
    data-loader workers may meet bad files at once, so the update holds an exclusive lock on a sibling file."""
    if audit_file is None or not audit_file.is_file():
        return
    import fcntl

    with open(audit_file.with_name(audit_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(audit_file.read_text())
        seen = report.setdefault(AFTER_AUDIT, {})
        if bad.name in seen:
            return
        seen[bad.name] = {"reason": bad.reason, "where": where}
        tmp = audit_file.with_name(audit_file.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(audit_file)


def audit(source: Source, cfg: DataConfig, tokenizer=None) -> DataReport:
    """Decode every sample once; count what is converted and what is skipped."""
    report = DataReport(total=len(source) + len(getattr(source, "unreadable", [])))
    for line, reason in getattr(source, "unreadable", []):
        report.note(reason, f"line {line}", report.skipped)
    if isinstance(source, ShapesSource):  # procedural: nothing to check
        report.kept = list(range(len(source)))
        return report
    limit = tokenizer.model_max_length if tokenizer is not None else None
    min_side = cfg.min_image_size if cfg.min_image_size is not None else max(cfg.resolution // 4, 1)
    for index in range(len(source)):
        notes: list[str] = []
        try:
            image, caption = source.get(index, notes)
            w, h = image.size
            if min(w, h) < min_side:
                raise BadSample(f"image smaller than {min_side} px", source.name(index), f"{w}×{h}")
            if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                raise BadSample(f"aspect ratio above {cfg.max_aspect_ratio:g}", source.name(index), f"{w}×{h}")
            to_rgb(image, source.name(index), notes)
        except BadSample as bad:
            report.note(bad.reason, bad.name, report.skipped)
            continue
        if limit is not None and any(len(tokenizer(c, truncation=False).input_ids) > limit
                                     for c in caption_variants(caption)):
            notes.append(f"caption longer than {limit} tokens: truncated")
        for kind in notes:
            report.note(kind, source.name(index), report.converted)
        report.kept.append(index)
        report.sizes.append((w, h))
    if report.bad_fraction > cfg.max_bad_fraction or not report.kept:
        offenders = [n for kind in report.skipped for n in report.examples[kind]]
        raise ConfigError(
            f"{report.summary()}\n{100 * report.bad_fraction:.1f} % of the samples are unusable, more than "
            f"data.max_bad_fraction={cfg.max_bad_fraction:g}; fix or remove them (e.g. {', '.join(offenders[:10])}) "
            "or raise data.max_bad_fraction"
        )
    return report


class AuditedSource:
    """Only the samples an audit kept, renumbered 0..n-1."""

    def __init__(self, source: Source, report: DataReport):
        self.source, self.report, self.kept = source, report, report.kept

    def __len__(self) -> int:
        return len(self.kept)

    def get(self, index: int) -> tuple[Image.Image, Caption]:
        return self.source.get(self.kept[index])

    def caption(self, index: int) -> Caption:
        return self.source.caption(self.kept[index])

    def fingerprint(self, index: int) -> str:
        return self.source.fingerprint(self.kept[index])

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) as the audit decoded it (after EXIF rotation): bucketing reads no image again."""
        return self.report.sizes[index]


def open_audited(cfg: DataConfig, tokenizer=None, accelerator=None) -> Source:
    """`open_source` + `audit` (on the main process; the verdict is shared with the others)."""
    source = open_source(cfg)
    if not cfg.audit or isinstance(source, ShapesSource):
        return source
    main = accelerator is None or accelerator.is_main_process
    outcome: object = None
    if main:
        try:
            outcome = audit(source, cfg, tokenizer)
            print(outcome.summary())
        except ConfigError as err:
            outcome = err
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, ConfigError):
        raise outcome
    return AuditedSource(source, outcome)
