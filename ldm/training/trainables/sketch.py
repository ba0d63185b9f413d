"""A ControlNet trained on the frozen text-to-image UNet: the sketch (edges of the picture) steers it."""

from __future__ import annotations

import torch
from PIL import Image

from ldm.config.schema import Config
from ldm.diffusion import (
    SKETCH_STREAM,
    drop_condition,
)
from ldm.images import to_pil
from ldm.inference.modes import Sketch
from ldm.inference.pipeline import assemble_pipeline
from ldm.models.conditions import (
    build_controlnet,
    controlled_prediction,
    sketch_from_pixels,
)
from ldm.training.export import export_pipeline
from ldm.training.trainables.base import Trainable


class SketchControlNet(Trainable):
    """A ControlNet (sketch = edges of the picture) trained on the frozen text-to-image UNet."""

    label = "ControlNet"
    weights_file = "controlnet.safetensors"

    def __init__(self, cfg: Config, unet: torch.nn.Module, vae_downsample: int):
        super().__init__(cfg, unet)
        unet.requires_grad_(False).eval()
        torch.manual_seed(cfg.train.seed)
        self.controlnet = build_controlnet(unet, vae_downsample)
        self.module = self.controlnet
        self.sketch_threshold = cfg.conditioning.sketch.threshold

    def cache_request(self) -> dict:
        """The cache holds each picture's sketch too (the edges at this threshold)."""
        return {"sketch_threshold": self.sketch_threshold}

    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        positions = [int(p) for p in batch["position"]]
        sketch = (encoded.sketches(batch["index"], batch["position"]) if encoded is not None else
                  sketch_from_pixels(batch["pixel_values"], self.sketch_threshold))
        keep = ~drop_condition(self.cfg.train.seed, positions, self.cfg.conditioning.sketch.dropout, SKETCH_STREAM)
        return {"sketch": sketch.to(device), "keep": keep}

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, sketch=None, keep=None):
        return controlled_prediction(self.unet, model, noisy_latents, timesteps, prompt_embeds, sketch, keep=keep)

    def held_back_inputs(self, stream, indices, pixel_values, device) -> dict:
        return {"sketch": sketch_from_pixels(pixel_values, self.sketch_threshold).to(device)}

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler,
                                 controlnet=self.controlnet)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """Prompt k is drawn on the sketch of stream sample k."""
        pixels = torch.stack([stream[k]["pixel_values"] for k in range(count)])
        sketches = [to_pil(x) for x in sketch_from_pixels(pixels, self.sketch_threshold) * 2 - 1]
        return sketches, {"mode": Sketch(sketches, self.cfg.conditioning.sketch.conditioning_scale)}

    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=None):
        return export_pipeline(folder, vae, text_encoder, tokenizer, self.unet, scheduler, cfg,
                               controlnet=self.controlnet)
