"""Image transforms and the replayable sample stream.

A *source* (`ldm.sources`) maps an index to (image, caption). The *stream* maps a position in the endless training
stream to a source index: epoch e = position // N uses the permutation drawn from (seed, e), so the
data order is a pure function of the seed and can be replayed from any position. A *batch sampler*
hands each process its slice of every global batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config import ConfigError, DataConfig
from ldm.diffusion import AUGMENT_STREAM, BUCKET_STREAM, CAPTION_STREAM, mix_seed, sample_generator
from ldm.sources import BadSample, Caption, Source, caption_variants, record_after_audit

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


Size = tuple[int, int]  # (width, height) in px


def crop_box(image_size: Size, size: Size, center_crop: bool,
             generator: Optional[torch.Generator] = None) -> tuple[Size, tuple[int, int, int, int]]:
    """Where a picture of `image_size` is cut to `size`: scaled (bicubic) to cover it, then cropped at the
    centre or at a random place. Returns (scaled size, (left, top, right, bottom) in the scaled picture)."""
    (w, h), (width, height) = image_size, size
    scale = max(width / w, height / h)
    w, h = max(width, round(w * scale)), max(height, round(h * scale))
    if center_crop:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left = int(torch.randint(0, w - width + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - height + 1, (1,), generator=generator))
    return (w, h), (left, top, left + width, top + height)


def resize_and_crop(image: Image.Image, size: int | Size, center_crop: bool,
                    generator: Optional[torch.Generator] = None) -> Image.Image:
    """Scale to cover `size` (a square side, or (width, height)), then crop it (centre or random)."""
    size = (size, size) if isinstance(size, int) else size
    scaled, box = crop_box(image.size, size, center_crop, generator)
    return image.resize(scaled, Image.BICUBIC).crop(box)


def to_pixel_values(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare_image(image: Image.Image, cfg: DataConfig, generator: Optional[torch.Generator] = None,
                  flip: Optional[bool] = None, size: Optional[Size] = None) -> torch.Tensor:
    """RGB, resize, crop (to `size`, or a square of data.resolution), optional flip (drawn from `generator`
    unless `flip` is given), [-1, 1]: (3, H, W)."""
    return prepare_sample(image, cfg, generator, flip, size)[0]


def prepare_sample(image: Image.Image, cfg: DataConfig, generator: Optional[torch.Generator] = None,
                   flip: Optional[bool] = None, size: Optional[Size] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_image`, and the crop box (left, top, right, bottom) in the scaled picture as trained, so after
    a flip it is mirrored too (a flipped picture's crop would otherwise name the wrong side; diffusers #6234)."""
    image = to_rgb(image)
    size = size or (cfg.resolution, cfg.resolution)
    scaled, box = crop_box(image.size, size, cfg.center_crop, generator)
    image = image.resize(scaled, Image.BICUBIC).crop(box)
    if flip is None:
        flip = cfg.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
    if flip:
        image = ImageOps.mirror(image)
        box = (scaled[0] - box[2], box[1], scaled[0] - box[0], box[3])
    return to_pixel_values(image), torch.tensor(box)


