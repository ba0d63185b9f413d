"""Image transforms and the replayable sample stream.

A *source* (`ldm.data.sources`) maps an index to (image, caption). The *stream* maps a position in the endless training
stream to a source index: epoch e = position // N uses the permutation drawn from (seed, e), so the
data order is a pure function of the seed and can be replayed from any position. A *batch sampler*
hands each process its slice of every global batch.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from ldm.config.data import DataConfig
from ldm.data.audit import record_after_audit
from ldm.data.buckets import BucketPlan, bucket_sizes, plan_buckets
from ldm.data.decode import BadSample, Caption, caption_variants, to_rgb
from ldm.data.sources import Source
from ldm.data.transforms import Size, caption_for, prepare_sample
from ldm.diffusion import AUGMENT_STREAM, mix_seed, sample_generator
from ldm.errors import ConfigError

logger = logging.getLogger(__name__)


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
