"""LoRA on the one "what trains" interface: training, checkpoints, resume, processes, precision, and the files
plain Diffusers, AUTOMATIC1111 and ComfyUI load."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, write_config
from helpers import ROOT, kill_resume_and_compare, max_diff, script_env, train_on_two_processes
from ldm.config.loading import load_config
from ldm.errors import ConfigError

PROMPTS = ["a red circle in the center", "a blue square on the left"]
RANK, ALPHA = 4, 2.0  # alpha ≠ rank: every consumer must apply the scale alpha / rank = 0.5


@pytest.fixture(scope="module")
def base(tiny_pipeline) -> Path:
    """The text-to-image pipeline the LoRAs adapt."""
    return tiny_pipeline


def lora_overrides(base: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={base}", "lora.enabled=true", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
            "lora.targets=[attention, projections, feed_forward, convolutions, time_embedding]",
            "lora.trigger_words=[zq]", "data.dataset=shapes", "data.resolution=16", "data.shapes.num_images=24",
            f"train.output_dir={out}", "train.batch_size=4", "train.lr=2e-2", "train.report_to=none",
            "train.log_every=1", "train.validate_every=0", "train.ema_decay=0.9", "train.checkpoint_every=2",
            "train.max_steps=4", f"sample.prompts={PROMPTS}", "sample.num_inference_steps=3",
            "sample.guidance_scale=3.0", *extra]


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("lora_run")
    return train(load_config(None, lora_overrides(base, out, "lora.fuse=true")), show_progress=False)


def test_lora_trains_only_the_adapter_and_its_checkpoint_holds_only_that(base, lora_run):
    run = lora_run.parent
    ckpt = run / "checkpoints" / "step_000004"
    weights = load_file(str(ckpt / "lora.safetensors"))
    assert not (ckpt / "unet.safetensors").exists()
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert all(".lora_" in k for k in load_file(str(ckpt / "ema.safetensors")))
    # The optimizer saw only the adapter: one (exp_avg, exp_avg_sq, step) triple per LoRA tensor.
    assert len(load_file(str(ckpt / "optimizer.safetensors"))) == 3 * len(weights)
    unet_bytes = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (ckpt / "lora.safetensors").stat().st_size < unet_bytes / 2
    # B started at zero and moved; every target group got adapters (attention, ff, convs, time embedding).
    assert any(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)
    for part in ("attn1.to_q", "attn2.to_out.0", "ff.net.2", "proj_in", "resnets.0.conv1", "time_emb_proj",
                 "time_embedding.linear_1"):
        assert any(part in k for k in weights), part
    files = sorted(p.name for p in lora_run.iterdir())
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "ldm_config.yaml", "README.md"} <= set(files)
    card = (lora_run / "README.md").read_text()
    assert f"| rank | {RANK} |" in card and "| alpha | 2 (scale alpha / rank = 0.5)" in card and "zq" in card
    assert "load_lora_weights" in card and "base_model" not in card.split("---")[1]  # a local base is no Hub id
    # Publishing the LoRA folder: its files go up; training state copied beside them does not.
    import shutil

    from ldm.interop.hub import upload_plan

    for name in ("lora.safetensors", "ema.safetensors", "optimizer.safetensors"):
        shutil.copy(ckpt / name, lora_run / name)
    files, refused = upload_plan(lora_run)
    assert files == ["README.md", "ldm_config.yaml", "lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]
    assert refused == ["ema.safetensors", "lora.safetensors", "optimizer.safetensors"]
    for name in refused:
        (lora_run / name).unlink()


def test_lora_training_changes_no_base_weight(tiny, base, tmp_path):
    """Optimizer steps through the loop's own train_step move the adapter and leave every base weight bit-identical."""
    from diffusers.optimization import get_scheduler

    from ldm.models.building import build_scheduler, build_unet
    from ldm.models.loading import check_components
    from ldm.training.loop import train_step
    from ldm.training.trainables import build_trainable

    cfg = load_config(None, lora_overrides(base, tmp_path))
    vae_info, text_info = check_components(cfg)
    trainable = build_trainable(cfg, lambda: build_unet(cfg, vae_info, text_info), vae_info.downsample)
    before = {n: p.detach().clone() for n, p in trainable.module.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    assert lora_before and all("lora_" in n for n in lora_before)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2, weight_decay=0.1)
    lr = get_scheduler("constant", optimizer)
    scheduler = build_scheduler(cfg.model.scheduler)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        embeds = torch.randn(2, 12, 32, generator=g)
        loss = train_step(trainable, trainable.module, scheduler, latents, embeds, noise, torch.tensor([10, 500]),
                          "epsilon", None)
        loss.backward()
        optimizer.step(), lr.step(), optimizer.zero_grad()
    after = dict(trainable.module.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())
    assert any(not torch.equal(after[n], v) for n, v in lora_before.items())


