"""Probes and metrics: the shapes probe scored by the analytic checker, and sweeps over samplers,
step counts and guidance scales, written as JSON, a Markdown table and plots."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from ldm.components import encode_prompts, latent_distribution
from ldm.config import DataConfig
from ldm.data import prepare_image
from ldm.diffusion import training_target, validation_draws
from ldm.images import make_grid, save_png
from ldm.pipeline import generate, load_pipeline
from ldm.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    all_specs,
    parse_holdout,
    read_image,
    render,
    score,
)


@dataclass
class ProbeResult:
    scores: dict  # colour / shape / position / all accuracies in [0, 1], n images
    specs: list[ShapeSpec]
    readings: list
    images: list


def shapes_probe(model, seeds: Sequence[int] = (0,), specs: Optional[Sequence[ShapeSpec]] = None,
                 sampler: str = "dpm++", num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 batch_size: int = 64, device: str = "cpu", fast: bool = False) -> ProbeResult:
    """Generate every spec (default: every colour × shape × position) once per seed, and read it back
    (`fast`: through `generate(fast=True)`)."""
    specs = list(specs or all_specs())
    images, expected = [], []
    for seed in seeds:
        # Distinct seeds per image: image j of this call is seeded base + j.
        results = generate(model, [s.caption for s in specs], guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, sampler=sampler,
                           seed=seed * 100_003, batch_size=batch_size, device=device, fast=fast)
        images += [r.image for r in results]
        expected += specs
    readings = [read_image(image) for image in images]
    return ProbeResult(score(readings, expected), expected, readings, images)


def saved_holdout(pipeline_folder: str | Path) -> list[ShapeSpec]:
    """The held-out combinations a pipeline was trained without (from its ldm_config.yaml; none if absent).
    Read as plain YAML: the config may name paths (a base model) that no longer exist here."""
    import yaml

    saved = Path(pipeline_folder) / "ldm_config.yaml"
    if not saved.is_file():
        return []
    tree = yaml.safe_load(saved.read_text()) or {}
    return parse_holdout(((tree.get("data") or {}).get("shapes") or {}).get("holdout") or [])


def split_scores(result: ProbeResult, held_out: Sequence[ShapeSpec]) -> dict[str, dict]:
    """Scores over combinations seen in training and over those held out of it (when any are)."""
    held = set(held_out)
    out = {}
    for name, keep in (("seen", lambda s: s not in held), ("held_out", lambda s: s in held)):
        pairs = [(r, s) for r, s in zip(result.readings, result.specs) if keep(s)]
        if pairs:
            out[name] = score([r for r, _ in pairs], [s for _, s in pairs])
    return out


def format_scores(scores: dict, title: str = "shapes probe") -> str:
    pct = {k: f"{100 * v:5.1f} %" for k, v in scores.items() if k != "n"}
    return (f"{title} ({scores['n']} images): colour {pct['colour']} | shape {pct['shape']} | "
            f"position {pct['position']} | all three {pct['all']}")


def save_probe(result: ProbeResult, folder: str | Path, extra: Optional[dict] = None,
               grid_columns: int = 24) -> Path:
    """probe.json (scores + per-image readings) and a grid PNG of the generated images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": s.caption, "expected": [s.colour, s.shape, s.position],
             "read": [r.colour, r.shape, r.position], "shape_iou": round(r.shape_iou, 3)}
            for s, r in zip(result.specs, result.readings)]
    (folder / "probe.json").write_text(json.dumps({"scores": result.scores, **(extra or {}), "images": rows}, indent=1))
    return save_png(make_grid(result.images, cols=grid_columns), folder / "probe_grid.png", extra or {})


# --------------------------------------------------------------------------------------------
# Sweeps: samplers × steps, guidance scale
# --------------------------------------------------------------------------------------------


@contextmanager
def count_unet_calls(pipe) -> Iterator[list[int]]:
    """Counts the UNet's network evaluations inside the block, one per latent it runs on: a guided step
    (conditional and unconditional halves in one batch) costs two per image, an unguided one one."""
    calls = [0]
    inner = pipe.unet.forward

    def counted(sample, *args, **kwargs):
        calls[0] += sample.shape[0]
        return inner(sample, *args, **kwargs)

    pipe.unet.forward = counted
    try:
        yield calls
    finally:
        pipe.unet.forward = inner


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


