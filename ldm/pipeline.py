"""Load or assemble a Diffusers pipeline, pick a sampler by name, and generate.

Every sampler is a Diffusers scheduler configured from the model's own scheduler config, so the
noise schedule (β's, T, prediction type) is always the one the model was trained with.
Seeding: image j of a call (prompts × images per prompt, flattened) uses a generator seeded with
`seed + j`, so an image does not change when the batch size or the other prompts change, and a
plain `StableDiffusionPipeline` called with the same generators gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from ldm.components import _load

# name -> (scheduler class, options on top of the model's scheduler config)
SAMPLERS: dict[str, tuple[type, dict]] = {
    # Ancestral sampling with the posterior variance σ_t² = β_t(1−ᾱ_{t−1})/(1−ᾱ_t) (Ho et al. 2020).
    "ddpm": (DDPMScheduler, {"variance_type": "fixed_small", "clip_sample": False}),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # The stochastic variant without the torchsde dependency of DPMSolverSDEScheduler.
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
}


def make_scheduler(name: str, config) -> object:
    """A sampler by name, built from a scheduler config (the model's)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    cls, options = SAMPLERS[name]
    return cls.from_config(config, **options)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler: str = "dpm++") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from in-memory components (no safety checker: we train our own models)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(sampler, scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(path: str | Path, device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """An exported pipeline from a folder, a Hub id or one LDM-layout `.safetensors` file (safetensors only)."""
    if str(path).endswith(".safetensors"):
        from ldm.single_file import load_single_file

        return load_single_file(path, torch_dtype=dtype).to(device)
    pipe = _load("pipeline", str(path), lambda: StableDiffusionPipeline.from_pretrained(
        str(path), torch_dtype=dtype, use_safetensors=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))
    return pipe.to(device)


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    params: dict = field(default_factory=dict)


def generate(
    model: Union[str, Path, StableDiffusionPipeline],
    prompts: Sequence[str],
    negative_prompt: Optional[str] = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 25,
    sampler: str = "dpm++",
    seed: int = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_images_per_prompt: int = 1,
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
    guidance_rescale: float = 0.0,
) -> list[Generated]:
    """Generate `num_images_per_prompt` images for each prompt; returns them with their parameters."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    pipe = model if isinstance(model, StableDiffusionPipeline) else load_pipeline(str(model), device)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    jobs = [(p, seed + j) for j, p in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]
    out: list[Generated] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        images = pipe(
            prompt=[p for p, _ in chunk],
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, guidance_rescale=guidance_rescale,
            height=height, width=width, generator=generators, output_type="pil",
        ).images
        for (prompt, s), image in zip(chunk, images):
            params = dict(prompt=prompt, negative_prompt=negative_prompt or "", seed=s, sampler=sampler,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, height=height, width=width)
            out.append(Generated(image, prompt, s, params))
    return out
