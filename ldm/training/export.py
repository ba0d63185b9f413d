"""What a run leaves behind: a Diffusers pipeline folder, written atomically (a crash never leaves half a folder)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ldm.config.loading import save_config
from ldm.config.schema import Config
from ldm.inference.pipeline import assemble_pipeline


def export_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet, scheduler, cfg: Config,
                    controlnet=None, sampler: Optional[str] = None,
                    also: Sequence[Callable[[Path], None]] = ()) -> Path:
    """Write a StableDiffusionPipeline folder that `DiffusionPipeline.from_pretrained` loads; each of `also`
    writes what the kind adds into the folder (a style adapter's weights).

    Written to a temporary sibling and renamed into place, so a crash never leaves a half pipeline
    where a complete one is expected. The resolved config travels with it (`ldm_config.yaml`).
    """
    folder = Path(folder)
    with replace_folder(folder) as tmp:
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler=sampler or cfg.sample.sampler,
                                 controlnet=controlnet)
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_config(cfg, tmp / "ldm_config.yaml")
        for write in also:
            write(tmp)
    return folder


@contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then rename it into place: a crash never leaves half a folder
    where a complete one is expected."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
