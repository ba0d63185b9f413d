"""End to end on tiny real components: stage 1, stage 2, export, reload, generate, dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides, write_config
from ldm.config.loading import load_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    """A 2-step stage-2 run (BERT text encoder, on-the-fly encoding) exported as a pipeline."""
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, tiny_overrides(tiny, out) + ["train.ema_decay=0.9", "train.gradient_accumulation_steps=2"])
    return train(cfg, show_progress=False)


def test_two_step_run_exports_a_safetensors_pipeline(trained):
    files = {p.relative_to(trained).as_posix() for p in trained.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "scheduler/scheduler_config.json", "ldm_config.yaml"} <= files
    assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pkl")) for f in files)
    saved = load_config(trained / "ldm_config.yaml")
    assert saved.train.max_steps == 2 and saved.model.text_encoder.max_length == 12
    assert (trained.parent / "config.yaml").is_file()
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == ["transformers", "BertModel"]


def test_export_loads_in_plain_diffusers_and_matches_generate_script(trained, tmp_path):
    """scripts/generate.py and DiffusionPipeline.from_pretrained give the same pixels for the same seed."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from ldm.images import read_png_params

    prompts = ["a red circle in the center", "a blue square on the left"]
    out = tmp_path / "samples"
    _run(["scripts/generate.py", "--model", str(trained), "--prompt", prompts[0], "--prompt", prompts[1],
          "--seed", "11", "--steps", "4", "--guidance-scale", "3", "--sampler", "dpm++", "--out", str(out)])
    ours = [np.asarray(Image.open(out / f"{j:04d}_seed{11 + j}.png"), dtype=np.float64) / 255 for j in range(2)]
    assert (out / "grid.png").is_file()
    params = read_png_params(out / "0001_seed12.png")
    assert params["prompt"] == prompts[1] and params["seed"] == 12 and params["sampler"] == "dpm++"

    pipe = DiffusionPipeline.from_pretrained(str(trained))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(11 + j) for j in range(2)]
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=generators, output_type="np").images
    theirs = np.round(theirs * 255) / 255  # the PNGs hold 8-bit pixels
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() <= 1e-5


def test_ddpm_sampler_generates_from_the_export(trained):
    from ldm import generate

    results = generate(str(trained), ["a green cross at the top"], sampler="ddpm", num_inference_steps=5, seed=1)
    assert results[0].image.size == (16, 16) and results[0].params["sampler"] == "ddpm"
    with pytest.raises(ValueError, match="choose one of ddpm, ddim, dpm\\+\\+"):
        generate(str(trained), ["x"], sampler="plms")


