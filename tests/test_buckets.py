"""Real datasets: aspect-ratio buckets, caption files beside the images, caption lists and tag shuffling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_overrides, write_config
from helpers import kill_resume_and_compare, max_diff, samples_of, train_on_two_processes
from ldm.config.data import DataConfig
from ldm.config.loading import load_config
from ldm.data.audit import audit
from ldm.data.buckets import BucketPlan, bucket_sizes, nearest_bucket, plan_buckets
from ldm.data.sources import FolderSource
from ldm.data.stream import SampleStream
from ldm.data.transforms import caption_for
from ldm.errors import ConfigError

# A folder "someone else" captioned kohya-style: portrait, landscape, square, tiny and extreme pictures, each
# with a same-named .txt. At 32 px with 8 px steps the buckets are 24×40, 32×32 and 40×24.
SIZES = {"land": [(40, 24), (50, 30), (64, 16), (45, 27), (80, 48), (41, 25), (60, 36)],
         "square": [(32, 32), (30, 34), (10, 12), (33, 31), (64, 64), (29, 29)],
         "portrait": [(24, 40)]}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def write_captioned_folder(root: Path, sizes: dict = SIZES) -> Path:
    rng = np.random.default_rng(0)
    for kind, shapes in sizes.items():
        for i, (w, h) in enumerate(shapes):
            colour = list(COLOURS)[i % 3]
            pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            sub = root / kind
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(sub / f"{i:02d}.png")
            (sub / f"{i:02d}.txt").write_text(f"a {colour} {kind} picture, noisy, flat\n", encoding="utf-8")
    return root


def bucket_overrides(tiny: dict, folder: Path, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(tiny, out) + [f"data.dataset={folder}", "data.resolution=32", "data.buckets.enabled=true",
                                        "data.buckets.step=8", "train.record_samples=true", *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_captioned_folder(tmp_path_factory.mktemp("captioned"))


# --------------------------------------------------------------------------------------------
# The plan, as pure functions
# --------------------------------------------------------------------------------------------


def test_bucket_sizes_hold_the_area_the_step_and_the_ratio():
    sizes = bucket_sizes(512, 64, 256, 1024, 2.0)
    assert (512, 512) in sizes and (768, 320) not in sizes  # 2.4:1 is past the ratio
    assert {(640, 384), (384, 640), (704, 320)} & set(sizes) == {(640, 384), (384, 640)}
    for w, h in sizes:
        assert w % 64 == h % 64 == 0 and w * h <= 512 * 512 and max(w, h) <= 2 * min(w, h)
        assert (h, w) in sizes  # portrait and landscape alike
        assert w * h > (512 * 512) * 0.7  # about resolution² each: no tiny bucket
    with pytest.raises(ConfigError, match="data.buckets: no bucket size fits"):
        bucket_sizes(32, 64, 16, 64, 2.0)


def test_nearest_bucket_by_aspect_ratio_and_no_upscale():
    sizes = bucket_sizes(32, 8, 16, 64, 2.0)
    assert sizes == [(24, 40), (32, 32), (40, 24)]
    assert nearest_bucket((400, 240), sizes) == (40, 24)
    assert nearest_bucket((64, 16), sizes) == (40, 24)  # extreme: the widest bucket there is
    assert nearest_bucket((300, 310), sizes) == (32, 32)
    # A picture smaller than its bucket: enlarged by default, kept at its own size (to the step) otherwise.
    assert nearest_bucket((20, 12), sizes) == (40, 24)
    assert nearest_bucket((20, 12), sizes, no_upscale=True, step=8) == (16, 8)
    assert nearest_bucket((36, 36), sizes, no_upscale=True, step=8) == (32, 32)


def test_small_buckets_merge_and_nothing_is_dropped():
    sizes = bucket_sizes(32, 8, 16, 64, 2.0)
    images = [(40, 24)] * 5 + [(32, 32)] * 4 + [(24, 40)]  # the portrait bucket holds one image
    plan = plan_buckets(images, sizes, batch=4, seed=0, min_images=4)
    assert plan.histogram() == {"32x32": 5, "40x24": 5} and plan.merged == {"24x40": "32x32"}
    assert sorted(i for m in plan.members for i in m) == list(range(10))
    # min_images 1: the one-image bucket is kept and trains (its batch repeats it).
    alone = plan_buckets(images, sizes, batch=4, seed=0, min_images=1)
    assert alone.histogram() == {"24x40": 1, "32x32": 4, "40x24": 5}
    portrait = [b for b, idx in alone.epoch(0) if alone.sizes[b] == (24, 40)]
    assert len(portrait) == 1 and dict(alone.epoch(0))[portrait[0]] == [9, 9, 9, 9]
    # Merging never enlarges a picture when no_upscale says so: a small odd bucket then stays.
    small = plan_buckets([(40, 24)] * 4 + [(18, 30)], sizes, batch=4, seed=0, min_images=4, no_upscale=True, step=8)
    assert small.histogram() == {"16x24": 1, "40x24": 4}


def test_epoch_order_is_a_function_of_seed_and_epoch():
    sizes = bucket_sizes(32, 8, 16, 64, 2.0)
    images = [(40, 24)] * 7 + [(32, 32)] * 6 + [(24, 40)] * 5
    plan = plan_buckets(images, sizes, batch=4, seed=3, min_images=4)
    again = plan_buckets(images, sizes, batch=4, seed=3, min_images=4)
    assert plan.batches_per_epoch == 2 + 2 + 2
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert batches == again.epoch(epoch)
        assert len(batches) == plan.batches_per_epoch
        for bucket, indices in batches:  # one bucket per batch, every image of the bucket in every epoch
            assert set(indices) <= set(plan.members[bucket]) and len(indices) == 4
        assert {i for _, idx in batches for i in idx} == set(range(18))
    assert plan.epoch(0) != plan.epoch(1)
    assert plan.epoch(0) != plan_buckets(images, sizes, batch=4, seed=4, min_images=4).epoch(0)
    # Positions map to global micro-batches: position p is slot p % 4 of batch p // 4.
    assert [plan.locate(p)[1] for p in range(8, 12)] == plan.epoch(0)[2][1]
    assert plan.locate(4 * 6 + 1) == (plan.epoch(1)[0][0], plan.epoch(1)[0][1][1])
    assert isinstance(plan, BucketPlan)


def test_caption_lists_and_tag_shuffling_replay_by_position():
    caption = ("a cat", "a small cat", "a cat on a mat")
    picks = [caption_for(caption, 0, p) for p in range(60)]
    assert set(picks) == set(caption) and picks == [caption_for(caption, 0, p) for p in range(60)]
    assert caption_for("only one", 0, 5) == "only one"
    tags = "sks dog, outdoors, grass, sunny, red collar, running"
    shuffled = [caption_for(tags, 1, p, shuffle_tags=True, keep_tags=1) for p in range(40)]
    assert all(s.startswith("sks dog, ") for s in shuffled) and len(set(shuffled)) > 10
    assert all(sorted(s.split(", ")) == sorted(tags.split(", ")) for s in shuffled)
    assert shuffled == [caption_for(tags, 1, p, shuffle_tags=True, keep_tags=1) for p in range(40)]


# --------------------------------------------------------------------------------------------
# Caption files
# --------------------------------------------------------------------------------------------


def test_caption_files_are_read_beside_their_images(tmp_path):
    root = write_captioned_folder(tmp_path / "f", {"a": [(20, 20), (30, 20), (20, 30)]})
    (root / "a" / "01.txt").unlink()
    (root / "a" / "01.caption").write_text("from a .caption file")
    (root / "a" / "02.txt").write_text("first way to say it\n\nsecond way to say it\n")
    Image.new("RGB", (20, 20)).save(root / "a" / "03.png")  # no caption file: counted, not silently dropped
    Image.new("RGB", (20, 20)).save(root / "a" / "04.png")
    (root / "a" / "04.txt").write_bytes(b"caf\xe9")  # not UTF-8
    source = FolderSource(root, "text")
    assert [source.name(i) for i in range(len(source))] == [f"a/0{i}.png" for i in range(5)]
    assert source.caption(0) == "a red a picture, noisy, flat"
    assert source.caption(1) == "from a .caption file"
    assert source.caption(2) == ("first way to say it", "second way to say it")
    report = audit(source, DataConfig(resolution=16, max_bad_fraction=0.5))
    assert report.kept == [0, 1, 2] and report.sizes == [(20, 20), (30, 20), (20, 30)]
    assert report.skipped == {"missing caption": 1, "caption file is not UTF-8 text": 1}
    assert report.converted["caption list: one entry chosen per use"] == 1


def test_a_folder_without_metadata_or_caption_files_names_both_ways(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"no metadata.jsonl or metadata.csv and no caption files.*\.txt"):
        FolderSource(tmp_path, "text")


def test_config_refuses_a_cached_run_with_shuffled_tags(tmp_path):
    with pytest.raises(ConfigError, match="data.shuffle_tags"):
        load_config(None, ["data.cache=true", "data.shuffle_tags=true"])
    with pytest.raises(ConfigError, match="data.buckets.step"):
        load_config(None, ["data.buckets.step=0"])


# --------------------------------------------------------------------------------------------
# Training with buckets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucketed(tiny, folder, tmp_path_factory) -> dict:
    """One uncached 6-step run on the mixed folder, with the latent shape of every micro-batch recorded."""
    import ldm.training.loop

    out = tmp_path_factory.mktemp("bucketed")
    shapes: list[tuple[int, ...]] = []
    inner = ldm.training.loop.train_step

    def recording(trainable, model, scheduler, latents, *args, **kwargs):
        shapes.append(tuple(latents.shape))
        return inner(trainable, model, scheduler, latents, *args, **kwargs)

    ldm.training.loop.train_step = recording
    try:
        export = ldm.training.loop.train(load_config(None, bucket_overrides(
            tiny, folder, out, "train.max_steps=6", "train.checkpoint_every=6", "train.validate_every=3",
            "train.adam_epsilon=1e-4")), show_progress=False)
    finally:
        ldm.training.loop.train_step = inner
    return {"out": out, "export": export, "shapes": shapes}


def test_every_batch_has_one_shape_from_the_plan(bucketed):
    out = bucketed["out"]
    report = json.loads((out / "data_audit.json").read_text())
    assert report["usable"] == 14
    b = report["buckets"]
    assert b["histogram"] == {"32x32": 7, "40x24": 7} and b["merged"] == {"24x40": "32x32"}
    assert b["global_micro_batch"] == 4 and b["batches_per_epoch"] == 4
    # f = 2: a 40×24 picture is a (4, 12, 20) latent. Both buckets were met, nothing else.
    assert set(bucketed["shapes"]) == {(4, 4, 16, 16), (4, 4, 12, 20)}
    # The first epoch (4 batches) met every image, the portrait one included (merged, never dropped).
    seen = {i for step in range(1, 5) for idx in samples_of(out)[step] for i in idx}
    assert seen == set(range(14))
    grids = sorted(p.name for p in (out / "validation").glob("step_000003*.png"))
    assert grids == ["step_000003.png", "step_000003_40x24.png"]


def test_a_bucketed_model_generates_non_square_through_plain_diffusers(bucketed):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from ldm.inference.generate import generate

    pipe = DiffusionPipeline.from_pretrained(bucketed["export"])
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    plain = pipe("a red land picture", height=24, width=40, num_inference_steps=3, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert plain.shape == (24, 40, 3)
    ours = generate(bucketed["export"], ["a red land picture"], height=24, width=40, num_inference_steps=3,
                    guidance_scale=3.0, seed=7, sampler="dpm++")[0].image
    assert ours.size == (40, 24)
    assert np.abs(np.asarray(ours, dtype=np.float64) / 255 - np.round(plain * 255) / 255).max() <= 1e-5
    card = (Path(bucketed["export"]) / "README.md").read_text()
    assert "aspect-ratio buckets of about 32×32 px" in card


def test_cached_buckets_match_on_the_fly_and_rebuild_when_the_plan_changes(tiny, folder, tmp_path, bucketed):
    from ldm.training.loop import train

    cache = tmp_path / "cache"
    run = bucket_overrides(tiny, folder, tmp_path / "cached", "train.max_steps=6", "train.checkpoint_every=6",
                           "train.adam_epsilon=1e-4", "data.cache=true", f"data.cache_dir={cache}")
    train(load_config(None, run), show_progress=False)
    a = load_file(str(tmp_path / "cached" / "checkpoints" / "step_000006" / "unet.safetensors"))
    b = load_file(str(bucketed["out"] / "checkpoints" / "step_000006" / "unet.safetensors"))
    assert max_diff(a, b) <= 1e-5  # the same draws, from cached latent distributions

    def keys() -> list[str]:
        from ldm.data.cache import mmap_safetensors

        shards = cache.glob("latents-*/shard-*.safetensors")
        return [k for p in shards for k in json.loads(mmap_safetensors(p)[1]["keys"])]

    first = keys()
    assert len(first) == 14 and sum(k.endswith(":40x24:flip=0") for k in first) == 7
    # Square buckets only: the seven landscape pictures move, are encoded at 32×32; the rest is reused.
    train(load_config(None, run + [f"train.output_dir={tmp_path / 'square'}", "data.buckets.max_aspect_ratio=1.0"]),
          show_progress=False)
    second = keys()
    assert len(second) == 21 and sum(k.endswith(":32x32:flip=0") for k in second) == 14


@pytest.mark.slow
def test_buckets_two_processes_match_one_and_resume_exactly(tiny, folder, tmp_path):
    from ldm.training.loop import train

    common = lambda out, *x: bucket_overrides(tiny, folder, out, "train.max_steps=3", "train.checkpoint_every=3",  # noqa: E731
                                              "train.adam_epsilon=1e-4", *x)
    train_on_two_processes(write_config(tmp_path / "two.yaml", common(tmp_path / "two", "train.batch_size=2")))
    train(load_config(None, common(tmp_path / "one", "train.batch_size=4")), show_progress=False)
    a, b = (tmp_path / n / "checkpoints" / "step_000003" / "unet.safetensors" for n in ("two", "one"))
    assert max_diff(load_file(str(a)), load_file(str(b))) <= 1e-6
    two_audit, one_audit = (json.loads((tmp_path / n / "data_audit.json").read_text()) for n in ("two", "one"))
    assert two_audit["buckets"] == one_audit["buckets"]
    r0, r1, one = samples_of(tmp_path / "two", 0), samples_of(tmp_path / "two", 1), samples_of(tmp_path / "one")
    for step in (1, 2, 3):
        assert r0[step][0] + r1[step][0] == one[step][0]
    # SIGKILL mid-run, resume: the same weights as the uninterrupted run (the bucket order replays).
    (tmp_path / "kill").mkdir()
    kill_resume_and_compare(tmp_path / "kill", lambda out: bucket_overrides(
        tiny, folder, out, "train.max_steps=6", "train.checkpoint_every=2", "train.ema_decay=0.9"),
        ("unet.safetensors", "ema.safetensors"))


def test_stream_serves_bucket_sizes(folder):
    from ldm.data.audit import open_audited

    cfg = load_config(None, [f"data.dataset={folder}", "data.resolution=32", "data.buckets.enabled=true"]).data
    stream = SampleStream(open_audited(cfg), cfg, seed=0)
    stream.plan_buckets(4, 8)
    for p in range(16):
        item = stream[p]
        w, h = stream.size_at(p)
        assert item["pixel_values"].shape == (3, h, w)
        left, top, right, bottom = item["crop_box"].tolist()
        assert (right - left, bottom - top) == (w, h)
