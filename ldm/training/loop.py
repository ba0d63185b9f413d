"""Stage 2: text-conditional latent diffusion, and conditions on top of it. One loop, top to bottom.

    1. check the config against the components' own configs (no weights yet)
    2. accelerator, output folder, resolved config
    3. data (columns checked before any model is built)
    4. components: frozen VAE + text encoder, DDPM noise scheduler, and what trains (ldm.training.trainables: the
       UNet, a ControlNet or an image-prompt adapter on the frozen UNet, a LoRA on the UNet), picked once
    5. optionally fill the fingerprinted cache (latents, prompt embeddings, sketches)
    6. optimiser, LR schedule, EMA
    7. the loop: draws → latents + prompt_embeds → train_step → backward → clip → guard → step → EMA
       → log / checkpoint / validate
    8. export a Diffusers pipeline
"""

from __future__ import annotations

import json
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.config.loading import save_config
from ldm.config.schema import Config, downsampling_factor
from ldm.data.audit import open_audited
from ldm.data.cache import EncodedDataset, build_cache, cache_fingerprints
from ldm.data.shards import StreamingShards
from ldm.data.stream import SampleStream, StreamBatches
from ldm.diffusion import SampleDraws, draw_samples
from ldm.errors import ConfigError, UserError
from ldm.interop.hub import BackgroundPublisher, publish
from ldm.interop.model_card import write_model_card
from ldm.models.building import build_scheduler, build_unet, unet_flops_per_image, unet_kwargs
from ldm.models.encoders import FrozenEncoders, encode_prompts, latent_distribution
from ldm.models.loading import TextEncoderInfo, VAEInfo, check_components, load_tokenizer
from ldm.training.checkpoint import (
    check_disk_space,
    estimate_checkpoint_bytes,
    find_resume_folder,
    incomplete_checkpoints,
    load_training_state,
    save_training_state,
)
from ldm.training.run_folder import apply_settings, claim_output_dir, record_resume, resume_changes
from ldm.training.sharding import Sharded, check_launch, full, held, whole_weights
from ldm.training.trainables import build_trainable
from ldm.training.trainables.base import Trainable
from ldm.training.validation import ParameterEMA, ema_weights, log_validation_loss, validate

# What holds a process group in a multi-process run, kept past train()'s return: freeing a DDP reducer can
# deadlock in gloo's process-group destructor (it waits on its worker threads while holding the GIL; seen
# here once in a full test run, after every file was written). The scripts end such runs with
# `os._exit` once output is flushed (ldm.cli.run_script), so these are never torn down.
_KEPT_UNTIL_EXIT: list = []


class NonFiniteError(UserError, FloatingPointError):
    """Training stopped on non-finite losses or gradients (the message names the settings to change)."""


