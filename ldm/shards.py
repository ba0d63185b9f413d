"""Datasets as shards: an imagefolder written as webdataset tars (or parquet files), read back by the
`datasets` library (ldm.sources.ShardSource), locally or through fsspec URLs.

A webdataset shard is a plain tar in which the files of one sample share a key: `<key>.png` (the image's
original bytes, any format) and `<key>.txt` (its caption; several lines are alternatives, one chosen per use,
as in a caption file). Keys keep the folder's order, so the shards index like the folder: the same seed trains
to the same weights, and cached latents (keyed by the image's bytes) are shared between the two.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ldm.config import ConfigError
from ldm.sources import BadSample, FolderSource, caption_variants

ShardFormat = Literal["webdataset", "parquet"]


@dataclass
class ShardReport:
    shards: list[Path] = field(default_factory=list)
    samples: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # file name → why it could not be written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock or owner in the bytes: shards reproduce
    tar.addfile(info, io.BytesIO(data))


def _caption_text(raw: object, name: str) -> str:
    """The caption as shard text: one line per alternative (lists), the caption itself otherwise."""
    from ldm.sources import normalise_caption

    return "\n".join(c.replace("\n", " ") for c in caption_variants(normalise_caption(raw, name, [])))


def write_shards(folder: str | Path, out: str | Path, samples_per_shard: int = 1000,
                 fmt: ShardFormat = "webdataset", caption_column: str = "text") -> ShardReport:
    """Write the imagefolder `folder` (metadata file or caption files) as shards in `out`, in folder order.

    Images are copied byte for byte, damaged ones included: the training audit decodes and counts them, as it
    would in the folder. A row whose file is missing, or whose caption is unusable, is not written and is
    listed in the report (and in `out/shards.json`). Each shard is written under a temporary name and renamed."""
    if samples_per_shard < 1:
        raise ConfigError(f"samples per shard must be ≥ 1, got {samples_per_shard}")
    source = FolderSource(Path(folder), caption_column)
    out = Path(out)
    if out.exists() and any(out.glob("shard-*")):
        raise ConfigError(f"{out} already holds shards; pick an empty folder (shards of two datasets would mix)")
    out.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    rows: list[tuple[str, str, bytes, str]] = []  # key, extension, image bytes, caption text

    def flush() -> None:
        if not rows:
            return
        n = len(report.shards)
        final = out / f"shard-{n:06d}.{'tar' if fmt == 'webdataset' else 'parquet'}"
        tmp = final.with_name(final.name + ".tmp")
        if fmt == "webdataset":
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for key, ext, data, caption in rows:
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.txt", caption.encode("utf-8"))
        else:
            _write_parquet(tmp, rows)
        os.replace(tmp, final)
        report.shards.append(final)
        rows.clear()

    for index in range(len(source)):
        name = source.name(index)
        try:
            path = source.resolve(index)
            caption = _caption_text(source.rows[index].caption, name)
            data = path.read_bytes()
        except (BadSample, OSError) as err:
            report.skipped[name] = str(err)
            continue
        rows.append((f"{index:09d}", path.suffix.lower().lstrip(".") or "img", data, caption))
        report.samples += 1
        if len(rows) == samples_per_shard:
            flush()
    flush()
    (out / "shards.json").write_text(json.dumps({
        "format": fmt, "samples": report.samples, "shards": [p.name for p in report.shards],
        "source": str(Path(folder).resolve()), "skipped": report.skipped}, indent=1))
    return report


def _write_parquet(path: Path, rows: list[tuple[str, str, bytes, str]]) -> None:
    """One parquet file with `image` ({bytes, path}, the datasets Image feature) and `text` columns."""
    import datasets
    from datasets import Dataset, Features, Image, Value

    features = Features({"__key__": Value("string"), "image": Image(), "text": Value("string")})
    table = Dataset.from_dict({"__key__": [r[0] for r in rows],
                               "image": [{"bytes": r[2], "path": f"{r[0]}.{r[1]}"} for r in rows],
                               "text": [r[3] for r in rows]}, features=features)
    datasets.disable_progress_bars()  # one bar per shard would bury the script's own report
    try:
        table.to_parquet(str(path))
    finally:
        datasets.enable_progress_bars()