# --------------------------------------------------------------------------------------------
# Validation loss per timestep bucket
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(vae, tokenizer, text_encoder, images: Sequence, captions: Sequence[str], resolution: int,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """latents (N, C, h, w) = posterior mean × scaling factor, and prompt_embeds (N, L, D)."""
    cfg = DataConfig(resolution=resolution)
    latents, embeds = [], []
    for start in range(0, len(images), batch_size):
        x = torch.stack([prepare_image(im, cfg) for im in images[start:start + batch_size]])
        latents.append(latent_distribution(vae, x)[0].cpu())
        embeds.append(encode_prompts(tokenizer, text_encoder, list(captions[start:start + batch_size])).cpu())
    return torch.cat(latents), torch.cat(embeds)


@torch.no_grad()
def validation_loss(model, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor, prediction_type: str,
                    buckets: int = 10, seed: int = 0, batch_size: int = 64,
                    device: Optional[torch.device] = None) -> dict[str, float]:
    """Mean squared error (unweighted) with fixed noise and timesteps, per timestep bucket and overall.

    `model` is a UNet, or a function (noisy_latents, timesteps, prompt_embeds, rows) → model_pred, where
    `rows` are the images' indices (a condition's inputs are looked up by them). Each image is noised
    once per bucket, so every bucket sees every image: the loss at high t says how well the model lays
    out a picture, at low t how well it renders detail."""
    if isinstance(model, torch.nn.Module):
        unet = model
        device = device or next(unet.parameters()).device
        model = lambda x, t, c, rows: unet(x, t, c).sample  # noqa: E731
    # Noise with the closed form q(x_t|x_0) of the model's own schedule: a sampler's add_noise (e.g.
    # DPM-Solver++) looks t up in its inference schedule instead and would noise to the wrong level.
    scheduler = DDPMScheduler.from_config(scheduler.config)
    n, T = latents.shape[0], scheduler.config.num_train_timesteps
    noise, timesteps = validation_draws(seed, n, tuple(latents.shape[1:]), T, buckets)
    device = device or torch.device("cpu")
    x0 = latents.repeat_interleave(buckets, dim=0)  # (N·K, C, h, w): row i·K + k
    context = prompt_embeds.repeat_interleave(buckets, dim=0)
    errors = []
    for s in range(0, len(x0), batch_size):
        sl = slice(s, s + batch_size)
        x, eps, t = x0[sl].to(device), noise[sl].to(device), timesteps[sl].to(device)
        rows = torch.arange(len(x0))[sl] // buckets  # which image each row noises
        pred = model(scheduler.add_noise(x, eps, t), t, context[sl].to(device), rows)
        target = training_target(scheduler, x, eps, t, prediction_type)
        errors.append(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).cpu())
    per_row = torch.cat(errors).view(n, buckets)
    width = T / buckets
    out = {f"t{int(k * width):03d}-{int((k + 1) * width) - 1:03d}": float(per_row[:, k].mean()) for k in range(buckets)}
    out["mean"] = float(per_row.mean())
    return out


# --------------------------------------------------------------------------------------------
# Image-to-image on the shapes world
# --------------------------------------------------------------------------------------------


def other_colour(colour: str) -> str:
    """The next palette colour (a fixed, different colour to ask for)."""
    names = list(COLOURS)
    return names[(names.index(colour) + 1) % len(names)]


def other_spec(spec: ShapeSpec) -> ShapeSpec:
    """Another colour, another shape and another position (the next of each)."""
    shapes, positions = list(SHAPES), list(POSITIONS)
    return ShapeSpec(other_colour(spec.colour), shapes[(shapes.index(spec.shape) + 1) % len(shapes)],
                     positions[(positions.index(spec.position) + 4) % len(positions)])


