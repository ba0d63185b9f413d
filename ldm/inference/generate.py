"""generate(): prompts (and an init image, a sketch or a style reference) to pictures, as plain Diffusers draws them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from diffusers import (
    StableDiffusionPipeline,
)
from PIL import Image

from ldm.config.schema import SampleConfig
from ldm.errors import ConfigError
from ldm.inference.fast import make_fast, text_kv_table
from ldm.inference.modes import Mode, Text, takes_style
from ldm.inference.pipeline import SAMPLERS, as_pipeline, make_scheduler
from ldm.interop.lora import load_loras, parse_lora
from ldm.models.loading import native_size


@torch.no_grad()
def _encode_once(pipe, prompts: Sequence[str], negative_prompt: Optional[str]) -> dict:
    """prompt → its embedding (1, L, D), and None → the negative prompt's ("" without one), with the pipeline's own
    encoder call."""
    device = pipe._execution_device
    unique = list(dict.fromkeys(prompts))
    encoded = {None: pipe.encode_prompt([negative_prompt or ""], device, 1, False)[0]}
    for start in range(0, len(unique), 64):
        part = unique[start:start + 64]
        embeds = pipe.encode_prompt(part, device, 1, False)[0]
        encoded.update({p: embeds[k:k + 1] for k, p in enumerate(part)})
    return encoded


def _has_adapters(pipe) -> bool:
    """Whether LoRA (PEFT) layers were loaded into the pipeline's UNet."""
    return bool(getattr(pipe.unet, "peft_config", None))


def _style_embeds(pipe, reference: Optional[Image.Image], guidance_scale: float) -> torch.Tensor:
    """(2 or 1, 1, D): the zero embedding of the unconditional half (as Diffusers makes it), then the
    reference's own (zeros without a reference; the scale is 0 then, too). The pipeline repeats it
    over the call's batch."""
    device = pipe._execution_device
    if reference is not None:
        embeds = pipe.encode_image(reference, device, 1)[0]
    else:
        embeds = torch.zeros(1, pipe.image_encoder.config.projection_dim, device=device)
    if guidance_scale > 1.0:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    return embeds[:, None]


