"""Probes and metrics: generate the shapes probe and score it with the analytic checker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ldm.images import make_grid, save_png
from ldm.pipeline import generate
from ldm.shapes import ShapeSpec, all_specs, read_image, score


@dataclass
class ProbeResult:
    scores: dict  # colour / shape / position / all accuracies in [0, 1], n images
    specs: list[ShapeSpec]
    readings: list
    images: list


def shapes_probe(model, seeds: Sequence[int] = (0,), specs: Optional[Sequence[ShapeSpec]] = None,
                 sampler: str = "dpm++", num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 batch_size: int = 64, device: str = "cpu") -> ProbeResult:
    """Generate every spec (default: every colour × shape × position) once per seed, and read it back."""
    specs = list(specs or all_specs())
    images, expected = [], []
    for seed in seeds:
        # Distinct seeds per image: image j of this call is seeded base + j.
        results = generate(model, [s.caption for s in specs], guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, sampler=sampler,
                           seed=seed * 100_003, batch_size=batch_size, device=device)
        images += [r.image for r in results]
        expected += specs
    readings = [read_image(image) for image in images]
    return ProbeResult(score(readings, expected), expected, readings, images)


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
