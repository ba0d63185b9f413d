"""Training state save / resume (crash-safe) and export of the pipeline.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding only safetensors and JSON (nothing is
ever unpickled on resume):

    <weights_file>            what trains, fp32: unet.safetensors, controlnet.safetensors,
                              style_adapter.safetensors, or lora.safetensors (the adapter's tensors only)
    ema.safetensors           EMA shadow weights of the trained parameters by name, when EMA is on
    optimizer.safetensors     AdamW moments and step counts; param groups in state.json
    rng_rank{r}.safetensors   torch / CUDA / NumPy generator states of process r (Python's in state.json)
    state.json                step, micro-step (the data position), LR schedule, grad scaler, EMA
                              counters, the per-rank Python RNG states, and a manifest of file sizes

It is written into `step_NNNNNN.tmp/`, every file flushed to disk, `state.json` last, then renamed
into place: a folder without `.tmp` whose manifest matches is complete, anything else is ignored by
`resume=latest` and reported. Older checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ldm.config.loading import save_config
from ldm.config.schema import Config
from ldm.errors import ConfigError, UserError
from ldm.training.sharding import full_state, shard_like

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class DiskSpaceError(UserError, RuntimeError):
    """Not enough free disk for a checkpoint; raised before anything is written."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def estimate_checkpoint_bytes(trainable, with_ema: bool) -> int:
    """Trained weights + EMA + two AdamW moments, fp32, plus 5 % for headers and small files."""
    n = sum(p.numel() for p in trainable.parameters())
    return int(4 * n * (1 + int(with_ema) + 2) * 1.05) + (1 << 20)


def check_disk_space(folder: str | Path, needed: int, what: str = "a checkpoint") -> None:
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            f"{what} needs {needed / 2**30:.2f} GiB in {folder} but only {free / 2**30:.2f} GiB is free; free some "
            "space, point train.output_dir at a larger disk, or lower train.checkpoints_total_limit"
        )


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: tensors for safetensors, the rest as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
                     "python": [version, list(internal), gauss_next]}


