"""Sweeps over samplers, step counts and guidance scales, scored by the shapes probe, as tables and plots."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ldm.evaluation.probes import shapes_probe, split_scores
from ldm.models.hooks import wrapped_forward
from ldm.shapes import (
    ShapeSpec,
)


@contextmanager
def count_unet_calls(pipe) -> Iterator[list[int]]:
    """Counts the UNet's network evaluations inside the block, one per latent it runs on: a guided step
    (conditional and unconditional halves in one batch) costs two per image, an unguided one one."""
    calls = [0]

    def counting(inner):
        def counted(sample, *args, **kwargs):
            calls[0] += sample.shape[0]
            return inner(sample, *args, **kwargs)

        return counted

    with wrapped_forward(pipe.unet, counting):
        yield calls


def sweep(pipe, runs: Sequence[tuple[str, int, float]], seeds: Sequence[int] = (0,),
          held_out: Sequence[ShapeSpec] = (), batch_size: int = 64, model: Optional[str] = None) -> list[dict]:
    """One probe per (sampler, num_inference_steps, guidance_scale); a row of scores for each, with the UNet
    evaluations spent per image (a guided step costs two) and the seconds per image. `model` labels the rows
    (when a sweep puts a teacher and its student side by side)."""
    rows = []
    for sampler, steps, guidance in runs:
        start = time.perf_counter()
        with count_unet_calls(pipe) as calls:
            result = shapes_probe(pipe, seeds=seeds, sampler=sampler, num_inference_steps=steps,
                                  guidance_scale=guidance, batch_size=batch_size)
        seconds = time.perf_counter() - start
        n = len(result.specs)
        rows.append({**({"model": model} if model else {}), "sampler": sampler, "steps": steps,
                     "guidance_scale": guidance, "nfe": round(calls[0] / n), "seconds": round(seconds, 1),
                     "seconds_per_image": round(seconds / n, 4),
                     **{k: v for k, v in split_scores(result, held_out).items()}})
    return rows


def sweep_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per run, all-correct accuracy on seen (and held-out) combinations."""
    held = any("held_out" in r for r in rows)
    named = any("model" in r for r in rows)
    head = ("| model " if named else "") + "| sampler | steps | NFE | guidance | ms / image | colour | shape | " \
        "position | all (seen) |" + (" all (held out) |" if held else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        s = r["seen"]
        line = ((f"| {r.get('model', '')} " if named else "") +
                f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['guidance_scale']:g} | "
                f"{1000 * r.get('seconds_per_image', 0):.0f} | {100 * s['colour']:.1f} % | "
                f"{100 * s['shape']:.1f} % | {100 * s['position']:.1f} % | {100 * s['all']:.1f} % |")
        lines.append(line + (f" {100 * r['held_out']['all']:.1f} % |" if held else ""))
    return "\n".join(lines)


def plot_sweeps(sampler_rows: Sequence[dict], guidance_rows: Sequence[dict], folder: str | Path) -> list[Path]:
    """accuracy_vs_nfe.png (one line per sampler) and accuracy_vs_guidance.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install -e '.[plots]'") from err
    folder = Path(folder)
    paths = []
    if sampler_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        def line(r):
            return f"{r['model']}, {r['sampler']}" if "model" in r else r["sampler"]

        for name in dict.fromkeys(map(line, sampler_rows)):
            rows = sorted((r for r in sampler_rows if line(r) == name), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rows], [100 * r["seen"]["all"] for r in rows], marker="o", label=name)
        ax.set(xscale="log", xlabel="network evaluations per image", ylabel="all three correct (%)",
               title="shapes probe: accuracy vs sampling cost")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(folder / "accuracy_vs_nfe.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if guidance_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = sorted(guidance_rows, key=lambda r: r["guidance_scale"])
        for key, label in (("seen", "seen combinations"), ("held_out", "held-out combinations")):
            if all(key in r for r in rows):
                ax.plot([r["guidance_scale"] for r in rows], [100 * r[key]["all"] for r in rows], marker="o",
                        label=label)
        ax.set(xlabel="guidance scale", ylabel="all three correct (%)", title="shapes probe: accuracy vs guidance")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(folder / "accuracy_vs_guidance.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths
