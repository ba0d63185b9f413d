"""Datasets (built-in shapes, local imagefolder, Hub), image transforms, and the replayable sample stream.

A *source* maps an index to (image, caption). The *stream* maps a position in the endless training
stream to a source index: epoch e = position // N uses the permutation drawn from (seed, e), so the
data order is a pure function of the seed and can be replayed from any position. A *batch sampler*
hands each process its slice of every global batch.
"""

from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config import ConfigError, DataConfig
from ldm.diffusion import mix_seed, sample_generator

_AUGMENT_STREAM = 1  # generator stream id for crop/flip draws (0 is used by the training draws)


class Source(Protocol):
    def __len__(self) -> int: ...
    def get(self, index: int) -> tuple[Image.Image, str]: ...


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ShapesSource:
    def __init__(self, cfg: DataConfig):
        from ldm.shapes import ShapesDataset

        self.dataset = ShapesDataset(cfg.shapes.num_images, cfg.resolution, seed=cfg.shapes.seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Image.Image, str]:
        item = self.dataset[index]
        return item["image"], item["text"]


class HFSource:
    """A `datasets.Dataset` with an image column (decoded here, so a bad file is named) and a caption column."""

    def __init__(self, dataset, image_column: str, caption_column: str, origin: str):
        from datasets import Image as ImageFeature

        self.dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.caption_column, self.origin = image_column, caption_column, origin

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[Image.Image, str]:
        row = self.dataset[index]
        ref = row[self.image_column]
        name = ref.get("path") or f"{self.origin}[{index}]"
        try:
            image = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"])
            image.load()
        except Exception as err:
            raise ValueError(f"cannot decode image {name!r} ({type(err).__name__}: {err})") from err
        caption = row[self.caption_column]
        return image, caption if isinstance(caption, str) else ""


def _metadata_columns(folder: Path) -> tuple[Path, list[str]]:
    for name in ("metadata.jsonl", "metadata.csv"):
        file = folder / name
        if file.is_file():
            if name.endswith(".jsonl"):
                with file.open() as f:
                    first = next((line for line in f if line.strip()), "{}")
                return file, list(json.loads(first).keys())
            with file.open(newline="") as f:
                return file, next(csv.reader(f), [])
    raise ConfigError(
        f"data.dataset: folder {str(folder)!r} has no metadata.jsonl or metadata.csv; add one with a "
        "'file_name' column and a caption column (see README, 'Your own images')"
    )


def open_source(cfg: DataConfig) -> Source:
    """The configured dataset, with its columns checked before any model is built."""
    if cfg.dataset == "shapes":
        return ShapesSource(cfg)
    folder = Path(cfg.dataset).expanduser()
    from datasets import load_dataset

    if folder.is_dir():
        meta, columns = _metadata_columns(folder)
        for col in ("file_name", cfg.caption_column):
            if col not in columns:
                raise ConfigError(
                    f"config key 'data.caption_column': {meta} has no column {col!r}; its columns are "
                    f"{', '.join(columns)}" if col == cfg.caption_column else
                    f"data.dataset: {meta} needs a 'file_name' column; its columns are {', '.join(columns)}")
        dataset = load_dataset("imagefolder", data_dir=str(folder), split=cfg.split)
        return HFSource(dataset, "image", cfg.caption_column, str(folder))
    if cfg.dataset.startswith((".", "/", "~")):
        raise ConfigError(f"data.dataset: folder {cfg.dataset!r} does not exist")
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
    return HFSource(dataset, cfg.image_column, cfg.caption_column, cfg.dataset)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white, 16-bit greyscale rescaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((arr * 255.0 / max(arr.max(), 1.0)).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool,
                    generator: Optional[torch.Generator] = None) -> Image.Image:
    """Resize the short side to `resolution` (bicubic), then crop a square (centre or random)."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixel_values(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare_image(image: Image.Image, cfg: DataConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    image = resize_and_crop(to_rgb(image), cfg.resolution, cfg.center_crop, generator)
    if cfg.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
        image = ImageOps.mirror(image)
    return to_pixel_values(image)


# --------------------------------------------------------------------------------------------
# The replayable stream
# --------------------------------------------------------------------------------------------


class SampleStream(torch.utils.data.Dataset):
    """Dataset indexed by stream position: item p is source[perm(seed, p // N)[p % N]], transformed."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed
        self.size = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
        if self.size == 0:
            raise ConfigError(f"data.dataset: {cfg.dataset!r} has no samples")

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return self.size

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def index_of(self, position: int) -> int:
        return int(self._permutation(position // self.size)[position % self.size])

    def __getitem__(self, position: int) -> dict:
        index = self.index_of(position)
        image, caption = self.source.get(index)
        pixel_values = prepare_image(image, self.cfg, sample_generator(self.seed, position, _AUGMENT_STREAM))
        return {"position": position, "index": index, "pixel_values": pixel_values, "caption": caption}


class StreamBatches(torch.utils.data.Sampler):
    """Micro-batch k of process r holds positions k·b·W + r·b … + b − 1 (W processes, b per process).

    A W-process run at batch b therefore sees exactly the samples of a 1-process run at batch W·b.
    """

    def __init__(self, batch_size: int, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start, self.stop, self.rank, self.world = batch_size, start, stop, rank, world_size

    def positions(self, micro_step: int) -> list[int]:
        base = (micro_step * self.world + self.rank) * self.batch_size
        return list(range(base, base + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.stop):
            yield self.positions(k)

    def __len__(self) -> int:
        return self.stop - self.start
