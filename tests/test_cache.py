"""The fingerprinted cache: each input of the fingerprint rebuilds its part only; shards resume and split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import tiny_overrides
from ldm.config.loading import load_config
from ldm.data.cache import build_cache, cache_fingerprints
from ldm.data.sources import open_source
from ldm.data.stream import SampleStream
from ldm.models.encoders import FrozenEncoders


def _shard_keys(cache: Path, kind: str) -> dict[str, list[str]]:
    """{folder name: keys} for every latents-* or text-* folder."""
    out: dict[str, list[str]] = {}
    for folder in sorted(cache.glob(f"{kind}-*")):
        keys: list[str] = []
        for shard in sorted(folder.glob("shard-*.safetensors")):
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                keys += json.loads(json.loads(f.read(n))["__metadata__"]["keys"])
        out[folder.name] = keys
    return out


def _build(cfg, cache: Path, rank: int = 0, world: int = 1) -> FrozenEncoders:
    frozen = FrozenEncoders(cfg.model, torch.device("cpu"))
    stream = SampleStream(open_source(cfg.data), cfg.data, seed=0)
    build_cache(stream, cache, lambda: frozen.vae, lambda: frozen.text, *cache_fingerprints(cfg, frozen),
                rank=rank, world_size=world, batch_size=4, shard_size=6, show_progress=False)
    return frozen


def _folder_config(tiny, tmp_path, write_imagefolder, extra=()):
    folder = write_imagefolder(n=8, caption_column="text", size=24)
    return folder, load_config(None, tiny_overrides(tiny, tmp_path) + [f"data.dataset={folder}", *extra])


def test_each_fingerprint_input_rebuilds_its_part(tiny, tmp_path, write_imagefolder):
    cache = tmp_path / "cache"
    folder, cfg = _folder_config(tiny, tmp_path, write_imagefolder)
    frozen = _build(cfg, cache)
    assert frozen.loaded == {"vae": True, "text_encoder": True}
    (latent_dir, first), = _shard_keys(cache, "latents").items()
    assert len(first) == 8 and len(next(iter(_shard_keys(cache, "text").values()))) == 9  # 8 captions + ""
    # Complete: nothing to encode, so no encoder is loaded at all.
    assert _build(cfg, cache).loaded == {"vae": False, "text_encoder": False}

    # 1. One image's bytes change: that image alone is encoded again (a new key in the same folder).
    from PIL import Image

    Image.new("RGB", (24, 24), (10, 200, 10)).save(folder / "images" / "000003.png")
    frozen = _build(cfg, cache)
    keys = _shard_keys(cache, "latents")[latent_dir]
    assert len(keys) == 9 and frozen.loaded == {"vae": True, "text_encoder": False}

    # 2. Resolution: a new latents folder, all images again; the text cache is untouched.
    cfg24 = load_config(None, tiny_overrides(tiny, tmp_path) + [f"data.dataset={folder}", "data.resolution=24"])
    frozen = _build(cfg24, cache)
    assert len(_shard_keys(cache, "latents")) == 2 and frozen.loaded["text_encoder"] is False

    # 3. VAE weights: same architecture, one weight nudged -> a new latents folder.
    from diffusers import AutoencoderKL

    vae2 = tmp_path / "vae2"
    vae = AutoencoderKL.from_pretrained(tiny["vae"])
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(1e-3)
    vae.save_pretrained(vae2)
    cfg_vae = load_config(None, tiny_overrides(tiny, tmp_path) + [f"data.dataset={folder}", f"model.vae.path={vae2}"])
    assert _build(cfg_vae, cache).loaded == {"vae": True, "text_encoder": False}
    assert len(_shard_keys(cache, "latents")) == 3

    # 4. Text encoder: a new text folder, no latents re-encoded.
    cfg_clip = load_config(None, tiny_overrides(tiny, tmp_path, text_encoder="clip") + [f"data.dataset={folder}"])
    assert _build(cfg_clip, cache).loaded == {"vae": False, "text_encoder": True}
    assert len(_shard_keys(cache, "text")) == 2 and len(_shard_keys(cache, "latents")) == 3


def test_interrupted_build_resumes_and_processes_split_the_work(tiny, tmp_path, write_imagefolder):
    folder, cfg = _folder_config(tiny, tmp_path, write_imagefolder)
    cache = tmp_path / "cache"
    # Two "processes": each encodes a disjoint half; together they cover everything once.
    _build(cfg, cache, rank=0, world=2)
    _build(cfg, cache, rank=1, world=2)
    (name, keys), = _shard_keys(cache, "latents").items()
    assert len(keys) == len(set(keys)) == 8
    shards = sorted(p.name for p in (cache / name).glob("shard-*"))
    assert shards == ["shard-r0-000000.safetensors", "shard-r1-000000.safetensors"]
    # An interrupted build: lose one shard; the next build re-encodes only what that shard held.
    (cache / name / shards[1]).unlink()
    frozen = _build(cfg, cache)
    assert len(_shard_keys(cache, "latents")[name]) == 8 and frozen.loaded["vae"]
    shutil.rmtree(cache)


def test_training_from_a_complete_cache_loads_no_encoder(tiny, tmp_path, capsys):
    from ldm.training.loop import train

    over = tiny_overrides(tiny, tmp_path) + ["data.cache=true", f"data.cache_dir={tmp_path / 'cache'}",
                                             "train.validate_every=0"]
    train(load_config(None, over + [f"train.output_dir={tmp_path / 'a'}"]), show_progress=False)
    assert "encoders loaded to fill it: vae, text_encoder" in capsys.readouterr().out
    train(load_config(None, over + [f"train.output_dir={tmp_path / 'b'}"]), show_progress=False)
    assert "encoders loaded to fill it: none" in capsys.readouterr().out