def restore_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = extra["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Whole moments back into the optimizer, each cut like its parameter when that is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        if torch.is_tensor(value) and int(idx) < len(params) and value.shape == params[int(idx)].shape:
            value = shard_like(value, params[int(idx)])
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # load_state_dict hands moments back contiguous; the fused AdamW kernel walks a parameter and its moments
    # as flat memory, so a channels-last weight with contiguous moments would be updated from the wrong
    # elements. Each moment takes its parameter's layout again.
    for p in params:
        for name, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


@dataclass
class TrainingState:
    """What the loop needs back after a resume."""

    step: int
    micro_step: int


def save_training_state(root: str | Path, step: int, micro_step: int, trainable, ema, optimizer, lr_schedule,
                        accelerator, cfg: Config, keep: Optional[int]) -> Optional[Path]:
    """Write checkpoints/step_{step}; every process takes part (each saves its own RNG state, and under FSDP
    each gives its shards: the files hold whole tensors, the same as an unsharded run's).

    `trainable` (ldm.training.trainables) says what trains: its state, parameter names and file name."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    main = accelerator.is_main_process
    inner = bare_optimizer(optimizer)
    weights = full_state(trainable.state_dict(), keep=main)
    shadow = full_state(dict(zip([n for n, _ in trainable.named_parameters()], ema.shadow_params, strict=True)),
                        keep=main) if ema is not None else None
    opt_tensors, opt_meta = _optimizer_tensors(inner)
    opt_tensors = full_state(opt_tensors, keep=main)
    if main:
        # Never checkpoint non-finite weights: they would poison every resume.
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            raise FloatingPointError(f"{trainable.label} weights are not finite at step {step}; refusing to "
                                     "checkpoint them")
        check_disk_space(root, estimate_checkpoint_bytes(trainable, ema is not None))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, extra = rng_state()
    _save_tensors(tensors, tmp / f"rng_rank{accelerator.process_index}.safetensors")
    (tmp / f"rng_rank{accelerator.process_index}.json").write_text(json.dumps(extra))
    _fsync_file(tmp / f"rng_rank{accelerator.process_index}.json")
    accelerator.wait_for_everyone()
    if main:
        _save_tensors(weights, tmp / trainable.weights_file)
        ema_meta = None
        if ema is not None:
            # Keyed by parameter name: the file loads straight into the module with load_state_dict(strict=False).
            _save_tensors(shadow, tmp / "ema.safetensors")
            ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_config(cfg, tmp / "config.yaml")
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        state = {"step": step, "micro_step": micro_step, "world_size": accelerator.num_processes,
                 "lr_schedule": {k: v for k, v in lr_schedule.state_dict().items() if k != "lr_lambdas"},
                 "grad_scaler": scaler, "ema": ema_meta, "optimizer": opt_meta, "files": files}
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync_file(tmp / "state.json")
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep is not None:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final if main else None


def is_complete(folder: Path) -> bool:
    state = folder / "state.json"
    if not _STEP_DIR.match(folder.name) or not state.is_file():
        return False
    try:
        files = json.loads(state.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
            return False
    except (ValueError, KeyError, TypeError, OSError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def incomplete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_complete(p))


def find_resume_folder(resume: str, root: str | Path) -> Optional[Path]:
    """`latest` → newest complete checkpoint under root (None if there is none); a path → that folder."""
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    folder = Path(resume)
    if not is_complete(folder):
        raise ConfigError(f"train.resume: {resume!r} is not a complete checkpoint folder (state.json and the files "
                         "it lists); use train.resume=latest to pick the newest complete one")
    return folder


def read_state(folder: Path) -> dict:
    """state.json of a checkpoint, with the fields a resume needs checked (a damaged one is named)."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        for key, kind in (("step", int), ("micro_step", int), ("world_size", int), ("lr_schedule", dict),
                          ("optimizer", dict), ("files", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"'{key}' is missing or not a {kind.__name__}")
        if not isinstance(state["optimizer"].get("param_groups"), list):
            raise ValueError("'optimizer.param_groups' is missing")
    except (ValueError, OSError) as err:
        raise ConfigError(f"train.resume: {path} is damaged ({err}); resume from an earlier checkpoint with "
                          f"train.resume={folder.parent}/step_…, or start a new run") from err
    return state


def _check_shapes(weights: Path, trainable) -> None:
    """The checkpoint's tensors against the module's (a changed architecture), before loading anything."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in trainable.state_dict().items()}
    with safe_open(str(weights), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wrong = [f"{k}: saved {saved[k]}, now {expected[k]}" for k in saved if k in expected and saved[k] != expected[k]]
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if wrong or missing or unexpected:
        detail = "; ".join(wrong[:3] + [f"missing {k}" for k in missing[:2]]
                           + [f"unexpected {k}" for k in unexpected[:2]])
        raise ConfigError(f"train.resume: {weights} does not fit the {trainable.label} this config builds "
                          f"({len(wrong)} shapes differ, {len(missing)} missing, {len(unexpected)} unexpected: "
                          f"{detail}); resume with the config that wrote it, or start a new run")


def load_training_state(folder: Path, trainable, ema, optimizer, lr_schedule, accelerator) -> TrainingState:
    state = read_state(folder)
    # safetensors takes "cpu", not the "cpu:0" a multi-process CPU launch gives each process.
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    weights = folder / trainable.weights_file
    if not weights.is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in ("ema.safetensors",
                                                                                       "optimizer.safetensors")
                       and not p.name.startswith("rng_rank"))
        raise ConfigError(f"{folder} holds {', '.join(found) or 'no weights'}, not {trainable.weights_file}: it is "
                         f"not a checkpoint of a {trainable.label} run; resume the run that wrote it with its own "
                         "config, or start a new one in another train.output_dir")
    _check_shapes(weights, trainable)
    current = trainable.state_dict()
    trainable.load_state_dict({k: shard_like(v, current[k]) if k in current else v
                               for k, v in load_file(str(weights), device=device).items()})
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise ConfigError(f"{folder} was saved without EMA but train.ema_decay is set; set train.ema_decay=null "
                             "or start a new run")
        shadow = load_file(str(folder / "ema.safetensors"))
        named = trainable.named_parameters()
        ema.load_state_dict({**state["ema"], "shadow_params": [shard_like(shadow[n], p) for n, p in named]})
        ema.to(accelerator.device)
    inner = bare_optimizer(optimizer)
    _load_optimizer(inner, load_file(str(folder / "optimizer.safetensors"), device=device),
                    state["optimizer"])
    lr_schedule.load_state_dict({**lr_schedule.state_dict(), **state["lr_schedule"]})
    if accelerator.scaler is not None and state["grad_scaler"]:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rank_file = folder / f"rng_rank{accelerator.process_index}.safetensors"
    if state["world_size"] == accelerator.num_processes and rank_file.is_file():
        restore_rng_state(load_file(str(rank_file)),
                          json.loads((folder / f"rng_rank{accelerator.process_index}.json").read_text()))
    return TrainingState(step=state["step"], micro_step=state["micro_step"])


def bare_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (its state and param groups), or the one given."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
