"""Probes and metrics: the shapes probe scored by the analytic checker, and sweeps over samplers,
step counts and guidance scales, written as JSON, a Markdown table and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ldm.images import make_grid, save_png
from ldm.inference.generate import generate
from ldm.inference.modes import ImageToImage, Sketch, Style
from ldm.inference.pipeline import as_pipeline
from ldm.models.conditions import sketch_image
from ldm.models.loading import native_size
from ldm.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    STYLES,
    ShapeSpec,
    all_specs,
    colour_caption,
    parse_holdout,
    read_image,
    render,
    score,
    share,
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
    pipe = as_pipeline(model)
    resolution = native_size(pipe)
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
                           mode=ImageToImage(inputs, strength))
        readings = [read_image(r.image) for r in results]
        n = len(readings)
        scores[f"{strength:g}"] = {
            "keeps_shape_and_position": share(r.shape == s.shape and r.position == s.position
                                            for r, s in zip(readings, specs)),
            "follows_prompt_colour": share(r.colour == t.colour for r, t in zip(readings, targets)),
            "keeps_input_colour": share(r.colour == s.colour for r, s in zip(readings, specs)),
            "keeps_position": share(r.position == s.position for r, s in zip(readings, specs)),
            "keeps_shape": share(r.shape == s.shape for r, s in zip(readings, specs)),
            "follows_prompt_shape_and_position": share(r.shape == t.shape and r.position == t.position
                                                     for r, t in zip(readings, targets)),
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
    pipe = as_pipeline(model)
    resolution = native_size(pipe)
    specs = list(specs or all_specs())
    rng = np.random.default_rng([seed, 1_000_003])
    sketches = [sketch_image(render(s, resolution, rng), threshold) for s in specs]
    targets = [ShapeSpec(other_colour(s.colour), s.shape, s.position) for s in specs]
    results = generate(pipe, [colour_caption(t.colour) for t in targets], guidance_scale=guidance_scale,
                       sampler=sampler, num_inference_steps=num_inference_steps, seed=seed * 100_003,
                       batch_size=batch_size, mode=Sketch(sketches, conditioning_scale))
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
                "shape_and_position_follow_sketch": share(r.shape == s.shape and r.position == s.position
                                                        for s, _, r in rows),
                "colour_follows_text": share(r.colour == t.colour for _, t, r in rows),
                "all": share(r.shape == s.shape and r.position == s.position and r.colour == t.colour
                           for s, t, r in rows),
                "n": n,
            }
    return out


def style_probe(model, specs: Optional[Sequence[ShapeSpec]] = None, seed: int = 0, style_scale: float = 1.0,
                sampler: str = "dpm++", num_inference_steps: int = 20, guidance_scale: float = 3.0,
                batch_size: int = 64) -> tuple[dict, list]:
    """Each prompt is a full caption; its reference shows another shape (and colour and place) in one of
    the styles, cycling through them. Scores whether the background follows the reference and whether
    colour and shape (and position) follow the text. Returns (scores, [(label, images)])."""
    pipe = as_pipeline(model)
    resolution = native_size(pipe)
    specs = list(specs or all_specs())
    styles = [list(STYLES)[i % len(STYLES)] for i in range(len(specs))]
    rng = np.random.default_rng([seed, 2_000_003])
    references = [render(other_spec(s), resolution, rng, style) for s, style in zip(specs, styles)]
    results = generate(pipe, [s.caption for s in specs], guidance_scale=guidance_scale, sampler=sampler,
                       num_inference_steps=num_inference_steps, seed=seed * 100_003, batch_size=batch_size,
                       mode=Style(references, style_scale))
    readings = [read_image(r.image) for r in results]
    n = len(specs)
    scores = {
        "style_follows_reference": share(r.style == st for r, st in zip(readings, styles)),
        "colour_and_shape_follow_text": share(r.colour == s.colour and r.shape == s.shape
                                            for r, s in zip(readings, specs)),
        "position_follows_text": share(r.position == s.position for r, s in zip(readings, specs)),
        "reference_shape_copied": share(r.shape == other_spec(s).shape for r, s in zip(readings, specs)),
        "all": share(r.style == st and r.colour == s.colour and r.shape == s.shape and r.position == s.position
                   for r, s, st in zip(readings, specs, styles)),
        "n": n,
    }
    return scores, [("reference", references), ("generated", [r.image for r in results])]
