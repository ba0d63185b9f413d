"""Single-file export in the LDM layout and import back: through ldm and through Diffusers' own loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ldm.interop.single_file import export_single_file, load_single_file, read_metadata, write_config_folder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle in the center", "a blue square on the left"]


def _quickstart_pipeline(folder: Path, text_encoder: str | None = None):
    """The quickstart's VAE and UNet architectures (random, seeded) with MiniLM or the given text encoder."""
    from ldm.config.loading import load_config
    from ldm.inference.pipeline import assemble_pipeline
    from ldm.models.building import build_scheduler, build_unet
    from ldm.models.loading import check_components, load_text_encoder, load_vae
    from ldm.training.autoencoder import save_untrained_autoencoder

    overrides = [f"model.vae.path={folder / 'vae_stage1'}"]
    if text_encoder:
        overrides += [f"model.text_encoder.path={text_encoder}", "model.text_encoder.max_length=12"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
    save_untrained_autoencoder(cfg, folder / "vae_stage1")
    vae_info, text_info = check_components(cfg)
    torch.manual_seed(0)
    unet = build_unet(cfg, vae_info, text_info)
    with torch.no_grad():  # the UNet's fresh init predicts nearly nothing; make its output matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tokenizer, encoder = load_text_encoder(cfg.model.text_encoder)
    pipe = assemble_pipeline(load_vae(cfg.model.vae), encoder, tokenizer, unet, build_scheduler(cfg.model.scheduler))
    pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
    return pipe


def _images(pipe) -> np.ndarray:
    from ldm.inference.generate import generate

    return np.stack([np.asarray(g.image, dtype=np.float32) / 255 for g in
                     generate(pipe, PROMPTS, guidance_scale=3.0, num_inference_steps=4, sampler="dpm++", seed=0)])


def _latent_images(pipe) -> np.ndarray:
    """Decoded floats (no 8-bit rounding) for a tolerance check."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(j) for j in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="np").images


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("quickstart_single")
    return _quickstart_pipeline(folder), folder


def test_fp32_single_file_regenerates_the_same_images_through_ldm(quickstart):
    pipe, folder = quickstart
    path = export_single_file(pipe, folder / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    # The LDM layout: encoder stem, an attention block of level 1, the mid block, the VAE's decoder numbering.
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.input_blocks.4.1.proj_in.weight" in keys
    assert "model.diffusion_model.middle_block.2.in_layers.2.weight" in keys
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # lowest level: upsampler after attention
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys  # first downsampler
    assert "first_stage_model.decoder.up.2.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.embeddings.word_embeddings.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks", "vae.")) for k in keys)
    meta = read_metadata(path)
    assert meta["modelspec.resolution"] == "32x32" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ldm.dtype"] == "fp32" and float(meta["ldm.scaling_factor"]) == pipe.vae.config.scaling_factor
    loaded = load_single_file(path)
    a, b = _latent_images(pipe), _latent_images(loaded)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(_images(pipe) - _images(loaded)).max() == 0  # and the PNG-level images are identical


def test_diffusers_single_file_loaders_read_our_unet_and_vae(quickstart, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe, folder = quickstart
    path = export_single_file(pipe, tmp_path / "model.safetensors")
    configs = write_config_folder(folder / "pipeline", tmp_path / "configs")
    assert not list(configs.rglob("*.safetensors"))  # weights can only come from the single file
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(configs), subfolder="unet")
    vae = AutoencoderKL.from_single_file(str(path), config=str(configs), subfolder="vae")
    for ours, theirs in ((pipe.unet, unet), (pipe.vae, vae)):
        want, got = ours.state_dict(), theirs.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_diffusers_pipeline_from_single_file_with_a_clip_text_encoder(tiny, tmp_path):
    """A CLIP text tower is what Diffusers' SD-1 single-file loader understands: the whole pipeline loads."""
    from diffusers import StableDiffusionPipeline

    pipe = _quickstart_pipeline(tmp_path, text_encoder=tiny["clip"])
    path = export_single_file(pipe, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:  # the key by which SD-1 files are recognised
        assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in f.keys()
    configs = write_config_folder(tmp_path / "pipeline", tmp_path / "configs")
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(configs), safety_checker=None,
                                                      requires_safety_checker=False)
    theirs.scheduler = pipe.scheduler  # from_single_file picks its own default sampler
    assert np.abs(_latent_images(pipe) - _latent_images(theirs)).max() <= 1e-4


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_variants_store_rounded_weights(quickstart, tmp_path, precision, dtype):
    pipe, folder = quickstart
    full = export_single_file(pipe, tmp_path / "fp32.safetensors")
    half = export_single_file(pipe, tmp_path / f"{precision}.safetensors", precision)
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    with safe_open(str(half), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == dtype
    assert read_metadata(half)["ldm.dtype"] == precision
    loaded = load_single_file(half, torch_dtype=dtype)
    assert loaded.unet.dtype == dtype
    want = pipe.unet.state_dict()
    got = loaded.unet.state_dict()
    assert all(torch.equal(want[k].to(dtype), got[k]) for k in want)


def test_export_rejects_an_unknown_precision(quickstart, tmp_path):
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        export_single_file(quickstart[0], tmp_path / "x.safetensors", "fp8")


@pytest.mark.slow
def test_scripts_export_import_and_generate_from_the_file(quickstart, tmp_path):
    import os
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    _, folder = quickstart
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    file = tmp_path / "model.safetensors"
    assert "fp16" in run("scripts/single_file.py", "export", "--model", str(folder / "pipeline"), "--out", str(file),
                         "--precision", "fp16", "--configs", str(tmp_path / "configs"))
    assert (tmp_path / "configs" / "unet" / "config.json").is_file()
    run("scripts/single_file.py", "import", "--file", str(file), "--out", str(tmp_path / "imported"))
    imported = DiffusionPipeline.from_pretrained(tmp_path / "imported")
    assert list(imported.unet.config.block_out_channels) == [64, 128, 128]
    run("scripts/generate.py", "--model", str(file), "--prompt", "a red circle in the center", "--steps", "2",
        "--out", str(tmp_path / "samples"))
    assert (tmp_path / "samples" / "0000_seed0.png").is_file()
