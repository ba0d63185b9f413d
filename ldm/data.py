"""Image transforms and the replayable sample stream.

A *source* (`ldm.sources`) maps an index to (image, caption). The *stream* maps a position in the endless training
stream to a source index: epoch e = position // N uses the permutation drawn from (seed, e), so the
data order is a pure function of the seed and can be replayed from any position. A *batch sampler*
hands each process its slice of every global batch.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config import ConfigError, DataConfig
from ldm.diffusion import AUGMENT_STREAM, mix_seed, sample_generator
from ldm.sources import BadSample, Source, record_after_audit

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, name: str = "image", notes: Optional[list[str]] = None) -> Image.Image:
    """Any PIL mode to 8-bit RGB, on the scale the file means, never the picture's own maximum: 16-bit values
    / 257 (so a dark 16-bit picture stays dark), float pixels read as [0, 1] (or [0, 255] when they exceed 1),
    transparency composited on white. What was done is appended to `notes`; pixels that have no such reading
    (negative, or beyond 16 bits) raise BadSample."""
    notes = notes if notes is not None else []
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or low < 0:
            raise BadSample(f"{mode} pixels outside the displayable range", name, f"{low:g} … {high:g}")
        if mode == "F":
            scale = 255.0 if high <= 1.0 else 1.0
            notes.append(f"float image read as [0, {1 if high <= 1.0 else 255}] and converted to 8-bit RGB")
        else:
            if high > 65535:
                raise BadSample("32-bit integer pixels beyond 16 bits", name, f"max {high:g}")
            scale = 1 / 257
            notes.append("16-bit image scaled to 8 bits (÷ 257)")
        if high > 255 / scale:
            raise BadSample("float pixels beyond 255", name, f"max {high:g}")
        image = Image.fromarray(np.round(arr * scale).clip(0, 255).astype(np.uint8), "L")
    elif mode != "RGB":
        notes.append(f"image mode {mode} converted to RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode PIL cannot convert (e.g. LAB, HSV)
        raise BadSample(f"image mode {mode} cannot be converted to RGB", name) from err


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


def prepare_image(image: Image.Image, cfg: DataConfig, generator: Optional[torch.Generator] = None,
                  flip: Optional[bool] = None) -> torch.Tensor:
    """RGB, resize, crop, optional flip (drawn from `generator` unless `flip` is given), [-1, 1]."""
    image = resize_and_crop(to_rgb(image), cfg.resolution, cfg.center_crop, generator)
    if flip is None:
        flip = cfg.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
    if flip:
        image = ImageOps.mirror(image)
    return to_pixel_values(image)


def flip_decision(seed: int, position: int) -> bool:
    """The flip `SampleStream` draws for a stream position when cropping is central (no crop draws first)."""
    return bool(torch.rand(1, generator=sample_generator(seed, position, AUGMENT_STREAM)) < 0.5)


# --------------------------------------------------------------------------------------------
# The replayable stream
# --------------------------------------------------------------------------------------------


class SampleStream(torch.utils.data.Dataset):
    """Dataset indexed by stream position: item p is source[perm(seed, p // N)[p % N]], transformed."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed
        self.audit_file: Optional[Path] = None  # data_audit.json, where files that go bad later are counted
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

    def usable(self, index: int, position: Optional[int] = None) -> tuple[int, Image.Image, str]:
        """(index, image, caption) of `index`, or of the next sample that still decodes when this one went bad
        after the audit (deterministic: a replay takes the same replacement)."""
        for _ in range(self.size):
            try:
                image, caption = self.source.get(index)
                return index, image, caption
            except BadSample as bad:
                where = f" at stream position {position}" if position is not None else ""
                logger.warning("skipping %s%s; using the next sample", bad, where)
                record_after_audit(self.audit_file, bad, f"training stream{where}")
                index = (index + 1) % self.size
        raise ConfigError(f"data.dataset: no sample of {self.cfg.dataset!r} decodes any more (every file went bad "
                          "after the audit); check the disk and the folder")

    def __getitem__(self, position: int) -> dict:
        index, image, caption = self.usable(self.index_of(position), position)
        pixel_values = prepare_image(image, self.cfg, sample_generator(self.seed, position, AUGMENT_STREAM))
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
