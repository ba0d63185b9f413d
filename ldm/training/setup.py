"""Everything `train()` sets up before its loop, as named steps in the order they run:

    start_run           the config against the components' own configs (no weights yet), the accelerator, the
                        output folder, the checkpoint a resume starts from, the resolved config saved
    open_stream         the data: columns checked and every sample audited, held-back samples, buckets
    build_models        frozen VAE + text encoder, what trains (picked once from the trainables table), the
                        DDPM noise scheduler, memory settings
    fill_cache          the fingerprinted cache of what the frozen encoders compute (when data.cache)
    build_optimisation  FSDP shards, optimizer, LR schedule, EMA, the wrapped modules
    resume              the checkpoint's state, then the current config's settings
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler

from ldm.config.loading import save_config
from ldm.config.schema import Config, downsampling_factor
from ldm.data.audit import open_audited
from ldm.data.cache import EncodedDataset, build_cache, cache_fingerprints
from ldm.data.shards import StreamingShards
from ldm.data.stream import SampleStream
from ldm.errors import ConfigError
from ldm.models.building import build_scheduler, build_unet
from ldm.models.encoders import FrozenEncoders
from ldm.models.loading import TextEncoderInfo, VAEInfo, check_components, load_tokenizer
from ldm.training.checkpoint import (
    check_disk_space,
    estimate_checkpoint_bytes,
    find_resume_folder,
    incomplete_checkpoints,
    load_training_state,
)
from ldm.training.run_folder import apply_settings, claim_output_dir, record_resume, resume_changes
from ldm.training.sharding import Sharded, check_launch
from ldm.training.trainables import build_trainable
from ldm.training.trainables.base import Trainable
from ldm.training.validation import ParameterEMA


@dataclass
class Run:
    """Where and how the run happens, settled before any data or weights load."""

    cfg: Config
    accelerator: Accelerator
    vae: VAEInfo
    text: TextEncoderInfo
    resume_from: Optional[Path] = None  # the checkpoint a resume starts from
    resume_applies: dict = field(default_factory=dict)  # settings the resume changes (resumes.jsonl)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Models:
    frozen: FrozenEncoders  # the VAE and text encoder, loaded on first use
    trainable: Trainable
    scheduler: object  # the DDPM noise scheduler of training


@dataclass
class Optimisation:
    params: list  # what the optimizer, EMA and clipping see
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    ema: Optional[ParameterEMA]
    model: torch.nn.Module  # the trained module as wrapped (compile, DDP)
    extra: list  # the trainable's extra modules as wrapped (DDP)
    sharded: Optional[Sharded]

    @property
    def wrapped(self) -> list:
        return [self.model, *self.extra]


def set_tf32(allow: bool) -> None:
    """TF32 for fp32 matrix products and convolutions (Ampere and newer; 10-bit mantissa, fp32 range)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def start_run(cfg: Config) -> Run:
    """The config against the components' own configs (before anything heavy); the accelerator (processes,
    devices, mixed precision, accumulation); the output folder (a fresh run never takes over another run's, a
    resume must match its checkpoint's config); the resolved config saved."""
    t = cfg.train
    vae_info, text_info = check_components(cfg)
    out = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    run = Run(cfg, accelerator, vae_info, text_info)
    check_launch(cfg, accelerator)
    set_tf32(t.allow_tf32)
    if t.resume is not None:
        for bad in incomplete_checkpoints(run.ckpt_root):
            accelerator.print(f"ignoring incomplete checkpoint {bad} (a save was interrupted)")
        run.resume_from = find_resume_folder(t.resume, run.ckpt_root)
        if run.resume_from is None:
            accelerator.print(f"train.resume=latest: no complete checkpoint in {run.ckpt_root}; starting from step 0")
        else:
            run.resume_applies = resume_changes(run.resume_from, cfg, accelerator.num_processes)
    claim_output_dir(cfg, out, run.resume_from is not None, t.overwrite_output_dir, run.main)
    accelerator.wait_for_everyone()
    if run.main:
        save_config(cfg, out / "config.yaml")
        if t.report_to != "none":
            accelerator.init_trackers("text2img")
    return run


