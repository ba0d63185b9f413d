"""Pictures of the diffusion process: the forward strip, the reverse strip, the guidance grid.

- forward: an image's latents noised to chosen t by q(x_t|x_0) and decoded, from the image to noise;
- reverse: the denoising trajectory x_t and the model's predicted x̂_0 at chosen steps (DDIM, which
  reports x̂_0 at every step);
- guidance: one prompt and seed at several guidance scales.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from ldm.config.data import DataConfig
from ldm.data.transforms import prepare_image
from ldm.images import make_grid
from ldm.inference.generate import generate
from ldm.inference.pipeline import make_scheduler
from ldm.models.encoders import latent_distribution
from ldm.models.loading import native_size


@torch.no_grad()
def _decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


@torch.no_grad()
def forward_strip(pipe, image: Image.Image, timesteps: Sequence[int] = (0, 50, 150, 300, 500, 750, 999),
                  seed: int = 0) -> Image.Image:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε for each t (one ε), decoded: a row from the image to pure noise."""
    size = native_size(pipe)
    x = prepare_image(image, DataConfig(resolution=size))  # (3, H, W) in [-1, 1]
    latents = latent_distribution(pipe.vae, x[None])[0]  # (1, C, h, w)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(list(timesteps))
    noisy = pipe.scheduler.add_noise(latents.expand(len(t), -1, -1, -1), noise.expand(len(t), -1, -1, -1), t)
    return make_grid(_decode(pipe, noisy), cols=len(t))


@torch.no_grad()
def reverse_strip(pipe, prompt: str, seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                  show: int = 6) -> Image.Image:
    """Two rows over `show` evenly spaced steps: x_t (top) and the predicted x̂_0 (bottom), DDIM sampling."""
    scheduler = make_scheduler("ddim", pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    embeds, negative = pipe.encode_prompt([prompt], pipe.device, 1, True, [""])
    context = torch.cat([negative, embeds])  # (2, L, D): unconditional, conditional
    size = pipe.unet.config.sample_size
    x = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = x * scheduler.init_noise_sigma
    keep = {round(i * (num_inference_steps - 1) / (show - 1)) for i in range(show)}
    tops, bottoms = [], []
    for i, t in enumerate(scheduler.timesteps):
        uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        out = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x)
        if i in keep:
            tops.append(x.clone())
            bottoms.append(out.pred_original_sample)
        x = out.prev_sample
    return make_grid(_decode(pipe, torch.cat(tops)) + _decode(pipe, torch.cat(bottoms)), cols=len(tops))


def guidance_grid(pipe, prompt: str, scales: Sequence[float] = (1, 2, 4, 7, 10), seed: int = 0,
                  sampler: str = "dpm++", num_inference_steps: int = 20) -> Image.Image:
    """The same prompt and seed at each guidance scale, left to right."""
    images = [generate(pipe, [prompt], guidance_scale=g, seed=seed, sampler=sampler,
                       num_inference_steps=num_inference_steps)[0].image for g in scales]
    return make_grid(images, cols=len(images))
