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
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import psutil
import torch

from ldm.cache import build_cache, cache_fingerprints
from ldm.components import (
    FrozenEncoders,
    build_scheduler,
    build_unet,
    check_components,
    unet_flops_per_image,
    unet_kwargs,
)
from ldm.config import Config
from ldm.data import SampleStream
from ldm.pipeline import assemble_pipeline
from ldm.sources import open_audited
from ldm.train import set_tf32, train

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


# Architectures (from each repository's config.json) of the published components the SD recipe names, so a
# benchmark can run with random weights of the same shapes where the real ones cannot be downloaded: the cost
# of a forward pass does not depend on the values of the weights.
STAND_IN_VAES = {
    "stabilityai/sd-vae-ft-mse": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      norm_num_groups=32, scaling_factor=0.18215),
}
STAND_IN_VAES["stabilityai/sd-vae-ft-ema"] = STAND_IN_VAES["stabilityai/sd-vae-ft-mse"]
STAND_IN_TEXT_ENCODERS = {
    "openai/clip-vit-large-patch14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768),
    "openai/clip-vit-base-patch32": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                         num_attention_heads=8, projection_dim=512),
}


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (timings depend on it: AVX2 against AVX-512 BF16 / AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save_letter_tokenizer(folder: Path, model_max_length: int):
    """A CLIP tokenizer whose vocabulary is single letters (ids 0/1: start/end): a valid byte-pair
    tokenizer without the real 49,408-token vocabulary, for stand-ins and tests. Returns it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in list(letters) + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_stand_ins(cfg: Config, folder: Path) -> list[str]:
    """Random-weight copies of the Hub components in `cfg` that have a known architecture, saved under `folder`;
    returns the config overrides that point at them. The tokenizer is a small letter-level BPE (tokenizing is not
    what a benchmark measures); the text model keeps the real vocabulary size and 77 positions."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    overrides = []
    vae_arch = STAND_IN_VAES.get(cfg.model.vae.path)
    if vae_arch is not None:
        n = len(vae_arch["block_out_channels"])
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                      sample_size=cfg.data.resolution, **vae_arch).save_pretrained(folder / "vae")
        overrides += [f"model.vae.path={folder / 'vae'}", "model.vae.subfolder=null"]
    text_arch = STAND_IN_TEXT_ENCODERS.get(cfg.model.text_encoder.path)
    if text_arch is not None:
        out = folder / "text_encoder"
        save_letter_tokenizer(out, 77)
        torch.manual_seed(0)
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1, **text_arch)).save_pretrained(out)
        overrides += [f"model.text_encoder.path={out}", "model.text_encoder.subfolder=null"]
    return overrides


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
    inner = unet.forward

    def timed_forward(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        unet_seconds.append(time.perf_counter() - start)
        return out

    unet.forward = timed_forward
    step_ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        _sync(device)
        step_ends.append(time.perf_counter())
        return kwargs

    prompts = [cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(batch)]
    results = []
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
    unet.forward = inner
    steady = results[1:]
    step = statistics.median(r["step"] for r in steady)
    unet_s = statistics.median(r["unet"] for r in steady)
    return {"num_inference_steps": steps, "batch": batch, "guidance_scale": cfg.sample.guidance_scale,
            "seconds_per_step": step, "seconds_per_unet_call": unet_s,
            "overhead_outside_unet": max(step - unet_s, 0.0) / step,
            "seconds_per_image_end_to_end": statistics.median(r["per_image"] for r in steady)}


def time_few_step(teacher: str, student: str, prompts: list[str], batch: int = 16, repeats: int = 3,
                  teacher_run: tuple[str, int, float] = ("dpm++", 20, 3.0),
                  student_run: tuple[str, int, float] = ("lcm", 4, 1.0)) -> dict:
    """Seconds per image of a teacher and its distilled student through `ldm.generate`, back to back: the two
    alternate, one warm-up call each, the median of `repeats` timed calls. Each run is (sampler, steps, guidance)."""
    from ldm.pipeline import generate, load_pipeline

    pipes = {"teacher": load_pipeline(teacher), "student": load_pipeline(student)}
    runs = {"teacher": teacher_run, "student": student_run}
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
    seconds: dict[str, list[float]] = {"teacher": [], "student": []}
    for r in range(repeats + 1):
        for name, pipe in pipes.items():
            sampler, steps, guidance = runs[name]
            start = time.perf_counter()
            generate(pipe, batch_prompts, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance,
                     seed=r, batch_size=batch)
            if r:  # the first round warms up
                seconds[name].append((time.perf_counter() - start) / batch)
    out = {name: {"sampler": runs[name][0], "num_inference_steps": runs[name][1], "guidance_scale": runs[name][2],
                  "unet_evaluations_per_image": runs[name][1] * (2 if runs[name][2] > 1 else 1),
                  "seconds_per_image": statistics.median(seconds[name]), "all": seconds[name]} for name in pipes}
    out["speedup"] = out["teacher"]["seconds_per_image"] / out["student"]["seconds_per_image"]
    return out


def time_generation(model: str, prompts: list[str], sampler: str = "dpm++", steps: int = 20, guidance: float = 3.0,
                    batch: int = 64, repeats: int = 3, probe_seeds: int = 0, precision: str = "auto",
                    compile: bool = True) -> dict:
    """Seconds per image of plain Diffusers (the StableDiffusionPipeline as loaded, fp32, called directly) against
    `ldm.generate(fast=True)` on the same model, sampler, steps, guidance, batch and seeds: separate copies of the
    pipeline, calls alternated, one warm-up call each (the fast one's compiles: its seconds are reported), the
    median of `repeats` timed calls. With `probe_seeds`, both also run the shapes probe (a model trained on shapes)
    and the scores are reported side by side. `precision` and `compile` go to `make_fast` (forcing bf16 on a CPU
    without bf16 units measures what bf16 does to the pictures, not its speed)."""
    import numpy as np

    from ldm.pipeline import generate, load_pipeline, make_fast, make_scheduler

    plain, fast = load_pipeline(model), load_pipeline(model)
    make_fast(fast, compile=compile, precision=precision)
    plain.scheduler = make_scheduler(sampler, plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]

    def run_plain(seed: int) -> list:
        generators = [torch.Generator().manual_seed(seed + j) for j in range(batch)]
        return plain(prompt=batch_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                     output_type="pil").images

    def run_fast(seed: int) -> list:
        return [r.image for r in generate(fast, batch_prompts, sampler=sampler, num_inference_steps=steps,
                                          guidance_scale=guidance, seed=seed, batch_size=batch, fast=True)]

    seconds: dict[str, list[float]] = {"plain": [], "fast": []}
    first: dict[str, float] = {}
    images: dict[str, list] = {}
    for r in range(repeats + 1):
        for name, run in (("plain", run_plain), ("fast", run_fast)):
            start = time.perf_counter()
            images[name] = run(r)
            elapsed = time.perf_counter() - start
            if r:
                seconds[name].append(elapsed / batch)
            else:
                first[name] = elapsed
    diff = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in
            zip(images["plain"], images["fast"])]
    out = {"model": str(model), "sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance,
           "batch": batch, "fast_path": asdict(fast._ldm_fast), "cpu": cpu_name(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "pixels_mean_abs_diff": float(np.mean([d.mean() for d in diff])),
           "pixels_max_abs_diff": int(max(d.max() for d in diff))}
    for name in seconds:
        out[name] = {"seconds_per_image": statistics.median(seconds[name]), "all": seconds[name],
                     "first_call_seconds": first[name]}
    out["speedup"] = out["plain"]["seconds_per_image"] / out["fast"]["seconds_per_image"]
    if probe_seeds:
        from ldm.evaluation import saved_holdout, shapes_probe, split_scores

        held = saved_holdout(model)
        for name, pipe in (("plain", plain), ("fast", fast)):
            result = shapes_probe(pipe, seeds=range(probe_seeds), sampler=sampler, num_inference_steps=steps,
                                  guidance_scale=guidance, batch_size=batch, fast=name == "fast")
            out[name]["probe"] = {"all": result.scores, **split_scores(result, held)}
    return out


def format_generation(r: dict) -> str:
    rows = [f"{r['cpu']}, torch {r['torch']}, {r['threads']} threads; {r['sampler']} {r['num_inference_steps']} steps, "
            f"guidance {r['guidance_scale']:g}, batch {r['batch']}; fast path: {r['fast_path']}", "",
            "| | ms / image | speed-up | first call (s) | probe: all three correct |", "| --- |" + " --- |" * 4]
    for name, label in (("plain", "plain StableDiffusionPipeline (fp32)"), ("fast", "ldm.generate(fast=True)")):
        x = r[name]
        probe = " / ".join(f"{k.replace('_', '-')} {100 * v['all']:.1f} %" for k, v in x.get("probe", {}).items())
        speedup = r["plain"]["seconds_per_image"] / x["seconds_per_image"]
        rows.append(f"| {label} | {1000 * x['seconds_per_image']:.1f} | {speedup:.2f}× | "
                    f"{x['first_call_seconds']:.1f} | {probe or '–'} |")
    rows.append(f"pixels against plain: mean |diff| {r['pixels_mean_abs_diff']:.3f}, max {r['pixels_max_abs_diff']} "
                "(of 255)")
    return "\n".join(rows)


def format_few_step(r: dict) -> str:
    rows = ["| model | sampler | steps | guidance | UNet evaluations / image | ms / image |", "| --- |" + " --- |" * 5]
    for name in ("teacher", "student"):
        x = r[name]
        rows.append(f"| {name} | {x['sampler']} | {x['num_inference_steps']} | {x['guidance_scale']:g} | "
                    f"{x['unet_evaluations_per_image']} | {1000 * x['seconds_per_image']:.1f} |")
    rows.append(f"student speed-up: {r['speedup']:.2f}× per image")
    return "\n".join(rows)


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


# --------------------------------------------------------------------------------------------
# Memory per process: DDP against FSDP on the same model
# --------------------------------------------------------------------------------------------


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