def img2img_probe(model, strengths: Sequence[float] = (0.3, 0.8), seed: int = 0,
                  specs: Optional[Sequence[ShapeSpec]] = None, sampler: str = "dpm++", num_inference_steps: int = 20,
                  guidance_scale: float = 3.0, batch_size: int = 64, change: str = "colour") -> tuple[dict, list]:
    """Each input is a rendered picture of a spec; the prompt asks for another colour, with the same shape
    and place (`change="colour"`) or another shape and place too (`change="all"`: then only the picture
    can keep them). Per strength: how often the output keeps the input's shape and position, how often
    its colour (and shape and position) are the prompt's. Returns (scores by strength, grids)."""
    pipe = model if not isinstance(model, (str, Path)) else load_pipeline(model)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    specs = list(specs or all_specs())
    rng = np.random.default_rng([seed, 7])
    inputs = [render(s, resolution, rng) for s in specs]
    if change not in ("colour", "all"):
        raise ValueError(f"change={change!r}: 'colour' or 'all'")
    targets = [other_spec(s) if change == "all" else ShapeSpec(other_colour(s.colour), s.shape, s.position)
               for s in specs]
    scores, grids = {}, []
    for strength in strengths:
        results = generate(pipe, [t.caption for t in targets], guidance_scale=guidance_scale, sampler=sampler,
                           num_inference_steps=num_inference_steps, seed=seed * 100_003, batch_size=batch_size,
                           init_image=inputs, strength=strength)
        readings = [read_image(r.image) for r in results]
        n = len(readings)
        scores[f"{strength:g}"] = {
            "keeps_shape_and_position": sum(r.shape == s.shape and r.position == s.position
                                            for r, s in zip(readings, specs)) / n,
            "follows_prompt_colour": sum(r.colour == t.colour for r, t in zip(readings, targets)) / n,
            "keeps_input_colour": sum(r.colour == s.colour for r, s in zip(readings, specs)) / n,
            "keeps_position": sum(r.position == s.position for r, s in zip(readings, specs)) / n,
            "keeps_shape": sum(r.shape == s.shape for r, s in zip(readings, specs)) / n,
            "follows_prompt_shape_and_position": sum(r.shape == t.shape and r.position == t.position
                                                     for r, t in zip(readings, targets)) / n,
            "n": n,
        }
        grids.append((strength, [r.image for r in results]))
    return scores, [("input", inputs)] + grids


def sketch_probe(model, specs: Optional[Sequence[ShapeSpec]] = None, seed: int = 0, threshold: float = 0.1,
                 conditioning_scale: float = 1.0, sampler: str = "dpm++", num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, batch_size: int = 64) -> tuple[list, list, list, list]:
    """Pictures rendered from a seed no training run uses → their sketches; each prompt names only a
    colour, another than the picture's ("a red shape"), so shape and position can only come from the
    sketch. Returns (specs, target specs, readings, [(label, images)])."""
    from ldm.conditions import sketch_image
    from ldm.shapes import colour_caption

    pipe = model if not isinstance(model, (str, Path)) else load_pipeline(model)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    specs = list(specs or all_specs())
    rng = np.random.default_rng([seed, 1_000_003])
    sketches = [sketch_image(render(s, resolution, rng), threshold) for s in specs]
    targets = [ShapeSpec(other_colour(s.colour), s.shape, s.position) for s in specs]
    results = generate(pipe, [colour_caption(t.colour) for t in targets], guidance_scale=guidance_scale,
                       sampler=sampler, num_inference_steps=num_inference_steps, seed=seed * 100_003,
                       batch_size=batch_size, sketch=sketches, conditioning_scale=conditioning_scale)
    readings = [read_image(r.image) for r in results]
    return specs, targets, readings, [("sketch", sketches), ("generated", [r.image for r in results])]


def sketch_scores(specs: Sequence[ShapeSpec], targets: Sequence[ShapeSpec], readings: Sequence,
                  held_out: Sequence[ShapeSpec] = ()) -> dict:
    """Shape and position against the sketch's picture, colour against the prompt; seen / held out."""
    held = set(held_out)
    out = {}
    for name, keep in (("seen", lambda s: s not in held), ("held_out", lambda s: s in held)):
        rows = [(s, t, r) for s, t, r in zip(specs, targets, readings) if keep(s)]
        if rows:
            n = len(rows)
            out[name] = {
                "shape_and_position_follow_sketch": sum(r.shape == s.shape and r.position == s.position
                                                        for s, _, r in rows) / n,
                "colour_follows_text": sum(r.colour == t.colour for _, t, r in rows) / n,
                "all": sum(r.shape == s.shape and r.position == s.position and r.colour == t.colour
                           for s, t, r in rows) / n,
                "n": n,
            }
    return out