def flip_decision(seed: int, position: int) -> bool:
    """The flip `SampleStream` draws for a stream position when cropping is central (no crop draws first)."""
    return bool(torch.rand(1, generator=sample_generator(seed, position, AUGMENT_STREAM)) < 0.5)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def caption_for(caption: Caption, seed: int, position: int, shuffle_tags: bool = False, keep_tags: int = 0) -> str:
    """The text one use of a sample trains on: one alternative of a caption list, its comma-separated tags
    shuffled behind the first `keep_tags` if asked, both drawn from (seed, position), so a replay, a resumed
    run or another process count sees the same text at the same stream position."""
    variants = caption_variants(caption)
    if len(variants) == 1 and not shuffle_tags:
        return variants[0]
    g = sample_generator(seed, position, CAPTION_STREAM)
    text = variants[int(torch.randint(len(variants), (1,), generator=g))] if len(variants) > 1 else variants[0]
    if shuffle_tags:
        tags = [tag.strip() for tag in text.split(",") if tag.strip()]
        head, tail = tags[:keep_tags], tags[keep_tags:]
        text = ", ".join(head + [tail[i] for i in torch.randperm(len(tail), generator=g).tolist()])
    return text


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int, max_aspect_ratio: float) -> list[Size]:
    """Bucket sizes (width, height): sides multiples of `step` within [min_side, max_side], at most
    resolution² pixels (for each width the tallest height that fits), aspect ratio at most `max_aspect_ratio`;
    portrait and landscape alike (each size's transpose is in the list too)."""
    area, sizes = resolution * resolution, set()
    for w in range(-(-min_side // step) * step, max_side + 1, step):
        h = min(area // w // step * step, max_side)
        if h >= min_side and max(w, h) <= max_aspect_ratio * min(w, h) + 1e-9:
            sizes |= {(w, h), (h, w)}
    if not sizes:
        raise ConfigError(f"data.buckets: no bucket size fits (resolution {resolution}, step {step}, sides "
                          f"{min_side}…{max_side}, aspect ratio ≤ {max_aspect_ratio:g}); widen the sides or the ratio")
    return sorted(sizes)


def _log_ratio(size: Size) -> float:
    return math.log(size[0] / size[1])


def _upscales(image: Size, bucket: Size) -> bool:
    return bucket[0] > image[0] or bucket[1] > image[1]


def nearest_bucket(image: Size, sizes: list[Size], no_upscale: bool = False, step: int = 64) -> Size:
    """The size whose aspect ratio is nearest the image's (ties: the larger). With `no_upscale` only sizes the
    image covers without enlarging count; an image smaller than all of them keeps its own size, rounded down to
    `step` (at least one step)."""
    candidates = [s for s in sizes if not (no_upscale and _upscales(image, s))]
    if not candidates:
        return max(step, image[0] // step * step), max(step, image[1] // step * step)
    r = _log_ratio(image)
    return min(candidates, key=lambda s: (abs(_log_ratio(s) - r), -s[0] * s[1], s))


@dataclass
class BucketPlan:
    """Which bucket each image trains in, and the order of global micro-batches: a function of the images'
    sizes, the settings, the seed and the epoch only, so every rank, a resumed run and a run on another
    process count (same global batch) take the same batch at the same step."""

    sizes: list[Size]  # the buckets in use, sorted
    members: list[list[int]]  # [bucket] → stream indices, ascending
    batch: int  # global micro-batch (processes × per-process batch): every one comes from a single bucket
    seed: int
    merged: dict[str, str] = field(default_factory=dict)  # "WxH" of a merged bucket → where its images went

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-len(m) // self.batch) for m in self.members)

    def epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        """[(bucket, the batch's stream indices)] of one epoch. Each bucket's images in an order drawn from
        (seed, epoch, bucket), cut into batches; a bucket's last batch is filled from its own start (so no image
        waits an epoch and no batch mixes shapes); the batches of all buckets shuffled by (seed, epoch)."""
        return self._epoch(epoch)

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        batches = []
        for b, members in enumerate(self.members):
            g = torch.Generator().manual_seed(mix_seed(self.seed, BUCKET_STREAM, epoch, b + 1))
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            n = -(-len(order) // self.batch)
            order = (order * -(-n * self.batch // len(order)))[:n * self.batch]
            batches += [(b, order[j * self.batch:(j + 1) * self.batch]) for j in range(n)]
        g = torch.Generator().manual_seed(mix_seed(self.seed, BUCKET_STREAM, epoch, 0))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def locate(self, position: int) -> tuple[int, int]:
        """(bucket, stream index) of a stream position: global micro-batch position // batch of its epoch."""
        k, slot = divmod(position, self.batch)
        epoch, j = divmod(k, self.batches_per_epoch)
        bucket, indices = self.epoch(epoch)[j]
        return bucket, indices[slot]

    def histogram(self) -> dict[str, int]:
        return {f"{w}x{h}": len(m) for (w, h), m in zip(self.sizes, self.members)}

    def __hash__(self) -> int:  # lru_cache on a method keys on the instance
        return id(self)


def plan_buckets(image_sizes: list[Size], sizes: list[Size], batch: int, seed: int, min_images: int,
                 no_upscale: bool = False, step: int = 64) -> BucketPlan:
    """Assign every image to its nearest bucket, then merge buckets of fewer than `min_images` images into the
    neighbour of nearest aspect ratio (the smallest first; with `no_upscale` only into a bucket none of them
    would be enlarged for) until none is left or none can merge. Nothing is dropped: a bucket that cannot merge
    trains as it is, its batches filled by repeating its images."""
    assigned: dict[Size, list[int]] = {}
    for index, image in enumerate(image_sizes):
        assigned.setdefault(nearest_bucket(image, sizes, no_upscale, step), []).append(index)
    merged: dict[str, str] = {}
    final: set[Size] = set()
    while True:
        small = [s for s, m in assigned.items() if len(m) < min_images and s not in final]
        if not small or len(assigned) == 1:
            break
        b = min(small, key=lambda s: (len(assigned[s]), s))
        targets = [s for s in assigned if s != b
                   and not (no_upscale and any(_upscales(image_sizes[i], s) for i in assigned[b]))]
        if not targets:
            final.add(b)
            continue
        c = min(targets, key=lambda s: (abs(_log_ratio(s) - _log_ratio(b)), -len(assigned[s]), s))
        assigned[c] = sorted(assigned[c] + assigned.pop(b))
        merged[f"{b[0]}x{b[1]}"] = f"{c[0]}x{c[1]}"
        merged = {k: (f"{c[0]}x{c[1]}" if v == f"{b[0]}x{b[1]}" else v) for k, v in merged.items()}
    order = sorted(assigned)
    return BucketPlan(order, [assigned[s] for s in order], batch, seed, merged)


# --------------------------------------------------------------------------------------------
# The replayable stream
# --------------------------------------------------------------------------------------------


class SampleStream(torch.utils.data.Dataset):
    """Dataset indexed by stream position: item p is source[perm(seed, p // N)[p % N]], transformed."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed
        self.audit_file: Optional[Path] = None  # data_audit.json, where files that go bad later are counted
        self.plan: Optional[BucketPlan] = None  # aspect-ratio buckets (plan_buckets), else square crops
        self.size = len(source) if cfg.max_samples is None else min(len(source), cfg.max_samples)
        if self.size == 0:
            raise ConfigError(f"data.dataset: {cfg.dataset!r} has no samples")

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return self.size

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def index_of(self, position: int) -> int:
        if self.plan is not None:
            return self.plan.locate(position)[1]
        return int(self._permutation(position // self.size)[position % self.size])

    def size_at(self, position: int) -> Size:
        """(width, height) in px the sample at `position` trains at: its bucket's, or data.resolution square."""
        if self.plan is not None:
            return self.plan.sizes[self.plan.locate(position)[0]]
        return self.cfg.resolution, self.cfg.resolution

    def caption_at(self, index: int, position: Optional[int], caption: Optional[Caption] = None) -> str:
        """The caption of `index` as used at stream `position` (None: outside the stream, e.g. validation)."""
        caption = self.source.caption(index) if caption is None else caption
        if position is None:
            return caption_variants(caption)[0]
        return caption_for(caption, self.seed, position, self.cfg.shuffle_tags, self.cfg.keep_tags)

    def image_size(self, index: int) -> Size:
        """(width, height) of an image, upright: from the audit when there was one, else decoded once."""
        if hasattr(self.source, "size"):
            return self.source.size(index)
        return to_rgb(self.usable(index)[1]).size

    def plan_buckets(self, batch: int, step: int) -> BucketPlan:
        """Bucket every training image (data.buckets) for global micro-batches of `batch`; the stream then
        serves one bucket per global micro-batch."""
        b, res = self.cfg.buckets, self.cfg.resolution
        sizes = bucket_sizes(res, step, b.min_side or res // 2, b.max_side or 2 * res, b.max_aspect_ratio)
        images = [self.image_size(i) for i in range(self.size)]
        self.plan = plan_buckets(images, sizes, batch, self.seed, b.min_images or batch, b.no_upscale, step)
        return self.plan

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
        pixel_values, box = prepare_sample(image, self.cfg, sample_generator(self.seed, position, AUGMENT_STREAM),
                                           size=self.size_at(position))
        return {"position": position, "index": index, "pixel_values": pixel_values,
                "caption": self.caption_at(index, position, caption), "crop_box": box}


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
