"""Aspect-ratio buckets: the sizes, each image's nearest one, and the epoch's batch plan (a function of seed and
epoch alone)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ldm.data.transforms import Size
from ldm.diffusion import BUCKET_STREAM, mix_seed
from ldm.errors import ConfigError


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
