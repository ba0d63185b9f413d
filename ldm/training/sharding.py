"""Sharded training (FSDP2) of what trains, and the checks of the other distributed setups.

`train.sharding=fsdp` splits the trained module's parameters, gradients and AdamW moments across the
processes with PyTorch's `fully_shard` (FSDP2): each process keeps 1/N of them and gathers a block's
weights only while that block runs. ldm applies it itself rather than through accelerate's FSDP plugin:
on CPUs (gloo) the plugin falls back to plain DDP, and FSDP1's full-state-dict save crashes there. The
same code runs on GPUs under any multi-process launch (`configs/accelerate/ddp.yaml`).

Everything outside the training step sees whole tensors, so nothing else has to know about shards:

- checkpoints hold full fp32 tensors in the same files as an unsharded run (`full_state`, gathered one
  tensor at a time; only the main process keeps them), and a resume cuts them back into this process'
  shards (`shard_like`);
- validation and the export run on the main process against an unsharded copy of the module holding the
  gathered weights (`Sharded.whole`), the EMA ones when the export uses EMA;
- the EMA shadow is sharded like the parameters it follows (its update is local to each shard).

Only full-weight training of the text-to-image UNet shards (from scratch or fine-tuning): a LoRA trains
well under 1 % of the weights, which DDP already holds cheaply, and the conditions' modules are small.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ldm.config.schema import Config
from ldm.errors import ConfigError

# Children of a Diffusers UNet / ControlNet sharded as units of their own (one all-gather each), inside
# the root's unit that holds the rest (embeddings, the input and output convolutions).
_BLOCKS = ("down_blocks", "up_blocks", "mid_block", "controlnet_down_blocks")


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process calls it in the same order)."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def held(t: torch.Tensor) -> int:
    """Elements of `t` this process holds (its shard, or all of it)."""
    return t.to_local().numel() if isinstance(t, _dtensor()) else t.numel()


def full_state(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """`state` with every shard replaced by its whole tensor, gathered one at a time. Every process must call
    it; those with `keep=False` take part in the gathering and drop each tensor at once (no full copy)."""
    out = {}
    for key, value in state.items():
        value = full(value)
        if keep:
            out[key] = value
    return out


def shard_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut the way `ref` is (its own shard of it, computed locally: every process read the
    same file), or `value` itself when `ref` is not sharded."""
    if not isinstance(ref, _dtensor()):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def check_launch(cfg: Config, accelerator) -> None:
    """The distributed setup accelerate was launched with, against the config (before anything heavy):
    accelerate's own FSDP plugin is refused (ldm shards itself), a DeepSpeed config must agree with the
    run's batch, accumulation, clipping and precision."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise ConfigError("accelerate was launched with its FSDP plugin; ldm shards the trained module itself: "
                          "launch as for DDP (configs/accelerate/ddp.yaml, or --multi_gpu) and set "
                          "train.sharding=fsdp")
    if kind == DistributedType.DEEPSPEED:
        if cfg.train.sharding != "none":
            raise ConfigError("train.sharding=fsdp under a DeepSpeed launch: use one of them")
        check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg,
                               accelerator.num_processes)


def check_deepspeed_config(ds: dict, cfg: Config, num_processes: int) -> None:
    """A DeepSpeed config (the JSON accelerate hands the engine, or the `deepspeed_config` section of an
    accelerate YAML) against the run; every disagreement is listed with the value the run needs."""
    t = cfg.train
    zero = ds.get("zero_optimization", {}) if isinstance(ds.get("zero_optimization"), dict) else {}
    stage = ds.get("zero_stage", zero.get("stage", 0))
    problems = []

    def agree(key: str, value, needed, fix: str) -> None:
        if value not in (None, "auto") and value != needed:
            problems.append(f"{key}={value!r} but {fix} is {needed!r}")

    agree("gradient_accumulation_steps", ds.get("gradient_accumulation_steps"), t.gradient_accumulation_steps,
          "train.gradient_accumulation_steps")
    agree("gradient_clipping", ds.get("gradient_clipping"), t.max_grad_norm, "train.max_grad_norm")
    agree("train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu"), t.batch_size,
          "train.batch_size")
    agree("train_batch_size", ds.get("train_batch_size"),
          t.batch_size * t.gradient_accumulation_steps * num_processes,
          "train.batch_size × gradient_accumulation_steps × processes")
    for precision in ("fp16", "bf16"):
        section = ds.get(precision)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if enabled not in (None, "auto") and bool(enabled) != (t.mixed_precision == precision):
            problems.append(f"{precision}.enabled={enabled!r} but train.mixed_precision is {t.mixed_precision!r}")
    if stage not in (0, 1, 2):
        problems.append(f"ZeRO stage {stage!r}: ldm's checkpoints read whole parameters, which stage 3 "
                        "partitions (use stage 2, or train.sharding=fsdp on a DDP launch)")
    for key in ("offload_optimizer_device", "offload_param_device"):
        value = ds.get(key, (zero.get(key.replace("_device", ""), {}) or {}).get("device"))
        if value not in (None, "none", "cpu", "nvme"):
            problems.append(f"{key}={value!r}: use none, cpu or nvme")
    if problems:
        raise ConfigError("the DeepSpeed config disagrees with the run: " + "; ".join(problems)
                          + " (set the DeepSpeed values to 'auto', or to what the ldm config says)")


class Sharded:
    """The trained module sharded across the processes, and what the rest of the run needs from it."""

    def __init__(self, module: torch.nn.Module, num_processes: int, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # What rebuilds it whole: its own class (fully_shard swaps in a subclass) and Diffusers config.
        self.cls, self.config = type(module), module.config
        self.device = device
        mesh = init_device_mesh(device.type, (num_processes,))
        for name in _BLOCKS:
            child = getattr(module, name, None)
            for block in (child if isinstance(child, torch.nn.ModuleList) else [child]):
                if block is not None and any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        self.module = module

    @contextmanager
    def whole(self, trainable, main: bool) -> Iterator[Optional[torch.nn.Module]]:
        """Every process gathers the module's weights (as they are now: swap the EMA in first); on the main
        process the trainable holds an unsharded copy with them until the block ends, so validation and the
        export run there alone, without collectives. Yields the copy (None elsewhere)."""
        state = full_state(self.module.state_dict(), keep=main)
        if not main:
            yield None
            return
        plain = self.cls.from_config(self.config).to(self.device)
        plain.load_state_dict(state)
        plain.train(self.module.training)
        names = [k for k, v in vars(trainable).items() if v is self.module]
        for name in names:
            setattr(trainable, name, plain)
        try:
            yield plain
        finally:
            for name in names:
                setattr(trainable, name, self.module)


@contextmanager
def whole_weights(sharded: Optional[Sharded], trainable, main: bool):
    """`Sharded.whole` under FSDP; nothing to do otherwise."""
    if sharded is None:
        yield None
    else:
        with sharded.whole(trainable, main) as plain:
            yield plain
