"""Throughput and memory, measured on the training loop's own code path, as ratios within one run.

Training: `train()` itself, timed through its per-step hook: images/s and s/step after warm-up (median of
several windows), on-the-fly decoding and
encoding against the fingerprinted cache, peak memory (RSS on CPU, max allocated on CUDA), the
analytic UNet FLOPs per image and, on a GPU with a known peak, MFU. Inference: seconds per UNet
call and per denoising step inside a real pipeline call, so the per-step overhead outside the UNet
(scheduler, guidance arithmetic, Python) is visible, and seconds per image end to end.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ldm.config.schema import Config
from ldm.data.audit import open_audited
from ldm.data.cache import build_cache, cache_fingerprints
from ldm.data.stream import SampleStream
from ldm.evaluation.memory import PeakMemory
from ldm.evaluation.stand_ins import STAND_IN_VAES
from ldm.inference.pipeline import assemble_pipeline
from ldm.models.building import build_scheduler, build_unet, unet_flops_per_image, unet_kwargs
from ldm.models.encoders import FrozenEncoders
from ldm.models.hooks import wrapped_forward
from ldm.models.loading import check_components
from ldm.training.loop import train
from ldm.training.setup import set_tf32

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


STAND_IN_VAES["stabilityai/sd-vae-ft-ema"] = STAND_IN_VAES["stabilityai/sd-vae-ft-mse"]


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (timings depend on it: AVX2 against AVX-512 BF16 / AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds_per_step: float
    images_per_second: float
    window_seconds: list[float]
    peak_mib: float


def time_training(cfg: Config, cached: bool, device: torch.device, warmup: int, windows: int, window_steps: int,
                  out: Path) -> Timing:
    """Optimizer steps of `train()` itself (the loop's own code path: draws, decoding and encoding or the cache,
    the step, clipping, the guard, EMA), timed in windows after warm-up through its `on_step` hook; peak memory
    over the same windows. Checkpoints, validation and publishing are off; the run writes into `out`."""
    run = copy.deepcopy(cfg)
    t = run.train
    t.max_steps, t.checkpoint_every, t.validate_every = warmup + windows * window_steps, 0, 0
    t.report_to, t.output_dir, t.resume = "none", str(out), None
    run.data.cache, run.data.validation_images = cached, 0
    run.hub.repo_id, run.hub.push_checkpoints = None, False
    marks: list[float] = []
    memory, peak = PeakMemory(device), [0.0]

    def on_step(step: int) -> None:
        if step >= warmup and (step - warmup) % window_steps == 0:
            _sync(device)
            marks.append(time.perf_counter())
            if step == warmup:
                memory.start()
            if step == t.max_steps:
                peak[0] = memory.stop()

    shutil.rmtree(out, ignore_errors=True)
    train(run, show_progress=False, on_step=on_step)
    per_window = [b - a for a, b in zip(marks, marks[1:])]
    s_step = statistics.median(per_window) / window_steps
    return Timing(s_step, t.batch_size / s_step, per_window, peak[0])


def time_inference(cfg: Config, frozen: FrozenEncoders, device: torch.device, steps: int, batch: int,
                   repeats: int = 3) -> dict:
    """Seconds per UNet call and per denoising step inside StableDiffusionPipeline, and per image."""
    torch.manual_seed(0)
    vae_info, text_info = check_components(cfg)
    unet = build_unet(cfg, vae_info, text_info).to(device).eval()
    tokenizer, text_encoder = frozen.text
    pipe = assemble_pipeline(frozen.vae, text_encoder, tokenizer, unet, build_scheduler(cfg.model.scheduler),
                             sampler=cfg.sample.sampler)
    pipe.set_progress_bar_config(disable=True)
    unet_seconds: list[float] = []

    def timing(inner):
        def timed_forward(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(device)
            unet_seconds.append(time.perf_counter() - start)
            return out

        return timed_forward

    step_ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        _sync(device)
        step_ends.append(time.perf_counter())
        return kwargs

    prompts = [cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(batch)]
    results = []
    with wrapped_forward(unet, timing):
        for r in range(repeats + 1):  # the first call warms up
            unet_seconds.clear()
            step_ends.clear()
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                pipe(prompts, num_inference_steps=steps, guidance_scale=cfg.sample.guidance_scale,
                     generator=torch.Generator().manual_seed(r), output_type="np", callback_on_step_end=on_step_end)
            _sync(device)
            end = time.perf_counter()
            step_times = [b - a for a, b in zip(step_ends, step_ends[1:])]  # step 2..n: loop time per step
            results.append({"step": statistics.median(step_times), "unet": statistics.median(unet_seconds[1:]),
                            "per_image": (end - start) / batch})
    steady = results[1:]
    step = statistics.median(r["step"] for r in steady)
    unet_s = statistics.median(r["unet"] for r in steady)
    return {"num_inference_steps": steps, "batch": batch, "guidance_scale": cfg.sample.guidance_scale,
            "seconds_per_step": step, "seconds_per_unet_call": unet_s,
            "overhead_outside_unet": max(step - unet_s, 0.0) / step,
            "seconds_per_image_end_to_end": statistics.median(r["per_image"] for r in steady)}


def run_benchmark(cfg: Config, warmup: int = 3, windows: int = 5, window_steps: int = 4,
                  inference_steps: int = 20, inference_batch: int = 16, cached_only: bool = False) -> dict:
    """The whole report; `cached_only` skips the on-the-fly baseline and inference (for quick GPU sweeps)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_tf32(cfg.train.allow_tf32)
    vae_info, text_info = check_components(cfg)
    stream = SampleStream(open_audited(cfg.data), cfg.data, cfg.train.seed)
    frozen = FrozenEncoders(cfg.model, device)
    runs = Path(cfg.data.cache_dir).parent / "runs"  # what the timed train() calls write
    on_the_fly = None if cached_only else time_training(cfg, False, device, warmup, windows, window_steps,
                                                        runs / "on_the_fly")
    start = time.perf_counter()
    build_cache(stream, cfg.data.cache_dir, lambda: frozen.vae, lambda: frozen.text,
                *cache_fingerprints(cfg, frozen), show_progress=False)
    cache_seconds = time.perf_counter() - start
    frozen.release()  # training from the complete cache loads neither encoder
    cached = time_training(cfg, True, device, warmup, windows, window_steps, runs / "cached")
    latent = cfg.data.resolution // vae_info.downsample
    flops = 3 * unet_flops_per_image(unet_kwargs(cfg.model.unet, text_info.hidden_size, latent,
                                                 vae_info.latent_channels), text_info.max_length)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None) if device.type == "cuda" else None
    report = {
        "device": name, "threads": torch.get_num_threads(), "vae": cfg.model.vae.path,
        "text_encoder": cfg.model.text_encoder.path, "allow_tf32": cfg.train.allow_tf32,
        "batch_size": cfg.train.batch_size,
        "resolution": cfg.data.resolution, "mixed_precision": cfg.train.mixed_precision,
        "compile": cfg.train.compile, "channels_last": cfg.train.channels_last,
        "train_flops_per_image": flops,
        "on_the_fly": vars(on_the_fly) if on_the_fly else None, "cached": vars(cached),
        "cache_build_seconds": cache_seconds,
        "cache_speedup": cached.images_per_second / on_the_fly.images_per_second if on_the_fly else None,
        "inference": None if cached_only else time_inference(cfg, frozen, device, inference_steps, inference_batch),
    }
    for key in ("on_the_fly", "cached"):
        if report[key] is not None:
            report[key]["mfu"] = report[key]["images_per_second"] * flops / peak if peak else None
    return report