@pytest.mark.slow
def test_lora_resumes_exactly_after_sigkill(base, tmp_path):
    run = ["train.max_steps=6", "train.gradient_accumulation_steps=2", "train.lr_scheduler=cosine",
           "train.lr_warmup_steps=1"]
    kill_resume_and_compare(tmp_path, lambda out: lora_overrides(base, out, *run),
                            ("lora.safetensors", "ema.safetensors"))


@pytest.mark.slow
def test_lora_two_processes_match_one(base, tmp_path):
    from ldm.training.loop import train

    common = ["train.max_steps=2", "train.adam_epsilon=1e-4", "train.checkpoint_every=2"]
    two = write_config(tmp_path / "two.yaml", lora_overrides(base, tmp_path / "two", "train.batch_size=2", *common))
    train_on_two_processes(two)
    train(load_config(None, lora_overrides(base, tmp_path / "one", "train.batch_size=4", *common)), show_progress=False)
    a = load_file(str(tmp_path / "two" / "checkpoints" / "step_000002" / "lora.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoints" / "step_000002" / "lora.safetensors"))
    assert max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lora_mixed_precision_runs_with_fp32_adapter_weights(base, tmp_path, precision):
    # A fresh process (accelerate fixes the precision once per process), as a user would run it.
    config = write_config(tmp_path / "run.yaml", lora_overrides(base, tmp_path, f"train.mixed_precision={precision}",
                                                                "train.max_steps=2", "lora.kohya=false"))
    proc = subprocess.run([sys.executable, "scripts/train_text2img.py", "--config", str(config)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unscale" not in proc.stderr.lower()
    out = tmp_path / "lora"
    weights = load_file(str(tmp_path / "checkpoints" / "step_000002" / "lora.safetensors"))
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "lora_kohya.safetensors").exists()


def _plain(base: Path):
    from diffusers import StableDiffusionPipeline

    from ldm.inference.pipeline import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_plain_diffusers_matches_generate(base: Path, folder: Path):
    """Plain Diffusers (base + load_lora_weights) gives ldm.generate's pixels; returns that pipeline."""
    from ldm.inference.generate import generate

    ours = generate(base, PROMPTS, loras=[folder], num_inference_steps=3, guidance_scale=3.0, seed=3)
    pipe = _plain(base)
    pipe.load_lora_weights(folder)
    generators = [torch.Generator().manual_seed(3 + j) for j in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=generators).images
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b)) for a, b in zip(ours, theirs))
    return pipe


def _images(pipe, seed: int = 3, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + j) for j in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=generators, output_type="np",
                **kwargs).images


def test_plain_diffusers_reproduces_ldm_generate_with_the_lora(base, lora_run, caplog):
    from ldm.inference.generate import generate

    ours = generate(base, PROMPTS, loras=[lora_run], num_inference_steps=3, guidance_scale=3.0, seed=3)
    assert ours[0].params["loras"] == [f"{lora_run.name}:1"]
    pipe = _plain(base)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(lora_run)
    # Nothing unexpected or missing (the one notice says the BERT text encoder gets no LoRA, which is right).
    assert not [r for r in caplog.records if re.search(r"(unexpected|missing)( adapter)? keys", r.getMessage())], \
        caplog.text
    # alpha ≠ rank travelled with the file: peft's scale is alpha / rank.
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[next(iter(layer.scaling))] == pytest.approx(ALPHA / RANK)
    generators = [torch.Generator().manual_seed(3 + j) for j in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=generators).images
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a.image), np.asarray(b))
    with_lora = _images(pipe)
    assert np.abs(with_lora - _images(_plain(base))).max() > 1e-3  # the LoRA does something
    # A scale halves the update: generate(…:0.5) equals Diffusers with set_adapters weight 0.5.
    half = generate(base, PROMPTS, loras=[f"{lora_run}:0.5"], num_inference_steps=3, guidance_scale=3.0, seed=3)
    pipe.set_adapters(pipe.get_list_adapters()["unet"], adapter_weights=[0.5])
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(3 + j) for j in range(2)]).images
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b)) for a, b in zip(half, theirs))