def set_tf32(allow: bool) -> None:
    """TF32 for fp32 matrix products and convolutions (Ampere and newer; 10-bit mantissa, fp32 range)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


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


def plan_buckets(stream: SampleStream, cfg: Config, vae_downsample: int, global_micro_batch: int, out: Path,
                 main: bool, log: Callable[[str], None]) -> None:
    """Aspect-ratio buckets for the run (data.buckets), in steps the VAE and every UNet level divide; the
    histogram (and what merged where) goes into data_audit.json and the log."""
    unit = vae_downsample * downsampling_factor(cfg.model.unet.block_out_channels)
    step = cfg.data.buckets.step or unit
    if step % unit:
        raise ConfigError(f"config key 'data.buckets.step': {step} px is not a multiple of {unit} px (the VAE "
                          f"downsamples by {vae_downsample} and the UNet halves the latents "
                          f"{len(cfg.model.unet.block_out_channels) - 1} times); use {unit} or a multiple")
    plan = stream.plan_buckets(global_micro_batch, step)
    log(f"aspect-ratio buckets ({len(plan.sizes)} in use, {plan.batches_per_epoch} batches of {plan.batch} an "
        f"epoch): " + ", ".join(f"{k} × {n}" for k, n in plan.histogram().items())
        + "".join(f"; {a} merged into {b}" for a, b in plan.merged.items()))
    audit_file = out / "data_audit.json"
    if main:
        report = json.loads(audit_file.read_text()) if audit_file.is_file() else {}
        report["buckets"] = {"histogram": plan.histogram(), "merged": plan.merged, "step": step,
                             "global_micro_batch": plan.batch, "batches_per_epoch": plan.batches_per_epoch}
        audit_file.write_text(json.dumps(report, indent=1))


def _record(path: Path, step: int, batch: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "positions": list(map(int, batch["position"])),
                            "indices": list(map(int, batch["index"])),
                            **({"sources": batch["source"]} if "source" in batch else {})}) + "\n")


def _check_ranks_agree(accelerator: Accelerator, trainable: Trainable) -> None:
    """All processes must end with the same weights; a cheap checksum makes a divergence loud (sharded
    weights are summed over their shards: every process gets the whole sum)."""
    checksum = torch.stack([full(p.detach().double().sum()) for p in trainable.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"processes ended with different weights (checksums {sums.tolist()})")
    accelerator.print(f"final weights agree on {accelerator.num_processes} process(es): checksum {sums[0].item():.10e}")


@contextmanager
def evaluation_weights(trainable: Trainable, ema, cfg: Config, sharded: Optional[Sharded], main: bool):
    """Eval mode and the weights validation and export use (EMA by default), whole on the main process;
    under FSDP every process must enter (the weights are gathered), otherwise the main one alone."""
    trainable.set_training(False)
    try:
        with ema_weights(trainable, ema if cfg.train.ema_for_export else None), whole_weights(sharded, trainable, main):
            yield
    finally:
        trainable.set_training(True)


def _export(trainable: Trainable, folder: Path, frozen: FrozenEncoders, scheduler, cfg: Config) -> Path:
    """What the run leaves behind, with the weights as they are (inside `evaluation_weights`)."""
    tokenizer, text_encoder = frozen.text
    vae = frozen.vae if frozen.vae.dtype == torch.float32 else frozen.vae.to(torch.float32)
    trainable.export(folder, vae, text_encoder, tokenizer, scheduler, cfg)
    return folder


def _write_summary(path: Path, trainable: Trainable, steps: int, seconds: float, export: Path, ckpt_root: Path,
                   device: torch.device) -> None:
    """What the run cost: s/step over the loop (checkpoints and validation included), peak memory (the
    process' RSS on CPU, max allocated on CUDA), and the sizes of what it wrote."""
    import resource

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0

    checkpoints = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    path.write_text(json.dumps({
        **trainable.describe(), "parameters_held_per_process": sum(held(p) for p in trainable.parameters()),
        "steps": steps, "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 4), "peak_memory_mib": round(peak / 2**20, 1),
        "checkpoint_mib": round(size(checkpoints[-1]) / 2**20, 3) if checkpoints else None,
        "export_mib": round(size(export) / 2**20, 3)}, indent=1))


def _push_checkpoint(publisher: BackgroundPublisher, cfg: Config, step: int, frozen: FrozenEncoders,
                     trainable: Trainable, ema, scheduler, staging: Path) -> None:
    """Export the weights of this checkpoint to a staging folder and upload it in the background."""
    with evaluation_weights(trainable, ema, cfg, None, True):
        _export(trainable, staging, frozen, scheduler, cfg)
    write_model_card(staging, cfg)
    publisher.submit(staging, f"ldm: checkpoint at step {step}")


def train(cfg: Config, show_progress: bool = True, on_step: Optional[Callable[[int], None]] = None) -> Path:
    """Train as configured (ldm.training.trainables: the UNet, a ControlNet or style adapter on it, a LoRA, with or without
    the text encoder); returns the export (the pipeline folder, or the LoRA folder). `on_step(step)` is called
    after every optimizer step (the benchmark times the loop through it)."""
    t = cfg.train
    # 1. Config against the components' own configs, before anything heavy.
    vae_info, text_info = check_components(cfg)
    # 2. Accelerator (processes, devices, mixed precision, accumulation), output folder, config.
    out = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, main = accelerator.device, accelerator.is_main_process
    check_launch(cfg, accelerator)
    set_tf32(t.allow_tf32)
    # The folder: a fresh run never takes over another run's; a resume must match the checkpoint's config.
    ckpt_root = out / "checkpoints"
    resume_from, resume_applies = None, {}
    if t.resume is not None:
        for bad in incomplete_checkpoints(ckpt_root):
            accelerator.print(f"ignoring incomplete checkpoint {bad} (a save was interrupted)")
        resume_from = find_resume_folder(t.resume, ckpt_root)
        if resume_from is None:
            accelerator.print(f"train.resume=latest: no complete checkpoint in {ckpt_root}; starting from step 0")
        else:
            resume_applies = resume_changes(resume_from, cfg, accelerator.num_processes)
    claim_output_dir(cfg, out, resume_from is not None, t.overwrite_output_dir, main)
    accelerator.wait_for_everyone()
    if main:
        save_config(cfg, out / "config.yaml")
        if t.report_to != "none":
            accelerator.init_trackers("text2img")
    # 3. Data: columns checked, every sample audited (bad ones converted or skipped and counted).
    if cfg.data.streaming:  # each process streams its own shards; samples are checked as they are met
        stream = StreamingShards(cfg.data, t.seed, accelerator.process_index, accelerator.num_processes)
        accelerator.print(stream.describe())
        if main:
            (out / "data_audit.json").write_text(json.dumps({"streaming": stream.describe()}, indent=1))
    else:
        stream = SampleStream(open_audited(cfg.data, load_tokenizer(cfg.model.text_encoder), accelerator),
                              cfg.data, t.seed)
    if main and hasattr(stream.source, "report"):
        (out / "data_audit.json").write_text(json.dumps(stream.source.report.to_dict(), indent=1))
    stream.audit_file = out / "data_audit.json"
    n_val = cfg.data.validation_images
    if n_val >= stream.size:
        raise ConfigError(f"config key 'data.validation_images': {n_val} leaves nothing to train on "
                          f"({stream.size} samples); use fewer")
    stream.size -= n_val  # the last n_val samples never enter the training stream
    if cfg.data.buckets.enabled:
        plan_buckets(stream, cfg, vae_info.downsample, t.batch_size * accelerator.num_processes, out, main,
                     accelerator.print)
    val_set: list = []  # the held-back samples, encoded at the first validation
    # 4. Components. Frozen encoders load on first use (the VAE in its configured dtype, fp32 by default).
    #    What trains is picked once, from the table in ldm.training.trainables; nothing below asks which it is.
    frozen = FrozenEncoders(cfg.model, device)
    trainable = build_trainable(cfg, lambda: build_unet(cfg, vae_info, text_info), vae_info.downsample,
                                text=lambda: frozen.text).to(device)
    scheduler = build_scheduler(cfg.model.scheduler)
    if t.gradient_checkpointing:
        for module in trainable.modules():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
    if t.attention == "xformers":
        try:
            for module in trainable.modules():
                module.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise ConfigError(f"config key 'train.attention': xformers is not usable here ({err}); "
                              "install the 'xformers' extra or use 'sdpa'") from err
    # 5. The cache: encode what it lacks (each process its share); complete, it needs no encoder at all.
    encoded = None
    if cfg.data.cache:
        vae_fp, text_fp = cache_fingerprints(cfg, frozen)
        encoded = build_cache(stream, cfg.data.cache_dir, lambda: frozen.vae, lambda: frozen.text, vae_fp, text_fp,
                              accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                              show_progress=show_progress and main, sketch_threshold=trainable.sketch_threshold)
        loaded = [name for name, was in frozen.loaded.items() if was]
        accelerator.print(f"cache ready in {cfg.data.cache_dir}; encoders loaded to fill it: "
                          f"{', '.join(loaded) or 'none'}")
    if t.channels_last:
        for module in trainable.modules():
            module.to(memory_format=torch.channels_last)
    # FSDP: the trained module's parameters become this process' shards (before the optimizer sees them).
    sharded = Sharded(trainable.module, accelerator.num_processes, device) if t.sharding == "fsdp" else None
    # 6. Optimiser over what trains, LR schedule (stepped once per optimizer step, whatever the process
    #    count), EMA of the same parameters. AdamW's fused kernel runs on CPUs too: 20 ms a step on the
    #    quickstart UNet against 90 ms for the per-tensor loop PyTorch picks by default off CUDA (Intel Xeon).
    params = trainable.parameters()
    optimizer = torch.optim.AdamW(trainable.param_groups(t.lr, cfg.model.text_encoder.lr),
                                  betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
                                  fused=device.type in ("cuda", "cpu"))
    lr_schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                num_training_steps=t.max_steps)
    ema = ParameterEMA(params, decay=t.ema_decay, use_ema_warmup=t.ema_warmup) if t.ema_decay is not None else None
    if ema is not None:
        ema.to(device)
    # The bare module shares its parameters with whatever wraps it here (compile, DDP); EMA, checkpoints,
    # validation and export use the bare one (its state-dict keys carry no wrapper prefix).
    # Sharded, the module is its own wrapper (FSDP reduces the gradients) and only the optimizer is prepared.
    model = torch.compile(trainable.module) if t.compile else trainable.module
    if sharded is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        optimizer = accelerator.prepare(optimizer)
    # A trained text encoder is a second wrapped model (DDP all-reduces its gradients too).
    text_model = accelerator.prepare(trainable.text_encoder) if trainable.text_encoder is not None else None
    wrapped = [m for m in (model, text_model) if m is not None]
    # Resume: weights, EMA, optimizer, LR schedule, grad scaler, RNG and the data position; then the
    # current config's learning rates, AdamW and EMA settings (changed ones are recorded in resumes.jsonl).
    step, start_micro = 0, 0
    if resume_from is not None:
        state = load_training_state(resume_from, trainable, ema, optimizer, lr_schedule, accelerator)
        apply_settings(cfg, trainable, optimizer, lr_schedule, ema)
        step, start_micro = state.step, state.micro_step
        if main:
            accelerator.print(record_resume(out, step, resume_from, resume_applies))
    if main and t.checkpoint_every:
        check_disk_space(out, estimate_checkpoint_bytes(trainable, ema is not None), "a checkpoint of this run")
    # 7. The loop. Micro-batch k of this process holds stream positions from StreamBatches.
    k_accum = t.gradient_accumulation_steps
    sampler = StreamBatches(t.batch_size, start_micro, t.max_steps * k_accum, accelerator.process_index,
                            accelerator.num_processes)

    def latent_shape(positions) -> tuple[int, int, int]:  # (C, h, w) of a micro-batch (one bucket, or square)
        width, height = stream.size_at(int(positions[0]))
        return vae_info.latent_channels, height // vae_info.downsample, width // vae_info.downsample

    global_batch = t.batch_size * accelerator.num_processes * k_accum
    running, window_start, window_steps, bad_streak = torch.zeros((), device=device), time.time(), 0, 0
    publisher = BackgroundPublisher(cfg.hub.repo_id, cfg.hub.private, cfg.hub.retries, accelerator.print) \
        if cfg.hub.push_checkpoints else None
    accelerator.print(f"training the {trainable.label}: {sum(p.numel() for p in params):,} parameters")
    bar = tqdm(total=t.max_steps, initial=step, desc=f"stage 2 ({trainable.label})",
               disable=not (show_progress and main))
    trainable.set_training(True)
    loop_start, first_step = time.time(), step
    for batch in iterate_batches(stream, sampler, encoded, cfg.data.num_workers, device.type == "cuda"):
        draws = draw_samples(t.seed, batch["position"], latent_shape(batch["position"]),
                             cfg.model.scheduler.num_train_timesteps, cfg.data.caption_dropout)
        if cfg.data.latent_sample == "mean":
            draws.latent_eps.zero_()  # z = mean + std · 0
        latents, prompt_embeds = encode_batch(batch, draws, encoded, frozen, device, text_model is not None)
        if t.record_samples:
            _record(out / f"samples_rank{accelerator.process_index}.jsonl", step + 1, batch)
        inputs = trainable.inputs(batch, encoded, stream, device)
        with accelerator.accumulate(*wrapped), accelerator.autocast():
            if prompt_embeds is None:  # the text encoder trains: encode with gradients
                prompt_embeds = trainable.prompt_embeds(text_model, captions_of(batch, draws))
            loss = train_step(trainable, model, scheduler, latents, prompt_embeds, draws.noise.to(device),
                              draws.timesteps.to(device), cfg.model.scheduler.prediction_type, t.snr_gamma, **inputs)
            accelerator.backward(loss)
            running += loss.detach() / k_accum
            if not accelerator.sync_gradients:
                continue
            # Non-finite guard: one host sync per optimizer step. Under fp16 the grad scaler already
            # skips overflowing steps, so only a non-finite loss counts there.
            grad_norm = full(accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf")))
            finite = torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) if accelerator.scaler is None
                                                      else torch.ones((), dtype=torch.bool, device=device))
            if bool(accelerator.reduce(finite.float(), reduction="sum") == accelerator.num_processes):
                optimizer.step()
                trainable.after_optimizer_step()
                bad_streak = 0
            else:
                bad_streak += 1
                accelerator.print(f"step {step + 1}: non-finite loss or gradient (loss {loss.item():.4g}, grad "
                                  f"norm {float(grad_norm):.4g}); update skipped ({bad_streak} in a row)")
                if t.nonfinite == "stop" or bad_streak >= t.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"stopping at step {step + 1} after {bad_streak} non-finite step(s) (train.nonfinite="
                        f"{t.nonfinite}, train.max_nonfinite_steps={t.max_nonfinite_steps}); lower train.lr, keep "
                        "train.max_grad_norm on, keep the VAE in float32, or check the data")
            with warnings.catch_warnings():  # a skipped update still counts as a step of the schedule
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
                lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None and bad_streak == 0:
            ema.step(params)
        step += 1
        window_steps += 1
        bar.update(1)
        if on_step is not None:
            on_step(step)
        if step % t.log_every == 0 or step == t.max_steps:
            mean_loss = accelerator.reduce(running, reduction="mean").item() / window_steps
            rate = window_steps * global_batch / max(time.time() - window_start, 1e-9)
            lr = lr_schedule.get_last_lr()[0]
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate,
                             "train/grad_norm": float(grad_norm)}, step=step)
            if main:  # the same numbers as plain text, whatever train.report_to says
                with (out / "train_log.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                                        "images_per_s": round(rate, 2)}) + "\n")
            running.zero_()
            window_start, window_steps = time.time(), 0
        if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.max_steps):
            save_training_state(ckpt_root, step, step * k_accum, trainable, ema, optimizer, lr_schedule, accelerator,
                                cfg, t.checkpoints_total_limit)
            if publisher is not None and main and step < t.max_steps and not publisher.busy:
                _push_checkpoint(publisher, cfg, step, frozen, trainable, ema, scheduler, out / "hub_staging")
        if t.validate_every and step % t.validate_every == 0 and step < t.max_steps and (main or sharded):
            with evaluation_weights(trainable, ema, cfg, sharded, main):
                if main:
                    validate(cfg, step, frozen, trainable, scheduler, out, accelerator, stream)
                    log_validation_loss(cfg, step, stream, val_set, frozen, trainable, scheduler, out, accelerator)
    bar.close()
    loop_seconds = time.time() - loop_start
    # 8. Export (EMA weights by default) and a last validation grid.
    _check_ranks_agree(accelerator, trainable)
    folder = out / trainable.export_folder
    if main or sharded:
        with evaluation_weights(trainable, ema, cfg, sharded, main):
            if main:
                _export(trainable, folder, frozen, scheduler, cfg)
                if t.validate_every:
                    validate(cfg, step, frozen, trainable, scheduler, out, accelerator, stream)
                log_validation_loss(cfg, step, stream, val_set, frozen, trainable, scheduler, out, accelerator)
    if main:
        grids = sorted((out / "validation").glob("step_*.png"))
        write_model_card(folder, cfg, images=tuple(grids[-1:]))
        _write_summary(out / "train_summary.json", trainable, step - first_step, loop_seconds, folder, ckpt_root,
                       device)
        if publisher is not None:
            publisher.wait()
        if cfg.hub.repo_id is not None:  # a failed upload is logged; the run and its files stand
            publish(folder, cfg.hub.repo_id, cfg.hub.private, cfg.hub.retries,
                    commit_message=f"ldm: step {step}", log=accelerator.print)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _KEPT_UNTIL_EXIT.append((accelerator, wrapped, trainable))
    return folder
