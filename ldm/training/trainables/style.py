"""An image-prompt adapter trained on the frozen text-to-image UNet: a reference picture's style steers it."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from ldm.config.schema import Config
from ldm.diffusion import (
    STYLE_STREAM,
    drop_condition,
)
from ldm.inference.modes import Style
from ldm.inference.pipeline import assemble_pipeline
from ldm.models.conditions import (
    build_style_adapter,
    save_style_adapter,
    style_processor,
    style_reference,
)
from ldm.training.export import export_pipeline
from ldm.training.trainables.base import Trainable


class StyleAdapter(Trainable):
    """An image-prompt adapter (style from a reference picture) trained on the frozen text-to-image UNet."""

    label = "style adapter"
    weights_file = "style_adapter.safetensors"

    def __init__(self, cfg: Config, unet: torch.nn.Module, load_plain_unet: Callable[[], torch.nn.Module]):
        super().__init__(cfg, unet)
        unet.requires_grad_(False).eval()
        torch.manual_seed(cfg.train.seed)
        st = cfg.conditioning.style
        self.adapter = build_style_adapter(unet, cfg.data.resolution, st.encoder_width, st.encoder_layers)
        self.module = self.adapter
        self.processor = style_processor(cfg.data.resolution)
        # The export holds the pretrained UNet without the adapter's processors: loaded when exporting,
        # not held for the whole run.
        self._load_plain_unet = load_plain_unet

    def _references(self, stream, indices: list[int]) -> torch.Tensor:
        images = [style_reference(stream.source, int(i)) for i in indices]
        return self.processor(images, return_tensors="pt").pixel_values

    def inputs(self, batch: dict, encoded, stream, device) -> dict:
        positions = [int(p) for p in batch["position"]]
        keep = ~drop_condition(self.cfg.train.seed, positions, self.cfg.conditioning.style.dropout, STYLE_STREAM)
        return {"reference": self._references(stream, batch["index"]).to(device), "keep": keep}

    def predict(self, model, noisy_latents, timesteps, prompt_embeds, reference=None, keep=None):
        return model(self.unet, noisy_latents, timesteps, prompt_embeds, reference, keep)

    def held_back_inputs(self, stream, indices, pixel_values, device) -> dict:
        return {"reference": self._references(stream, indices).to(device)}

    def pipeline(self, vae, text_encoder, tokenizer, scheduler, sampler: str):
        return assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler, sampler=sampler,
                                 image_encoder=self.adapter.image_encoder, feature_extractor=self.processor)

    def validation_inputs(self, stream, count: int) -> tuple[list[Image.Image], dict]:
        """Prompt k is drawn in the style of stream sample k's reference."""
        references = [style_reference(stream.source, stream.usable(stream.index_of(k))[0]) for k in range(count)]
        return references, {"mode": Style(references, self.cfg.conditioning.style.scale)}

    def export(self, folder, vae, text_encoder, tokenizer, scheduler, cfg, text_state=None):
        return export_pipeline(folder, vae, text_encoder, tokenizer, self._load_plain_unet(), scheduler, cfg,
                               also=[lambda tmp: save_style_adapter(self.adapter, tmp)])
