"""A run's output folder: whether a fresh run may use it, and whether a resume is the run it says it is.

A fresh run (no checkpoint to resume) into a folder that holds another run's checkpoints or export
stops before anything is loaded: retention would delete the new run's checkpoints (the other run's higher
steps sort as newer), `resume=latest` would later pick the other run, and the export would be replaced.
`train.overwrite_output_dir=true` (or `autoencoder.overwrite_output_dir` for stage 1) clears what ldm
wrote there first, and only that. A component read from inside the parts a run replaces (fine-tuning
`<output_dir>/pipeline` into the same `output_dir`) is refused in every case.

A resume compares the checkpoint's saved config with the current one, key by key. A change that can
take effect from the resumed step on (learning rate, schedule length, AdamW settings, EMA decay, logging,
checkpointing, validation) is applied, printed and recorded in `resumes.jsonl`; a change to what was
trained or to the data order (model, data, LoRA, conditioning, seed, batch) is refused with the list
of keys, before any data or model is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ldm.config.loading import load_config, to_dict
from ldm.config.schema import Config
from ldm.errors import ConfigError
from ldm.training.checkpoint import bare_optimizer, read_state
from ldm.training.trainables import EXPORT_FOLDERS

# What ldm writes into train.output_dir (an explicit overwrite removes these and nothing else).
RUN_FILES = ("checkpoints", "validation", "logs", "hub_staging", "config.yaml", "data_audit.json",
             "train_summary.json", "validation_loss.jsonl", "resumes.jsonl", "train_log.jsonl")


RUN_GLOBS = ("samples_rank*.jsonl",)


# Settings a resume applies from its step on (re-applied to the optimizer, schedule and EMA after loading).
APPLIED_ON_RESUME = {
    "train.lr", "train.lr_scheduler", "train.lr_warmup_steps", "train.max_steps", "train.adam_beta1",
    "train.adam_beta2", "train.adam_weight_decay", "train.adam_epsilon", "train.max_grad_norm", "train.ema_decay",
    "train.ema_warmup", "train.snr_gamma", "train.mixed_precision", "model.text_encoder.lr",
}


# Settings that change how the run is carried out or reported, not what it computes.
FREE_ON_RESUME = (
    "train.output_dir", "train.resume", "train.overwrite_output_dir", "train.log_every", "train.validate_every",
    "train.report_to", "train.checkpoint_every", "train.checkpoints_total_limit", "train.nonfinite",
    "train.max_nonfinite_steps", "train.record_samples", "train.ema_for_export", "train.gradient_checkpointing",
    "train.attention", "train.allow_tf32", "train.channels_last", "train.compile", "train.batch_size",
    "train.sharding",  # checkpoints hold whole tensors either way
    "data.num_workers", "data.cache", "data.cache_dir", "data.audit", "data.max_bad_fraction",
    "lora.trigger_words", "lora.kohya", "lora.fuse", "sample.", "hub.", "autoencoder.",
)



def earlier_run(out: Path) -> list[str]:
    """What in `out` another run left that this one would delete, replace or resume by mistake."""
    found = []
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(checkpoints.iterdir()) if p.name.startswith("step_")]
    for name in EXPORT_FOLDERS:
        if (out / name).is_dir() and any((out / name).iterdir()):
            found.append(f"{name}/")
    return found


def _inside(path: Optional[str], folder: Path) -> bool:
    if not path:
        return False
    candidate = Path(path).expanduser()
    return candidate.exists() and candidate.resolve().is_relative_to(folder.resolve())


def claim_output_dir(cfg: Config, out: Path, resuming: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse (or, with `overwrite`, clear) a used folder for a fresh run; refuse components read from the
    parts of `out` the run replaces. Call before anything is written or loaded."""
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"train.output_dir: {out} cannot be a folder: {blocking} is a file; choose another "
                          "train.output_dir")
    m = cfg.model
    replaced = [out / name for name in (*EXPORT_FOLDERS, "checkpoints")]
    for key, path in (("model.pretrained", m.pretrained), ("model.unet.path", m.unet.path),
                      ("model.vae.path", m.vae.path), ("model.text_encoder.path", m.text_encoder.path)):
        for part in replaced:
            if _inside(path, part):
                raise ConfigError(f"config key '{key}': {path!r} lies inside {part}, which this run writes or "
                                  f"replaces; train into another train.output_dir (e.g. {out}-finetune)")
    if resuming:
        return
    found = earlier_run(out)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"train.output_dir: {out} already holds another run ({shown}); a fresh run there would delete or "
            "replace it. Continue that run with train.resume=latest, choose another train.output_dir, or set "
            "train.overwrite_output_dir=true to clear what ldm wrote there"
        )
    if main:
        print(f"train.overwrite_output_dir=true: clearing the earlier run in {out} ({', '.join(found[:4])}…)")
        clear_run(out)


