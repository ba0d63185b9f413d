"""Load or assemble a Diffusers pipeline, pick a sampler by name, and generate.

Every sampler is a Diffusers scheduler configured from the model's own scheduler config, so the
noise schedule (β's, T, prediction type) is always the one the model was trained with.
Seeding: image j of a call (prompts × images per prompt, flattened) uses a generator seeded with
`seed + j`, so an image does not change when the batch size or the other prompts change, and a
plain `StableDiffusionPipeline` called with the same generators gives the same pixels.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence, Union

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from ldm.errors import ConfigError
from ldm.interop.lora import LoRASpec, load_loras
from ldm.interop.single_file import load_single_file
from ldm.models.loading import _load


def fused_pipeline(base: str | Path, loras: Sequence[LoRASpec], device: str = "cpu"):
    """The base pipeline with the LoRAs fused into its weights (no adapter layers left)."""
    pipe = load_pipeline(str(base), device)
    active = load_loras(pipe, loras)
    pipe.fuse_lora(adapter_names=[n for n, _ in active], lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe


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
    # Latent consistency sampling (Luo et al. 2023) for a distilled student: 1–8 steps, guidance 1 (folded in).
    "lcm": (LCMScheduler, {}),
}


def make_scheduler(name: str, config) -> object:
    """A sampler by name, built from a scheduler config (the model's)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    cls, options = SAMPLERS[name]
    return cls.from_config(config, **options)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler, sampler: str = "dpm++", controlnet=None,
                      image_encoder=None, feature_extractor=None):
    """A StableDiffusionPipeline (or, with a ControlNet, a StableDiffusionControlNetPipeline) from in-memory
    components (no safety checker: we train our own models). `image_encoder` and `feature_extractor` go
    with a UNet that carries a style adapter."""
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                 scheduler=make_scheduler(sampler, scheduler.config), safety_checker=None,
                 feature_extractor=feature_extractor, requires_safety_checker=False, image_encoder=image_encoder)
    if controlnet is not None:
        return StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    return StableDiffusionPipeline(**parts)


class _TextEncoderTypeNotice(logging.Filter):
    """Diffusers warns when a Stable-Diffusion pipeline's text encoder is not CLIP; ldm trains with any
    Transformers encoder (MiniLM in the quickstart) and the pipeline runs it the same way."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Expected types for text_encoder")


@contextmanager
def any_text_encoder():
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    notice = _TextEncoderTypeNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def load_pipeline(path: str | Path, device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """An exported pipeline from a folder, a Hub id or one LDM-layout `.safetensors` file (safetensors only)."""
    if str(path).endswith(".safetensors"):
        return load_single_file(path, torch_dtype=dtype).to(device)
    with any_text_encoder():
        pipe = _load("pipeline", str(path), lambda: DiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False))
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionControlNetPipeline)):
        raise ConfigError(f"{path}: a {type(pipe).__name__}; ldm generates with Stable-Diffusion-layout pipelines")
    if (Path(path) / "ip_adapter" / "ip_adapter.safetensors").is_file():  # a style run's export
        pipe.load_ip_adapter(str(path), subfolder="ip_adapter", weight_name="ip_adapter.safetensors")
    return pipe.to(device)


def as_pipeline(model, device: Union[str, torch.device] = "cpu"):
    """`model` itself when it is a loaded pipeline; a folder, Hub id or single file loaded onto `device`."""
    return model if hasattr(model, "unet") else load_pipeline(str(model), device)
