"""Bad input and bad situations, by class: each test builds the situation a user meets and asserts the exact
outcome (the message names the file or key and the fix; what is skipped is counted; nothing is deleted or
overwritten). Data-file cases beyond these live in test_bad_data.py, the decoder fuzz in test_fuzz.py, the
scripts' exit status in test_scripts.py.

    1 uploads · 2 output folders · 3 resume · 4 files that break after the audit · 5 pixels · 6 metadata
    7 config · 8 (scripts: test_scripts.py)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import tiny_overrides
from ldm.config.loading import load_config
from ldm.errors import ConfigError


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory) -> Path:
    """A finished tiny run (2 steps, checkpoints at 1 and 2): its output folder."""
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("hardening") / "run"
    train(load_config(None, tiny_overrides(tiny, out) + ["train.checkpoint_every=1"]), show_progress=False)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# --------------------------------------------------------------------------------------------
# 1. Uploads: no training state leaves the machine, no local path either
# --------------------------------------------------------------------------------------------


def test_every_checkpoint_file_planted_at_every_level_stays_off_the_upload_plan(run, tmp_path):
    from ldm.interop.hub import upload_plan

    pipeline = _copy_run(run, tmp_path) / "pipeline"
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    written = sorted(p.name for p in checkpoint.iterdir())  # what the checkpoint code really writes
    assert {"unet.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_rank0.safetensors",
            "state.json", "config.yaml"} <= set(written)
    extra = ["controlnet.safetensors", "style_adapter.safetensors", "lora.safetensors"]  # the other trainables'
    levels = ["."] + sorted(str(p.relative_to(pipeline)) for p in pipeline.rglob("*") if p.is_dir())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(levels)
    planted = set()
    for level in levels:
        for name in written + extra:
            target = pipeline / level / name
            source = checkpoint / name if (checkpoint / name).is_file() else checkpoint / "unet.safetensors"
            shutil.copy(source, target)
            planted.add((Path(level) / name).as_posix())
    shutil.copytree(checkpoint, pipeline / "checkpoints" / checkpoint.name)  # a whole checkpoint copied in
    files, refused = upload_plan(pipeline)
    assert not planted & set(files), planted & set(files)
    assert planted <= set(refused)
    assert not [f for f in files if f.startswith("checkpoints/")]
    assert "unet/diffusion_pytorch_model.safetensors" in files and "text_encoder/model.safetensors" in files


def test_publish_refuses_a_checkpoint_and_a_run_folder(run):
    from ldm.interop.hub import publish

    with pytest.raises(ConfigError, match="training checkpoint: publish the run's pipeline/ or lora/"):
        publish(sorted((run / "checkpoints").iterdir())[-1], "me/model", api=object())
    with pytest.raises(ConfigError, match="is not an exported pipeline folder"):
        publish(run, "me/model", api=object())


def test_no_absolute_local_path_reaches_an_uploaded_file(run, tmp_path):
    from ldm.interop.hub import publish
    from ldm.interop.model_card import write_model_card

    pipeline = _copy_run(run, tmp_path) / "pipeline"
    cfg = load_config(pipeline / "ldm_config.yaml")
    write_model_card(pipeline, cfg, "me/model")
    seen: dict[str, str] = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, folder_path, allow_patterns, **kwargs):
            for name in allow_patterns:
                if name.endswith((".json", ".yaml", ".md", ".txt")):
                    seen[name] = (Path(folder_path) / name).read_text()

    result = publish(pipeline, "me/model", api=Api(), log=lambda m: None)
    assert result.ok and {"README.md", "ldm_config.yaml", "unet/config.json", "vae/config.json"} <= seen.keys()
    roots = {str(tmp_path), str(run.parent), str(Path.home()), "/tmp/"}
    leaks = {name: root for name, text in seen.items() for root in roots if root in text}
    assert not leaks
    uploaded = load_config_text(seen["ldm_config.yaml"], tmp_path)
    assert uploaded.model.vae.path.startswith("<local>/") and uploaded.train.output_dir == "<local>/run"
    assert load_config(pipeline / "ldm_config.yaml").model.vae.path == cfg.model.vae.path  # the local file keeps it
    assert not list(tmp_path.glob(".*upload"))  # the staging folder is gone


def load_config_text(text: str, tmp_path: Path):
    path = tmp_path / "uploaded.yaml"
    path.write_text(text)
    return load_config(path)


def test_a_hand_written_or_edited_card_is_kept_and_ldms_own_is_regenerated(run, tmp_path, capsys):
    from ldm.interop.model_card import write_model_card

    pipeline = _copy_run(run, tmp_path) / "pipeline"
    cfg = load_config(pipeline / "ldm_config.yaml")
    card = pipeline / "README.md"
    write_model_card(pipeline, cfg, "me/model")  # unedited ldm card: regenerated freely
    assert "me/model" in card.read_text()
    card.write_text(card.read_text().replace("license: other", "license: cc-by-4.0"))  # an edit
    write_model_card(pipeline, cfg, "me/other")
    assert "cc-by-4.0" in card.read_text() and "me/other" not in card.read_text()
    assert "keeping" in capsys.readouterr().out
    card.write_text("# My model\nlicense: mine\n")  # written by hand
    write_model_card(pipeline, cfg, "me/other")
    assert card.read_text() == "# My model\nlicense: mine\n"
    write_model_card(pipeline, cfg, "me/other", replace_edited=True)
    assert "me/other" in card.read_text()


# --------------------------------------------------------------------------------------------
# 2. Output folders: a run never destroys another
# --------------------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_folder_stops_before_training_and_touches_nothing(tiny, run, tmp_path, monkeypatch):
    import ldm.training.loop
    import ldm.training.setup
    from ldm.training.loop import train

    out = _copy_run(run, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(ldm.training.setup, "open_audited", lambda *a, **k: pytest.fail("data was opened"))
    with pytest.raises(ConfigError) as err:
        train(load_config(None, tiny_overrides(tiny, out) + ["train.seed=5"]), show_progress=False)
    text = str(err.value)
    assert str(out) in text and "checkpoints/step_000002" in text and "pipeline/" in text
    assert "train.resume=latest" in text and "train.overwrite_output_dir=true" in text
    assert _snapshot(out) == before


def test_overwrite_output_dir_clears_only_what_ldm_wrote(tiny, run, tmp_path):
    from ldm.training.checkpoint import complete_checkpoints
    from ldm.training.loop import train

    out = _copy_run(run, tmp_path)
    (out / "my_notes.txt").write_text("mine")
    old = json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())["step"]
    overrides = ["train.overwrite_output_dir=true", "train.max_steps=1", "train.checkpoint_every=1",
                 "train.checkpoints_total_limit=1"]
    train(load_config(None, tiny_overrides(tiny, out) + overrides), show_progress=False)
    assert old == 2 and [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_000001"]
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "pipeline" / "model_index.json").is_file()


def test_fine_tuning_a_pipeline_into_its_own_run_folder_is_refused_even_with_overwrite(tiny, run, tmp_path):
    from ldm.training.loop import train

    out = _copy_run(run, tmp_path)
    before = _snapshot(out / "pipeline")
    for extra in ([], ["train.overwrite_output_dir=true"]):
        cfg = load_config(None, tiny_overrides(tiny, out) + [f"model.pretrained={out / 'pipeline'}", *extra])
        with pytest.raises(ConfigError, match="config key 'model.pretrained'.*lies inside .*pipeline, which this run "
                                              "writes or replaces; train into another train.output_dir"):
            train(cfg, show_progress=False)
    assert _snapshot(out / "pipeline") == before


def test_generations_never_overwrite_earlier_ones_without_asking(tmp_path):
    from ldm.images import check_unused, save_generations
    from ldm.inference.generate import Generated

    results = [Generated(Image.new("RGB", (8, 8), "red"), "a", 0, {"prompt": "a"})]
    save_generations(results, tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ConfigError, match="already holds 2 generated images .*pass --overwrite"):
        save_generations(results, tmp_path / "out")
    with pytest.raises(ConfigError, match="choose another folder"):
        check_unused(tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before
    save_generations(results, tmp_path / "out", overwrite=True)


def test_stage_1_into_a_folder_holding_a_vae_stops_unless_asked(tiny, tmp_path):
    from ldm.training.autoencoder import train_autoencoder

    vae = tmp_path / "vae"
    shutil.copytree(tiny["vae"], vae)
    before = _snapshot(vae)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [f"autoencoder.output_dir={vae}",
                                                                      "autoencoder.max_steps=1"])
    with pytest.raises(ConfigError, match="already holds a VAE.*autoencoder.overwrite_output_dir=true"):
        train_autoencoder(cfg, show_progress=False)
    assert _snapshot(vae) == before


# --------------------------------------------------------------------------------------------
# 3. Resume: what it says it is
# --------------------------------------------------------------------------------------------


def _resume(tiny, out: Path, *extra: str):
    from ldm.training.loop import train

    return train(load_config(None, tiny_overrides(tiny, out) + ["train.resume=latest", "train.checkpoint_every=1",
                                                                *extra]), show_progress=False)


def test_a_changed_learning_rate_and_ema_decay_are_applied_and_recorded(tiny, run, tmp_path):
    out = _copy_run(run, tmp_path)
    _resume(tiny, out, "train.max_steps=3", "train.lr=5e-4", "train.adam_beta2=0.99", "train.ema_decay=0.5")
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    (group,) = state["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(5e-4) and group["initial_lr"] == pytest.approx(5e-4)
    assert group["betas"] == [0.9, 0.99] and state["ema"]["decay"] == 0.5
    (record,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["applied"] == {
        "train.adam_beta2": [0.999, 0.99], "train.ema_decay": [0.9999, 0.5], "train.lr": [1e-3, 5e-4],
        "train.max_steps": [2, 3]}
    assert load_config(out / "pipeline" / "ldm_config.yaml").train.lr == 5e-4  # the export reports what ran


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=2", "processes × train.batch_size: 4 → 2"),
    ("model.unet.block_out_channels=[8, 16]", "model.unet.block_out_channels: [16, 32] → [8, 16]"),
    ("train.seed=3", "train.seed: 0 → 3"),
    ("data.resolution=32", "data.resolution: 16 → 32"),
    ("data.caption_dropout=0.5", "data.caption_dropout: 0.1 → 0.5"),
    ("train.gradient_accumulation_steps=2", "train.gradient_accumulation_steps: 1 → 2"),
])
def test_a_change_a_resume_cannot_apply_is_refused_before_any_data_or_model(tiny, run, tmp_path, monkeypatch,
                                                                             override, key):
    import ldm.training.loop
    import ldm.training.setup

    out = _copy_run(run, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(ldm.training.setup, "open_audited", lambda *a, **k: pytest.fail("data was opened"))
    with pytest.raises(ConfigError) as err:
        _resume(tiny, out, "train.max_steps=3", override)
    assert key in str(err.value) and "set them back to resume it, or start a new run" in str(err.value)
    assert _snapshot(out) == before


@pytest.mark.parametrize("damage", ["not json", "wrong types", "no param groups"])
def test_a_damaged_state_json_is_named(tiny, run, tmp_path, damage):
    out = _copy_run(run, tmp_path)
    folder = out / "checkpoints" / "step_000002"
    state = json.loads((folder / "state.json").read_text())
    if damage == "not json":
        text = "{" + json.dumps(state)[1:-40]
    elif damage == "wrong types":
        text = json.dumps({**state, "step": "two", "lr_schedule": [1]})
    else:
        text = json.dumps({**state, "optimizer": {"scalars": {}}})
    (folder / "state.json").write_text(text)
    with pytest.raises(ConfigError, match=r"state\.json|not a complete checkpoint folder"):
        _resume(tiny, out, f"train.resume={folder}", "train.max_steps=3")


def test_checkpoint_weights_of_another_architecture_are_named_not_a_size_mismatch_dump(tiny, run):
    from ldm.models.building import build_unet
    from ldm.models.loading import check_components
    from ldm.training.checkpoint import _check_shapes
    from ldm.training.trainables import build_trainable

    cfg = load_config(None, tiny_overrides(tiny, run) + ["model.unet.block_out_channels=[8, 16]"])
    vae, text = check_components(cfg)
    trainable = build_trainable(cfg, lambda: build_unet(cfg, vae, text), vae.downsample)
    with pytest.raises(ConfigError, match="does not fit the UNet this config builds .* shapes differ"):
        _check_shapes(run / "checkpoints" / "step_000002" / "unet.safetensors", trainable)


# --------------------------------------------------------------------------------------------
# 4. Files that break after the audit, damaged caches
# --------------------------------------------------------------------------------------------


def test_files_that_break_after_the_audit_never_abort_a_cached_run_or_its_validation(tiny, tmp_path, monkeypatch,
                                                                                      capsys):
    import ldm.training.loop
    import ldm.training.setup
    from ldm.data.audit import open_audited
    from ldm.shapes import write_imagefolder

    folder = write_imagefolder(tmp_path / "data", 24, 16)
    audited = {}

    def audit_then_break(*args, **kwargs):
        source = open_audited(*args, **kwargs)
        for i in (1, 5, 22):  # two training images and one held-back validation image go bad now
            (folder / "images" / f"{i:06d}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken %d" % i)
        (folder / "images" / "000007.png").unlink()  # and one disappears
        audited["report"] = source.report
        return source

    monkeypatch.setattr(ldm.training.setup, "open_audited", audit_then_break)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [
        f"data.dataset={folder}", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}",
        "data.validation_images=4", "train.max_steps=6"])
    exported = ldm.training.loop.train(cfg, show_progress=False)
    out = capsys.readouterr().out
    assert audited["report"].bad_fraction == 0 and (exported / "model_index.json").is_file()
    assert out.count("went bad after the audit") == 3 and "validation: skipping held-back sample" in out
    assert "validation loss" in out and "on 3 held-back images" in out
    bad = json.loads((tmp_path / "cache" / "bad-r0.json").read_text())
    assert len(bad) == 2  # the two broken files' contents, remembered; the missing one has no content
    later = json.loads((tmp_path / "run" / "data_audit.json").read_text())["went_bad_after_audit"]
    assert {name.rsplit("/", 1)[-1]: entry["where"] for name, entry in later.items()} == {
        "000001.png": "cache build", "000005.png": "cache build", "000007.png": "cache build",
        "000022.png": "validation"}


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "wrong row count"])
def test_a_damaged_cache_shard_is_named_with_the_fix(tmp_path, damage):
    from ldm.data.cache import ShardStore

    folder = tmp_path / "latents-x"
    folder.mkdir()
    shard = folder / "shard-r0-000000.safetensors"
    keys = ["a", "b"] if damage != "wrong row count" else ["a", "b", "c"]
    save_file({"mean": torch.zeros(2, 4, 2, 2)}, str(shard), metadata={"keys": json.dumps(keys)})
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-20])
    elif damage == "garbage header":
        shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    with pytest.raises(ConfigError, match=f"cache shard {shard} is damaged .*delete that file"):
        ShardStore(folder)


def test_unreadable_exif_keeps_the_pixels_and_says_so(tmp_path, monkeypatch):
    from PIL import ImageOps

    from ldm.data.decode import decode_image

    Image.new("RGB", (24, 30), "blue").save(tmp_path / "a.jpg")

    def broken(image):
        raise SyntaxError("not a TIFF file (header b'\\x00\\x00' not valid)")  # what a damaged EXIF block raises

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    notes: list[str] = []
    image = decode_image(tmp_path / "a.jpg", "a.jpg", notes)
    assert image.size == (24, 30) and notes == ["unreadable EXIF: orientation not applied"]


# --------------------------------------------------------------------------------------------
# 5. Pixels: every image on the scale its file means
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", 64 * 257, 64),  # a dark 16-bit picture stays dark (it used to be divided by its own maximum)
    ("I;16", 65535, 255),
    ("I", 128 * 257, 128),  # 32-bit container, 16-bit values
    ("F", 0.25, 64),  # float in [0, 1]
    ("F", 200.0, 200),  # float in [0, 255]
])
def test_high_bit_depth_pixels_keep_their_brightness(mode, values, expected, tmp_path):
    from ldm.data.decode import decode_image, to_rgb

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    arr = np.full((8, 8), values, dtype)
    arr[0, 0] = 0  # a darker corner: the scale must not come from the picture's own range
    ext = "png" if mode == "I;16" else "tiff"
    Image.fromarray(arr, mode if mode != "I;16" else None).save(tmp_path / f"x.{ext}")
    notes: list[str] = []
    rgb = to_rgb(decode_image(tmp_path / f"x.{ext}", "x"), "x", notes)
    assert np.asarray(rgb)[4, 4].tolist() == [expected] * 3 and np.asarray(rgb)[0, 0].tolist() == [0, 0, 0]
    assert notes and ("16-bit" in notes[0] or "float" in notes[0])


@pytest.mark.parametrize("values, reason", [(-1.0, "F pixels outside the displayable range"),
                                            (300.0, "float pixels beyond 255"),
                                            (float("nan"), "F pixels outside the displayable range")])
def test_float_pixels_without_a_reading_are_skipped_not_guessed(values, reason):
    from ldm.data.decode import BadSample, to_rgb

    with pytest.raises(BadSample, match=reason):
        to_rgb(Image.fromarray(np.full((4, 4), values, np.float32)), "x.tiff")


def test_generation_inputs_are_prepared_as_training_prepares_pictures(tmp_path):
    from ldm.cli import image_argument
    from ldm.inference.modes import as_rgb

    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    Image.new("RGB", (24, 30), "blue").save(tmp_path / "rotated.jpg", exif=exif)
    alpha = as_rgb(image_argument(str(tmp_path / "alpha.png"), "--init-image"), "--init-image")
    assert np.asarray(alpha)[0, 0].tolist() == [255, 0, 0] and np.asarray(alpha)[3, 3].tolist() == [255, 255, 255]
    assert image_argument(str(tmp_path / "rotated.jpg"), "--sketch").size == (30, 24)
    assert as_rgb(Image.open(tmp_path / "rotated.jpg"), "style").size == (30, 24)  # a PIL image given to generate()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ConfigError, match="--style .*broken.png: not an image or corrupt"):
        image_argument(str(tmp_path / "broken.png"), "--style")
    with pytest.raises(ConfigError, match="--init-image .*: no such file"):
        image_argument(str(tmp_path / "nowhere.png"), "--init-image")


# --------------------------------------------------------------------------------------------
# 6. Metadata as people really write it
# --------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def _open(folder: Path, *overrides: str):
    from ldm.data.audit import audit
    from ldm.data.sources import open_source

    cfg = load_config(None, [f"data.dataset={folder}", "data.resolution=16", "data.max_bad_fraction=1", *overrides])
    source = open_source(cfg.data)
    return source, audit(source, cfg.data)


def test_a_csv_with_a_byte_order_mark_reads_every_column(tmp_path):
    folder = _folder(tmp_path)
    rows = "".join(f"{i}.png,a red picture {i}\n" for i in range(4))
    (folder / "metadata.csv").write_bytes("file_name,text\n".encode("utf-8-sig") + rows.encode())
    source, report = _open(folder)
    assert len(report.kept) == 4 and source.caption(0) == "a red picture 0"


def test_a_jsonl_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
    folder = _folder(tmp_path)
    lines = "".join(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n" for i in range(4))
    (folder / "metadata.jsonl").write_text("\ufeff" + lines, encoding="utf-8")
    _, report = _open(folder)
    assert len(report.kept) == 4 and not report.skipped


def test_a_latin_1_file_stops_naming_the_line_or_reads_with_its_encoding(tmp_path):
    folder = _folder(tmp_path)
    text = "file_name,text\n0.png,a red circle\n1.png,un café rouge\n2.png,x\n3.png,y\n"
    (folder / "metadata.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"metadata.csv is not utf-8 text \(line 3: byte 0xe9\); save it as UTF-8 "
                                          r".*data.metadata_encoding"):
        _open(folder)
    source, _ = _open(folder, "data.metadata_encoding=latin-1")
    assert source.caption(1) == "un café rouge"


def test_an_unquoted_comma_in_a_csv_caption_is_skipped_and_counted_not_cut(tmp_path):
    folder = _folder(tmp_path)
    (folder / "metadata.csv").write_text('file_name,text\n0.png,"a red, round thing"\n1.png,a red, round thing\n'
                                         "2.png\n3.png,fine\n")
    source, report = _open(folder)
    assert report.skipped == {"CSV row has more fields than the header (quote captions that contain commas)": 1,
                              "CSV row has fewer fields than the header": 1}
    assert report.examples["CSV row has more fields than the header (quote captions that contain commas)"] == ["line 3"]
    assert source.caption(0) == "a red, round thing" and len(report.kept) == 2


def test_both_metadata_files_are_refused_not_one_ignored(tmp_path):
    folder = _folder(tmp_path)
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a\n")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "b"}\n')
    with pytest.raises(ConfigError, match="holds both metadata.jsonl and metadata.csv; keep one"):
        _open(folder)


def test_a_json_array_gets_a_message_that_says_so_and_how_to_convert(tmp_path):
    folder = _folder(tmp_path)
    (folder / "metadata.jsonl").write_text(json.dumps([{"file_name": "0.png", "text": "a"}], indent=2))
    with pytest.raises(ConfigError, match="holds a JSON array; JSON Lines has one object per line. Convert it"):
        _open(folder)


def test_invisible_and_non_object_lines_are_counted(tmp_path):
    folder = _folder(tmp_path)
    lines = [{"file_name": "0.png", "text": "\u200b \u00a0\u2060"}, {"file_name": "1.png", "text": "\ufeffa cat\u200b"},
             [1, 2], {"file_name": "2.png", "text": "ok"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    source, report = _open(folder)
    assert report.skipped == {"caption has no visible characters": 1,
                              "unreadable metadata line (not a JSON object)": 1}
    assert source.caption(1) == "a cat"  # invisible characters at the ends are trimmed


def test_an_unknown_metadata_encoding_is_a_config_error():
    with pytest.raises(ConfigError, match="data.metadata_encoding': 'utf-9' is not a text encoding"):
        load_config(None, ["data.metadata_encoding=utf-9"])


# --------------------------------------------------------------------------------------------
# 7. Config errors that used to be tracebacks or wrong
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("model.unet.norm_num_groups=0", "model.unet.norm_num_groups': must be a positive integer, got 0"),
    ("model.unet.attention_head_dim=0", "model.unet.attention_head_dim': must be a positive integer, got 0"),
    ("autoencoder.norm_num_groups=0", "autoencoder.norm_num_groups': must be a positive integer, got 0"),
    ("model.unet.layers_per_block=-1", "model.unet.layers_per_block': must be a positive integer, got -1"),
    ("autoencoder.layers_per_block=0", "autoencoder.layers_per_block': must be a positive integer"),
    ("model.unet.cross_attention_dim=-8", "model.unet.cross_attention_dim': must be positive or null"),
    ("train.adam_beta1=1.0", "train.adam_beta1': must be in [0, 1), got 1.0"),
    ("train.adam_beta2=-0.1", "train.adam_beta2': must be in [0, 1)"),
    ("train.adam_epsilon=0", "train.adam_epsilon': must be positive"),
    ("train.adam_weight_decay=-1", "train.adam_weight_decay': must be ≥ 0"),
    ("train.seed=-1", "train.seed': must be ≥ 0"),
    ("data.max_samples=0", "data.max_samples': must be ≥ 1 or null"),
    ("autoencoder.num_validation_images=-2", "autoencoder.num_validation_images': must be ≥ 0"),
])
def test_impossible_numbers_name_the_key_before_anything_divides_by_them(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_repeated_yaml_section_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\ndata:\n  resolution: 16\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml': 'train' is given twice \(lines 1 and 5\); merge the two"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 1e-4\n   max_steps: 3\n", r"is not valid YAML at line 3, column \d+"),
    ("train: [1, 2\n", r"is not valid YAML at line 2"),
])
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"broken.yaml' {message}"):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("sample:\n  prompts: ['un café']\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml' is not UTF-8 text"):
        load_config(path)


def test_component_paths_that_point_at_the_wrong_component_are_named(tiny, tmp_path):
    from ldm.models.loading import check_components

    with pytest.raises(ConfigError, match=r"model.vae.path: .* holds a BertModel, not an AutoencoderKL"):
        check_components(load_config(None, tiny_overrides(tiny, tmp_path) + [f"model.vae.path={tiny['bert']}"]))
    with pytest.raises(ConfigError, match="model.text_encoder.path: .* holds a AutoencoderKL, not a Transformers"):
        check_components(load_config(None, tiny_overrides(tiny, tmp_path) + [f"model.text_encoder.path={tiny['vae']}"]))


def test_a_truncated_component_config_is_named_with_the_fix(tiny, tmp_path):
    from ldm.models.loading import check_components

    vae = tmp_path / "vae"
    shutil.copytree(tiny["vae"], vae)
    (vae / "config.json").write_text((vae / "config.json").read_text()[:40])
    with pytest.raises(ConfigError, match=f"{vae / 'config.json'} is damaged .*export or download that component"):
        check_components(load_config(None, tiny_overrides(tiny, tmp_path) + [f"model.vae.path={vae}"]))


@pytest.mark.parametrize("extra, held, trained", [
    (["data.shapes.num_images=1"], 0, 1),  # one image: trains, no held-out PSNR
    (["autoencoder.num_validation_images=0"], 0, 32),
    (["data.max_samples=10", "autoencoder.num_validation_images=4"], 1, 9),  # max_samples bounds stage 1 too
])
def test_stage_1_on_tiny_datasets_and_settings(tiny, tmp_path, extra, held, trained):
    from ldm.training.autoencoder import train_autoencoder

    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "run") + [
        f"autoencoder.output_dir={tmp_path / 'vae'}", "autoencoder.max_steps=2", "autoencoder.batch_size=4", *extra])
    out = train_autoencoder(cfg, show_progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_images"] == held and metrics["training_images"] == trained
    assert (metrics["psnr_db"] is None) == (held == 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_inference_steps": 0}, r"num_inference_steps \(--steps\) 0: must be a whole number ≥ 1"),
    ({"num_inference_steps": -3}, r"num_inference_steps \(--steps\) -3"),
    ({"guidance_scale": -1.0}, r"guidance_scale \(--guidance-scale\) -1.0: must be ≥ 0"),
    ({"guidance_scale": float("nan")}, r"guidance_scale \(--guidance-scale\) nan"),
    ({"sampler": "plms"}, r"sampler \(--sampler\) 'plms': choose one of ddpm"),
    ({"num_images_per_prompt": 0}, r"num_images_per_prompt \(--num-images\) 0"),
    ({"height": -64}, r"height \(--height\) -64: must be a positive number of pixels"),
    ({"guidance_rescale": 2.0}, r"guidance_rescale \(--guidance-rescale\) 2.0: must be in \[0, 1\]"),
])
def test_generate_checks_its_numbers_before_loading_anything(kwargs, message):
    from ldm.inference.generate import generate

    with pytest.raises(ConfigError, match=message):
        generate("/nonexistent/model", ["a red circle"], **kwargs)  # no model is loaded: the check comes first


def test_generate_refuses_a_size_the_model_cannot_make(run):
    from ldm.inference.generate import generate

    # The tiny model halves 16 px twice (4 px), but Diffusers' pipelines also need 8 px: 20 is refused by ldm,
    # with the nearest size, rather than by a ValueError from inside Diffusers.
    with pytest.raises(ConfigError, match="height 20: this model generates sizes that are multiples of 8 px"):
        generate(str(run / "pipeline"), ["a red circle"], height=20, num_inference_steps=1)


def test_a_broken_pretrained_pipeline_names_model_pretrained_not_a_derived_key(tiny, run, tmp_path):
    from ldm.models.loading import check_components

    pipeline = tmp_path / "pipeline"
    shutil.copytree(run / "pipeline", pipeline)
    shutil.rmtree(pipeline / "vae")
    with pytest.raises(ConfigError, match="config key 'model.pretrained': .* is not a complete pipeline "
                                          r"\(model.vae.path: no AutoencoderKL config"):
        check_components(load_config(None, tiny_overrides(tiny, tmp_path / "run") + [f"model.pretrained={pipeline}"]))


def test_the_command_line_builds_one_mode_and_refuses_two():
    from PIL import Image

    from ldm.inference.modes import ImageToImage, Sketch, Style, mode_of

    picture = Image.new("RGB", (16, 16))
    assert mode_of() is None
    assert mode_of(init_image=picture, strength=0.4) == ImageToImage(picture, 0.4)
    assert mode_of(sketch=picture, conditioning_scale=1.5) == Sketch(picture, 1.5)
    assert mode_of(style=picture, style_scale=0.5) == Style(picture, 0.5)
    with pytest.raises(ConfigError, match="--init-image and --sketch: give one of"):
        mode_of(init_image=picture, sketch=picture)
    with pytest.raises(ConfigError, match=r"style_scale \(--style-scale\) -1: must be ≥ 0"):
        Style(picture, -1).check(20)


@pytest.mark.parametrize("override, key", [("train.lr=inf", "train.lr"), ("model.scheduler.beta_end=nan",
                                                                            "model.scheduler.beta_end"),
                                           ("train.snr_gamma=-inf", "train.snr_gamma")])
def test_a_non_finite_number_in_the_config_names_its_key(override, key):
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': .* is not a finite number"):
        load_config(None, [override])
    load_config(None, ["train.lr=1e-4", "train.snr_gamma=5.0"])  # negative control: finite values load


def test_an_output_dir_that_is_a_file_is_refused_before_anything_loads(tiny, tmp_path):
    from ldm.training.loop import train

    (tmp_path / "afile").write_text("not a folder")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match=r"train.output_dir: .* cannot be a folder: .*afile is a file"):
            train(load_config(None, tiny_overrides(tiny, out)), show_progress=False)
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_non_finite_weights_at_the_end_stop_with_a_message_not_a_checksum_mismatch():
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from ldm.training.finish import NonFiniteError, check_ranks_agree
    from ldm.training.trainables.base import Trainable

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=8, attention_head_dim=2, sample_size=8)
    trainable, accelerator = Trainable(load_config(None, []), unet), Accelerator(cpu=True)
    check_ranks_agree(accelerator, trainable)  # negative control: finite weights pass
    with torch.no_grad():
        next(iter(unet.parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="weights are not finite at the end of the run"):
        check_ranks_agree(accelerator, trainable)


def _model_files(folder: Path) -> dict[str, Path]:
    """A valid safetensors file and the ways a file given as a model or LoRA goes wrong."""
    from safetensors.torch import save_file

    files = {"valid": folder / "valid.safetensors", "pickle": folder / "pickle.safetensors",
             "cut": folder / "cut.safetensors", "random": folder / "random.safetensors",
             "empty": folder / "empty.safetensors", "html": folder / "page.safetensors"}
    save_file({"w": torch.zeros(64)}, str(files["valid"]), metadata={"ldm.format": "1"})
    torch.save({"w": torch.zeros(4)}, files["pickle"])
    files["cut"].write_bytes(files["valid"].read_bytes()[:-50])
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["empty"].write_bytes(b"")
    files["html"].write_bytes(b"<!DOCTYPE html><html><body>Sign in to download</body></html>" + b" " * 64)
    return files


@pytest.mark.parametrize("kind, message", [
    ("pickle", "a PyTorch checkpoint .* safetensors files only"), ("cut", r"cut short \(\d[\d,]* of \d[\d,]* bytes\)"),
    ("random", "not a safetensors file"), ("empty", r"empty or cut short \(0 bytes\)"),
    ("html", "a web page .* the download may have failed"), ("missing", "no such file")])
def test_a_model_file_from_elsewhere_is_named_for_what_it_is(kind, message, tmp_path):
    from ldm.interop.model_files import ModelFileError, check_safetensors

    files = _model_files(tmp_path)
    assert check_safetensors(files["valid"], "--model") == {"ldm.format": "1"}  # negative control
    with pytest.raises(ModelFileError, match=message):
        check_safetensors(files.get(kind, tmp_path / "missing.safetensors"), "--model")


def test_generate_refuses_a_damaged_model_or_lora_file_before_loading_it(tmp_path, tiny_pipeline):
    from ldm.inference.generate import generate
    from ldm.interop.model_files import ModelFileError

    files = _model_files(tmp_path)
    with pytest.raises(ModelFileError, match="model file .*pickle.safetensors.*: a PyTorch checkpoint"):
        generate(files["pickle"], ["a red circle"], num_inference_steps=1)
    with pytest.raises(ModelFileError, match="LoRA .*cut.safetensors.*: cut short"):
        generate(tiny_pipeline, ["a red circle"], num_inference_steps=1, loras=[str(files["cut"])])