def clear_run(out: Path, extra: tuple[str, ...] = ()) -> None:
    """Remove what ldm writes into a run folder (and `extra` names), nothing else."""
    names = [*RUN_FILES, *EXPORT_FOLDERS, *extra] + [p.name for g in RUN_GLOBS for p in out.glob(g)]
    for name in names:
        path = out / name
        for candidate in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            elif candidate.exists() or candidate.is_symlink():
                candidate.unlink()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def resume_changes(folder: Path, cfg: Config, world_size: int) -> dict[str, list]:
    """The settings that differ between checkpoint `folder` and `cfg` and that a resume applies, as
    {key: [saved, now]}; raises ConfigError listing the ones it cannot apply."""
    state = read_state(folder)
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"train.resume: {folder} has no config.yaml, so whether it belongs to this run cannot be "
                          "checked; resume it with the config that wrote it, or start a new run")
    saved = _flat(to_dict(load_config(saved_file)))
    now = _flat(to_dict(cfg))
    changed = {k: [saved.get(k), now.get(k)] for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if k not in APPLIED_ON_RESUME and not k.startswith(FREE_ON_RESUME)}
    before = int(state.get("world_size", 1)) * saved["train.batch_size"]
    after = world_size * cfg.train.batch_size
    if before != after:
        refused["processes × train.batch_size"] = [before, after]
    if saved["train.ema_decay"] is None and cfg.train.ema_decay is not None:
        refused["train.ema_decay"] = [None, cfg.train.ema_decay]  # no EMA was kept to continue
    if refused:
        lines = "\n".join(f"  {k}: {old!r} → {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(
            f"train.resume: {folder} was written by a run with other settings, which a resume cannot change (they "
            f"decide what was trained or which samples each step sees):\n{lines}\nset them back to resume it, or "
            "start a new run in another train.output_dir (or with train.overwrite_output_dir=true)"
        )
    return {k: v for k, v in changed.items() if k in APPLIED_ON_RESUME}


def apply_settings(cfg: Config, trainable, optimizer, lr_schedule, ema) -> None:
    """After loading a checkpoint: the current config's learning rates, AdamW settings and EMA decay replace
    the saved ones (the LR schedule's shape already comes from the current config), so what the config, the
    export and the card report is what the resumed steps use."""
    t = cfg.train
    inner = bare_optimizer(optimizer)
    wanted = trainable.param_groups(t.lr, cfg.model.text_encoder.lr)
    lr_schedule.base_lrs = [g["lr"] for g in wanted]
    for group, base, factor in zip(inner.param_groups, lr_schedule.base_lrs, lr_schedule.lr_lambdas, strict=True):
        group.update(initial_lr=base, lr=base * factor(lr_schedule.last_epoch), betas=(t.adam_beta1, t.adam_beta2),
                     eps=t.adam_epsilon, weight_decay=t.adam_weight_decay)
    lr_schedule._last_lr = [g["lr"] for g in inner.param_groups]
    if ema is not None:
        ema.decay, ema.use_ema_warmup = t.ema_decay, t.ema_warmup


def record_resume(out: Path, step: int, folder: Path, changes: dict[str, list]) -> str:
    """Append the resume to `resumes.jsonl`; the line to print."""
    with (out / "resumes.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "checkpoint": str(folder), "applied": changes}) + "\n")
    if not changes:
        return f"resumed from {folder} at step {step}"
    shown = "; ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())
    return f"resumed from {folder} at step {step}, applying the changed settings from here on: {shown}"
