"""Where images and captions come from, and the audit that keeps bad data from crashing a run.

Sources: the built-in `shapes`, a local imagefolder (`metadata.jsonl` / `metadata.csv` with a
`file_name` column and a caption column) and Hugging Face Hub datasets (`datasets.load_dataset`).
A local folder's metadata is read line by line rather than through Arrow, because Arrow's typed
columns reject the very rows an audit must count (a number where a caption should be, a broken line).

The audit decodes every sample once before training. Each problem is either *converted* (image mode
→ RGB, EXIF rotation, first frame of an animation, a non-string caption → text, an over-long caption
→ truncated) or *skipped*, and every kind is counted with examples. If more than
`data.max_bad_fraction` of the samples would be skipped, training stops before it starts and lists
the offending files.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import io
import json
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.config import ConfigError, DataConfig


class Source(Protocol):
    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[Image.Image, str]: ...
    def caption(self, index: int) -> str: ...  # without decoding the image
    def fingerprint(self, index: int) -> str: ...  # sha256 of the image's bytes


class BadSample(ValueError):
    """One sample cannot be used; `reason` is the counted kind."""

    def __init__(self, reason: str, name: str, detail: str = ""):
        super().__init__(f"{name}: {reason}{' (' + detail + ')' if detail else ''}")
        self.reason, self.name = reason, name


def decode_image(data: bytes | Path, name: str, notes: Optional[list[str]] = None) -> Image.Image:
    """Open and fully decode an image; raise BadSample naming the kind of failure.

    A damaged file can make a decoder raise almost anything (struct.error, IndexError, ZeroDivisionError,
    EOFError…), so every exception from decoding is this sample's problem, named and counted, never the run's."""
    notes = notes if notes is not None else []
    try:
        if isinstance(data, Path) and data.stat().st_size == 0 or isinstance(data, bytes) and not data:
            raise BadSample("empty file", name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": handled below
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if getattr(image, "n_frames", 1) > 1:
                notes.append("animated image: first frame used")
                image.seek(0)
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("decompression bomb (too many pixels)", name, str(err)[:80]) from err
    except UnidentifiedImageError as err:
        raise BadSample("not an image or corrupt", name) from err
    except MemoryError as err:
        raise BadSample("too large to decode", name) from err
    except Exception as err:  # noqa: BLE001 (see the docstring)
        kind = "truncated image" if "truncated" in str(err) else "corrupt image data"
        raise BadSample(kind, name, f"{type(err).__name__}: {err}"[:80]) from err
    try:
        orientation = image.getexif().get(0x0112, 1)
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (corrupt EXIF: the pixels are fine, the rotation is unknown)
        notes.append("unreadable EXIF: orientation not applied")
        return image
    if transposed is not image and orientation != 1:
        notes.append("EXIF orientation applied")
    return transposed


_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"  # zero-width characters and BOMs that str.strip keeps


def normalise_caption(caption: object, name: str, notes: list[str]) -> str:
    if caption is None:
        raise BadSample("missing caption", name)
    if not isinstance(caption, str):
        if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
            notes.append("caption list: first entry used")
            caption = caption[0]
        elif isinstance(caption, (int, float, bool)):
            notes.append("non-string caption converted to text")
            caption = str(caption)
        else:
            raise BadSample("unusable caption type", name, type(caption).__name__)
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadSample("caption is not valid Unicode (a lone surrogate)", name, repr(caption)[:60]) from err
    if not caption.strip():
        raise BadSample("empty caption", name)
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in caption):
        raise BadSample("caption has no visible characters", name, repr(caption)[:60])
    return caption.strip().strip(_INVISIBLE).strip()


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ShapesSource:
    def __init__(self, cfg: DataConfig):
        from ldm.shapes import ShapesDataset, parse_holdout

        self.dataset = ShapesDataset(cfg.shapes.num_images, cfg.resolution, seed=cfg.shapes.seed,
                                     exclude=parse_holdout(cfg.shapes.holdout),
                                     colour_only_captions=cfg.shapes.colour_only_captions,
                                     styles=cfg.shapes.styles, focus=parse_holdout(cfg.shapes.focus),
                                     focus_fraction=cfg.shapes.focus_fraction)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Image.Image, str]:
        item = self.dataset[index]
        return item["image"], item["text"]

    def caption(self, index: int) -> str:
        return self.dataset.caption(index)

    def reference(self, index: int) -> Image.Image:
        """A style reference for item `index`: same background, other content."""
        return self.dataset.reference(index)

    def fingerprint(self, index: int) -> str:
        image = self.get(index)[0]
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


@dataclass
class FolderRow:
    file_name: object
    caption: object
    line: int


class FolderSource:
    """A local imagefolder; every file path is checked to stay inside the folder (no `../`, absolute
    paths or symlinks out)."""

    def __init__(self, folder: Path, caption_column: str, encoding: str = "utf-8"):
        self.folder = folder.resolve()
        self.rows, self.unreadable = _read_metadata(folder, caption_column, encoding)

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return str(self.rows[index].file_name)

    def resolve(self, index: int) -> Path:
        row = self.rows[index]
        name = str(row.file_name)
        if not isinstance(row.file_name, str) or not name.strip():
            raise BadSample("missing file_name", f"metadata line {row.line}")
        if "\0" in name:
            raise BadSample("NUL byte in file_name", repr(name)[:80])
        try:
            if Path(name).is_absolute():
                raise BadSample("absolute path in file_name", name)
            path = (self.folder / name).resolve()  # follows symlinks
            if not path.is_relative_to(self.folder):
                raise BadSample("path escapes the dataset folder", name)
            if not path.is_file():
                raise BadSample("missing file", name)
        except RuntimeError as err:  # Python 3.11: a symlink loop
            raise BadSample("symlink loop", name) from err
        except OSError as err:
            kind = {errno.ELOOP: "symlink loop", errno.ENAMETOOLONG: "file_name too long"}.get(err.errno,
                                                                                              "unreadable file")
            raise BadSample(kind, name[:80], err.strerror or "") from err
        return path

    def fingerprint(self, index: int) -> str:
        path = self.resolve(index)
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as err:
            raise BadSample("unreadable file", self.name(index), err.strerror or "") from err

    def caption(self, index: int) -> str:
        return normalise_caption(self.rows[index].caption, self.name(index), [])

    def get(self, index: int, notes: Optional[list[str]] = None) -> tuple[Image.Image, str]:
        notes = notes if notes is not None else []
        path = self.resolve(index)
        caption = normalise_caption(self.rows[index].caption, str(self.rows[index].file_name), notes)
        return decode_image(path, str(self.rows[index].file_name), notes), caption


def _metadata_text(meta: Path, encoding: str) -> str:
    """The metadata file as text: a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, and bytes that
    are not `encoding` stop the run naming the line, instead of training on replacement characters."""
    data = meta.read_bytes()
    try:
        return data.decode("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(
            f"data.dataset: {meta} is not {encoding} text (line {line}: byte {data[err.start]:#04x}); save it as "
            "UTF-8 (Excel: 'CSV UTF-8'), or set data.metadata_encoding to its encoding (e.g. cp1252 or latin-1)"
        ) from err


def _read_metadata(folder: Path, caption_column: str, encoding: str = "utf-8") -> tuple[list[FolderRow], list]:
    """The rows of metadata.jsonl or metadata.csv, and the (line, reason) of every line that cannot be read."""
    rows: list[FolderRow] = []
    unreadable: list[tuple[int, str]] = []
    jsonl, csv_file = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file() and csv_file.is_file():
        raise ConfigError(f"data.dataset: {folder} holds both metadata.jsonl and metadata.csv; keep one (ldm, like "
                          "the Hugging Face imagefolder loader, would read only one and ignore the other)")
    if not jsonl.is_file() and not csv_file.is_file():
        raise ConfigError(
            f"data.dataset: folder {str(folder)!r} has no metadata.jsonl or metadata.csv; add one with a "
            "'file_name' column and a caption column (see README, 'Your own images')"
        )
    meta = jsonl if jsonl.is_file() else csv_file
    text = _metadata_text(meta, encoding)
    columns: set[str] = set()
    if meta is jsonl:
        if text.lstrip().startswith("["):
            raise ConfigError(
                f"data.dataset: {meta} holds a JSON array; JSON Lines has one object per line. Convert it with "
                f"python -c \"import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]\" "
                f"{meta} > metadata.jsonl.new, then replace the file"
            )
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                unreadable.append((n, "unreadable metadata line (not JSON)"))
                continue
            if not isinstance(row, dict):
                unreadable.append((n, "unreadable metadata line (not a JSON object)"))
                continue
            columns |= row.keys()
            rows.append(FolderRow(row.get("file_name"), row.get(caption_column), n))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA)
        columns = set(reader.fieldnames or [])
        for row in reader:
            n = reader.line_num
            if row.get(_EXTRA):
                unreadable.append((n, "CSV row has more fields than the header (quote captions that contain "
                                      "commas)"))
            elif None in row.values():
                unreadable.append((n, "CSV row has fewer fields than the header"))
            else:
                rows.append(FolderRow(row.get("file_name"), row.get(caption_column), n))
    if "file_name" not in columns:
        raise ConfigError(f"data.dataset: {meta} needs a 'file_name' column; its columns are "
                          f"{', '.join(map(repr, sorted(columns)))}")
    if caption_column not in columns:
        raise ConfigError(f"config key 'data.caption_column': {meta} has no column {caption_column!r}; its columns "
                          f"are {', '.join(map(repr, sorted(columns)))}")
    return rows, unreadable


_EXTRA = "\0extra fields"


class HubSource:
    """A `datasets.Dataset` (Hub); images decoded here so a bad one is counted, not fatal."""

    def __init__(self, dataset, image_column: str, caption_column: str, origin: str):
        from datasets import Image as ImageFeature

        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.caption_column, self.origin = image_column, caption_column, origin

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        ref = self.dataset[index][self.image_column] or {}
        return ref.get("path") or f"{self.origin}[{index}]"

    def caption(self, index: int) -> str:
        return normalise_caption(self.dataset[index][self.caption_column], self.name(index), [])

    def fingerprint(self, index: int) -> str:
        ref = self.dataset[index][self.image_column] or {}
        data = ref.get("bytes") or (Path(ref["path"]).read_bytes() if ref.get("path") else b"")
        return hashlib.sha256(data).hexdigest()

    def get(self, index: int, notes: Optional[list[str]] = None) -> tuple[Image.Image, str]:
        notes = notes if notes is not None else []
        row = self.dataset[index]
        ref, name = row[self.image_column] or {}, self.name(index)
        data = ref.get("bytes") or (Path(ref["path"]) if ref.get("path") else None)
        if data is None:
            raise BadSample("missing image", name)
        caption = normalise_caption(row[self.caption_column], name, notes)
        return decode_image(data, name, notes), caption


def open_source(cfg: DataConfig) -> Source:
    """The configured dataset, with its columns checked before any model is built."""
    if cfg.dataset == "shapes":
        return ShapesSource(cfg)
    folder = Path(cfg.dataset).expanduser()
    if folder.is_dir():
        return FolderSource(folder, cfg.caption_column, cfg.metadata_encoding)
    if cfg.dataset.startswith((".", "/", "~")):
        raise ConfigError(f"data.dataset: folder {cfg.dataset!r} does not exist")
    from datasets import load_dataset

    try:
        dataset = load_dataset(cfg.dataset, split=cfg.split)
    except Exception as err:
        raise ConfigError(
            f"data.dataset: could not load {cfg.dataset!r} (split {cfg.split!r}): it is not a local folder, and "
            f"the Hub dataset is not cached or cannot be reached (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). "
            f"({type(err).__name__}: {err})"
        ) from err
    for key, col in (("data.image_column", cfg.image_column), ("data.caption_column", cfg.caption_column)):
        if col not in dataset.column_names:
            raise ConfigError(f"config key '{key}': dataset {cfg.dataset!r} has no column {col!r}; "
                              f"its columns are {', '.join(dataset.column_names)}")
    return HubSource(dataset, cfg.image_column, cfg.caption_column, cfg.dataset)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


@dataclass
class DataReport:
    total: int = 0
    kept: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

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
    from ldm.data import to_rgb

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
        if limit is not None and len(tokenizer(caption, truncation=False).input_ids) > limit:
            notes.append(f"caption longer than {limit} tokens: truncated")
        for kind in notes:
            report.note(kind, source.name(index), report.converted)
        report.kept.append(index)
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

    def get(self, index: int) -> tuple[Image.Image, str]:
        return self.source.get(self.kept[index])

    def caption(self, index: int) -> str:
        return self.source.caption(self.kept[index])

    def fingerprint(self, index: int) -> str:
        return self.source.fingerprint(self.kept[index])


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
