"""Conditions beyond text: a sketch through a ControlNet (Zhang et al. 2023).

The sketch is derived from the training picture itself after it was resized and cropped, so its
geometry matches the latents exactly: edges where any colour channel steps by more than a
threshold (a Sobel magnitude per channel, the largest over channels, so a yellow shape on white
has as clear an outline as a blue one). Or it is read from a dataset column. The ControlNet starts
as a copy of the trained UNet's encoder with zero-initialised output convolutions, so training
starts from the text-only model's behaviour; the UNet stays frozen.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from ldm.images import to_pil

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def sketch_from_pixels(pixel_values: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, 3, H, W) in {0, 1}: white edges on black.

    A step of height h (in [0, 1] units) gives a Sobel response of about h / 2 at the edge, so the
    default threshold marks steps of more than 0.2."""
    x = (pixel_values.float() + 1.0) / 2.0
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    kx = _SOBEL_X.to(x.device)[None, None]
    gx, gy = F.conv2d(flat, kx), F.conv2d(flat, kx.transpose(-1, -2))
    magnitude = torch.sqrt(gx**2 + gy**2).reshape(b, c, h, w).amax(dim=1, keepdim=True)
    return (magnitude > threshold).float().expand(b, 3, h, w).contiguous()


def sketch_image(image: Image.Image, threshold: float = 0.1) -> Image.Image:
    """The sketch of one picture, as a PIL image (for generation and for the probe)."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return to_pil(sketch_from_pixels(x[None], threshold)[0] * 2 - 1)


def build_controlnet(unet: UNet2DConditionModel, vae_downsample: int) -> ControlNetModel:
    """A ControlNet initialised from `unet`; its conditioning encoder downsamples pixels to latents
    (one stride-2 stage per factor of 2 of the VAE)."""
    stages = int(math.log2(vae_downsample))
    channels = (16, 32, 96, 256, 256)[: stages + 1]
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


def style_reference(source, index: int) -> Image.Image:
    """The style reference of a training item: the source's own (the shapes world draws another shape in
    the same style), else the picture itself, as IP-Adapter trains."""
    if hasattr(source, "reference"):
        return source.reference(index)
    return source.get(index)[0]


def controlled_prediction(unet, controlnet, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                          prompt_embeds: torch.Tensor, sketch: torch.Tensor,
                          conditioning_scale: float = 1.0, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added; `keep` (B,) zeroes dropped sketches."""
    if keep is not None:
        sketch = sketch * keep.to(sketch.device, sketch.dtype)[:, None, None, None]
    down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, controlnet_cond=sketch,
                           conditioning_scale=conditioning_scale, return_dict=False)
    return unet(noisy_latents, timesteps, prompt_embeds, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


def style_processor(image_size: int):
    """The reference preprocessing, exactly as Diffusers' `load_ip_adapter` builds it for this encoder."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size=image_size, crop_size=image_size)


class StyleAdapter(torch.nn.Module):
    """What a style run trains: a small CLIP vision tower (from scratch) whose embedding is projected to 4
    extra tokens, and per cross-attention layer a second key/value projection for those tokens
    (decoupled cross-attention). The image projection and the attention processors live inside the
    UNet, in Diffusers' own IP-Adapter classes; this module holds them so they train, checkpoint and
    average (EMA) as one."""

    def __init__(self, image_encoder, unet):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_proj = unet.encoder_hid_proj
        self.processors = torch.nn.ModuleList([p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")])

    def forward(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                reference_pixels: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_embeds = self.image_encoder(reference_pixels).image_embeds  # (B, D)
        if keep is not None:  # a dropped reference is a zero embedding, as the pipeline's unconditional one
            image_embeds = image_embeds * keep.to(image_embeds.device, image_embeds.dtype)[:, None]
        return unet(noisy_latents, timesteps, prompt_embeds,
                    added_cond_kwargs={"image_embeds": [image_embeds[:, None]]}).sample

    def ip_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter in the IP-Adapter file layout that Diffusers' `load_ip_adapter` reads."""
        out = {f"image_proj.{k.replace('image_embeds.', 'proj.')}": v
               for k, v in self.image_proj.image_projection_layers[0].state_dict().items()}
        for i, proc in enumerate(self.processors):
            out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return {k: v.detach().contiguous() for k, v in out.items()}


def build_style_adapter(unet: UNet2DConditionModel, image_size: int, width: int = 128, layers: int = 3,
                        tokens: int = 4) -> StyleAdapter:
    """Attach a fresh adapter to `unet` (through Diffusers' IP-Adapter loader, so the processors are its
    own) and return it. The new key/value projections start as copies of the text ones (as IP-Adapter
    does); the image encoder is a CLIP vision tower trained from scratch (no pretrained one is offline)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=image_size, patch_size=max(image_size // 8, 1), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=4, projection_dim=width))
    cross = unet.config.cross_attention_dim
    proj = torch.nn.Linear(width, tokens * cross)
    state = {"image_proj": {"proj.weight": proj.weight.detach(), "proj.bias": proj.bias.detach(),
                            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
             "ip_adapter": {}}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        state["ip_adapter"][f"{key}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        state["ip_adapter"][f"{key}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
        key += 2
    if tokens != 4:
        raise ValueError("Diffusers' loader reads a plain IP-Adapter projection as 4 tokens")
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    adapter = StyleAdapter(encoder, unet)
    adapter.requires_grad_(True)
    return adapter


def save_style_adapter(adapter: StyleAdapter, pipeline_folder) -> None:
    """pipeline/ip_adapter/{ip_adapter.safetensors, image_encoder/}: what `pipe.load_ip_adapter(folder,
    subfolder="ip_adapter", weight_name="ip_adapter.safetensors")` loads in plain Diffusers."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(pipeline_folder) / "ip_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in adapter.ip_adapter_state().items()}, str(folder / "ip_adapter.safetensors"))
    adapter.image_encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
