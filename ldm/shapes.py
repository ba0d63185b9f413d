"""The built-in procedural dataset `shapes` and its analytic checker.

Each image is one coloured shape on a white background at one of nine positions; its caption says
colour, shape and position ("a red circle in the top left corner"). Everything is reproducible from
(seed, index), needs no download, and can be read back from a generated picture by `read_image`, so
a text-to-image model can be scored on whether it drew what it was asked for.

The checker is deliberately strict: the shape is the template (circle, square, triangle, cross)
with the highest soft IoU against the drawn mask (each template at its best size), so a circle
drawn as a rounded square reads as a square; the colour is the nearest palette entry to the mean of
the saturated core, so an orange that drifts to yellow reads as yellow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 210, 30),
    "green": (35, 160, 65),
    "blue": (35, 85, 220),
    "purple": (135, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Positions on a 3×3 grid: (name, phrase used in captions, (x, y) centre as a fraction of the side).
_GRID = (0.2, 0.5, 0.8)
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "top left": ("in the top left corner", (_GRID[0], _GRID[0])),
    "top": ("at the top", (_GRID[1], _GRID[0])),
    "top right": ("in the top right corner", (_GRID[2], _GRID[0])),
    "left": ("on the left", (_GRID[0], _GRID[1])),
    "center": ("in the center", (_GRID[1], _GRID[1])),
    "right": ("on the right", (_GRID[2], _GRID[1])),
    "bottom left": ("in the bottom left corner", (_GRID[0], _GRID[2])),
    "bottom": ("at the bottom", (_GRID[1], _GRID[2])),
    "bottom right": ("in the bottom right corner", (_GRID[2], _GRID[2])),
}
BACKGROUND = (255, 255, 255)
# The style attribute: the background colour. Captions never name it, so a model can only take it from
# a reference picture (ldm's style condition); the checker reads it back from the border pixels.
STYLES: dict[str, tuple[int, int, int]] = {"white": BACKGROUND, "grey": (150, 150, 150), "dark": (40, 40, 40)}
SHAPE_SIZE = 0.34  # side of the shape's bounding box, as a fraction of the image side
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {POSITIONS[self.position][0]}"


def colour_caption(colour: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} shape"


def all_specs() -> list[ShapeSpec]:
    """Every colour × shape × position combination, in a fixed order."""
    return [ShapeSpec(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def parse_holdout(entries: Sequence[str]) -> list[ShapeSpec]:
    """Combinations held out of training, each "colour shape position" with `*` for any part:
    "red triangle *" (at every position), "green * bottom left" (every shape there)."""
    held: list[ShapeSpec] = []
    for entry in entries:
        colour, shape, *rest = entry.split() + ["*", "*"][: max(0, 3 - len(entry.split()))]
        position = " ".join(rest)
        parts = ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"), (position, POSITIONS, "position"))
        for value, valid, what in parts:
            if value != "*" and value not in valid:
                raise ValueError(f"data.shapes.holdout entry {entry!r}: unknown {what} {value!r}; valid: "
                                 f"{', '.join(valid)} or *")
        held += [spec for spec in all_specs() if colour in ("*", spec.colour) and shape in ("*", spec.shape)
                 and position in ("*", spec.position) and spec not in held]
    return held


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":  # apex up, base at the bottom of the bounding box
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    elif shape == "cross":  # a plus sign with arms a third of the size wide
        a = size / 6
        draw.rectangle([cx - a, cy - h, cx + a, cy + h], fill=fill)
        draw.rectangle([cx - h, cy - a, cx + h, cy + a], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def render(spec: ShapeSpec, resolution: int, jitter: Optional[np.random.Generator] = None,
           style: str = "white") -> Image.Image:
    """Draw `spec` anti-aliased (supersampled ×4) on the `style` background. `jitter` perturbs position
    (±4 %) and size (±10 %)."""
    big = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), STYLES[style])
    fx, fy = POSITIONS[spec.position][1]
    size = SHAPE_SIZE
    if jitter is not None:
        fx, fy = fx + jitter.uniform(-0.04, 0.04), fy + jitter.uniform(-0.04, 0.04)
        size = size * jitter.uniform(0.9, 1.1)
    _draw_shape(ImageDraw.Draw(image), spec.shape, fx * big, fy * big, size * big, COLOURS[spec.colour])
    return image.resize((resolution, resolution), Image.BOX)


class ShapesDataset:
    """`num_images` shapes pictures; index i shows combination i mod 216, jittered from (seed, i).

    With `focus`, a fixed fraction of the pictures (`focus_fraction`, evenly interleaved) cycles through the
    focus combinations and the rest through the others: a new concept and a replay of what the model knows."""

    def __init__(self, num_images: int, resolution: int, seed: int = 0,
                 exclude: Iterable[ShapeSpec] = (), colour_only_captions: float = 0.0,
                 styles: Sequence[str] = (), focus: Iterable[ShapeSpec] = (), focus_fraction: float = 0.5):
        excluded = set(exclude)
        self.specs = [s for s in all_specs() if s not in excluded]
        if not self.specs:
            raise ValueError("every shapes combination is excluded; nothing left to train on")
        focused = set(focus)
        self.focus = [s for s in self.specs if s in focused]
        self.rest = [s for s in self.specs if s not in focused]
        self.focus_fraction = focus_fraction
        if focused and not self.focus:
            raise ValueError("data.shapes.focus: every focus combination is held out")
        if self.focus and not self.rest and focus_fraction < 1:
            raise ValueError("data.shapes.focus covers every combination left; set focus_fraction to 1")
        self.num_images, self.resolution, self.seed = num_images, resolution, seed
        self.colour_only_captions = colour_only_captions
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown shapes styles {unknown}; valid: {', '.join(STYLES)}")
        self.styles = list(styles) or ["white"]

    def __len__(self) -> int:
        return self.num_images

    def spec(self, index: int) -> ShapeSpec:
        if not self.focus:
            return self.specs[index % len(self.specs)]
        k = math.floor((index + 1) * self.focus_fraction)  # focus pictures among indices 0..index
        if k > math.floor(index * self.focus_fraction):
            return self.focus[(k - 1) % len(self.focus)]
        return self.rest[(index - k) % len(self.rest)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        spec = self.spec(index)
        rng = np.random.default_rng([self.seed, index])
        return {"image": render(spec, self.resolution, rng, self.style(index)), "text": self.caption(index)}

    def style(self, index: int) -> str:
        return self.styles[int(np.random.default_rng([self.seed, index, 2]).integers(len(self.styles)))]

    def reference(self, index: int) -> Image.Image:
        """A picture in the same style as item `index` that shows other content: another shape, and a colour
        and position drawn at random (what a style condition trains on)."""
        spec = self.spec(index)
        rng = np.random.default_rng([self.seed, index, 3])
        others = [s for s in SHAPES if s != spec.shape]
        other = ShapeSpec(list(COLOURS)[rng.integers(len(COLOURS))], others[rng.integers(len(others))],
                          list(POSITIONS)[rng.integers(len(POSITIONS))])
        return render(other, self.resolution, rng, self.style(index))

    def caption(self, index: int) -> str:
        """The full caption, or (for a fixed fraction of indices) the colour alone: "a red shape"."""
        spec = self.spec(index)
        draw = np.random.default_rng([self.seed, index, 1]).random() if self.colour_only_captions else 1.0
        if draw < self.colour_only_captions:
            return colour_caption(spec.colour)
        return spec.caption


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    colour: Optional[str]
    shape: Optional[str]
    position: Optional[str]
    shape_iou: float  # soft IoU of the best-fitting template (how clean the drawing is)
    style: Optional[str] = None  # the background, nearest of STYLES


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean mask (iterative flood fill; images are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _template(shape: str, box: tuple[float, float, float, float], resolution: int) -> np.ndarray:
    """Soft mask in [0, 1] of `shape` filling the box (x0, y0, x1, y1) in pixel units."""
    big = resolution * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in box)
    cx, cy, size = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, size, 255)
    return np.asarray(canvas.resize((resolution, resolution), Image.BOX), dtype=np.float32) / 255.0


def _subpixel_box(soft: np.ndarray) -> tuple[float, float, float, float]:
    """Bounding box with sub-pixel edges: an outermost row or column covered a fraction c of a pixel
    puts the edge 1 − c inside it (without this, anti-aliased squares get boxes too big and read as
    circles at 32 px)."""
    cols, rows = soft.max(axis=0), soft.max(axis=1)
    xs, ys = np.nonzero(cols > 0)[0], np.nonzero(rows > 0)[0]
    x0, x1, y0, y1 = xs[0], xs[-1], ys[0], ys[-1]
    return (x0 + 1.0 - cols[x0], y0 + 1.0 - rows[y0], x1 + cols[x1], y1 + rows[y1])


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Read colour, shape and position back from a picture of one shape on white."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.max() > 1.5:
        rgb = rgb / 255.0
    res = rgb.shape[0]
    # The background: the median border pixel (exactly white when it is nearly white, as on the shapes
    # the model was always asked for before styles existed).
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    if np.abs(background - 1.0).max() < 0.08:
        background = np.ones(3, dtype=np.float32)
    style = min(STYLES, key=lambda k: float(np.sum((np.array(STYLES[k]) / 255.0 - background) ** 2)))
    # How far each pixel is from the background, 0 (background) .. ~1 (saturated colour on white).
    dist = np.linalg.norm(background - rgb, axis=-1) / np.sqrt(3.0)
    # A pixel belongs to the shape if it is at least a quarter as far from white as the most saturated
    # pixel (and clearly off-white): a faint halo the model paints around a shape is not part of it.
    component = _largest_component(dist > max(0.15, 0.25 * float(dist.max())))
    if component.sum() < 2:
        return Reading(None, None, None, 0.0, style)
    core = component & (dist >= 0.7 * dist[component].max())
    mean = rgb[core].mean(axis=0) * 255.0
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - mean) ** 2)))
    # Coverage of each pixel by the shape, from how far it is from white relative to the core.
    soft = np.clip(dist / max(float(dist[core].mean()), 1e-6), 0.0, 1.0) * component
    box = _subpixel_box(soft)
    # Position from the bounding-box centre (the renderer centres the box on the grid point).
    fx, fy = (box[0] + box[2]) / 2 / res, (box[1] + box[3]) / 2 / res
    col = int(np.argmin([abs(fx - g) for g in _GRID]))
    row = int(np.argmin([abs(fy - g) for g in _GRID]))
    position = next(n for n, (_, (gx, gy)) in POSITIONS.items() if gx == _GRID[col] and gy == _GRID[row])
    # Shape: soft IoU of the drawn coverage against each template, each at its best of a few sizes
    # around the estimated box: at ~11 px a quarter-pixel box error costs as much IoU as rounded
    # corners do, and the search takes that error out of the comparison between shapes.
    ious = {}
    for shape in SHAPES:
        best = 0.0
        for grow in (-0.5, -0.25, 0.0, 0.25):
            tmpl = _template(shape, (box[0] - grow / 2, box[1] - grow / 2, box[2] + grow / 2, box[3] + grow / 2), res)
            best = max(best, float(np.minimum(soft, tmpl).sum() / max(np.maximum(soft, tmpl).sum(), 1e-6)))
        ious[shape] = best
    shape = max(ious, key=ious.get)
    return Reading(colour, shape, position, ious[shape], style)


def share(hits: Iterable[bool]) -> float:
    """The fraction of true items: what every probe reports (0 for none)."""
    hits = list(hits)
    return sum(hits) / len(hits) if hits else 0.0


def score(readings: Sequence[Reading], expected: Sequence[ShapeSpec]) -> dict[str, float]:
    """Accuracy per attribute and all-three-correct, as fractions in [0, 1]."""
    if len(readings) != len(expected) or not readings:
        raise ValueError(f"need as many readings as expectations (>0), got {len(readings)} and {len(expected)}")
    n = len(readings)
    c = share(r.colour == e.colour for r, e in zip(readings, expected))
    s = share(r.shape == e.shape for r, e in zip(readings, expected))
    p = share(r.position == e.position for r, e in zip(readings, expected))
    a = share(r.colour == e.colour and r.shape == e.shape and r.position == e.position
            for r, e in zip(readings, expected))
    return {"colour": c, "shape": s, "position": p, "all": a, "n": n}


def write_imagefolder(folder: str | Path, num_images: int, resolution: int, seed: int = 0,
                      caption_column: str = "text") -> Path:
    """Write the shapes dataset as an imagefolder: PNG files plus metadata.jsonl (file_name + caption)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(num_images, resolution, seed=seed)
    with (folder / "metadata.jsonl").open("w") as f:
        for i in range(num_images):
            item = data[i]
            name = f"images/{i:06d}.png"
            item["image"].save(folder / name)
            f.write(json.dumps({"file_name": name, caption_column: item["text"]}) + "\n")
    return folder
