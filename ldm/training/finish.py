"""What `train()` does around and after its loop: the cadence of logs, checkpoints and validation, and the finish
(weights checked across processes, the export, the last validation, the model card, the summary, the upload)."""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ldm.config.schema import Config
from ldm.errors import UserError
from ldm.interop.hub import BackgroundPublisher, publish
from ldm.interop.model_card import write_model_card
from ldm.models.encoders import FrozenEncoders
from ldm.training.checkpoint import save_training_state
from ldm.training.setup import Models, Optimisation, Run
from ldm.training.sharding import Sharded, full, held, whole_weights
from ldm.training.trainables import card_facts
from ldm.training.trainables.base import Trainable
from ldm.training.validation import ema_weights, log_validation_loss, validate

# What holds a process group in a multi-process run, kept past train()'s return: freeing a DDP reducer can
# deadlock in gloo's process-group destructor (it waits on its worker threads while holding the GIL; seen
# here once in a full test run, after every file was written). The scripts end such runs with
# `os._exit` once output is flushed (ldm.cli.run_script), so these are never torn down.
_KEPT_UNTIL_EXIT: list = []


class NonFiniteError(UserError, FloatingPointError):
    """Training stopped on non-finite losses, gradients or weights (the message names the settings to change)."""


class Progress:
    """The loop's running numbers: the loss over the logging window, images/s, the progress bar, the background
    publisher of checkpoints; and the loop's wall time."""

    def __init__(self, run: Run, trainable: Trainable, lr_schedule, step: int, show: bool,
                 on_step: Optional[Callable[[int], None]]):
        cfg, t = run.cfg, run.cfg.train
        self.run, self.lr_schedule, self.on_step = run, lr_schedule, on_step
        self.global_batch = t.batch_size * run.accelerator.num_processes * t.gradient_accumulation_steps
        self.running, self.window_start, self.window_steps = torch.zeros((), device=run.device), time.time(), 0
        self.publisher = BackgroundPublisher(cfg.hub.repo_id, cfg.hub.private, cfg.hub.retries,
                                             run.accelerator.print) if cfg.hub.push_checkpoints else None
        run.accelerator.print(f"training the {trainable.label}: {sum(p.numel() for p in trainable.parameters()):,} "
                              "parameters")
        self.bar = tqdm(total=t.max_steps, initial=step, desc=f"stage 2 ({trainable.label})",
                        disable=not (show and run.main))
        self.first_step = step
        trainable.set_training(True)
        self.start = time.time()

    def advance(self, step: int) -> None:
        """One optimizer step was taken (or skipped as non-finite)."""
        self.window_steps += 1
        self.bar.update(1)
        if self.on_step is not None:
            self.on_step(step)

    def log(self, step: int, grad_norm: torch.Tensor) -> None:
        """The window's mean loss, lr, images/s and grad norm: to the trackers, the bar and train_log.jsonl."""
        accelerator = self.run.accelerator
        mean_loss = accelerator.reduce(self.running, reduction="mean").item() / self.window_steps
        rate = self.window_steps * self.global_batch / max(time.time() - self.window_start, 1e-9)
        lr = self.lr_schedule.get_last_lr()[0]
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate,
                         "train/grad_norm": float(grad_norm)}, step=step)
        if self.run.main:  # the same numbers as plain text, whatever train.report_to says
            with (self.run.out / "train_log.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                                    "images_per_s": round(rate, 2)}) + "\n")
        self.running.zero_()
        self.window_start, self.window_steps = time.time(), 0

    def close(self) -> tuple[int, float]:
        """(steps taken in this process' loop, seconds the loop took)."""
        self.bar.close()
        return self.first_step, time.time() - self.start


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


def export(trainable: Trainable, folder: Path, frozen: FrozenEncoders, scheduler, cfg: Config) -> Path:
    """What the run leaves behind, with the weights as they are (inside `evaluation_weights`)."""
    tokenizer, text_encoder = frozen.text
    vae = frozen.vae if frozen.vae.dtype == torch.float32 else frozen.vae.to(torch.float32)
    trainable.export(folder, vae, text_encoder, tokenizer, scheduler, cfg)
    return folder


def checkpoint(run: Run, models: Models, opt: Optimisation, step: int, progress: Progress) -> None:
    """Save the training state; with hub.push_checkpoints, export it and upload it in the background."""
    cfg, t = run.cfg, run.cfg.train
    save_training_state(run.ckpt_root, step, step * t.gradient_accumulation_steps, models.trainable, opt.ema,
                        opt.optimizer, opt.lr_schedule, run.accelerator, cfg, t.checkpoints_total_limit)
    publisher = progress.publisher
    if publisher is not None and run.main and step < t.max_steps and not publisher.busy:
        staging = run.out / "hub_staging"
        with evaluation_weights(models.trainable, opt.ema, cfg, None, True):
            export(models.trainable, staging, models.frozen, models.scheduler, cfg)
        write_model_card(staging, cfg, facts=card_facts(cfg))
        publisher.submit(staging, f"ldm: checkpoint at step {step}")


def validate_now(run: Run, stream, models: Models, opt: Optimisation, step: int, val_set: list) -> None:
    """The validation grid and the held-back loss with the evaluation weights (on the main process; under FSDP
    every process gathers the weights)."""
    if not (run.main or opt.sharded):
        return
    with evaluation_weights(models.trainable, opt.ema, run.cfg, opt.sharded, run.main):
        if run.main:
            validate(run.cfg, step, models.frozen, models.trainable, models.scheduler, run.out, run.accelerator,
                     stream)
            log_validation_loss(run.cfg, step, stream, val_set, models.frozen, models.trainable, models.scheduler,
                                run.out, run.accelerator)


def check_ranks_agree(accelerator, trainable: Trainable) -> None:
    """All processes must end with the same weights; a cheap checksum makes a divergence loud (sharded
    weights are summed over their shards: every process gets the whole sum)."""
    checksum = torch.stack([full(p.detach().double().sum()) for p in trainable.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.isfinite(sums).all():
        raise NonFiniteError(f"the trained {trainable.label} weights are not finite at the end of the run, so nothing "
                             "was exported; lower train.lr, keep train.max_grad_norm on, keep the VAE in float32, or "
                             "set train.nonfinite=stop to stop at the first non-finite step")
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"processes ended with different weights (checksums {sums.tolist()})")
    accelerator.print(f"final weights agree on {accelerator.num_processes} process(es): checksum {sums[0].item():.10e}")


def write_summary(path: Path, trainable: Trainable, steps: int, seconds: float, export: Path, ckpt_root: Path,
                  device: torch.device) -> None:
    """What the run cost: s/step over the loop (checkpoints and validation included), peak memory (the
    process' RSS on CPU, max allocated on CUDA), and the sizes of what it wrote."""

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


def finish(run: Run, stream, models: Models, opt: Optimisation, progress: Progress, step: int,
           val_set: list) -> Path:
    """Weights checked equal on every process; the export (EMA weights by default) and a last validation; the
    model card, train_summary.json and the upload. Returns the export folder."""
    cfg, accelerator, trainable = run.cfg, run.accelerator, models.trainable
    first_step, loop_seconds = progress.close()
    check_ranks_agree(accelerator, trainable)
    folder = run.out / trainable.export_folder
    if run.main or opt.sharded:
        with evaluation_weights(trainable, opt.ema, cfg, opt.sharded, run.main):
            if run.main:
                export(trainable, folder, models.frozen, models.scheduler, cfg)
                if cfg.train.validate_every:
                    validate(cfg, step, models.frozen, trainable, models.scheduler, run.out, accelerator, stream)
                log_validation_loss(cfg, step, stream, val_set, models.frozen, trainable, models.scheduler, run.out,
                                    accelerator)
    if run.main:
        grids = sorted((run.out / "validation").glob("step_*.png"))
        write_model_card(folder, cfg, images=tuple(grids[-1:]), facts=card_facts(cfg))
        write_summary(run.out / "train_summary.json", trainable, step - first_step, loop_seconds, folder,
                      run.ckpt_root, run.device)
        if progress.publisher is not None:
            progress.publisher.wait()
        if cfg.hub.repo_id is not None:  # a failed upload is logged; the run and its files stand
            publish(folder, cfg.hub.repo_id, cfg.hub.private, cfg.hub.retries, commit_message=f"ldm: step {step}",
                    log=accelerator.print)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _KEPT_UNTIL_EXIT.append((accelerator, opt.wrapped, trainable))
    return folder
