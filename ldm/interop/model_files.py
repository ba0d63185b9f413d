"""A model or LoRA file from elsewhere, checked before anything loads it: one message that says what the file is
(missing, empty, cut short, a pickle, not safetensors at all) and what to do, instead of a loader's traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ldm.errors import ConfigError

# How a file starts, for the formats a safetensors name is most often given by mistake.
_SIGNATURES = ((b"PK\x03\x04", "a PyTorch checkpoint (torch.save's zip of pickles)"),
               (b"\x80", "a Python pickle"),
               (b"<", "a web page (HTML), not a model: the download may have failed"),
               (b"version https://git-lfs", "a Git LFS pointer, not the file: fetch it with git lfs pull"))


class ModelFileError(ConfigError):
    """A model or LoRA file that cannot be used; the message names the file, what it is and what to do."""


def _what_it_is(head: bytes) -> str:
    return next((kind for signature, kind in _SIGNATURES if head.startswith(signature)), "not a safetensors file")


def check_safetensors(path: str | Path, what: str) -> dict[str, str]:
    """The metadata of a whole, readable safetensors file at `path`; `what` names it in the message ("--model",
    "LoRA"). Reads the header only: a damaged file is refused before any tensor is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {str(path)!r}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            kind = _what_it_is(head + f.read(64))
            if kind == "not a safetensors file" and 8 <= size:
                kind += " (its first bytes are no safetensors header: another format, or damaged)"
            elif size < 8:
                kind = f"empty or cut short ({size} bytes)"
            raise ModelFileError(f"{what} {str(path)!r}: {kind}. ldm reads weights from safetensors files only "
                                 "(never pickles); export or convert the model to .safetensors and give that")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ModelFileError(f"{what} {str(path)!r}: a damaged safetensors header; download or export it "
                                 "again") from None
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"
            and isinstance(info, dict) and "data_offsets" in info]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise ModelFileError(f"{what} {str(path)!r}: cut short ({size:,} of {needed:,} bytes); download or export "
                             "it again")
    return header.get("__metadata__") or {}
