"""Datasets as shards: an imagefolder written as webdataset tars (or parquet files), read back by the
`datasets` library (ldm.data.sources.ShardSource), locally or through fsspec URLs.

A webdataset shard is a plain tar in which the files of one sample share a key: `<key>.png` (the image's
original bytes, any format) and `<key>.txt` (its caption; several lines are alternatives, one chosen per use,
as in a caption file). Keys keep the folder's order, so the shards index like the folder: the same seed trains
to the same weights, and cached latents (keyed by the image's bytes) are shared between the two.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from ldm.data.audit import record_after_audit
from ldm.data.decode import BadSample, caption_variants, decode_image, normalise_caption
from ldm.data.sources import FolderSource, ShardSource, shard_files
from ldm.data.stream import StreamBatches
from ldm.data.transforms import caption_for, prepare_sample
from ldm.diffusion import AUGMENT_STREAM, mix_seed, sample_generator
from ldm.errors import ConfigError

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


class StreamingShards:
    """Shards read as a stream (data.streaming): `datasets` streams them and `split_dataset_by_node` gives each
    process whole shards of its own when the shard count divides by the process count (otherwise every process
    reads every shard and keeps every W-th sample). Each process's sample order is fixed by (seed, epoch): the
    shard order and a `data.shuffle_buffer` window are shuffled by `IterableDataset.shuffle(seed)`. With a
    shuffle the shards are dealt anew each epoch (the same deal on every process, so still disjoint within the
    epoch); with `data.shuffle_buffer=0` each process keeps the same shards for the whole run.

    What holds: the draws (noise, timestep, dropout) are still keyed by the global stream position; a resumed
    run is exact, because each process replays its stream and discards what it had consumed (cost: reading up
    to that point again); a run on another process count reads other samples and is refused on resume.
    What does not: 2 processes ≢ 1 process (each reads other shards), and there is no audit before training:
    a sample that does not decode is skipped when met and counted in data_audit.json."""

    plan = None  # no buckets: the plan needs every image's size up front

    def __init__(self, cfg, seed: int, rank: int = 0, world_size: int = 1):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        found = shard_files(cfg.dataset)
        if found is None:
            raise ConfigError(f"data.streaming: {cfg.dataset!r} is not a folder, glob or URL of .tar or .parquet "
                              "shards (write them with scripts/make_shards.py)")
        builder, files = found
        try:
            dataset = load_dataset(builder, data_files={"train": files}, split="train", streaming=True)
        except Exception as err:
            raise ConfigError(f"data.dataset: could not stream the {builder} shards {cfg.dataset!r} "
                              f"({type(err).__name__}: {err})"[:400]) from err
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world_size
        from datasets import Image as ImageFeature

        image_columns = [c for c, f in (dataset.features or {}).items() if isinstance(f, ImageFeature)]
        for column in image_columns:  # bytes, decoded here: a bad one is counted, not fatal
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.num_shards = dataset.num_shards
        self.own_shards = self.num_shards % world_size == 0
        self.dataset = split_dataset_by_node(dataset, rank, world_size)
        self.reader = ShardSource.__new__(ShardSource)  # its row → image / caption rules, without a table
        self.reader.image_columns = image_columns
        self.reader.caption_column = "txt" if builder == "webdataset" else cfg.caption_column
        self.reader.origin = cfg.dataset
        self.source = self  # train() asks stream.source for an audit report; there is none before training
        self.audit_file: Optional[Path] = None
        self.size = 1 << 62  # endless: epochs are each process's passes over its shards
        self.skipped = 0

    def describe(self) -> str:
        how = (f"{self.num_shards // self.world} of {self.num_shards} shards per process" if self.own_shards else
               f"{self.num_shards} shards do not divide among {self.world} processes: each reads all of them and "
               f"keeps every {self.world}-th sample")
        return f"streaming {self.cfg.dataset} ({how}, shuffle buffer {self.cfg.shuffle_buffer})"

    def size_at(self, position: int) -> tuple[int, int]:
        return self.cfg.resolution, self.cfg.resolution

    def _rows(self) -> Iterator[dict]:
        """This process's rows, epoch after epoch, each epoch in the order drawn from (seed, epoch)."""
        for epoch in itertools.count():
            rows = self.dataset
            if self.cfg.shuffle_buffer:
                rows = rows.shuffle(seed=mix_seed(self.seed, epoch) % 2**32, buffer_size=self.cfg.shuffle_buffer)
            empty = True
            for row in rows:
                empty = False
                yield row
            if empty:
                raise ConfigError(f"data.dataset: process {self.rank} has no samples in {self.cfg.dataset!r}")

    def batches(self, batch_size: int, start: int, stop: int) -> Iterator[dict]:
        """Micro-batches start … stop − 1 of this process, positions numbered as StreamBatches numbers them. A
        resumed run (start > 0) replays the micro-batches before `start` and discards them: the same rows
        decode (or fail) the same way, so it continues exactly where the checkpoint left off."""
        rows = self._rows()
        numbering = StreamBatches(batch_size, 0, stop, self.rank, self.world)
        self._read = 0
        for micro in range(stop):
            items = [self._next_item(rows, position) for position in numbering.positions(micro)]
            if micro >= start:
                yield {"position": [i["position"] for i in items], "index": [i["index"] for i in items],
                       "source": [i["source"] for i in items], "caption": [i["caption"] for i in items],
                       "pixel_values": torch.stack([i["pixel_values"] for i in items]),
                       "crop_box": torch.stack([i["crop_box"] for i in items])}

    def _next_item(self, rows: Iterator[dict], position: int) -> dict:
        """The next row that decodes, prepared for `position`; rows that do not are counted and skipped."""
        while True:
            row = next(rows)
            self._read += 1
            name = f"{Path(row.get('__url__') or self.cfg.dataset).name}:{row.get('__key__')}"
            try:
                ref = self.reader._ref(row)
                if not ref.get("bytes"):
                    raise BadSample("missing image", name)
                caption = normalise_caption(self.reader._raw_caption(row), name, [])
                pixels, box = prepare_sample(decode_image(ref["bytes"], name), self.cfg,
                                             sample_generator(self.seed, position, AUGMENT_STREAM))
            except BadSample as bad:
                self.skipped += 1
                record_after_audit(self.audit_file, bad, f"streaming, process {self.rank}")
                continue
            return {"position": position, "index": self._read - 1, "source": name, "pixel_values": pixels,
                    "crop_box": box,
                    "caption": caption_for(caption, self.seed, position, self.cfg.shuffle_tags, self.cfg.keep_tags)}