def _check_arguments(**a) -> None:
    """generate()'s numbers, checked before any model loads (each message names the argument and the
    command-line flag of scripts/generate.py)."""
    def require(ok: bool, name: str, flag: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{name} (--{flag}) {a[name]!r}: {rule}")

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    require(integer(a["num_inference_steps"]) and a["num_inference_steps"] >= 1, "num_inference_steps", "steps",
            "must be a whole number ≥ 1")
    require(number(a["guidance_scale"]) and a["guidance_scale"] >= 0, "guidance_scale", "guidance-scale",
            "must be ≥ 0 (1 or less: no classifier-free guidance; 3–8 is typical)")
    require(a["sampler"] in SAMPLERS, "sampler", "sampler", f"choose one of {', '.join(SAMPLERS)}")
    require(integer(a["num_images_per_prompt"]) and a["num_images_per_prompt"] >= 1, "num_images_per_prompt",
            "num-images", "must be a whole number ≥ 1")
    require(integer(a["batch_size"]) and a["batch_size"] >= 1, "batch_size", "batch-size", "must be a whole number ≥ 1")
    for name in ("height", "width"):
        require(a[name] is None or integer(a[name]) and a[name] > 0, name, name, "must be a positive number of pixels")
    require(number(a["guidance_rescale"]) and 0 <= a["guidance_rescale"] <= 1, "guidance_rescale", "guidance-rescale",
            "must be in [0, 1]")


SAMPLE = SampleConfig()  # the defaults of generate(): the config's sample section


@dataclass
class Generated:
    image: Image.Image
    prompt: str
    seed: int
    params: dict = field(default_factory=dict)


def generate(model: Union[str, Path, StableDiffusionPipeline], prompts: Sequence[str], mode: Mode = None,
             negative_prompt: Optional[str] = None, guidance_scale: float = SAMPLE.guidance_scale,
             num_inference_steps: int = SAMPLE.num_inference_steps, sampler: str = SAMPLE.sampler,
             seed: int = SAMPLE.seed, height: Optional[int] = None, width: Optional[int] = None,
             num_images_per_prompt: int = SAMPLE.num_images_per_prompt, batch_size: int = SAMPLE.batch_size,
             device: Union[str, torch.device] = "cpu",
             guidance_rescale: float = 0.0, loras: Sequence = (), on_step: Optional[Callable[[float], None]] = None,
             fast: bool = False) -> list[Generated]:
    """Generate `num_images_per_prompt` images for each prompt (image j seeded `seed + j`); returns them with
    the parameters each PNG records.

    `mode`: what to draw from beyond the prompt (ldm.inference.modes): `ImageToImage(image, strength)`,
    `Sketch(image, conditioning_scale)` for a ControlNet pipeline, `Style(reference, scale)` for a pipeline with
    a style adapter; None, the prompt alone. `loras`: LoRA files or lora/ folders (Diffusers or kohya format) as
    `path`, `"path:scale"` or `(path, scale)`. `on_step(fraction)` is called after every denoising step with the
    fraction of the whole call done. `fast=True` applies `make_fast` once (channels-last, the UNet compiled with
    frozen weights, the text's keys and values projected once per call, bf16 where the hardware has it) and
    keeps one batch shape per job; images then match the plain pipeline's within the documented tolerance."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("generate() needs at least one prompt")
    _check_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                     num_images_per_prompt=num_images_per_prompt, batch_size=batch_size, height=height, width=width,
                     guidance_rescale=guidance_rescale)
    mode = mode if mode is not None else Text()
    mode.check(num_inference_steps)
    pipe = as_pipeline(model, device)
    _prepare_pipeline(pipe, mode, sampler, loras, fast)
    height, width = _output_size(pipe, height, width)
    mode.prepare(pipe, prompts, width, height)
    references = mode.references()
    if takes_style(pipe):
        pipe.set_ip_adapter_scale(mode.scale if references else 0.0)
    jobs = [(p, seed + j, k) for j, (k, p) in
            enumerate((k, p) for k, p in enumerate(prompts) for _ in range(num_images_per_prompt))]
    # Fast: every distinct prompt (and the negative one) through the text encoder once per job, not once per image.
    encoded = _encode_once(pipe, [p for p, _, _ in jobs], negative_prompt) if fast else None
    recorded = dict(negative_prompt=negative_prompt or "", sampler=sampler, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height, width=width,
                    **mode.recorded())
    if loras:
        recorded["loras"] = [f"{Path(p).name}:{s:g}" for p, s in map(parse_lora, loras)]
    out: list[Generated] = []
    chunks = _chunks(jobs, len(prompts), batch_size, mode.calls_per_prompt())
    for n, chunk in enumerate(chunks):
        wanted = len(chunk)
        if fast and len(jobs) > batch_size:  # one batch shape for the compiled UNet: pad with the last job, dropped
            chunk = chunk + [chunk[-1]] * (batch_size - wanted)
        generators = [torch.Generator(device="cpu").manual_seed(s) for _, s, _ in chunk]
        common = dict(prompt=[p for p, _, _ in chunk],
                      negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                      guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                      generator=generators, output_type="pil")
        if encoded is not None:  # each distinct prompt was encoded once for the whole job
            _use_encoded(common, pipe, encoded, [p for p, _, _ in chunk], guidance_scale)
        if on_step is not None:
            common["callback_on_step_end"] = _progress(on_step, n, len(chunks))
        if takes_style(pipe):  # the chunk's one reference (or none: zero embeddings at scale 0), as Diffusers does
            common["ip_adapter_image_embeds"] = [_style_embeds(pipe, references[chunk[0][2]] if references else None,
                                                               guidance_scale)]
        images = mode.call(pipe, [k for _, _, k in chunk], common, height, width, guidance_rescale)
        out += [Generated(image, prompt, s, dict(prompt=prompt, negative_prompt=recorded["negative_prompt"], seed=s,
                                                 **{k: v for k, v in recorded.items() if k != "negative_prompt"}))
                for (prompt, s, _), image in zip(chunk[:wanted], images)]
    return out


def _chunks(jobs: list, num_prompts: int, batch_size: int, per_reference: bool) -> list[list]:
    """The job's pipeline calls. Diffusers repeats one set of image embeddings over a call's whole batch, so
    different style references cannot share a call: with one reference per prompt, each prompt gets its own."""
    groups = [[job for job in jobs if job[2] == k] for k in range(num_prompts)] if per_reference else [jobs]
    return [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


def _progress(on_step: Callable[[float], None], n: int, calls: int) -> Callable:
    """Diffusers' step-end callback reporting the fraction of the whole job done."""
    def progress(p, i, t, kwargs):
        on_step((n + (i + 1) / max(p.num_timesteps, 1)) / calls)
        return kwargs

    return progress


def _prepare_pipeline(pipe, mode, sampler: str, loras: Sequence, fast: bool) -> None:
    """Check that the pipeline takes the mode, load the LoRAs, set the sampler (and the fast path)."""
    if fast and (loras or getattr(pipe, "_ldm_fast", None) is None and _has_adapters(pipe)):
        raise ConfigError("fast=True (--fast) compiles the UNet with its weights frozen in, so LoRAs cannot be "
                          "loaded into it or swapped: generate with fast=False, or fuse the LoRA into a pipeline "
                          "you save and load that")
    if loras:
        load_loras(pipe, loras)
    mode.check_pipeline(pipe)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if fast:
        make_fast(pipe)


def _use_encoded(common: dict, pipe, encoded: dict, prompts: list[str], guidance_scale: float) -> None:
    """Replace a call's prompts by the embeddings encoded once per job (and, with the text's keys and values
    table of the fast path, project them once per call)."""
    del common["prompt"], common["negative_prompt"]
    common["prompt_embeds"] = torch.cat([encoded[p] for p in prompts])
    if guidance_scale > 1.0:
        common["negative_prompt_embeds"] = encoded[None].expand(len(prompts), -1, -1)
    if pipe._ldm_fast.text_kv:  # the UNet's batch: Diffusers puts the negative half first
        guided = guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        embeds = common["prompt_embeds"]
        if guided:
            embeds = torch.cat([common["negative_prompt_embeds"], embeds])
        common["cross_attention_kwargs"] = {"text_kv": text_kv_table(pipe, embeds)}


def _output_size(pipe, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """(height, width): the pipeline's native size where not given; a size it cannot generate is refused."""
    size = native_size(pipe)
    height, width = height or size, width or size
    # The UNet halves the latents once per level below the first; Diffusers' pipelines also ask for 8 px.
    multiple = math.lcm(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ConfigError(f"{name} {value}: this model generates sizes that are multiples of {multiple} px "
                              f"(its VAE and UNet downsampling, and Diffusers' 8 px); try {nearest}")
    return height, width


