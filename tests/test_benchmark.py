"""The benchmark times train() itself (the loop's own step), on the fly and from the cache, and inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from ldm.config.loading import load_config


def test_benchmark_times_the_training_loop_and_inference(tiny, tmp_path):
    from ldm.evaluation.benchmark import format_report, run_benchmark

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
    """The memory table of docs/results/long-runs.md: the same run under DDP and FSDP on 2 processes, peak memory
    of each rank."""
    from ldm.evaluation.memory import format_sharding_memory, sharding_memory

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


# A test double of Diffusers' train_text_to_image.py (the real one needs torchvision, which this project does not
# install): it takes the same arguments, prints the same progress-bar displays, and costs a fixed start-up plus
# a fixed sleep per step, so the steady state of the comparison must come out as that sleep.
EXAMPLE_DOUBLE = '''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for a in ("pretrained_model_name_or_path", "train_data_dir", "resolution", "train_batch_size", "learning_rate",
          "max_train_steps", "lr_scheduler", "lr_warmup_steps", "seed", "mixed_precision", "max_grad_norm",
          "output_dir", "checkpointing_steps", "report_to"):
    p.add_argument("--" + a, required=True)
p.add_argument("--center_crop", action="store_true")
a = p.parse_args()
assert os.path.isfile(os.path.join(a.pretrained_model_name_or_path, "model_index.json"))
assert len(os.listdir(a.train_data_dir)) > 0
time.sleep(0.5)  # start-up: cancels out of the steady state
n = int(a.max_train_steps)
for k in range(1, n + 1):
    time.sleep(0.05)
    bar = f"{k}/{n} [00:01<00:00, 1.0it/s, lr=0.0001, step_loss={k / 1000:.3f}]"
    sys.stdout.write(f"\\rSteps: {100 * k // n}%| | {bar}")
    sys.stdout.flush()
os.makedirs(a.output_dir, exist_ok=True)
json.dump(vars(a), open(os.path.join(a.output_dir, "args.json"), "w"))
'''


@pytest.mark.slow
def test_peer_comparison_alternates_fresh_processes_and_takes_the_steady_state(tmp_path):
    from ldm.evaluation.peer import format_peer, run_peer

    example = tmp_path / "train_text_to_image.py"
    example.write_text(EXAMPLE_DOUBLE)
    report = run_peer(example, tmp_path / "peer", images=8, kinds={"nothing cached": ["data.cache=false"]},
                      lengths=(2, 12), repeats=1, batch=4, pipeline_kwargs={"real_tokenizer": False})
    table = report["table"]
    assert report["sizes"]["unet_parameters"] == 6_600_900  # the 6.6M-parameter UNet
    # The double sleeps 0.05 s a step after a 0.5 s start-up: (wall 12 − wall 2) / 10 recovers the step.
    assert table["example"]["s_per_step"] == pytest.approx(0.05, abs=0.02)
    assert table["example"]["final_loss"] == pytest.approx(sum(range(3, 13)) / 10 / 1000)  # its last 10 steps
    ldm = table["nothing cached"]
    assert ldm["s_per_step"] > 0 and ldm["vs_example"] == pytest.approx(table["example"]["s_per_step"] /
                                                                        ldm["s_per_step"])
    assert 0 < ldm["final_loss"] < 2
    runs = tmp_path / "peer" / "runs"
    args = json.loads((runs / "example-12" / "args.json").read_text())
    assert args["train_batch_size"] == "4" and args["max_train_steps"] == "12" and args["center_crop"]
    cfg = load_config(runs / "nothing cached-12" / "config.yaml")
    assert cfg.train.max_steps == 12 and cfg.train.batch_size == 4 and not cfg.data.cache
    assert Path(cfg.model.pretrained) == tmp_path / "peer" / "pipeline"
    assert json.loads((tmp_path / "peer" / "peer.json").read_text())["table"]["example"]["s_per_step"] > 0
    assert "| Diffusers' example |" in (tmp_path / "peer" / "peer.md").read_text() == format_peer(report) + "\n"
