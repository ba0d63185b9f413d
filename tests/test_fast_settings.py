"""The speed settings change how a step is computed, not what it computes: bf16 autocast gives the fp32 loss
within a stated tolerance on the same fixed batch, and channels-last and compiled runs resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import _run

from conftest import tiny_overrides, write_config
from helpers import kill_resume_and_compare

# bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 %); the loss averages many such products.
BF16_REL_TOLERANCE = 0.02


def _first_losses(tiny, out: Path, *extra: str) -> list[float]:
    """Loss of steps 1-3, one row each (log_every=1): step 1 is the same fixed batch at the same weights. A fresh
    process each: accelerate fixes the precision once per process."""
    config = write_config(out.parent / f"{out.name}.yaml", tiny_overrides(tiny, out) + ["train.max_steps=3", *extra])
    _run(["scripts/train_text2img.py", "--config", str(config)])
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_bf16_autocast_gives_the_fp32_loss_on_a_fixed_batch(tiny, tmp_path):
    fp32 = _first_losses(tiny, tmp_path / "fp32")
    bf16 = _first_losses(tiny, tmp_path / "bf16", "train.mixed_precision=bf16")
    fast = _first_losses(tiny, tmp_path / "fast", "train.mixed_precision=bf16", "train.channels_last=true")
    assert abs(bf16[0] - fp32[0]) <= BF16_REL_TOLERANCE * fp32[0], (fp32, bf16)
    assert abs(fast[0] - fp32[0]) <= BF16_REL_TOLERANCE * fp32[0], (fp32, fast)
    assert bf16[0] != fp32[0], "bf16 autocast ran in fp32: the setting did not take effect"
    # Later steps follow weights that bf16 moved slightly differently: still close, looser.
    for a, b in zip(fp32[1:], bf16[1:]):
        assert abs(a - b) <= 3 * BF16_REL_TOLERANCE * a, (fp32, bf16)


@pytest.mark.slow
def test_channels_last_loss_equals_fp32_contiguous(tiny, tmp_path):
    plain = _first_losses(tiny, tmp_path / "plain")
    nhwc = _first_losses(tiny, tmp_path / "nhwc", "train.channels_last=true")
    for a, b in zip(plain, nhwc):
        assert abs(a - b) <= 1e-4 * a, (plain, nhwc)


_RUN = ["train.max_steps=6", "train.checkpoint_every=2", "train.ema_decay=0.9"]


@pytest.mark.slow
def test_a_channels_last_run_resumes_exactly(tiny, tmp_path):
    kill_resume_and_compare(tmp_path, lambda out: tiny_overrides(tiny, out) + _RUN + ["train.channels_last=true"],
                            ("unet.safetensors", "ema.safetensors"))


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(tiny, tmp_path):
    kill_resume_and_compare(tmp_path, lambda out: tiny_overrides(tiny, out) + _RUN + ["train.compile=true"],
                            ("unet.safetensors", "ema.safetensors"))