def test_kohya_file_loads_in_diffusers_strict_converter_and_matches(base, lora_run):
    from safetensors import safe_open

    kohya = lora_run / "lora_kohya.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    assert alphas and all(a.ndim == 0 and float(a) == ALPHA for a in alphas.values())
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.trigger_phrase"] == "zq"
    diffusers_format = _plain(base)
    diffusers_format.load_lora_weights(lora_run)
    kohya_format = _plain(base)
    kohya_format.load_lora_weights(str(lora_run), weight_name="lora_kohya.safetensors")  # strict: all keys consumed
    assert np.abs(_images(kohya_format) - _images(diffusers_format)).max() <= 1e-4


def test_fused_export_matches_the_unfused_lora(base, lora_run):
    from ldm.inference.pipeline import load_pipeline

    fused = lora_run.parent / "pipeline"  # lora.fuse=true
    pipe = load_pipeline(fused)
    assert not pipe.get_list_adapters()  # plain weights, no adapter layers
    unfused = _plain(base)
    unfused.load_lora_weights(lora_run)
    plain = _plain(fused)
    assert np.abs(_images(plain) - _images(unfused)).max() <= 1e-4


def test_every_kohya_module_maps_onto_the_sd15_single_file_layout():
    """An SD-1.5-layout UNet (from config, on the meta device): every module of its kohya LoRA lands on a weight
    of ldm's LDM-layout export under the AUTOMATIC1111/ComfyUI renaming; a Diffusers-native file does not."""
    from diffusers import UNet2DConditionModel

    from ldm.config.kinds import LoRAConfig
    from ldm.config.model import UNetConfig
    from ldm.interop.lora import peft_config, to_kohya, unmapped_modules
    from ldm.interop.single_file import unet_to_ldm
    from ldm.models.building import unet_kwargs

    lcfg = LoRAConfig(enabled=True, rank=4, targets=["attention", "projections", "feed_forward", "convolutions",
                                                    "time_embedding"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs(UNetConfig(), 768, 64, 4))
        ldm_keys = list(unet_to_ldm(unet))
        unet.add_adapter(peft_config(lcfg))
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    kohya = to_kohya(state, 4.0)
    modules = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".weight")}
    # SD-1.5: 16 transformers × (8 attention + 2 feed-forward + 2 projections) + 22 resnets × 3 + 2 time embedding.
    assert len(modules) == 16 * 12 + 22 * 3 + 2
    assert unmapped_modules(kohya, ldm_keys) == []
    native = [f"unet.{k}" for k in state]  # what Diffusers' own save_lora_weights writes
    assert len(unmapped_modules(native, ldm_keys)) == len({k.rsplit(".", 2)[0] for k in native})


