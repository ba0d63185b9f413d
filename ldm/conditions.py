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

from ldm.diffusion import mix_seed

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

    from ldm.images import to_pil

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return to_pil(sketch_from_pixels(x[None], threshold)[0] * 2 - 1)


def build_controlnet(unet: UNet2DConditionModel, vae_downsample: int) -> ControlNetModel:
    """A ControlNet initialised from `unet`; its conditioning encoder downsamples pixels to latents
    (one stride-2 stage per factor of 2 of the VAE)."""
    stages = int(math.log2(vae_downsample))
    channels = (16, 32, 96, 256, 256)[: stages + 1]
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


def drop_sketch(seed: int, positions: list[int], probability: float) -> torch.Tensor:
    """(B,) bool: which samples train without their sketch, keyed by (seed, position) like every draw
    (a separate stream, so the noise, timestep and caption draws are unchanged)."""
    return torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(mix_seed(seed, 11, p))).item()
                         < probability for p in positions], dtype=torch.bool)


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
