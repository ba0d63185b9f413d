"""Training you can trust: exact resume after SIGKILL, crash-safe checkpoints, accumulation, two processes,
numerical guards, disk space."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides, write_config
from helpers import ROOT, launch_and_kill, max_diff, samples_of, script_env, train_on_two_processes
from ldm.config.loading import load_config

# A run long enough to be killed mid-epoch: 24 images, 8 samples per optimizer step (batch 4 ×
# accumulation 2), so an epoch is 3 steps and step 4 is inside the second epoch.
RUN = ["data.shapes.num_images=24", "train.batch_size=4", "train.gradient_accumulation_steps=2",
       "train.max_steps=9", "train.checkpoint_every=2", "train.checkpoints_total_limit=2", "train.ema_decay=0.9",
       "train.lr_scheduler=cosine", "train.lr_warmup_steps=2", "train.record_samples=true",
       "train.log_every=3"]


def _final_state(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = out / "checkpoints" / "step_000009"
    return {"unet": load_file(str(folder / "unet.safetensors")), "ema": load_file(str(folder / "ema.safetensors")),
            "state": json.loads((folder / "state.json").read_text())}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> Path:
    from ldm.training.loop import train

    out = tmp_path_factory.mktemp("uninterrupted")
    train(load_config(None, tiny_overrides(tiny, out) + RUN), show_progress=False)
    return out


@pytest.mark.slow
def test_exact_resume_after_sigkill_mid_epoch(tiny, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    config = write_config(tmp_path / "run.yaml", tiny_overrides(tiny, out) + RUN)
    launch_and_kill(tmp_path, config, "step", 0.4, out / "checkpoints" / "step_000004")
    assert not (out / "checkpoints" / "step_000009").exists(), "the run was meant to die mid-way"
    proc = subprocess.run([sys.executable, "scripts/train_text2img.py", "--config", str(config), "train.resume=latest"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "step_000004" in proc.stdout
    a, b = _final_state(uninterrupted), _final_state(out)
    assert max_diff(a["unet"], b["unet"]) <= 1e-6
    assert max_diff(a["ema"], b["ema"]) <= 1e-6
    assert a["state"]["lr_schedule"]["_last_lr"] == pytest.approx(b["state"]["lr_schedule"]["_last_lr"], rel=1e-9)
    # The same samples after the resume as in the uninterrupted run (steps 5.. were redone or new).
    ref, resumed = samples_of(uninterrupted), samples_of(out)
    for step in range(5, 10):
        assert resumed[step][-2:] == ref[step], step  # the last two micro-batches written for each step


@pytest.mark.slow
def test_sigkill_while_checkpoint_is_written(tiny, tmp_path, uninterrupted):
    out = tmp_path / "killed-in-save"
    config = write_config(tmp_path / "run.yaml", tiny_overrides(tiny, out) + RUN)
    launch_and_kill(tmp_path, config, "checkpoint", 30.0,
                     out / "checkpoints" / "step_000004.tmp" / "unet.safetensors")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004.tmp"]
    proc = subprocess.run([sys.executable, "scripts/train_text2img.py", "--config", str(config), "train.resume=latest"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ignoring incomplete checkpoint" in proc.stdout and "step_000004.tmp" in proc.stdout
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert max_diff(_final_state(uninterrupted)["unet"], _final_state(out)["unet"]) <= 1e-6
    # Retention: only the newest two complete checkpoints are kept.
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".tmp")) == ["step_000008", "step_000009"]


def test_accumulation_equals_one_big_batch(tiny, tmp_path):
    from ldm.training.loop import train

    base = tiny_overrides(tiny, tmp_path) + ["train.max_steps=2", "train.checkpoint_every=1", "train.ema_decay=0.9",
                                             "train.lr_scheduler=linear", "train.lr_warmup_steps=1"]
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'k2'}", "train.batch_size=2",
                                     "train.gradient_accumulation_steps=2"]), show_progress=False)
    train(load_config(None, base + [f"train.output_dir={tmp_path / 'k1'}", "train.batch_size=4"]), show_progress=False)
    a = tmp_path / "k2" / "checkpoints" / "step_000002"
    b = tmp_path / "k1" / "checkpoints" / "step_000002"
    assert max_diff(load_file(str(a / "unet.safetensors")), load_file(str(b / "unet.safetensors"))) <= 1e-6
    state = json.loads((a / "state.json").read_text())
    # Optimizer, EMA and LR schedule stepped once per optimizer step, not per micro-batch.
    assert state["ema"]["optimization_step"] == 2 and state["lr_schedule"]["last_epoch"] == 2
    assert state["micro_step"] == 4


@pytest.mark.slow
def test_two_processes_match_one_process_at_twice_the_batch(tiny, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): identical ranks, different samples, one LR schedule."""
    # adam_epsilon 1e-4: DDP's all-reduce sums gradients in another order than one big batch (fp32 noise ~1e-7
    # relative), and Adam's update g/(|g| + ε) turns that noise into lr-sized differences wherever |g| ≈ ε.
    # With ε well above that scale the two runs agree to 1.6e-7 (1.4e-4 with ε = 1e-8).
    common = tiny_overrides(tiny, tmp_path) + ["train.max_steps=3", "train.checkpoint_every=3",
                                               "train.adam_epsilon=1e-4",
                                               "train.record_samples=true", "train.lr_scheduler=cosine"]
    two = write_config(tmp_path / "two.yaml", common + [f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2",
                                                         "train.validate_every=2"])  # rank 0 validates mid-run
    train_on_two_processes(two)
    from ldm.training.loop import train

    train(load_config(None, common + [f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4"]),
          show_progress=False)
    a, b = tmp_path / "two" / "checkpoints" / "step_000003", tmp_path / "one" / "checkpoints" / "step_000003"
    assert max_diff(load_file(str(a / "unet.safetensors")), load_file(str(b / "unet.safetensors"))) <= 1e-6
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert sa["world_size"] == 2 and sa["lr_schedule"]["last_epoch"] == sb["lr_schedule"]["last_epoch"] == 3
    assert sorted(p.name for p in a.glob("rng_rank*.safetensors")) == ["rng_rank0.safetensors", "rng_rank1.safetensors"]
    r0, r1, one = samples_of(tmp_path / "two", 0), samples_of(tmp_path / "two", 1), samples_of(tmp_path / "one")
    for step in (1, 2, 3):
        assert set(r0[step][0]).isdisjoint(r1[step][0])  # ranks see different samples (so draw different noise)
        assert r0[step][0] + r1[step][0] == one[step][0]  # together: the 1-process batch, in order


@pytest.mark.slow
def test_two_machines_on_loopback_match_one_process(tiny, tmp_path):
    """--num_machines 2 (one process each, rendezvous on 127.0.0.1), as on a real cluster: same weights and
    same samples as one process at the same global batch."""
    from ldm.training.loop import train

    common = tiny_overrides(tiny, tmp_path) + ["train.max_steps=3", "train.checkpoint_every=3",
                                               "train.adam_epsilon=1e-4", "train.record_samples=true"]
    config = write_config(tmp_path / "nodes.yaml", common + [f"train.output_dir={tmp_path / 'nodes'}",
                                                             "train.batch_size=2"])
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                               "scripts/train_text2img.py", "--config", str(config)],
                              cwd=ROOT, env={**script_env(), "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), logs[0][-2000:] + logs[1][-2000:]
    assert all("final weights agree on 2 process(es)" in log for log in logs)
    train(load_config(None, common + [f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4"]),
          show_progress=False)
    a, b = (tmp_path / n / "checkpoints" / "step_000003" / "unet.safetensors" for n in ("nodes", "one"))
    assert max_diff(load_file(str(a)), load_file(str(b))) <= 1e-6
    r0, r1, one = samples_of(tmp_path / "nodes", 0), samples_of(tmp_path / "nodes", 1), samples_of(tmp_path / "one")
    assert all(r0[step][0] + r1[step][0] == one[step][0] for step in (1, 2, 3))


def test_nonfinite_loss_is_skipped_then_stops(tiny, tmp_path, monkeypatch, capsys, recwarn):
    import ldm.training.loop

    inner = ldm.training.loop.train_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = inner(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(ldm.training.loop, "train_step", flaky)
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["train.max_steps=4", "train.checkpoint_every=2"])
    ldm.training.loop.train(cfg, show_progress=False)
    assert "step 2: non-finite loss or gradient" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "checkpoints" / "step_000004" / "unet.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    calls["n"] = 0
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "stop") + ["train.max_steps=4", "train.nonfinite=stop"])
    with pytest.raises(FloatingPointError, match="stopping at step 2 after 1 non-finite step"):
        ldm.training.loop.train(cfg, show_progress=False)

    monkeypatch.setattr(ldm.training.loop, "train_step", lambda *a, **k: inner(*a, **k) * float("nan"))
    cfg = load_config(None, tiny_overrides(tiny, tmp_path / "streak") + ["train.max_steps=9",
                                                                        "train.max_nonfinite_steps=3"])
    with pytest.raises(FloatingPointError, match="after 3 non-finite step"):
        ldm.training.loop.train(cfg, show_progress=False)
    # skipped first updates still step the schedule, without PyTorch's warning about the order
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_full_disk_fails_before_training(tiny, tmp_path, monkeypatch):
    import shutil

    from ldm.training.checkpoint import DiskSpaceError
    from ldm.training.loop import train

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + ["train.checkpoint_every=1"])
    with pytest.raises(DiskSpaceError, match="GiB is free"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_a_path_that_is_not_a_checkpoint(tiny, tmp_path):
    from ldm.training.loop import train

    cfg = load_config(None, tiny_overrides(tiny, tmp_path) + [f"train.resume={tmp_path}"])
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        train(cfg, show_progress=False)


def test_hub_token_is_never_taken_from_the_cli_nor_written(tiny, tmp_path, monkeypatch):
    from ldm.errors import ConfigError
    from ldm.training.loop import train

    secret = "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42"
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, [f"train.hub_token={secret}"])
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(tiny, out) + ["train.report_to=tensorboard", "train.checkpoint_every=1",
                                                         "train.validate_every=1"]), show_progress=False)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in written)  # the tracker did write logs
    assert not [p for p in written if secret.encode() in p.read_bytes()]