def open_stream(run: Run) -> SampleStream | StreamingShards:
    """The data: columns checked, every sample audited (bad ones converted or skipped and counted; streamed
    shards are checked as they are met), the last `data.validation_images` held back, buckets planned."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    if cfg.data.streaming:  # each process streams its own shards
        stream = StreamingShards(cfg.data, cfg.train.seed, accelerator.process_index, accelerator.num_processes)
        accelerator.print(stream.describe())
        if run.main:
            (out / "data_audit.json").write_text(json.dumps({"streaming": stream.describe()}, indent=1))
    else:
        stream = SampleStream(open_audited(cfg.data, load_tokenizer(cfg.model.text_encoder), accelerator),
                              cfg.data, cfg.train.seed)
    if run.main and hasattr(stream.source, "report"):
        (out / "data_audit.json").write_text(json.dumps(stream.source.report.to_dict(), indent=1))
    stream.audit_file = out / "data_audit.json"
    n_val = cfg.data.validation_images
    if n_val >= stream.size:
        raise ConfigError(f"config key 'data.validation_images': {n_val} leaves nothing to train on "
                          f"({stream.size} samples); use fewer")
    stream.size -= n_val  # the last n_val samples never enter the training stream
    if cfg.data.buckets.enabled:
        plan_buckets(stream, cfg, run.vae.downsample, cfg.train.batch_size * accelerator.num_processes, out,
                     run.main, accelerator.print)
    return stream


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


def build_models(run: Run) -> Models:
    """Frozen encoders (loaded on first use; the VAE in its configured dtype, fp32 by default), what trains
    (picked once from the table in ldm.training.trainables: nothing after this asks which it is), the noise
    scheduler; gradient checkpointing and the attention kernel on every module the prediction runs through."""
    cfg, t = run.cfg, run.cfg.train
    frozen = FrozenEncoders(cfg.model, run.device)
    trainable = build_trainable(cfg, lambda: build_unet(cfg, run.vae, run.text), run.vae.downsample,
                                text=lambda: frozen.text).to(run.device)
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
    return Models(frozen, trainable, scheduler)


def fill_cache(run: Run, stream: SampleStream, models: Models, show_progress: bool) -> Optional[EncodedDataset]:
    """With data.cache, encode what the cache lacks (each process its share, and what the trainable asks for
    beyond latents and prompt embeddings); a complete cache needs no encoder at all."""
    cfg, accelerator, frozen = run.cfg, run.accelerator, models.frozen
    if not cfg.data.cache:
        return None
    vae_fp, text_fp = cache_fingerprints(cfg, frozen)
    encoded = build_cache(stream, cfg.data.cache_dir, lambda: frozen.vae, lambda: frozen.text, vae_fp, text_fp,
                          accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                          show_progress=show_progress and run.main, **models.trainable.cache_request())
    loaded = [name for name, was in frozen.loaded.items() if was]
    accelerator.print(f"cache ready in {cfg.data.cache_dir}; encoders loaded to fill it: {', '.join(loaded) or 'none'}")
    return encoded


def build_optimisation(run: Run, models: Models) -> Optimisation:
    """Channels-last, FSDP shards (the trained module's parameters become this process' shards before the
    optimizer sees them), AdamW over what trains, the LR schedule (stepped once per optimizer step, whatever
    the process count), the EMA of the same parameters, and the modules wrapped for training."""
    t, accelerator, trainable, device = run.cfg.train, run.accelerator, models.trainable, run.device
    if t.channels_last:
        for module in trainable.modules():
            module.to(memory_format=torch.channels_last)
    sharded = Sharded(trainable.module, accelerator.num_processes, device) if t.sharding == "fsdp" else None
    # AdamW's fused kernel runs on CPUs too: 20 ms a step on the quickstart UNet against 90 ms for the
    # per-tensor loop PyTorch picks by default off CUDA (Intel Xeon).
    params = trainable.parameters()
    optimizer = torch.optim.AdamW(trainable.param_groups(t.lr, run.cfg.model.text_encoder.lr),
                                  betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
                                  eps=t.adam_epsilon, fused=device.type in ("cuda", "cpu"))
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
    # Modules that train beside it (a text encoder) are wrapped too (DDP all-reduces their gradients).
    extra = [accelerator.prepare(m) for m in trainable.extra_modules()]
    return Optimisation(params, optimizer, lr_schedule, ema, model, extra, sharded)


def resume(run: Run, models: Models, opt: Optimisation) -> tuple[int, int]:
    """(optimizer step, micro-step) to start from: 0 for a fresh run; for a resume, the checkpoint's weights,
    EMA, optimizer, LR schedule, grad scaler, RNG and data position, then the current config's learning
    rates, AdamW and EMA settings (changed ones are recorded in resumes.jsonl). Checks the disk has room."""
    step, start_micro = 0, 0
    if run.resume_from is not None:
        state = load_training_state(run.resume_from, models.trainable, opt.ema, opt.optimizer, opt.lr_schedule,
                                    run.accelerator)
        apply_settings(run.cfg, models.trainable, opt.optimizer, opt.lr_schedule, opt.ema)
        step, start_micro = state.step, state.micro_step
        if run.main:
            run.accelerator.print(record_resume(run.out, step, run.resume_from, run.resume_applies))
    if run.main and run.cfg.train.checkpoint_every:
        check_disk_space(run.out, estimate_checkpoint_bytes(models.trainable, opt.ema is not None),
                         "a checkpoint of this run")
    return step, start_micro
