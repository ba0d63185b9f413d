"""Config errors fail before any model is built, naming the key and what would be valid."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_overrides
from ldm.config.loading import load_config, save_config
from ldm.config.schema import Config
from ldm.config.typed_yaml import parse_override
from ldm.errors import ConfigError
from ldm.models.loading import check_components


def test_defaults_are_the_sd15_recipe_and_valid():
    cfg = load_config()
    assert cfg.model.unet.block_out_channels == [320, 640, 1280, 1280]
    assert cfg.data.caption_dropout == pytest.approx(0.1)
    assert cfg.data.random_flip is False


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1e-4", "unknown config key 'train.lrr'. Did you mean 'lr'?"),
    ("tran.lr=1e-4", "unknown config key 'tran'. Did you mean 'train'?"),
    ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
    ("train.max_steps=1.5", "config key 'train.max_steps': expected an integer"),
    ("train.mixed_precision=fp8", "choose one of 'no', 'fp16', 'bf16'"),
    ("model.scheduler.beta_schedule=cosine", "choose one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
    ("model.scheduler.prediction_type=sample", "choose one of 'epsilon', 'v_prediction'"),
    ("sample.sampler=plms", "choose one of 'ddpm', 'ddim', 'dpm++'"),
    ("data.caption_dropout=1.5", "config key 'data.caption_dropout': must be in [0, 1)"),
    ("train.batch_size=0", "config key 'train.batch_size': must be a positive integer"),
    ("model.unet.cross_attention=[true]", "config key 'model.unet.cross_attention': needs one entry per level"),
    ("model.unet.block_out_channels=[320, 650, 1280, 1280]", "650 must be a positive multiple of"),
    ("train.ema_decay=1.0", "config key 'train.ema_decay': must be in (0, 1)"),
    ("data.random_flip=yes please", "expected true or false"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_cache_rejects_random_crops():
    with pytest.raises(ConfigError, match="'data.cache': caches each image once"):
        load_config(None, ["data.cache=true", "data.center_crop=false"])
    assert load_config(None, ["data.cache=true", "data.random_flip=true"]).data.random_flip  # flips are variants


def test_yaml_file_overrides_and_saved_config_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 3e-4, "batch_size": 8}, "data": {"resolution": 256}}))
    cfg = load_config(path, ["train.lr=2e-4", "model.unet.cross_attention=[true, true, false, false]"])
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.batch_size == 8 and cfg.data.resolution == 256
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_override_values_parse_as_yaml():
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)  # YAML 1.1 reads a string
    assert load_config(None, ["sample.prompts=['1e-4']"]).sample.prompts == ["1e-4"]  # strings stay strings
    assert parse_override("train.snr_gamma=null") == ("train.snr_gamma", None)
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # not YAML's false
    assert parse_override("model.unet.block_out_channels=[1,2]") == ("model.unet.block_out_channels", [1, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolution_the_vae_and_unet_cannot_divide(tiny, tmp_path):
    # tiny VAE: f = 2; a 3-level UNet halves twice more -> multiples of 8 (also the pipeline's rule).
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + [
        "data.resolution=36", "model.unet.block_out_channels=[16, 32, 32]",
        "model.unet.cross_attention=[false, true, true]"])
    with pytest.raises(ConfigError) as err:
        check_components(cfg)
    assert "'data.resolution': 36 is not divisible by 8 (VAE downsampling 2 × UNet downsampling 4" in str(err.value)
    assert "e.g. 8, 16, 24" in str(err.value)
    # Divisible by VAE × UNet (4) but not a size the exported pipeline can generate.
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["data.resolution=12"])
    with pytest.raises(ConfigError, match="needs multiples of 8"):
        check_components(cfg)


def test_cross_attention_width_must_match_text_encoder(tiny, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["model.unet.cross_attention_dim=768"])
    with pytest.raises(ConfigError) as err:
        check_components(cfg)
    assert "'model.unet.cross_attention_dim': 768 does not match the text encoder's width 32" in str(err.value)


def test_missing_vae_folder_points_to_stage_1(tiny, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + [f"model.vae.path={tmp_path / 'no-vae'}"])
    with pytest.raises(ConfigError, match="scripts/train_autoencoder.py"):
        check_components(cfg)


def test_missing_caption_column_lists_the_columns(write_imagefolder):
    from ldm.data.sources import open_source

    folder = write_imagefolder(caption_column="caption")
    cfg = load_config(None, [f"data.dataset={folder}", "data.caption_column=text"])
    with pytest.raises(ConfigError) as err:
        open_source(cfg.data)
    assert "no column 'text'" in str(err.value) and "'caption', 'file_name', 'source'" in str(err.value)


def test_uncached_hub_id_fails_with_one_clear_offline_message(monkeypatch, recwarn):
    from ldm.config.model import VAEConfig
    from ldm.models.loading import load_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        load_vae(VAEConfig(path="nobody-here/no-such-vae"))
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]  # one message, no notices
    text = str(err.value)
    assert "'nobody-here/no-such-vae'" in text and "HF_HUB_OFFLINE=1" in text and "local folder" in text


def test_config_dataclass_defaults_are_independent():
    a, b = Config(), Config()
    a.sample.prompts.append("x")
    assert "x" not in b.sample.prompts
