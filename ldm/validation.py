"""Validation during training: a grid for fixed prompts and seeds (drawn on sketches or in the style of
references for conditioned runs), the loss per timestep bucket on held-back samples, and the EMA
weight swap both use."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ldm.components import FrozenEncoders
from ldm.conditions import sketch_from_pixels, style_processor, style_reference
from ldm.config import Config
from ldm.data import SampleStream
from ldm.evaluation import encode_images, validation_loss
from ldm.images import make_grid, save_png, to_pil
from ldm.pipeline import assemble_pipeline, generate


@contextmanager
def ema_weights(unet, ema: Optional[EMAModel]):
    """Temporarily swap the EMA weights into `unet` (training weights restored afterwards)."""
    if ema is None:
        yield
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


def validate(cfg: Config, step: int, frozen: FrozenEncoders, unet, scheduler, out: Path,
             accelerator: Accelerator, controlnet=None, stream: Optional[SampleStream] = None,
             adapter=None) -> Path:
    """Fixed prompts and seed → a PNG grid (and TensorBoard images). With a ControlNet, prompt k is drawn
    on the sketch of stream sample k; with a style adapter, in the style of that sample's reference (the
    sketches or references lead the grid)."""
    tokenizer, text_encoder = frozen.text
    pipe = assemble_pipeline(frozen.vae, text_encoder, tokenizer, unet, scheduler, sampler=cfg.sample.sampler,
                             controlnet=controlnet, image_encoder=adapter.image_encoder if adapter else None,
                             feature_extractor=style_processor(cfg.data.resolution) if adapter else None)
    s = cfg.sample
    sketches = references = None
    if adapter is not None:
        assert stream is not None
        references = [style_reference(stream.source, stream.index_of(k)) for k in range(len(s.prompts))]
    if controlnet is not None:
        assert stream is not None
        pixels = torch.stack([stream[k]["pixel_values"] for k in range(len(s.prompts))])
        sketches = [to_pil(x) for x in sketch_from_pixels(pixels, cfg.conditioning.sketch.threshold) * 2 - 1]
    results = generate(pipe, s.prompts, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale,
                       num_inference_steps=s.num_inference_steps, sampler=s.sampler, seed=s.seed,
                       num_images_per_prompt=s.num_images_per_prompt, batch_size=s.batch_size,
                       device=accelerator.device, sketch=sketches,
                       conditioning_scale=cfg.conditioning.sketch.conditioning_scale, style=references,
                       style_scale=cfg.conditioning.style.scale)
    images = (sketches or references or []) + [r.image for r in results]
    path = save_png(make_grid(images), out / "validation" / f"step_{step:06d}.png",
                    {"step": step, "prompts": list(s.prompts), "seed": s.seed, "sampler": s.sampler})
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=step,
                               dataformats="NHWC")
    return path


def log_validation_loss(cfg: Config, step: int, stream: SampleStream, val_set: list, frozen: FrozenEncoders,
                         unet, scheduler, out: Path, accelerator: Accelerator) -> None:
    """Loss per timestep bucket on the held-back samples (fixed draws); appended to validation_loss.jsonl."""
    n = cfg.data.validation_images
    if not n:
        return
    if not val_set:
        items = [stream.source.get(i) for i in range(stream.size, stream.size + n)]
        val_set += encode_images(frozen.vae, *frozen.text, [im for im, _ in items], [c for _, c in items],
                                 cfg.data.resolution)
    losses = validation_loss(unet, scheduler, *val_set, cfg.model.scheduler.prediction_type, seed=cfg.train.seed)
    accelerator.log({f"val/loss_{k}": v for k, v in losses.items()}, step=step)
    with (out / "validation_loss.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **losses}) + "\n")
    accelerator.print(f"step {step}: validation loss {losses['mean']:.4f} on {n} held-back images")