def test_validation_with_ema_restores_the_training_weights(tiny, tmp_path):
    from ldm.training.loop import train

    base = tiny_overrides(tiny, tmp_path) + ["train.max_steps=3", "train.checkpoint_every=3", "train.ema_decay=0.5",
                                             "train.ema_warmup=true"]
    for name, every in (("v", 1), ("n", 0)):
        train(load_config(None, base + [f"train.output_dir={tmp_path / name}", f"train.validate_every={every}"]),
              show_progress=False)
    a = tmp_path / "v" / "checkpoints" / "step_000003"
    b = tmp_path / "n" / "checkpoints" / "step_000003"
    assert max_diff(load_file(str(a / "unet.safetensors")), load_file(str(b / "unet.safetensors"))) == 0.0
    assert max_diff(load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))) == 0.0
    # and the EMA weights really differ from the training weights (so the swap was not a no-op)
    unet, ema = load_file(str(a / "unet.safetensors")), load_file(str(a / "ema.safetensors"))
    assert (unet["conv_in.weight"] - ema["conv_in.weight"]).abs().max() > 1e-6


def test_the_fused_ema_update_is_diffusers_ema_update():
    """ParameterEMA's one foreach lerp gives what EMAModel.step gives (with warm-up, so the decay changes every
    step), and leaves its step count and decay where EMAModel would."""
    from diffusers.training_utils import EMAModel

    from ldm.training.validation import ParameterEMA

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((8, 3), (5,), (2, 2, 3))]
    ours = ParameterEMA(params, decay=0.9, use_ema_warmup=True)
    theirs = EMAModel(params, decay=0.9, use_ema_warmup=True)
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ours.step(params)
        theirs.step(params)
    assert ours.optimization_step == theirs.optimization_step == 4
    assert ours.cur_decay_value == theirs.cur_decay_value
    for a, b, p in zip(ours.shadow_params, theirs.shadow_params, params):
        assert torch.allclose(a, b, atol=1e-6) and (a - p).abs().max() > 0.1  # averaged, not a copy
