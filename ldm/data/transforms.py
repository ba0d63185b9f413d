"""A decoded picture to pixel_values: resize, crop (centre or random), flip, [-1, 1]; the caption chosen per use.
Every random decision is keyed by (seed, stream position)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.config.data import DataConfig
from ldm.data.decode import Caption, caption_variants, to_rgb
from ldm.diffusion import AUGMENT_STREAM, CAPTION_STREAM, sample_generator

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