def style_probe(model, specs: Optional[Sequence[ShapeSpec]] = None, seed: int = 0, style_scale: float = 1.0,
                sampler: str = "dpm++", num_inference_steps: int = 20, guidance_scale: float = 3.0,
                batch_size: int = 64) -> tuple[dict, list]:
    """Each prompt is a full caption; its reference shows another shape (and colour and place) in one of
    the styles, cycling through them. Scores whether the background follows the reference and whether
    colour and shape (and position) follow the text. Returns (scores, [(label, images)])."""
    from ldm.shapes import STYLES

    pipe = model if not isinstance(model, (str, Path)) else load_pipeline(model)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    specs = list(specs or all_specs())
    styles = [list(STYLES)[i % len(STYLES)] for i in range(len(specs))]
    rng = np.random.default_rng([seed, 2_000_003])
    references = [render(other_spec(s), resolution, rng, style) for s, style in zip(specs, styles)]
    results = generate(pipe, [s.caption for s in specs], guidance_scale=guidance_scale, sampler=sampler,
                       num_inference_steps=num_inference_steps, seed=seed * 100_003, batch_size=batch_size,
                       style=references, style_scale=style_scale)
    readings = [read_image(r.image) for r in results]
    n = len(specs)
    scores = {
        "style_follows_reference": sum(r.style == st for r, st in zip(readings, styles)) / n,
        "colour_and_shape_follow_text": sum(r.colour == s.colour and r.shape == s.shape
                                            for r, s in zip(readings, specs)) / n,
        "position_follows_text": sum(r.position == s.position for r, s in zip(readings, specs)) / n,
        "reference_shape_copied": sum(r.shape == other_spec(s).shape for r, s in zip(readings, specs)) / n,
        "all": sum(r.style == st and r.colour == s.colour and r.shape == s.shape and r.position == s.position
                   for r, s, st in zip(readings, specs, styles)) / n,
        "n": n,
    }
    return scores, [("reference", references), ("generated", [r.image for r in results])]


# --------------------------------------------------------------------------------------------
# The emoji probe: real art, pixel checkers fitted on the training pictures
# --------------------------------------------------------------------------------------------


def emoji_probe(model, data_folder: str | Path, seeds: Sequence[int] = (0, 1), sampler: str = "dpm++",
                num_inference_steps: int = 20, guidance_scale: float = 3.0, batch_size: int = 64,
                device: str = "cpu") -> dict:
    """Generate every probe caption (ldm.emoji.probe_entries) once per seed and score it with the checkers, for
    seen and held-out captions apart; the same checkers on the real pictures of those captions are the
    ceiling. Returns the scores plus `images`, `real` and per-image `rows` for `save_emoji_probe`."""
    from ldm.emoji import EmojiCheckers, load_pixels, probe_entries

    pipe = model if hasattr(model, "unet") else load_pipeline(str(model), device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    checkers, entries = EmojiCheckers.fit(data_folder, resolution), probe_entries(data_folder)
    real = [load_pixels(path, resolution) for _, path, _ in entries]
    images, generated, expected = [], [], []
    for seed in seeds:
        results = generate(pipe, [e.text for e, _, _ in entries], guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, sampler=sampler, seed=seed * 100_003,
                           batch_size=batch_size, device=device)
        images += [r.image for r in results]
        generated += [np.asarray(r.image.convert("RGB"), dtype=np.float32) for r in results]
        expected += entries

    def split(pixels, rows) -> dict:
        return {name: checkers.score([px for px, r in zip(pixels, rows) if r[2] == held],
                                     [r[0] for r in rows if r[2] == held])
                for name, held in (("seen", False), ("held_out", True))}

    return {"generated": split(generated, expected), "real": split(real, entries), "images": images,
            "real_images": [Image.fromarray(px.astype(np.uint8)) for px in real], "seeds": len(seeds),
            "rows": [{"prompt": e.text, "held_out": held, **checkers.read(px)}
                     for px, (e, _, held) in zip(generated, expected)]}


def format_emoji_scores(result: dict) -> str:
    lines = ["emoji probe           | skin tone | heart colour | identity | NN distance | images"]
    for kind in ("real", "generated"):
        for split, s in result[kind].items():
            cell = lambda v: f"{100 * v:7.1f} %" if v is not None else "      —  "  # noqa: E731
            lines.append(f"{kind:9} {split.replace('_', '-'):11} | {cell(s['skin_tone'])} | {cell(s['heart_colour'])}"
                         f"    | {cell(s['identity'])} | {s['nn_distance']:11.1f} | {s['n']}")
    return "\n".join(lines)


def save_emoji_probe(result: dict, folder: str | Path, extra: Optional[dict] = None, scale: int = 2) -> list[Path]:
    """probe.json, probe_grid.png (every generated picture, a row per seed) and compare.png (per caption: the
    real picture, then one generated picture per seed), enlarged `scale` times."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores = {k: result[k] for k in ("real", "generated")}
    (folder / "probe.json").write_text(json.dumps({"scores": scores, **(extra or {}), "images": result["rows"]},
                                                  indent=1))
    n = len(result["real_images"])
    big = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in result["images"]]
    real = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in result["real_images"]]
    columns = [real] + [big[s * n:(s + 1) * n] for s in range(result["seeds"])]
    side_by_side = [column[i] for i in range(n) for column in columns]
    return [folder / "probe.json",
            save_png(make_grid(big, cols=n), folder / "probe_grid.png", extra or {}),
            save_png(make_grid(side_by_side, cols=len(columns) * 6),
                     folder / "compare.png", extra or {})]
