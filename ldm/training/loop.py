"""Stage 2: text-conditional latent diffusion, and conditions on top of it. One loop, top to bottom:

    1-6. set up (ldm.training.setup): the run, the data stream, the models, the cache, the optimisation, a resume
    7.   the loop: draws → latents + prompt_embeds → train_step → backward → clip → guard → step → EMA
         → log / checkpoint / validate
    8.   finish (ldm.training.finish): the export, a last validation, the model card, the summary
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ldm.config.schema import Config
from ldm.data.cache import EncodedDataset
from ldm.data.shards import StreamingShards
from ldm.data.stream import SampleStream, StreamBatches
from ldm.diffusion import SampleDraws, draw_samples
from ldm.models.building import unet_flops_per_image, unet_kwargs
from ldm.models.encoders import FrozenEncoders, encode_prompts, latent_distribution
from ldm.models.loading import TextEncoderInfo, VAEInfo
from ldm.training.finish import NonFiniteError, Progress, checkpoint, finish, validate_now
from ldm.training.setup import (
    Optimisation,
    Run,
    build_models,
    build_optimisation,
    fill_cache,
    open_stream,
    resume,
    start_run,
)
from ldm.training.sharding import full
from ldm.training.trainables.base import Trainable


def train(cfg: Config, show_progress: bool = True, on_step: Optional[Callable[[int], None]] = None) -> Path:
    """Train as configured (ldm.training.trainables: the UNet, a ControlNet or style adapter on it, a LoRA, a
    distilled student, with or without the text encoder); returns the export (the pipeline folder, or the LoRA
    folder). `on_step(step)` is called after every optimizer step (the benchmark times the loop through it)."""
    t = cfg.train
    run = start_run(cfg)  # 1. config checked, accelerator, output folder, the checkpoint a resume starts from
    stream = open_stream(run)  # 2. data: columns checked, samples audited, held-back samples, buckets
    models = build_models(run)  # 3. frozen encoders, what trains (picked once), noise scheduler
    encoded = fill_cache(run, stream, models, show_progress)  # 4. what the frozen encoders compute, once
    opt = build_optimisation(run, models)  # 5. optimizer, LR schedule, EMA, wrapped modules
    step, start_micro = resume(run, models, opt)  # 6. a checkpoint's state, or step 0
    trainable, accelerator, device = models.trainable, run.accelerator, run.device
    k_accum = t.gradient_accumulation_steps
    # 7. The loop. Micro-batch k of this process holds stream positions from StreamBatches.
    sampler = StreamBatches(t.batch_size, start_micro, t.max_steps * k_accum, accelerator.process_index,
                            accelerator.num_processes)
    progress = Progress(run, trainable, opt.lr_schedule, step, show_progress, on_step)
    val_set: list = []  # the held-back samples, encoded at the first validation
    guard = NonFiniteGuard(t.nonfinite, t.max_nonfinite_steps)
    for batch in iterate_batches(stream, sampler, encoded, cfg.data.num_workers, device.type == "cuda"):
        draws = draw_samples(t.seed, batch["position"], latent_shape(run, stream, batch["position"]),
                             cfg.model.scheduler.num_train_timesteps, cfg.data.caption_dropout)
        if cfg.data.latent_sample == "mean":
            draws.latent_eps.zero_()  # z = mean + std · 0
        latents, prompt_embeds = encode_batch(batch, draws, encoded, models.frozen, device, trainable.encodes_prompts)
        if t.record_samples:
            _record(run.out / f"samples_rank{accelerator.process_index}.jsonl", step + 1, batch)
        inputs = trainable.inputs(batch, encoded, stream, device)
        with accelerator.accumulate(*opt.wrapped), accelerator.autocast():
            if prompt_embeds is None:  # the trainable encodes them, with gradients
                prompt_embeds = trainable.prompt_embeds(opt.extra, captions_of(batch, draws))
            loss = train_step(trainable, opt.model, models.scheduler, latents, prompt_embeds, draws.noise.to(device),
                              draws.timesteps.to(device), cfg.model.scheduler.prediction_type, t.snr_gamma, **inputs)
            accelerator.backward(loss)
            progress.running += loss.detach() / k_accum
            if not accelerator.sync_gradients:
                continue
            grad_norm = optimizer_step(run, opt, trainable, loss, guard, step)
        if opt.ema is not None and guard.streak == 0:
            opt.ema.step(opt.params)
        step += 1
        progress.advance(step)
        if step % t.log_every == 0 or step == t.max_steps:
            progress.log(step, grad_norm)
        if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.max_steps):
            checkpoint(run, models, opt, step, progress)
        if t.validate_every and step % t.validate_every == 0 and step < t.max_steps:
            validate_now(run, stream, models, opt, step, val_set)
    return finish(run, stream, models, opt, progress, step, val_set)  # 8. export, card, summary, upload


class NonFiniteGuard:
    """Counts optimizer steps skipped in a row for a non-finite loss or gradient, and stops the run as
    train.nonfinite and train.max_nonfinite_steps say."""

    def __init__(self, policy: str, max_steps: int):
        self.policy, self.max_steps, self.streak = policy, max_steps, 0

    def skipped(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, log: Callable[[str], None]) -> None:
        self.streak += 1
        log(f"step {step + 1}: non-finite loss or gradient (loss {loss.item():.4g}, grad norm {float(grad_norm):.4g}); "
            f"update skipped ({self.streak} in a row)")
        if self.policy == "stop" or self.streak >= self.max_steps:
            raise NonFiniteError(
                f"stopping at step {step + 1} after {self.streak} non-finite step(s) (train.nonfinite={self.policy}, "
                f"train.max_nonfinite_steps={self.max_steps}); lower train.lr, keep train.max_grad_norm on, keep "
                "the VAE in float32, or check the data")


def optimizer_step(run: Run, opt: Optimisation, trainable: Trainable, loss: torch.Tensor, guard: NonFiniteGuard,
                   step: int) -> torch.Tensor:
    """Clip, then step unless the loss or the gradient is non-finite on any process (one host sync per optimizer
    step; under fp16 the grad scaler already skips overflowing steps, so only a non-finite loss counts there);
    the LR schedule steps either way. Returns the gradient norm."""
    accelerator = run.accelerator
    grad_norm = full(accelerator.clip_grad_norm_(opt.params, run.cfg.train.max_grad_norm or float("inf")))
    finite = torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) if accelerator.scaler is None
                                              else torch.ones((), dtype=torch.bool, device=run.device))
    if bool(accelerator.reduce(finite.float(), reduction="sum") == accelerator.num_processes):
        opt.optimizer.step()
        trainable.after_optimizer_step()
        guard.streak = 0
    else:
        guard.skipped(step, loss, grad_norm, accelerator.print)
    with warnings.catch_warnings():  # a skipped update still counts as a step of the schedule
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
        opt.lr_schedule.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def latent_shape(run: Run, stream, positions) -> tuple[int, int, int]:
    """(C, h, w) of a micro-batch's latents (one bucket, or square)."""
    width, height = stream.size_at(int(positions[0]))
    return run.vae.latent_channels, height // run.vae.downsample, width // run.vae.downsample


