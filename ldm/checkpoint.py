"""Export of the trained model as a plain Diffusers pipeline folder (safetensors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ldm.config import Config, save_config
from ldm.pipeline import assemble_pipeline


def export_pipeline(folder: str | Path, vae, text_encoder, tokenizer, unet, scheduler, cfg: Config) -> Path:
    """Write a StableDiffusionPipeline folder that `DiffusionPipeline.from_pretrained` loads.

    Written to a temporary sibling and renamed into place, so a crash never leaves a half pipeline
    where a complete one is expected. The resolved config travels with it (`ldm_config.yaml`).
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler=cfg.sample.sampler)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_config(cfg, tmp / "ldm_config.yaml")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder
