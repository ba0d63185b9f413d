"""The emoji probe: skin tone and heart colour read from generated emoji, and the nearest training picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ldm.data.emoji import EmojiCheckers, load_pixels, probe_entries
from ldm.images import make_grid, save_png
from ldm.inference.generate import generate
from ldm.inference.pipeline import as_pipeline
from ldm.models.loading import native_size


def emoji_probe(model, data_folder: str | Path, seeds: Sequence[int] = (0, 1), sampler: str = "dpm++",
                num_inference_steps: int = 20, guidance_scale: float = 3.0, batch_size: int = 64,
                device: str = "cpu") -> dict:
    """Generate every probe caption (ldm.data.emoji.probe_entries) once per seed and score it with the checkers, for
    seen and held-out captions apart; the same checkers on the real pictures of those captions are the
    ceiling. Returns the scores plus `images`, `real` and per-image `rows` for `save_emoji_probe`."""
    pipe = as_pipeline(model, device)
    resolution = native_size(pipe)
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
