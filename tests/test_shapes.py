"""The shapes world: reproducible, balanced, and a checker strict enough to catch near-misses."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm.shapes import COLOURS, POSITIONS, SHAPES, ShapesDataset, ShapeSpec, all_specs, read_image, score


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_reads_every_rendered_combination(resolution):
    data = ShapesDataset(2 * len(all_specs()), resolution, seed=5)
    readings = [read_image(data[i]["image"]) for i in range(len(data))]
    scores = score(readings, [data.spec(i) for i in range(len(data))])
    assert scores == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0, "n": len(data)}


def test_dataset_is_reproducible_and_balanced():
    a, b = ShapesDataset(432, 32, seed=1), ShapesDataset(432, 32, seed=1)
    assert np.array_equal(np.asarray(a[17]["image"]), np.asarray(b[17]["image"]))
    assert not np.array_equal(np.asarray(a[17]["image"]), np.asarray(ShapesDataset(432, 32, seed=2)[17]["image"]))
    captions = [a[i]["text"] for i in range(432)]
    assert len(set(captions)) == len(COLOURS) * len(SHAPES) * len(POSITIONS) == 216
    assert all(captions.count(c) == 2 for c in set(captions))
    assert a[0]["text"] == "a red circle in the top left corner"
    assert ShapeSpec("orange", "cross", "right").caption == "an orange cross on the right"


def _rounded_square(radius_fraction: float, colour=(220, 40, 40), offset: int = 42) -> Image.Image:
    big = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(big).rounded_rectangle([offset, offset, offset + 44, offset + 44],
                                          radius=int(44 * radius_fraction), fill=colour)
    return big.resize((32, 32), Image.BOX)


@pytest.mark.parametrize("offset", [40, 41, 42, 43])  # every quarter-pixel alignment at 32 px
def test_a_rounded_square_is_not_a_circle(offset):
    # Corners rounded by up to 30 % of the side still read as a square; from 35 % on, as a circle
    # (the IoUs with the two templates cross at 36 % in theory).
    assert [read_image(_rounded_square(r, offset=offset)).shape for r in (0.15, 0.25, 0.3)] == ["square"] * 3
    assert [read_image(_rounded_square(r, offset=offset)).shape for r in (0.35, 0.5)] == ["circle"] * 2


def test_colour_between_orange_and_yellow_is_not_both():
    orange, yellow = np.array(COLOURS["orange"]), np.array(COLOURS["yellow"])
    drifted = tuple(int(v) for v in (0.35 * orange + 0.65 * yellow))
    reading = read_image(_rounded_square(0.0, drifted))
    assert reading.colour == "yellow"


def test_blank_or_noisy_images_read_as_nothing():
    assert read_image(Image.new("RGB", (32, 32), "white")).shape is None
    assert score([read_image(Image.new("RGB", (32, 32), "white"))], [ShapeSpec("red", "circle", "top")])["all"] == 0


def test_excluding_combinations():
    held = [ShapeSpec("red", "circle", p) for p in POSITIONS]
    data = ShapesDataset(500, 32, exclude=held)
    assert not any(data.spec(i) in held for i in range(500))
    with pytest.raises(ValueError, match="excluded"):
        ShapesDataset(10, 32, exclude=all_specs())


def test_holdout_entries_and_their_errors():
    from ldm.config.loading import load_config
    from ldm.errors import ConfigError
    from ldm.shapes import parse_holdout

    held = parse_holdout(["red triangle *", "green * bottom left"])
    assert len(held) == 9 + 4
    assert ShapeSpec("red", "triangle", "top") in held and ShapeSpec("green", "cross", "bottom left") in held
    assert ShapeSpec("green", "cross", "bottom") not in held
    with pytest.raises(ConfigError, match="unknown colour 'teal'; valid: red, orange"):
        load_config(None, ["data.shapes.holdout=['teal circle *']"])
    with pytest.raises(ConfigError, match="unknown position 'middle'"):
        load_config(None, ["data.shapes.holdout=['red circle middle']"])
    from ldm.data.sources import open_source

    cfg = load_config(None, ["data.shapes.holdout=['red triangle *']", "data.resolution=16",
                             "data.shapes.num_images=400"])
    source = open_source(cfg.data)
    captions = {source.get(i)[1] for i in range(len(source))}
    assert len(captions) == 216 - 9 and not any(c.startswith("a red triangle") for c in captions)


def test_probe_scores_split_seen_and_held_out():
    from ldm.evaluation.probes import ProbeResult, split_scores
    from ldm.shapes import Reading

    specs = [ShapeSpec("red", "circle", "top"), ShapeSpec("red", "triangle", "top"), ShapeSpec("blue", "cross", "left")]
    readings = [Reading("red", "circle", "top", 1.0), Reading("red", "square", "top", 1.0),
                Reading("blue", "cross", "left", 1.0)]
    out = split_scores(ProbeResult({}, specs, readings, []), [specs[1]])
    assert out["seen"]["all"] == 1.0 and out["seen"]["n"] == 2
    assert out["held_out"] == {"colour": 1.0, "shape": 0.0, "position": 1.0, "all": 0.0, "n": 1}
    assert set(split_scores(ProbeResult({}, specs, readings, []), [])) == {"seen"}


def test_focus_interleaves_a_fixed_fraction_of_the_focus_combinations():
    from collections import Counter

    from ldm.shapes import ShapesDataset, parse_holdout

    data = ShapesDataset(720, 32, focus=parse_holdout(["purple * *"]), focus_fraction=0.5,
                         exclude=parse_holdout(["red cross *"]))
    specs = [data.spec(i) for i in range(720)]
    colours = Counter(s.colour for s in specs)
    assert colours["purple"] == 360 and all(s.colour == "purple" for s in specs[1::2])  # every second picture
    assert Counter(s for s in specs if s.colour == "purple").most_common()[-1][1] == 10  # 36 combinations × 10
    assert not any(s.colour == "red" and s.shape == "cross" for s in specs)  # held out stays out
    assert len({s for s in specs if s.colour != "purple"}) == 216 - 36 - 9  # the replay covers every other one
    with pytest.raises(ValueError, match="every focus combination is held out"):
        ShapesDataset(10, 32, focus=parse_holdout(["red cross *"]), exclude=parse_holdout(["red * *"]))
