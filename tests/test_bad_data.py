"""Bad data never crashes a run and is never silently dropped: a corpus of every kind, planted and counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from ldm.config.loading import load_config
from ldm.errors import ConfigError
from ldm.shapes import ShapesDataset

GOOD = 60


def _plant(folder: Path, outside: Path) -> tuple[list[dict], dict, dict]:
    """Write good images plus one case of every bad kind; return rows and the expected counts."""
    rows: list[dict] = []
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    shapes = ShapesDataset(GOOD, 24, seed=9)
    for i in range(GOOD):
        shapes[i]["image"].save(folder / f"good_{i}.png")
        rows.append({"file_name": f"good_{i}.png", "text": shapes[i]["text"]})

    def skip(kind: str, row: dict) -> None:
        rows.append(row)
        skipped[kind] = skipped.get(kind, 0) + 1

    def convert(kinds: list[str], name: str, caption: object = "a red circle") -> None:
        rows.append({"file_name": name, "text": caption})
        for kind in kinds:
            converted[kind] = converted.get(kind, 0) + 1

    rgb = Image.new("RGB", (24, 24), (200, 40, 40))
    png = folder / "good_0.png"
    # --- skipped: files
    (folder / "empty.png").write_bytes(b"")
    skip("empty file", {"file_name": "empty.png", "text": "x"})
    (folder / "truncated.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    skip("truncated image", {"file_name": "truncated.png", "text": "x"})
    (folder / "noise.png").write_bytes(os.urandom(500))
    skip("not an image or corrupt", {"file_name": "noise.png", "text": "x"})
    (folder / "notes.jpg").write_text("this is not a picture")
    skip("not an image or corrupt", {"file_name": "notes.jpg", "text": "x"})
    skip("missing file", {"file_name": "nowhere.png", "text": "x"})
    rgb.save(outside / "outside.png")
    skip("path escapes the dataset folder", {"file_name": "../outside/outside.png", "text": "x"})
    skip("absolute path in file_name", {"file_name": str(outside / "outside.png"), "text": "x"})
    os.symlink(outside / "outside.png", folder / "link.png")
    skip("path escapes the dataset folder", {"file_name": "link.png", "text": "x"})
    skip("missing file_name", {"file_name": None, "text": "x"})
    Image.new("RGB", (2, 2), "red").save(folder / "tiny.png")
    skip("image smaller than 4 px", {"file_name": "tiny.png", "text": "x"})
    Image.new("RGB", (200, 10), "red").save(folder / "strip.png")
    skip("aspect ratio above 4", {"file_name": "strip.png", "text": "x"})
    Image.new("1", (10_000, 9_000)).save(folder / "bomb.png")  # 90M pixels: over PIL's bomb limit
    skip("decompression bomb (too many pixels)", {"file_name": "bomb.png", "text": "x"})
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    skip("symlink loop", {"file_name": "loop_a.png", "text": "x"})
    skip("NUL byte in file_name", {"file_name": "good_0.png\u0000.png", "text": "x"})
    skip("file_name too long", {"file_name": "x" * 300 + ".png", "text": "x"})
    # --- skipped: captions
    skip("caption is not valid Unicode (a lone surrogate)", {"file_name": "good_9.png", "text": "a red \ud800 circle"})
    skip("caption has no visible characters", {"file_name": "good_10.png", "text": "\u200b\u2060\ufeff"})
    skip("missing caption", {"file_name": "good_1.png"})
    skip("missing caption", {"file_name": "good_2.png", "text": None})
    skip("empty caption", {"file_name": "good_3.png", "text": ""})
    skip("empty caption", {"file_name": "good_4.png", "text": "   \t"})
    skip("unusable caption type", {"file_name": "good_5.png", "text": {"caption": "nested"}})
    # --- converted: image modes, orientation, animation
    for mode in ("RGBA", "LA", "P", "L", "CMYK", "1"):
        ext = "jpg" if mode == "CMYK" else "png"
        rgb.convert(mode).save(folder / f"mode_{mode}.{ext}")
        convert([f"image mode {mode} converted to RGB"], f"mode_{mode}.{ext}")
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(folder / "mode_I16.png")
    convert(["16-bit image scaled to 8 bits (÷ 257)"], "mode_I16.png")
    Image.fromarray(np.full((24, 24), 0.25, np.float32)).save(folder / "float.tiff")
    convert(["float image read as [0, 1] and converted to 8-bit RGB"], "float.tiff")
    Image.fromarray(np.full((24, 24), -3.0, np.float32)).save(folder / "negative.tiff")
    skip("F pixels outside the displayable range", {"file_name": "negative.tiff", "text": "x"})
    transparent = Image.new("RGBA", (24, 24), (0, 0, 0, 0)).convert("P")
    transparent.info["transparency"] = 0
    transparent.save(folder / "mode_P_transparent.png", transparency=0)
    convert(["image mode P converted to RGB"], "mode_P_transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    Image.new("RGB", (24, 30), "blue").save(folder / "rotated.jpg", exif=exif)
    convert(["EXIF orientation applied"], "rotated.jpg")
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    convert(["animated image: first frame used", "image mode P converted to RGB"], "anim.gif")
    # --- converted: captions
    convert(["non-string caption converted to text"], "good_6.png", caption=7)
    convert(["caption list: one entry chosen per use"], "good_7.png", caption=["a blue square", "a square"])
    convert(["caption longer than 12 tokens: truncated"], "good_8.png",
            caption="a very long caption " * 10)
    return rows, skipped, converted


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict, dict]:
    folder, outside = tmp_path / "corpus", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    rows, skipped, converted = _plant(folder, outside)
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, '{"file_name": "broken.png", "text": ')  # a malformed metadata line
    skipped["unreadable metadata line (not JSON)"] = 1
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder, skipped, converted


def test_every_kind_is_counted_and_training_finishes(tiny, tmp_path, corpus):
    folder, skipped, converted = corpus
    assert len(skipped) + len(converted) >= 20
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny, out) + [
        f"data.dataset={folder}", "data.max_bad_fraction=0.3", "train.max_steps=3", "train.batch_size=8"])
    from ldm.training.loop import train

    train(cfg, show_progress=False)
    report = json.loads((out / "data_audit.json").read_text())
    assert report["skipped"] == skipped
    assert report["converted"] == converted
    planted = sum(skipped.values())
    assert report["total"] == GOOD + 37 + 1 and report["usable"] == report["total"] - planted  # 37 rows, 1 broken line
    assert report["examples"]["path escapes the dataset folder"] == ["../outside/outside.png", "link.png"]
    assert (out / "pipeline" / "model_index.json").is_file()


def test_too_much_bad_data_stops_before_training_and_lists_files(tiny, tmp_path, corpus):
    folder, _, _ = corpus
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [f"data.dataset={folder}"])
    from ldm.training.loop import train

    with pytest.raises(ConfigError) as err:
        train(cfg, show_progress=False)
    text = str(err.value)
    assert "more than data.max_bad_fraction=0.05" in text and "empty.png" in text and "truncated.png" in text
    assert not (tmp_path / "run" / "pipeline").exists()


def test_a_file_that_breaks_after_the_audit_is_replaced_not_fatal(tmp_path, caplog):
    from ldm.data.audit import open_audited
    from ldm.data.stream import SampleStream
    from ldm.shapes import write_imagefolder

    folder = write_imagefolder(tmp_path / "f", 6, 16)
    cfg = load_config(None, [f"data.dataset={folder}", "data.resolution=16"])
    stream = SampleStream(open_audited(cfg.data), cfg.data, seed=0)
    position = 2
    broken = stream.index_of(position)
    (folder / "images" / f"{broken:06d}.png").write_bytes(b"")  # zero bytes now
    item = stream[position]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert "empty file" in caplog.text and "using the next sample" in caplog.text
    assert stream[position]["caption"] == item["caption"]  # the replacement is deterministic
