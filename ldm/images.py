"""Image grids and PNGs that carry their generation parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import ConfigError


def to_pil(pixel_values) -> Image.Image:
    """(3, H, W) in [-1, 1] → an RGB PIL image."""
    import numpy as np

    arr = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def make_grid(images: Sequence[Image.Image], cols: Optional[int] = None, pad: int = 2,
              background=(255, 255, 255)) -> Image.Image:
    """Tile images (all the same size) row by row; `cols` defaults to a near-square layout."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), background)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def png_metadata(params: dict) -> PngInfo:
    """PNG text chunks: `parameters` in the one-line form other tools read, `ldm` as exact JSON."""
    info = PngInfo()
    readable = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt"))
    text = params.get("prompt", "")
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {params['negative_prompt']}"
    info.add_text("parameters", f"{text}\n{readable}")
    info.add_text("ldm", json.dumps(params, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | Path, params: Optional[dict] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_metadata(params) if params else None)
    return path


def read_png_params(path: str | Path) -> dict:
    """The exact parameters saved by `save_png`."""
    with Image.open(path) as image:
        return json.loads(image.text["ldm"])


def check_unused(folder: str | Path) -> None:
    """Refuse a folder that already holds generations (a ConfigError naming it and the way out)."""
    folder = Path(folder)
    earlier = sorted(folder.glob("[0-9][0-9][0-9][0-9]_seed*.png")) + sorted(folder.glob("grid.png"))
    if earlier:
        raise ConfigError(f"--out {folder} already holds {len(earlier)} generated images (e.g. {earlier[0].name}); "
                          "choose another folder, or pass --overwrite to replace them")


def save_generations(results, folder: str | Path, grid_columns: Optional[int] = None,
                     overwrite: bool = False) -> list[Path]:
    """One PNG per generated image (parameters in its text chunks) plus `grid.png`; returns the paths. A folder
    that already holds generations is refused unless `overwrite` (then only the files written are replaced)."""
    folder = Path(folder)
    if not overwrite:
        check_unused(folder)
    paths = [save_png(r.image, folder / f"{i:04d}_seed{r.seed}.png", r.params) for i, r in enumerate(results)]
    paths.append(save_png(make_grid([r.image for r in results], cols=grid_columns), folder / "grid.png"))
    return paths
