"""generate(fast=True): the same pictures as the plain pipeline within a stated tolerance, compiled once per job
(one batch shape), and refused where frozen weights would be wrong; the benchmark times it against plain
Diffusers back to back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.errors import ConfigError

PROMPTS = ["a red circle in the center", "a blue square on the left", "a green cross at the top"]
# fp32 with frozen, pre-packed weights sums in another order: a few 8-bit levels at most after 4 steps. bf16
# (only where the hardware has it) keeps 8 bits of mantissa in the UNet: looser.
MAX_LEVELS = {"fp32": 3, "bf16": 24}
MEAN_LEVELS = {"fp32": 0.5, "bf16": 4.0}


@pytest.fixture(scope="module")
def exported(tiny_pipeline):
    return tiny_pipeline


def _pixels(results) -> list[np.ndarray]:
    return [np.asarray(r.image, dtype=np.int16) for r in results]


@pytest.mark.slow
def test_fast_generation_matches_plain_and_compiles_once(exported):
    from torch._dynamo.utils import counters

    from ldm.inference.generate import generate
    from ldm.inference.pipeline import load_pipeline

    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=5, batch_size=2)
    plain = generate(load_pipeline(exported), PROMPTS, **kwargs)
    pipe = load_pipeline(exported)
    counters.clear()
    fast = generate(pipe, PROMPTS, fast=True, **kwargs)  # 3 images in batches of 2: the last one padded
    again = generate(pipe, PROMPTS[::-1], fast=True, **kwargs)
    precision = pipe._ldm_fast.precision
    assert pipe._ldm_fast.compiled and pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert [r.seed for r in fast] == [5, 6, 7] and [r.prompt for r in fast] == PROMPTS
    for a, b in zip(_pixels(plain), _pixels(fast)):
        diff = np.abs(a - b)
        assert diff.max() <= MAX_LEVELS[precision] and diff.mean() <= MEAN_LEVELS[precision], (diff.max(), diff.mean())
    # Image j keeps seed 5 + j whatever else is in the batch: the reversed call's first image is the third prompt
    # at seed 5, as the plain pipeline draws it alone.
    alone = generate(load_pipeline(exported), PROMPTS[2:], **kwargs)
    assert np.abs(_pixels(again)[0] - _pixels(alone)[0]).max() <= MAX_LEVELS[precision]
    # A negative prompt goes through the same once-per-job encoding.
    negative = dict(kwargs, negative_prompt="a yellow triangle")
    for a, b in zip(_pixels(generate(load_pipeline(exported), PROMPTS[:2], **negative)),
                    _pixels(generate(pipe, PROMPTS[:2], fast=True, **negative))):
        assert np.abs(a - b).max() <= MAX_LEVELS[precision]
    # Every call ran at one batch shape (the padded one): one graph for the UNet, one for the VAE's decoder.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_fast_generation_refuses_loras(exported, tmp_path):
    from ldm.inference.generate import generate

    with pytest.raises(ConfigError, match="fast=True"):
        generate(exported, PROMPTS[:1], fast=True, loras=[str(tmp_path / "any.safetensors")], num_inference_steps=1)


def test_bf16_path_stays_near_fp32_and_hands_the_scheduler_fp32(exported):
    """bf16 autocast of the UNet (forced here: on an AVX2-only CPU it is emulated, slow but the same arithmetic)."""
    from ldm.inference.fast import make_fast
    from ldm.inference.generate import generate
    from ldm.inference.pipeline import load_pipeline

    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=5, batch_size=2)
    pipe = load_pipeline(exported)
    assert make_fast(pipe, compile=False, precision="bf16") == make_fast(pipe)  # prepared once, kept
    predictions = []
    pipe.unet.register_forward_hook(lambda module, args, out: predictions.append(out))
    fast = generate(pipe, PROMPTS[:2], fast=True, **kwargs)
    plain = generate(load_pipeline(exported), PROMPTS[:2], **kwargs)
    assert predictions and all(out[0].dtype == torch.float32 for out in predictions)
    for a, b in zip(_pixels(plain), _pixels(fast)):
        diff = np.abs(a - b)
        assert 0 < diff.max() <= MAX_LEVELS["bf16"] and diff.mean() <= MEAN_LEVELS["bf16"], (diff.max(), diff.mean())
    with pytest.raises(ValueError, match="precision"):
        make_fast(pipe, precision="fp16")


def test_native_bf16_follows_the_cpu():
    from ldm.inference.fast import native_bf16

    assert native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.slow
def test_benchmark_times_plain_diffusers_against_fast_generate(exported):
    from ldm.evaluation.generation_speed import format_generation, time_generation

    report = time_generation(str(exported), PROMPTS, steps=2, batch=2, repeats=1)
    for name in ("plain", "fast"):
        assert len(report[name]["all"]) == 1 and report[name]["seconds_per_image"] > 0
    assert report["speedup"] == report["plain"]["seconds_per_image"] / report["fast"]["seconds_per_image"]
    assert report["fast_path"]["compiled"] and report["pixels_max_abs_diff"] <= MAX_LEVELS[
        report["fast_path"]["precision"]]
    assert "ldm.generate(fast=True)" in format_generation(report)


@pytest.mark.slow
def test_fast_unet_runs_frozen_prepacked_kernels_on_cpu(exported):
    """Weight freezing really happens: the compiled UNet calls oneDNN's convolutions with weights packed ahead of
    time (what freezing makes of a constant weight), not the plain convolution that reads the parameter each call."""
    from torch.profiler import ProfilerActivity, profile

    from ldm.inference.fast import make_fast
    from ldm.inference.pipeline import load_pipeline

    pipe = load_pipeline(exported)
    make_fast(pipe, precision="fp32")
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8)
    embeds = torch.randn(2, 4, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        pipe.unet(latents, 10, embeds)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe.unet(latents, 10, embeds)
    ops = {event.key for event in prof.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ops and "aten::mkldnn_convolution" not in ops, sorted(ops)


def test_text_keys_values_are_projected_once_per_call(exported):
    """The fast path projects the text's cross-attention keys and values once per pipeline call (a table), not at
    every denoising step, and the pictures stay those of the plain pipeline."""
    from diffusers.models.attention_processor import Attention

    from ldm.inference.fast import make_fast
    from ldm.inference.generate import generate
    from ldm.inference.pipeline import load_pipeline

    kwargs = dict(guidance_scale=3.0, num_inference_steps=4, seed=5, batch_size=2)
    pipe = load_pipeline(exported)
    assert make_fast(pipe, compile=False, precision="fp32").text_kv
    crosses = [m for m in pipe.unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    projected = []
    for module in crosses:
        module.to_k.register_forward_hook(lambda module, args, out: projected.append(out.shape))
    fast = generate(pipe, PROMPTS[:2], fast=True, **kwargs)
    # One table for the one call: each cross-attention's keys once, for both halves of the guided batch.
    assert crosses and len(projected) == len(crosses) and all(shape[0] == 4 for shape in projected)
    plain = generate(load_pipeline(exported), PROMPTS[:2], **kwargs)
    for a, b in zip(_pixels(plain), _pixels(fast)):
        assert np.abs(a - b).max() <= MAX_LEVELS["fp32"]
    # Unguided, the UNet's batch is the prompts alone, and so is the table.
    projected.clear()
    generate(pipe, PROMPTS[:2], fast=True, **dict(kwargs, guidance_scale=1.0))
    assert len(projected) == len(crosses) and all(shape[0] == 2 for shape in projected)
