"""Sharded training (train.sharding=fsdp, FSDP2 on 2 CPU ranks with gloo): the same training as DDP, exact
resume after SIGKILL, an export of whole weights that plain Diffusers loads; and the checks of the
distributed setups ldm does not run here (accelerate's FSDP plugin, DeepSpeed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, write_config
from helpers import LAUNCHER, ROOT, max_diff, samples_of, script_env
from ldm.config.loading import load_config, read_yaml
from ldm.errors import ConfigError

pytestmark = pytest.mark.slow

# Batch 2 per rank, accumulation 2, EMA, a mid-run validation (every rank gathers, rank 0 draws).
RUN = ["data.shapes.num_images=24", "train.batch_size=2", "train.gradient_accumulation_steps=2",
       "train.max_steps=6", "train.checkpoint_every=2", "train.checkpoints_total_limit=3", "train.ema_decay=0.9",
       "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "train.record_samples=true",
       "train.adam_epsilon=1e-4", "train.validate_every=4"]


def _launch(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args],
                            cwd=ROOT, env={**script_env(), "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _train(config: Path, *extra: str) -> str:
    proc = _launch(["scripts/train_text2img.py", "--config", str(config), *extra])
    log = proc.communicate(timeout=500)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "final weights agree on 2 process(es)" in log
    return log


def _losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """The same run under DDP and under FSDP, 2 processes each."""
    tmp = tmp_path_factory.mktemp("fsdp")
    outs = {}
    for sharding in ("none", "fsdp"):
        out = tmp / sharding
        config = write_config(tmp / f"{sharding}.yaml",
                              tiny_overrides(tiny, out) + RUN + [f"train.sharding={sharding}"])
        _train(config)
        outs[sharding] = out
    return outs


def test_fsdp_trains_like_ddp(runs):
    ddp, fsdp = runs["none"], runs["fsdp"]
    # Same samples on every rank and step, the same loss curve, the same weights, EMA and AdamW moments.
    assert samples_of(ddp, 0) == samples_of(fsdp, 0) and samples_of(ddp, 1) == samples_of(fsdp, 1)
    a, b = _losses(ddp), _losses(fsdp)
    assert a.keys() == b.keys() == set(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5, (a, b)
    # Tolerance: FSDP reduce-scatters the gradients where DDP all-reduces them (another summation order,
    # ~1e-7 relative), and Adam (ε = 1e-4 here) carries that into lr-sized steps at most.
    for name in ("unet.safetensors", "ema.safetensors", "optimizer.safetensors"):
        x = load_file(str(ddp / "checkpoints" / "step_000006" / name))
        y = load_file(str(fsdp / "checkpoints" / "step_000006" / name))
        assert max_diff(x, y) <= 1e-5, name
    # The checkpoints hold whole tensors, and each process held about half of them while training.
    held = json.loads((fsdp / "train_summary.json").read_text())
    assert held["parameters_held_per_process"] <= 0.55 * held["parameters"]
    whole = json.loads((ddp / "train_summary.json").read_text())
    assert whole["parameters_held_per_process"] == whole["parameters"] == held["parameters"]
    # The mid-run validation ran on the gathered (EMA) weights.
    assert (fsdp / "validation" / "step_000004.png").is_file()


def test_fsdp_export_loads_in_plain_diffusers(runs):
    from diffusers import DiffusionPipeline

    fsdp = runs["fsdp"]
    pipe = DiffusionPipeline.from_pretrained(str(fsdp / "pipeline"))
    ema = load_file(str(fsdp / "checkpoints" / "step_000006" / "ema.safetensors"))  # the export is the EMA
    exported = pipe.unet.state_dict()
    assert ema.keys() <= exported.keys()
    assert max((exported[k] - v).abs().max().item() for k, v in ema.items()) == 0.0
    ddp = DiffusionPipeline.from_pretrained(str(runs["none"] / "pipeline"))
    kw = dict(prompt="a red circle", num_inference_steps=3, height=16, width=16, output_type="np")
    x = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    y = ddp(**kw, generator=torch.Generator().manual_seed(0)).images
    assert x.shape == (1, 16, 16, 3) and abs(x - y).max() <= 1e-3  # the FSDP model draws what the DDP one does


def test_fsdp_resume_after_sigkill_is_exact(tiny, tmp_path, runs):
    out = tmp_path / "killed"
    config = write_config(tmp_path / "run.yaml", tiny_overrides(tiny, out) + RUN + ["train.sharding=fsdp"])
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    proc = _launch([str(launcher), "step", "0.4", "--config", str(config)])
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out waiting for checkpoint 2"
        time.sleep(0.01)
    # The launcher and both ranks at once (torchrun starts each rank in a session of its own).
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 3  # launcher, ranks
    for p in tree:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not psutil.wait_procs(tree, timeout=20)[1], "a rank survived SIGKILL"
    assert not (out / "checkpoints" / "step_000006").exists(), "the run was meant to die mid-way"
    assert "resumed from" in _train(config, "train.resume=latest")
    for name in ("unet.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(runs["fsdp"] / "checkpoints" / "step_000006" / name))
        b = load_file(str(out / "checkpoints" / "step_000006" / name))
        assert max_diff(a, b) <= 1e-6, name


def test_a_ddp_checkpoint_resumes_under_fsdp(tiny, tmp_path, runs):
    """Checkpoints hold whole tensors either way, so a run can switch to sharding when it resumes."""
    import shutil

    out = tmp_path / "switched"
    out.mkdir()
    shutil.copytree(runs["none"] / "checkpoints" / "step_000004", out / "checkpoints" / "step_000004")
    config = write_config(tmp_path / "run.yaml", tiny_overrides(tiny, out) + RUN + ["train.sharding=fsdp"])
    (out / "config.yaml").write_text((runs["none"] / "config.yaml").read_text())
    _train(config, "train.resume=latest")
    a = load_file(str(runs["none"] / "checkpoints" / "step_000006" / "unet.safetensors"))
    b = load_file(str(out / "checkpoints" / "step_000006" / "unet.safetensors"))
    assert max_diff(a, b) <= 1e-5


def test_fsdp_refuses_what_it_cannot_shard(tiny, tmp_path):
    base = tiny_overrides(tiny, tmp_path) + ["train.sharding=fsdp"]
    with pytest.raises(ConfigError, match="lora.enabled.*train.sharding=fsdp"):
        load_config(None, base + ["lora.enabled=true", f"model.pretrained={tmp_path}"])
    with pytest.raises(ConfigError, match="train.compile.*train.sharding=fsdp"):
        load_config(None, base + ["train.compile=true"])
    assert load_config(None, base).train.sharding == "fsdp"


class _Launch:
    """What check_launch reads of an Accelerator."""

    def __init__(self, kind, ds_config=None):
        from types import SimpleNamespace

        self.distributed_type, self.num_processes = kind, 8
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config))


def test_accelerates_own_fsdp_plugin_is_refused_with_the_way_to_shard(tiny, tmp_path):
    from accelerate.utils import DistributedType

    from ldm.training.sharding import check_launch

    cfg = load_config(None, tiny_overrides(tiny, tmp_path))
    with pytest.raises(ConfigError, match="train.sharding=fsdp"):
        check_launch(cfg, _Launch(DistributedType.FSDP))
    check_launch(cfg, _Launch(DistributedType.MULTI_CPU))  # DDP launches pass


def test_the_shipped_deepspeed_config_is_validated_against_the_run(tiny, tmp_path):
    from accelerate.utils import DistributedType

    from ldm.training.sharding import check_launch

    ds = read_yaml(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")["deepspeed_config"]
    base = tiny_overrides(tiny, tmp_path)
    check_launch(load_config(None, base + ["train.mixed_precision=bf16"]), _Launch(DistributedType.DEEPSPEED, ds))
    wrong = load_config(None, base + ["train.gradient_accumulation_steps=4", "train.max_grad_norm=0.5"])
    with pytest.raises(ConfigError) as err:
        check_launch(wrong, _Launch(DistributedType.DEEPSPEED, ds))
    assert "gradient_accumulation_steps=1 but train.gradient_accumulation_steps is 4" in str(err.value)
    assert "gradient_clipping=1.0 but train.max_grad_norm is 0.5" in str(err.value)
    engine = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}
    with pytest.raises(ConfigError) as err:
        check_launch(load_config(None, base), _Launch(DistributedType.DEEPSPEED, engine))
    for part in ("train_micro_batch_size_per_gpu=3 but train.batch_size is 4", "ZeRO stage 3",
                 "fp16.enabled=True but train.mixed_precision is 'no'"):
        assert part in str(err.value)
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}}
    check_launch(load_config(None, base), _Launch(DistributedType.DEEPSPEED, auto))
    with pytest.raises(ConfigError, match="use one of them"):
        check_launch(load_config(None, base + ["train.sharding=fsdp"]), _Launch(DistributedType.DEEPSPEED, auto))
