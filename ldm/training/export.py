"""What a run leaves behind: a Diffusers pipeline folder, written atomically (a crash never leaves half a folder)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ldm.config.loading import save_config
from ldm.config.schema import Config
from ldm.inference.pipeline import assemble_pipeline
from ldm.models.conditions import save_style_adapter


def export_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet, scheduler, cfg: Config,
                    controlnet=None, style_adapter=None, sampler: Optional[str] = None) -> Path:
    """Write a StableDiffusionPipeline folder that `DiffusionPipeline.from_pretrained` loads.

    Written to a temporary sibling and renamed into place, so a crash never leaves a half pipeline
    where a complete one is expected. The resolved config travels with it (`ldm_config.yaml`).
    """
    folder = Path(folder)
    with replace_folder(folder) as tmp:
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler=sampler or cfg.sample.sampler,
                                 controlnet=controlnet)
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_config(cfg, tmp / "ldm_config.yaml")
        if style_adapter is not None:
            save_style_adapter(style_adapter, tmp)
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