def format_report(r: dict) -> str:
    def mfu(x: Optional[float]) -> str:
        return f"{100 * x:.1f} %" if x is not None else "n/a (CPU or unknown GPU)"

    rows = [
        f"device {r['device']} ({r['threads']} threads), batch {r['batch_size']}, {r['resolution']} px, "
        f"precision {r['mixed_precision']}, compile {r['compile']}, channels-last {r['channels_last']}, "
        f"UNet training {r['train_flops_per_image'] / 1e9:.2f} GFLOP/image",
        "| training | images/s | s/step | peak memory | MFU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, key in (("on the fly (decode + VAE + text encoder)", "on_the_fly"), ("from the cache", "cached")):
        x = r[key]
        if x is None:
            continue
        rows.append(f"| {label} | {x['images_per_second']:.1f} | {x['seconds_per_step']:.3f} | "
                    f"{x['peak_mib']:.0f} MiB | {mfu(x['mfu'])} |")
    if r["cache_speedup"] is not None:
        rows.append(f"cache speed-up: {r['cache_speedup']:.2f}× (cache built in {r['cache_build_seconds']:.1f} s)")
    inf = r["inference"]
    if inf is not None:
        rows.append(
            f"inference ({inf['num_inference_steps']} steps, batch {inf['batch']}, guidance {inf['guidance_scale']}): "
            f"{inf['seconds_per_step'] * 1e3:.1f} ms/step, UNet {inf['seconds_per_unet_call'] * 1e3:.1f} ms/call, "
            f"overhead outside the UNet {100 * inf['overhead_outside_unet']:.1f} % of a step, "
            f"{inf['seconds_per_image_end_to_end']:.3f} s/image end to end")
    return "\n".join(rows)


def memory_run(cfg: Config, report: Path, warmup: int, windows: int, window_steps: int) -> None:
    """One process of a multi-process launch: the timed training of `time_training` (on the fly), its peak
    memory written to `report`.rank{r}.json. The run folder is shared by the processes."""
    import os

    rank = int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    run = report.with_name(report.name + "_run")
    timing = time_training(cfg, False, device, warmup, windows, window_steps, run)
    summary = json.loads((run / "train_summary.json").read_text()) if rank == 0 else {}
    Path(f"{report}.rank{rank}.json").write_text(json.dumps({"rank": rank, "ema": cfg.train.ema_decay is not None,
                                                             **vars(timing), **summary}))
