"""Helpers the tests share: launching scripts in fresh processes, killing a run mid-way and resuming it, two CPU
processes under accelerate, comparing weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import write_config
from ldm.config.loading import load_config

ROOT = Path(__file__).resolve().parents[1]


# Runs scripts/train_text2img.py with a test-only slowdown, so the test can SIGKILL it at a chosen point.
LAUNCHER = """
import sys, time, runpy
import ldm.training.loop, ldm.training.checkpoint
mode, seconds = sys.argv[1], float(sys.argv[2])
if mode == "step":
    inner = ldm.training.loop.train_step
    def slow_step(*a, **k):
        time.sleep(seconds)
        return inner(*a, **k)
    ldm.training.loop.train_step = slow_step
elif mode == "checkpoint":
    inner = ldm.training.checkpoint._save_tensors
    def slow_save(tensors, path):
        inner(tensors, path)
        if path.name == "unet.safetensors" and "step_000004" in str(path):
            time.sleep(seconds)  # a checkpoint half written: the test kills us here
    ldm.training.checkpoint._save_tensors = slow_save
sys.argv = ["train_text2img.py"] + sys.argv[3:]
runpy.run_path("scripts/train_text2img.py", run_name="__main__")
"""


def script_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def launch_and_kill(tmp: Path, config: Path, mode: str, seconds: float, kill_when: Path) -> None:
    launcher = tmp / "launcher.py"
    launcher.write_text(LAUNCHER)
    proc = subprocess.Popen([sys.executable, str(launcher), mode, str(seconds), "--config", str(config)],
                            cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not kill_when.exists():
        if proc.poll() is not None:
            raise AssertionError("run ended before it could be killed:\n" + proc.stdout.read().decode()[-3000:])
        assert time.time() < deadline, "timed out waiting for " + str(kill_when)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_resume_and_compare(tmp: Path, overrides, files: tuple[str, ...], last: int = 6) -> None:
    """Train `overrides(out)` uninterrupted and, beside it, SIGKILLed after checkpoint 2 and resumed with
    scripts/train_text2img.py train.resume=latest; checkpoint `last` must hold the same `files` (≤ 1e-6)."""
    from ldm.training.loop import train

    ref = tmp / "ref"
    train(load_config(None, overrides(ref)), show_progress=False)
    out = tmp / "killed"
    config = write_config(tmp / "run.yaml", overrides(out))
    launch_and_kill(tmp, config, "step", 0.4, out / "checkpoints" / "step_000002")
    assert not (out / "checkpoints" / f"step_{last:06d}").exists(), "the run was meant to die mid-way"
    proc = subprocess.run([sys.executable, "scripts/train_text2img.py", "--config", str(config), "train.resume=latest"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    for name in files:
        a = load_file(str(ref / "checkpoints" / f"step_{last:06d}" / name))
        b = load_file(str(out / "checkpoints" / f"step_{last:06d}" / name))
        assert max_diff(a, b) <= 1e-6, name


def train_on_two_processes(config: Path) -> str:
    """scripts/train_text2img.py under `accelerate launch`, 2 CPU processes (gloo); returns its stdout."""
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "scripts/train_text2img.py", "--config", str(config)],
                          cwd=ROOT, env={**script_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final weights agree on 2 process(es)" in proc.stdout
    return proc.stdout


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def samples_of(out: Path, rank: int = 0) -> dict[int, list[list[int]]]:
    steps: dict[int, list[list[int]]] = {}
    for line in (out / f"samples_rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], []).append(row["indices"])
    return steps
