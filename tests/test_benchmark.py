"""The benchmark times train() itself (the loop's own step), on the fly and from the cache, and inference."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_overrides
from ldm.config import load_config


def test_benchmark_times_the_training_loop_and_inference(tiny, tmp_path):
    from ldm.benchmark import format_report, run_benchmark

    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "unused") + [
        f"data.cache_dir={tmp_path / 'bench' / 'cache'}", "train.ema_decay=0.9"])
    report = run_benchmark(cfg, warmup=1, windows=2, window_steps=2, inference_steps=2, inference_batch=2)
    for key in ("on_the_fly", "cached"):
        timing = report[key]
        assert len(timing["window_seconds"]) == 2 and all(s > 0 for s in timing["window_seconds"])
        assert timing["seconds_per_step"] > 0 and timing["peak_mib"] > 0
        assert timing["images_per_second"] == cfg.train.batch_size / timing["seconds_per_step"]
    # Both timings are whole train() runs: each wrote its config and export, and stopped at warm-up + windows.
    runs = tmp_path / "bench" / "runs"
    for name in ("on_the_fly", "cached"):
        assert (runs / name / "pipeline" / "model_index.json").is_file()
        assert load_config(runs / name / "config.yaml").train.max_steps == 1 + 2 * 2
    assert load_config(runs / "cached" / "config.yaml").data.cache
    assert report["cache_speedup"] > 0 and report["inference"]["seconds_per_unet_call"] > 0
    assert "cache speed-up" in format_report(report)


@pytest.mark.slow
def test_sharding_memory_compares_ddp_and_fsdp_in_fresh_launches(tiny, tmp_path):
    """The README's memory table: the same run under DDP and FSDP on 2 processes, peak memory of each rank."""
    from ldm.benchmark import format_sharding_memory, sharding_memory

    root = Path(__file__).resolve().parents[1]
    overrides = tiny_overrides(tiny, tmp_path / "unused") + ["train.ema_decay=0.9", "train.batch_size=2"]
    report = sharding_memory(root / "scripts" / "benchmark.py", None, overrides, tmp_path, 2, 1, 2, 1)
    ddp, fsdp = report["runs"]["none"], report["runs"]["fsdp"]
    assert ddp["parameters"] == fsdp["parameters"] == ddp["parameters_held_per_process"]
    assert fsdp["parameters_held_per_process"] <= 0.55 * ddp["parameters"]  # each rank holds about half
    assert fsdp["state_mib_held_per_process"] <= 0.55 * ddp["state_mib_held_per_process"]
    assert len(ddp["peak_mib_per_rank"]) == len(fsdp["peak_mib_per_rank"]) == 2
    assert all(p > 100 for p in ddp["peak_mib_per_rank"] + fsdp["peak_mib_per_rank"])  # RSS of a real process
    for name in ("none", "fsdp"):  # both were real runs of 1 + 2 steps, on 2 ranks
        run = tmp_path / f"memory_{name}_run"
        assert load_config(run / "config.yaml").train.sharding == name
        assert load_config(run / "config.yaml").train.max_steps == 3
    assert "fsdp (FSDP2)" in format_sharding_memory(report)