def train_step(trainable: Trainable, model, scheduler, latents: torch.Tensor, prompt_embeds: torch.Tensor,
               noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str, snr_gamma: Optional[float],
               **inputs) -> torch.Tensor:
    """Loss of one micro-batch, as `trainable` defines it (through `model`, its wrapped module): the diffusion
    loss (ε or v, min-SNR weights) for every kind but a distilled student, whose loss is the consistency one."""
    return trainable.loss(model, scheduler, latents, prompt_embeds, noise, timesteps, prediction_type, snr_gamma,
                          **inputs)


def dry_run_report(cfg: Config, vae: VAEInfo, text: TextEncoderInfo) -> dict:
    """Architecture facts without weights: the UNet is built on the meta device."""
    latent = cfg.data.resolution // vae.downsample
    kwargs = unet_kwargs(cfg.model.unet, text.hidden_size, latent, vae.latent_channels)
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        params = sum(p.numel() for p in UNet2DConditionModel(**kwargs).parameters())
    forward = unet_flops_per_image(kwargs, text.max_length)
    return {
        "unet_parameters": params,
        "latent_shape": [vae.latent_channels, latent, latent],
        "prompt_embeds_shape": [text.max_length, text.hidden_size],
        "unet_forward_gflops_per_image": forward / 1e9,
        # Backward costs about twice the forward (weights + activations), hence ×3.
        "train_tflops_per_image": 3 * forward / 1e12,
    }


def captions_of(batch, draws: SampleDraws) -> list[str]:
    """The micro-batch's captions, "" where the draw drops them (classifier-free guidance)."""
    return ["" if drop else c for c, drop in zip(batch["caption"], draws.drop_caption.tolist())]


def encode_batch(batch, draws: SampleDraws, encoded: Optional[EncodedDataset], frozen: FrozenEncoders,
                 device, text_trains: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """latents (B, C, h, w) × scaling_factor and prompt_embeds (B, L, D) for one micro-batch, from the
    cache or the frozen encoders. prompt_embeds is None when the text encoder trains (the step encodes)."""
    if encoded is not None:
        latents = encoded.latents(batch["index"], batch["position"], draws.latent_eps).to(device)
        return latents, None if text_trains else encoded.embeds(batch["caption"], draws.drop_caption).to(device)
    vae = frozen.vae
    mean, std = latent_distribution(vae, batch["pixel_values"])
    latents = mean + std * draws.latent_eps.to(mean.device)
    if text_trains:
        return latents.to(device), None
    return latents.to(device), encode_prompts(*frozen.text, captions_of(batch, draws)).to(device)


def iterate_batches(stream: SampleStream | StreamingShards, sampler: StreamBatches, encoded: Optional[EncodedDataset],
                    num_workers: int, pin_memory: bool) -> Iterator[dict]:
    """Micro-batches in stream order: indices only when pre-encoded, decoded images otherwise."""
    if isinstance(stream, StreamingShards):
        yield from stream.batches(sampler.batch_size, sampler.start, sampler.stop)
        return
    if encoded is not None:
        for positions in sampler:
            indices = [encoded.usable(stream.index_of(p)) for p in positions]
            yield {"position": positions, "index": indices,
                   "caption": [stream.caption_at(i, p) for i, p in zip(indices, positions)]}
        return
    # Its own generator: starting the iterator then draws no number from the global stream, so a resumed
    # run's dropout (a trained text encoder's) continues exactly where the checkpoint left it.
    loader = torch.utils.data.DataLoader(stream, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(stream.seed))
    yield from loader


def _record(path: Path, step: int, batch: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "positions": list(map(int, batch["position"])),
                            "indices": list(map(int, batch["index"])),
                            **({"sources": batch["source"]} if "source" in batch else {})}) + "\n")

