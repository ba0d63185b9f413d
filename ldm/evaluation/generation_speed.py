"""Generation timed against plain Diffusers, back to back, and scored on the probe."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from ldm.evaluation.benchmark import cpu_name
from ldm.evaluation.probes import saved_holdout, shapes_probe, split_scores
from ldm.inference.fast import make_fast
from ldm.inference.generate import generate
from ldm.inference.pipeline import load_pipeline, make_scheduler


def time_few_step(teacher: str, student: str, prompts: list[str], batch: int = 16, repeats: int = 3,
                  teacher_run: tuple[str, int, float] = ("dpm++", 20, 3.0),
                  student_run: tuple[str, int, float] = ("lcm", 4, 1.0)) -> dict:
    """Seconds per image of a teacher and its distilled student through `ldm.generate`, back to back: the two
    alternate, one warm-up call each, the median of `repeats` timed calls. Each run is (sampler, steps, guidance)."""
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
