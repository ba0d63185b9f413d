"""Validation during training: a grid for fixed prompts and seeds (drawn on sketches or in the style of
references for conditioned runs), the loss per timestep bucket on held-back samples, and the EMA of the
trained weights that both of them and the export use."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ldm.config.data import DataConfig
from ldm.config.schema import Config
from ldm.data.audit import record_after_audit
from ldm.data.decode import BadSample
from ldm.data.stream import SampleStream
from ldm.data.transforms import prepare_image
from ldm.diffusion import training_target, validation_draws
from ldm.images import make_grid, save_png
from ldm.inference.generate import generate
from ldm.models.encoders import FrozenEncoders, encode_prompts, latent_distribution
from ldm.training.trainables.base import Trainable


class ParameterEMA(EMAModel):
    """Diffusers' EMAModel (its decay schedule, state dict and weight swap) with one fused update:
    θ̄ ← θ̄ + (1 − decay)·(θ − θ̄) as a single foreach lerp over every trained tensor. 10 ms per step on the
    quickstart UNet against 23 ms for EMAModel.step (Intel Xeon, 494 tensors); ZeRO-3 keeps the original,
    which gathers the partitioned parameters first."""

    @torch.no_grad()
    def step(self, parameters) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        parameters = list(parameters)
        if is_deepspeed_zero3_enabled() or not all(p.requires_grad for p in parameters):
            return super().step(parameters)
        self.optimization_step += 1
        self.cur_decay_value = self.get_decay(self.optimization_step)
        torch._foreach_lerp_(self.shadow_params, parameters, 1.0 - self.cur_decay_value)


@contextmanager
def ema_weights(trainable: Trainable, ema: Optional[EMAModel]):
    """Temporarily swap the EMA weights into what trains (training weights restored afterwards)."""
    if ema is None:
        yield
        return
    params = trainable.parameters()
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def validate(cfg: Config, step: int, frozen: FrozenEncoders, trainable: Trainable, scheduler, out: Path,
             accelerator: Accelerator, stream: SampleStream) -> Path:
    """Fixed prompts and seed → a PNG grid (and TensorBoard images). A condition's inputs lead the grid
    (prompt k drawn on the sketch of stream sample k, or in the style of its reference)."""
    tokenizer, text_encoder = frozen.text
    pipe = trainable.pipeline(frozen.vae, text_encoder, tokenizer, scheduler, cfg.sample.sampler)
    s = cfg.sample
    lead, condition = trainable.validation_inputs(stream, len(s.prompts))
    results = generate(pipe, s.prompts, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale,
                       num_inference_steps=s.num_inference_steps, sampler=s.sampler, seed=s.seed,
                       num_images_per_prompt=s.num_images_per_prompt, batch_size=s.batch_size,
                       device=accelerator.device, **condition)
    images = lead + [r.image for r in results]
    path = save_png(make_grid(images), out / "validation" / f"step_{step:06d}.png",
                    {"step": step, "prompts": list(s.prompts), "seed": s.seed, "sampler": s.sampler})
    # Aspect-ratio buckets: the same prompts at the two most populated non-square bucket sizes as well.
    for width, height in validation_sizes(stream):
        shaped = generate(pipe, s.prompts, negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale,
                          num_inference_steps=s.num_inference_steps, sampler=s.sampler, seed=s.seed,
                          height=height, width=width, num_images_per_prompt=s.num_images_per_prompt,
                          batch_size=s.batch_size, device=accelerator.device, **condition)
        save_png(make_grid([r.image for r in shaped]), out / "validation" / f"step_{step:06d}_{width}x{height}.png",
                 {"step": step, "prompts": list(s.prompts), "seed": s.seed, "size": [width, height]})
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=step,
                               dataformats="NHWC")
    return path


def validation_sizes(stream: SampleStream, count: int = 2) -> list[tuple[int, int]]:
    """The `count` most populated non-square bucket sizes (width, height) a pipeline can generate at (Diffusers
    asks for multiples of 8 px); none without buckets."""
    if stream.plan is None:
        return []
    by_count = sorted(zip(stream.plan.members, stream.plan.sizes), key=lambda m: (-len(m[0]), m[1]))
    return [size for _, size in by_count if size[0] != size[1] and size[0] % 8 == 0 and size[1] % 8 == 0][:count]


def log_validation_loss(cfg: Config, step: int, stream: SampleStream, val_set: list, frozen: FrozenEncoders,
                         trainable: Trainable, scheduler, out: Path, accelerator: Accelerator) -> None:
    """Loss per timestep bucket on the held-back samples (fixed draws, conditions on); appended to
    validation_loss.jsonl. `val_set` caches [latents, prompt_embeds, extra inputs, captions] between calls
    (the prompt embeddings are encoded again when the text encoder trains)."""
    n = cfg.data.validation_images
    if not n:
        return
    device = accelerator.device
    if not val_set:
        indices, items = [], []
        for i in range(stream.size, stream.size + n):
            try:
                image, caption = stream.source.get(i)
                items.append((image, stream.caption_at(i, None, caption)))  # a caption list: its first entry
                indices.append(i)
            except BadSample as bad:  # went bad after the audit: validate on the others
                accelerator.print(f"validation: skipping held-back sample {bad}")
                record_after_audit(stream.audit_file, bad, "validation")
        if not items:
            accelerator.print("validation: no held-back sample decodes any more; validation loss not measured")
            return
        val_set += encode_images(frozen.vae, *frozen.text, [im for im, _ in items], [c for _, c in items],
                                 cfg.data.resolution)
        pixels = torch.stack([prepare_image(im, cfg.data, flip=False) for im, _ in items])
        val_set += [trainable.held_back_inputs(stream, indices, pixels, torch.device("cpu")), [c for _, c in items]]
    latents, embeds, extra, captions = val_set
    n = len(captions)
    if trainable.encodes_prompts:  # the text encoder trains: encode with its current weights
        embeds = torch.cat([encode_prompts(*frozen.text, captions[i:i + 64]).cpu() for i in range(0, n, 64)])

    def predict(noisy_latents, timesteps, prompt_embeds, rows):
        inputs = {k: v[rows].to(device) for k, v in extra.items()}
        return trainable.predict(trainable.module, noisy_latents, timesteps, prompt_embeds, **inputs)

    losses = validation_loss(predict, scheduler, latents, embeds, cfg.model.scheduler.prediction_type,
                             seed=cfg.train.seed, device=device)
    accelerator.log({f"val/loss_{k}": v for k, v in losses.items()}, step=step)
    with (out / "validation_loss.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **losses}) + "\n")
    accelerator.print(f"step {step}: validation loss {losses['mean']:.4f} on {n} held-back images")


@torch.no_grad()
def encode_images(vae, tokenizer, text_encoder, images: Sequence, captions: Sequence[str], resolution: int,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """latents (N, C, h, w) = posterior mean × scaling factor, and prompt_embeds (N, L, D)."""
    cfg = DataConfig(resolution=resolution)
    latents, embeds = [], []
    for start in range(0, len(images), batch_size):
        x = torch.stack([prepare_image(im, cfg) for im in images[start:start + batch_size]])
        latents.append(latent_distribution(vae, x)[0].cpu())
        embeds.append(encode_prompts(tokenizer, text_encoder, list(captions[start:start + batch_size])).cpu())
    return torch.cat(latents), torch.cat(embeds)


@torch.no_grad()
def validation_loss(model, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor, prediction_type: str,
                    buckets: int = 10, seed: int = 0, batch_size: int = 64,
                    device: Optional[torch.device] = None) -> dict[str, float]:
    """Mean squared error (unweighted) with fixed noise and timesteps, per timestep bucket and overall.

    `model` is a UNet, or a function (noisy_latents, timesteps, prompt_embeds, rows) → model_pred, where
    `rows` are the images' indices (a condition's inputs are looked up by them). Each image is noised
    once per bucket, so every bucket sees every image: the loss at high t says how well the model lays
    out a picture, at low t how well it renders detail."""
    if isinstance(model, torch.nn.Module):
        unet = model
        device = device or next(unet.parameters()).device
        model = lambda x, t, c, rows: unet(x, t, c).sample  # noqa: E731
    # Noise with the closed form q(x_t|x_0) of the model's own schedule: a sampler's add_noise (e.g.
    # DPM-Solver++) looks t up in its inference schedule instead and would noise to the wrong level.
    scheduler = DDPMScheduler.from_config(scheduler.config)
    n, T = latents.shape[0], scheduler.config.num_train_timesteps
    noise, timesteps = validation_draws(seed, n, tuple(latents.shape[1:]), T, buckets)
    device = device or torch.device("cpu")
    x0 = latents.repeat_interleave(buckets, dim=0)  # (N·K, C, h, w): row i·K + k
    context = prompt_embeds.repeat_interleave(buckets, dim=0)
    errors = []
    for s in range(0, len(x0), batch_size):
        sl = slice(s, s + batch_size)
        x, eps, t = x0[sl].to(device), noise[sl].to(device), timesteps[sl].to(device)
        rows = torch.arange(len(x0))[sl] // buckets  # which image each row noises
        pred = model(scheduler.add_noise(x, eps, t), t, context[sl].to(device), rows)
        target = training_target(scheduler, x, eps, t, prediction_type)
        errors.append(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).cpu())
    per_row = torch.cat(errors).view(n, buckets)
    width = T / buckets
    out = {f"t{int(k * width):03d}-{int((k + 1) * width) - 1:03d}": float(per_row[:, k].mean()) for k in range(buckets)}
    out["mean"] = float(per_row.mean())
    return out
