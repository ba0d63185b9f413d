"""Peak memory: of a training step, and of DDP against FSDP launches per rank."""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import psutil
import torch


class PeakMemory:
    """Peak RSS (sampled every 5 ms) on CPU, or CUDA max allocated, in MiB, between start() and stop()."""

    def __init__(self, device: torch.device):
        self.device, self._peak, self._stop, self._thread = device, 0, threading.Event(), None

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self._peak = max(self._peak, proc.memory_info().rss)
            time.sleep(0.005)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        self._thread.join()
        return self._peak / 2**20


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """PeakMemory over a block: {"peak_mib": …} once it ends."""
    memory, result = PeakMemory(device), {}
    memory.start()
    try:
        yield result
    finally:
        result["peak_mib"] = memory.stop()


def sharding_memory(script: Path, config: Optional[str], overrides: list[str], out: Path, num_processes: int,
                    warmup: int, windows: int, window_steps: int) -> dict:
    """The same training under train.sharding=none (DDP) and fsdp, each a fresh `accelerate launch` of
    `num_processes` processes (gloo ranks on CPU), one after the other: peak memory per process over the
    timed windows (RSS on CPU, max allocated on CUDA) and what each process holds of the trained state."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})}
    result: dict = {"num_processes": num_processes, "runs": {}}
    for sharding in ("none", "fsdp"):
        report = out / f"memory_{sharding}"
        shutil.rmtree(report.with_name(report.name + "_run"), ignore_errors=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(script), *(["--config", config] if config else []), "--memory-run", str(report),
               "--warmup", str(warmup), "--windows", str(windows), "--window-steps", str(window_steps),
               *overrides, f"train.sharding={sharding}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the {sharding} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(num_processes)]
        lead = ranks[0]
        ema = lead["ema"]
        result["runs"][sharding] = {
            "peak_mib_per_rank": [r["peak_mib"] for r in ranks],
            "seconds_per_step": lead["seconds_per_step"], "parameters": lead["parameters"],
            "parameters_held_per_process": lead["parameters_held_per_process"],
            # fp32 weights, gradients and AdamW's two moments (the EMA shadow when on): what sharding divides.
            "state_mib_held_per_process": lead["parameters_held_per_process"] * 4 * (4 + int(ema)) / 2**20}
    none, fsdp = result["runs"]["none"], result["runs"]["fsdp"]
    result["peak_saving_mib_per_rank"] = max(none["peak_mib_per_rank"]) - max(fsdp["peak_mib_per_rank"])
    return result


def format_sharding_memory(r: dict) -> str:
    rows = [f"{r['num_processes']} processes, the same training under DDP and FSDP (train.sharding)",
            "| sharding | peak memory per rank | trained parameters held per rank | weights, gradients, AdamW "
            "(and EMA) held per rank | s/step |", "| --- | --- | --- | --- | --- |"]
    for name, label in (("none", "none (DDP)"), ("fsdp", "fsdp (FSDP2)")):
        x = r["runs"][name]
        peaks = " / ".join(f"{p:.0f}" for p in x["peak_mib_per_rank"])
        rows.append(f"| {label} | {peaks} MiB | {x['parameters_held_per_process'] / 1e6:.1f} M of "
                    f"{x['parameters'] / 1e6:.1f} M | {x['state_mib_held_per_process']:.0f} MiB | "
                    f"{x['seconds_per_step']:.3f} |")
    rows.append(f"FSDP saves {r['peak_saving_mib_per_rank']:.0f} MiB of peak memory per rank")
    return "\n".join(rows)