def test_training_embeddings_equal_the_pipelines(tiny):
    """encode_prompts (training) computes exactly what the exported pipeline computes at inference."""
    from ldm.config.model import TextEncoderConfig
    from ldm.models.encoders import encode_prompts
    from ldm.models.loading import load_text_encoder

    for name in ("bert", "clip"):
        tokenizer, encoder = load_text_encoder(TextEncoderConfig(path=tiny[name], max_length=12))
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=None, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        prompts = ["a red circle", "an orange cross on the right", ""]
        ours = encode_prompts(tokenizer, encoder, prompts)
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        assert ours.shape == (3, 12, 32) and torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_cached_and_on_the_fly_batches_agree(tiny, tmp_path, flip):
    """The same batch and draws give the same latents, prompt_embeds and loss from the cache as on the fly."""
    from ldm.data.cache import build_cache, cache_fingerprints
    from ldm.data.sources import open_source
    from ldm.data.stream import SampleStream
    from ldm.diffusion import draw_samples
    from ldm.models.building import build_scheduler
    from ldm.models.encoders import FrozenEncoders
    from ldm.training.loop import encode_batch, train_step

    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["data.caption_dropout=0.5", f"data.random_flip={flip}"])
    frozen = FrozenEncoders(cfg.model, torch.device("cpu"))
    stream = SampleStream(open_source(cfg.data), cfg.data, seed=0)
    encoded = build_cache(stream, tmp_path / "cache", lambda: frozen.vae, lambda: frozen.text,
                          *cache_fingerprints(cfg, frozen), batch_size=8, show_progress=False)
    positions = list(range(5, 13))
    items = [stream[p] for p in positions]
    batch = {"position": positions, "index": [i["index"] for i in items],
             "pixel_values": torch.stack([i["pixel_values"] for i in items]), "caption": [i["caption"] for i in items]}
    draws = draw_samples(0, positions, (4, 8, 8), 1000, 0.5)
    assert 0 < int(draws.drop_caption.sum()) < 8
    a = encode_batch(batch, draws, None, frozen, "cpu")
    b = encode_batch(batch, draws, encoded, frozen, "cpu")
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    from ldm.models.building import build_unet
    from ldm.models.loading import describe_text_encoder, describe_vae
    from ldm.training.trainables.base import Trainable

    torch.manual_seed(0)
    unet = build_unet(cfg, describe_vae(cfg.model.vae), describe_text_encoder(cfg.model.text_encoder))
    sched = build_scheduler(cfg.model.scheduler)
    trainable = Trainable(cfg, unet)
    losses = [train_step(trainable, unet, sched, lat, emb, draws.noise, draws.timesteps, "epsilon", None).item()
              for lat, emb in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_clip_text_encoder_and_cache_train(tiny, tmp_path):
    from ldm.training.loop import train

    cfg = load_config(None, tiny_overrides(tiny, tmp_path, text_encoder="clip") + [
        "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}", "train.snr_gamma=5.0",
        "model.scheduler.prediction_type=v_prediction",
        "train.validate_every=1"])
    folder = train(cfg, show_progress=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    grids = sorted((tmp_path / "validation").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000001.png", "step_000002.png"]


def test_imagefolder_by_someone_else_trains_with_config_only(tiny, tmp_path, write_imagefolder):
    """Dataset path, caption column and resolution changed in YAML; no code change."""
    folder = write_imagefolder(n=8, caption_column="description", size=20)
    config = write_config(tmp_path / "mine.yaml", tiny_overrides(tiny, tmp_path / "run") + [
        f"data.dataset={folder}", "data.caption_column=description", "data.resolution=24"])
    stdout = _run(["scripts/train_text2img.py", "--config", str(config)])
    pipeline = Path(stdout.strip().splitlines()[-1].split(": ", 1)[1])
    from ldm import generate

    assert generate(str(pipeline), ["a shape"], num_inference_steps=2)[0].image.size == (24, 24)


def test_stage_one_autoencoder(tmp_path):
    from diffusers import AutoencoderKL

    from ldm.training.autoencoder import train_autoencoder

    cfg = load_config(None, ["data.resolution=16", "data.shapes.num_images=40",
                             "autoencoder.block_out_channels=[8, 16]",
                             "autoencoder.norm_num_groups=8", "autoencoder.max_steps=30", "autoencoder.batch_size=8",
                             f"autoencoder.output_dir={tmp_path / 'vae'}", "autoencoder.num_validation_images=8"])
    folder = train_autoencoder(cfg, show_progress=False)
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["held_out_images"] == 4 and 5.0 < metrics["psnr_db"] < 60.0
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    # The scaling factor normalises the training latents (samples of q(z|x)) to unit standard deviation.
    from ldm.data.sources import open_source
    from ldm.data.transforms import prepare_image

    source = open_source(cfg.data)
    x = torch.stack([prepare_image(source.get(i)[0], cfg.data) for i in range(32)])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    assert z.std().item() == pytest.approx(1.0, abs=0.1)


def test_sd15_dry_run_counts_860m_parameters_offline(tmp_path):
    stdout = _run(["scripts/train_text2img.py", "--config", "configs/sd15-512.yaml", "--dry-run"],
                  env_extra={"HF_HOME": str(tmp_path / "empty-hf-home")})
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["unet_parameters"] == pytest.approx(860e6, rel=0.01)
    assert report["latent_shape"] == [4, 64, 64] and report["prompt_embeds_shape"] == [77, 768]
    assert report["train_tflops_per_image"] == pytest.approx(2.4, rel=0.05)
    assert "859.5M" in stdout


def test_bf16_mixed_precision_with_gradient_checkpointing_keeps_the_vae_in_fp32(tiny, tmp_path):
    """bf16 autocast for the UNet only (accelerate), gradient checkpointing on; the VAE encodes and ships in fp32."""
    from conftest import write_config

    out = tmp_path / "bf16"
    config = write_config(tmp_path / "bf16.yaml", tiny_overrides(tiny, out) + [
        "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.max_steps=3", "train.log_every=1"])
    stdout = _run(["scripts/train_text2img.py", "--config", str(config)])
    assert "exported: " in stdout and "pipeline" in stdout
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(out / "pipeline" / "vae")
    unet = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet")
    assert next(vae.parameters()).dtype == torch.float32 and next(unet.parameters()).dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_xformers_without_xformers_is_a_config_error(tiny, tmp_path):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    from ldm.errors import ConfigError
    from ldm.training.loop import train

    with pytest.raises(ConfigError, match="'train.attention': xformers is not usable here"):
        train(load_config(None, tiny_overrides(tiny, tmp_path) + ["train.attention=xformers"]), show_progress=False)


@pytest.mark.slow
def test_evaluate_script_sweeps_samplers_and_guidance(trained, tmp_path):
    out = tmp_path / "eval"
    stdout = _run(["scripts/evaluate.py", "--model", str(trained), "--validation-images", "16",
                   "--samplers", "dpm++:2,3", "euler-a:2",
                   "--guidance", "1,3", "--guidance-sampler", "ddim:2", "--out", str(out)], timeout=600)
    report = json.loads((out / "sweep.json").read_text())
    runs = [(r["sampler"], r["steps"], r["guidance_scale"]) for r in report["samplers"] + report["guidance"]]
    assert runs == [("dpm++", 2, 4.0), ("dpm++", 3, 4.0), ("euler-a", 2, 4.0), ("ddim", 2, 1.0), ("ddim", 2, 3.0)]
    for row in report["samplers"] + report["guidance"]:
        assert row["seen"]["n"] == 216 and 0.0 <= row["seen"]["all"] <= 1.0
    assert len(report["validation_loss"]) == 11 and report["validation_loss"]["mean"] > 0  # 10 buckets + mean
    # NFE counts UNet evaluations per image: a guided step (both halves in one call) costs two.
    assert [r["nfe"] for r in report["samplers"]] == [4, 6, 4]
    assert [r["nfe"] for r in report["guidance"]] == [2, 4]
    assert all(0 < r["seconds_per_image"] < r["seconds"] for r in report["samplers"])
    assert (out / "accuracy_vs_nfe.png").stat().st_size > 1000 and (out / "accuracy_vs_guidance.png").is_file()
    assert "| dpm++ | 3 | 6 | 4 |" in (out / "sweep.md").read_text() and "| dpm++ | 3 |" in stdout


def test_guidance_batches_both_passes_and_one_skips_the_unconditional(trained):
    from ldm import generate
    from ldm.inference.pipeline import load_pipeline

    pipe, sizes = load_pipeline(str(trained)), []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    generate(pipe, ["a red circle", "a blue cross"], guidance_scale=1.0, num_inference_steps=2)
    generate(pipe, ["a red circle", "a blue cross"], guidance_scale=3.0, num_inference_steps=2,
             negative_prompt="a square")
    assert sizes == [2, 2, 4, 4]  # one UNet call per step: B without guidance, 2B (cond + uncond) with it


def test_process_pictures(trained, tmp_path):
    from ldm.evaluation.visualisation import forward_strip, guidance_grid, reverse_strip
    from ldm.inference.pipeline import load_pipeline
    from ldm.shapes import ShapeSpec, render

    pipe = load_pipeline(str(trained))
    strip = forward_strip(pipe, render(ShapeSpec("red", "circle", "center"), 16), timesteps=(0, 500, 999))
    assert strip.size == (3 * 18 + 2, 20)  # 3 tiles of 16 px with 2 px padding
    frames = np.asarray(strip, dtype=np.float64)
    tile = [frames[2:18, 2 + 18 * i:18 + 18 * i] for i in range(3)]
    # t = 0 is the (decoded) image itself; noisier frames move further away from it.
    assert np.abs(tile[1] - tile[0]).mean() < np.abs(tile[2] - tile[0]).mean()
    rev = reverse_strip(pipe, "a red circle in the center", num_inference_steps=4, show=3)
    assert rev.size == (3 * 18 + 2, 2 * 18 + 2)
    assert guidance_grid(pipe, "a red circle", scales=(1, 5), num_inference_steps=2).size == (2 * 18 + 2, 20)
    stdout = _run(["scripts/visualise.py", "--model", str(trained), "--out", str(tmp_path / "vis")])
    assert all((tmp_path / "vis" / f"{n}.png").is_file() for n in ("forward", "reverse", "guidance")), stdout


def test_validation_loss_on_held_back_samples_is_logged(tiny, tmp_path):
    from ldm.training.loop import train

    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["data.validation_images=4", "train.validate_every=1",
                                                              "train.max_steps=2", "train.record_samples=true"])
    train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "validation_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # at each validation; the last one after export
    assert set(rows[0]) == {"step", "mean", *(f"t{100 * k:03d}-{100 * k + 99:03d}" for k in range(10))}
    lines = (tmp_path / "samples_rank0.jsonl").read_text().splitlines()
    used = {i for line in lines for i in json.loads(line)["indices"]}
    assert used.isdisjoint(range(28, 32))  # the last 4 of the 32 shapes never entered training
