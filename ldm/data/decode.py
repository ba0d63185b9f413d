"""Bytes to an RGB picture and raw text to a caption, or a BadSample that names what is wrong with it."""

from __future__ import annotations

import io
import unicodedata
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, name: str = "image", notes: Optional[list[str]] = None) -> Image.Image:
    """Any PIL mode to 8-bit RGB, on the scale the file means, never the picture's own maximum: 16-bit values
    / 257 (so a dark 16-bit picture stays dark), float pixels read as [0, 1] (or [0, 255] when they exceed 1),
    transparency composited on white. What was done is appended to `notes`; pixels that have no such reading
    (negative, or beyond 16 bits) raise BadSample."""
    notes = notes if notes is not None else []
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or low < 0:
            raise BadSample(f"{mode} pixels outside the displayable range", name, f"{low:g} … {high:g}")
        if mode == "F":
            scale = 255.0 if high <= 1.0 else 1.0
            notes.append(f"float image read as [0, {1 if high <= 1.0 else 255}] and converted to 8-bit RGB")
        else:
            if high > 65535:
                raise BadSample("32-bit integer pixels beyond 16 bits", name, f"max {high:g}")
            scale = 1 / 257
            notes.append("16-bit image scaled to 8 bits (÷ 257)")
        if high > 255 / scale:
            raise BadSample("float pixels beyond 255", name, f"max {high:g}")
        image = Image.fromarray(np.round(arr * scale).clip(0, 255).astype(np.uint8), "L")
    elif mode != "RGB":
        notes.append(f"image mode {mode} converted to RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode PIL cannot convert (e.g. LAB, HSV)
        raise BadSample(f"image mode {mode} cannot be converted to RGB", name) from err


Caption = Union[str, tuple[str, ...]]  # a tuple: alternatives, one chosen per use (ldm.data.transforms.caption_for)


class BadSample(ValueError):
    """One sample cannot be used; `reason` is the counted kind."""

    def __init__(self, reason: str, name: str, detail: str = ""):
        super().__init__(f"{name}: {reason}{' (' + detail + ')' if detail else ''}")
        self.reason, self.name = reason, name


def decode_image(data: bytes | Path, name: str, notes: Optional[list[str]] = None) -> Image.Image:
    """Open and fully decode an image; raise BadSample naming the kind of failure.

    A damaged file can make a decoder raise almost anything (struct.error, IndexError, ZeroDivisionError,
    EOFError…), so every exception from decoding is this sample's problem, named and counted, never the run's."""
    notes = notes if notes is not None else []
    try:
        if isinstance(data, Path) and data.stat().st_size == 0 or isinstance(data, bytes) and not data:
            raise BadSample("empty file", name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": handled below
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if getattr(image, "n_frames", 1) > 1:
                notes.append("animated image: first frame used")
                image.seek(0)
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("decompression bomb (too many pixels)", name, str(err)[:80]) from err
    except UnidentifiedImageError as err:
        raise BadSample("not an image or corrupt", name) from err
    except MemoryError as err:
        raise BadSample("too large to decode", name) from err
    except Exception as err:  # noqa: BLE001 (see the docstring)
        kind = "truncated image" if "truncated" in str(err) else "corrupt image data"
        raise BadSample(kind, name, f"{type(err).__name__}: {err}"[:80]) from err
    try:
        orientation = image.getexif().get(0x0112, 1)
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (corrupt EXIF: the pixels are fine, the rotation is unknown)
        notes.append("unreadable EXIF: orientation not applied")
        return image
    if transposed is not image and orientation != 1:
        notes.append("EXIF orientation applied")
    return transposed


_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"  # zero-width characters and BOMs that str.strip keeps


def normalise_caption(caption: object, name: str, notes: list[str]) -> Caption:
    """A usable caption (stripped text), or a tuple of them when the column holds a list of alternatives."""
    if isinstance(caption, BadSample):  # found unusable while reading (e.g. a caption file that is not UTF-8)
        raise caption
    if isinstance(caption, (list, tuple)):
        entries = [c for c in caption if isinstance(c, str) and c.strip(" \t\n\r" + _INVISIBLE)]
        if not entries:
            raise BadSample("caption list has no usable entry", name, repr(caption)[:60])
        if len(entries) < len(caption):
            notes.append("caption list: unusable entries dropped")
        texts = tuple(dict.fromkeys(_caption_text(c, name) for c in entries))
        if len(texts) == 1:
            return texts[0]
        notes.append("caption list: one entry chosen per use")
        return texts
    if caption is None:
        raise BadSample("missing caption", name)
    if not isinstance(caption, str):
        if isinstance(caption, (int, float, bool)):
            notes.append("non-string caption converted to text")
            caption = str(caption)
        else:
            raise BadSample("unusable caption type", name, type(caption).__name__)
    return _caption_text(caption, name)


def _caption_text(caption: str, name: str) -> str:
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadSample("caption is not valid Unicode (a lone surrogate)", name, repr(caption)[:60]) from err
    if not caption.strip():
        raise BadSample("empty caption", name)
    if not any(unicodedata.category(ch)[0] not in "CZ" for ch in caption):
        raise BadSample("caption has no visible characters", name, repr(caption)[:60])
    return caption.strip().strip(_INVISIBLE).strip()


def caption_variants(caption: Caption) -> tuple[str, ...]:
    """Every text a caption can be used as (one, or each alternative of a list)."""
    return caption if isinstance(caption, tuple) else (caption,)