def test_generate_script_takes_lora_and_config_errors(base, lora_run, tmp_path):
    proc = subprocess.run([sys.executable, "scripts/generate.py", "--model", str(base), "--prompt", PROMPTS[0],
                           "--steps", "2", "--lora", f"{lora_run / 'lora_kohya.safetensors'}:0.8",
                           "--out", str(tmp_path)], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from ldm.images import read_png_params

    assert read_png_params(tmp_path / "0000_seed0.png")["loras"] == ["lora_kohya.safetensors:0.8"]
    with pytest.raises(ConfigError, match="lora.enabled.*model.pretrained"):
        load_config(None, ["lora.enabled=true"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(None, [f"model.pretrained={base}", "lora.enabled=true", "lora.rank=0"])
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config(None, [f"model.pretrained={base}", "lora.enabled=true", "lora.targets=[attn]"])


@pytest.fixture(scope="module")
def clip_base(tiny, tmp_path_factory) -> Path:
    """A 3-step base with a CLIP text encoder (the text-encoder LoRA's kohya names are CLIP's)."""
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("clip_base")
    return train(load_config(None, tiny_overrides(tiny, out, "clip") + ["train.max_steps=3"]), show_progress=False)


def test_text_encoder_lora_trains_exports_and_loads_in_plain_diffusers(clip_base, tmp_path):
    from safetensors import safe_open

    from ldm.training.loop import train

    folder = train(load_config(None, lora_overrides(clip_base, tmp_path, "model.text_encoder.train=lora",
                                                    "model.text_encoder.lr=1e-2", "data.cache=true",
                                                    f"data.cache_dir={tmp_path / 'cache'}")), show_progress=False)
    ckpt = load_file(str(tmp_path / "checkpoints" / "step_000004" / "lora.safetensors"))
    text = [k for k in ckpt if k.startswith("text_encoder.")]
    assert text and all(".lora_A." in k or ".lora_B." in k for k in ckpt)
    assert any("q_proj" in k for k in text) and any("out_proj" in k for k in text)
    state = json.loads((tmp_path / "checkpoints" / "step_000004" / "state.json").read_text())
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [2e-2, 1e-2]  # each its own lr
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("text_encoder.") for k in f.keys()) and any(k.startswith("unet.") for k in f.keys())
    with safe_open(str(folder / "lora_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())
    pipe = _assert_plain_diffusers_matches_generate(clip_base, folder)
    assert any(ckpt[k].abs().max() > 0 for k in text if ".lora_B." in k)  # the text encoder's adapters trained
    embeds, base_embeds = (p.encode_prompt(PROMPTS, "cpu", 1, False)[0] for p in (pipe, _plain(clip_base)))
    assert (embeds - base_embeds).abs().max() > 1e-3  # and plain Diffusers applies them
    kohya = _plain(clip_base)
    kohya.load_lora_weights(str(folder), weight_name="lora_kohya.safetensors")
    assert np.abs(_images(kohya) - _images(pipe)).max() <= 1e-4


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_full_text_encoder_fine_tune_with_its_own_lr_resumes_exactly(base, tmp_path):
    """UNet and BERT text encoder trained whole (text encoder at a lower lr); resuming from a checkpoint ends
    where the uninterrupted run ends (dropout in BERT draws from the restored RNG)."""
    from ldm.training.loop import train

    full = ["lora.enabled=false", "model.text_encoder.train=full", "model.text_encoder.lr=5e-4",
            "train.lr=1e-3", "train.max_steps=4", "train.checkpoint_every=2"]
    ref = tmp_path / "ref"
    folder = train(load_config(None, lora_overrides(base, ref, *full)), show_progress=False)
    ckpt = ref / "checkpoints" / "step_000004"
    weights = load_file(str(ckpt / "unet.safetensors"))
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("conv_in") for k in weights)
    assert [g["initial_lr"] for g in _json(ckpt / "state.json")["optimizer"]["param_groups"]] == [1e-3, 5e-4]
    before = load_file(str(base / "text_encoder" / "model.safetensors"))
    after = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the exported encoder is the trained one
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ref / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    train(load_config(None, lora_overrides(base, resumed, *full, "train.resume=latest")), show_progress=False)
    assert max_diff(weights, load_file(str(resumed / "checkpoints" / "step_000004" / "unet.safetensors"))) <= 1e-6
    with pytest.raises(ConfigError, match="model.text_encoder.train"):
        load_config(None, [f"model.pretrained={base}", "model.text_encoder.train=lora"])


def test_dora_trains_and_loads_in_plain_diffusers_without_a_kohya_file(base, tmp_path):
    from ldm.training.loop import train

    folder = train(load_config(None, lora_overrides(base, tmp_path, "lora.use_dora=true", "train.max_steps=2")),
                   show_progress=False)
    weights = load_file(str(tmp_path / "checkpoints" / "step_000002" / "lora.safetensors"))
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's magnitudes train beside A and B
    assert not (folder / "lora_kohya.safetensors").exists()
    _assert_plain_diffusers_matches_generate(base, folder)
    assert "(DoRA)" in (folder / "README.md").read_text()
