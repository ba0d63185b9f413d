"""Data: an imagefolder someone else wrote, every image mode to RGB, crops, and the replayable stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.config.loading import load_config
from ldm.data.decode import to_rgb
from ldm.data.sources import open_source
from ldm.data.stream import SampleStream
from ldm.data.transforms import prepare_image


def test_imagefolder_with_custom_caption_column(write_imagefolder):
    folder = write_imagefolder(n=6, caption_column="caption", size=24)
    cfg = load_config(None, [f"data.dataset={folder}", "data.caption_column=caption", "data.resolution=16"])
    source = open_source(cfg.data)
    assert len(source) == 6
    image, caption = source.get(2)
    assert image.size == (24, 24) and caption.startswith("a ")
    item = SampleStream(source, cfg.data, seed=0)[3]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0


def test_imagefolder_without_metadata_is_rejected(tmp_path):
    from ldm.errors import ConfigError

    (tmp_path / "a.png").write_bytes(b"")
    cfg = load_config(None, [f"data.dataset={tmp_path}"])
    with pytest.raises(ConfigError, match="metadata.jsonl"):
        open_source(cfg.data)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "1"])
def test_every_image_mode_becomes_rgb(mode):
    base = Image.new("RGB", (8, 8), (200, 30, 30))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((8, 8), 40000, np.uint16))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(to_rgb(image))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[2, 2]) == (255, 255, 255)


def test_resize_crop_and_flip():
    image = Image.new("RGB", (40, 20), "white")
    image.paste((0, 0, 0), (0, 0, 10, 20))  # black stripe on the left
    cfg = load_config(None, ["data.resolution=10", "data.center_crop=false", "data.random_flip=true"])
    outs = {tuple(prepare_image(image, cfg.data, torch.Generator().manual_seed(s))[0, 5].tolist()) for s in range(20)}
    assert len(outs) > 2  # random crops and flips differ
    centre = load_config(None, ["data.resolution=10"])
    x = prepare_image(image, centre.data)
    assert x.shape == (3, 10, 10)
    assert torch.equal(x, prepare_image(image, centre.data))


def test_stream_order_is_a_function_of_seed_and_epoch():
    cfg = load_config(None, ["data.shapes.num_images=10", "data.resolution=16"])
    source = open_source(cfg.data)
    s1, s2 = SampleStream(source, cfg.data, seed=3), SampleStream(source, cfg.data, seed=3)
    epoch0 = [s1.index_of(p) for p in range(10)]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
    assert [s2.index_of(p) for p in range(10, 20)] == [s1.index_of(p) for p in range(10, 20)]
    assert [s1.index_of(p) for p in range(10, 20)] != epoch0
