"""Every script: a user's mistake exits with status 2 and one message that names it, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_overrides
from helpers import ROOT, script_env

# Every test here runs scripts in fresh processes (each imports torch and Diffusers): part of the full suite only.
pytestmark = pytest.mark.slow

NOPE = "/nonexistent/ldm-test"
CASES = {
    "train_text2img.py": ["--config", f"{NOPE}.yaml"],
    "train_text2img.py (unknown key)": ["train.lrr=1"],
    "train_autoencoder.py": ["--config", f"{NOPE}.yaml"],
    "quickstart.py": ["--config", f"{NOPE}.yaml"],
    "cache_dataset.py": ["--config", f"{NOPE}.yaml"],
    "benchmark.py": ["--config", f"{NOPE}.yaml"],
    "generate.py": ["--model", NOPE, "--prompt", "a red circle"],
    "generate.py (lora)": ["--model", NOPE, "--prompt", "a red circle", "--lora", f"{NOPE}.safetensors:0.5"],
    "evaluate.py": ["--model", NOPE],
    "evaluate_conditions.py": ["--model", NOPE],
    "evaluate_lora.py": ["--base", NOPE, "--concept", "purple * *"],
    "publish.py": ["--model", NOPE, "--repo-id", "me/model", "--dry-run"],
    "single_file.py": ["export", "--model", NOPE, "--out", f"{NOPE}.safetensors"],
    "visualise.py": ["--model", NOPE],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_exits_2_with_one_message(case):
    script = case.split(" ")[0]
    proc = subprocess.run([sys.executable, f"scripts/{script}", *CASES[case]], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert ("nonexistent" in proc.stderr) or ("train.lrr" in proc.stderr)  # it names the culprit


def _used_output_dir(tmp, tiny):
    (tmp / "run" / "checkpoints" / "step_000004").mkdir(parents=True)
    return "train_text2img.py", [*tiny_overrides(tiny, tmp / "run")], "already holds another run"


def _repeated_section(tmp, tiny):
    (tmp / "c.yaml").write_text("train:\n  lr: 1e-4\ntrain:\n  max_steps: 3\n")
    return "train_text2img.py", ["--config", str(tmp / "c.yaml")], "'train' is given twice"


def _yaml_syntax(tmp, tiny):
    (tmp / "c.yaml").write_text("train:\n  lr: 1e-4\n   max_steps: 3\n")
    return "cache_dataset.py", ["--config", str(tmp / "c.yaml")], "is not valid YAML at line 3"


def _vae_in_use(tmp, tiny):
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text("{}")
    return "train_autoencoder.py", [f"autoencoder.output_dir={tmp / 'vae'}"], "already holds a VAE"


def _json_array(tmp, tiny):
    (tmp / "data").mkdir()
    (tmp / "data" / "metadata.jsonl").write_text('[{"file_name": "a.png", "text": "a"}]')
    return "cache_dataset.py", [*tiny_overrides(tiny, tmp / "run"), f"data.dataset={tmp / 'data'}"], "JSON array"


def _damaged_state(tmp, tiny):
    folder = tmp / "run" / "checkpoints" / "step_000002"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text('{"files": {}, "step": "two"}')
    return "train_text2img.py", [*tiny_overrides(tiny, tmp / "run"), f"train.resume={folder}"], "state.json"


def _used_out(tmp, tiny):
    (tmp / "out").mkdir()
    (tmp / "out" / "0000_seed0.png").write_bytes(b"")
    return "generate.py", ["--model", NOPE, "--prompt", "x", "--out", str(tmp / "out")], "--out"


def _broken_init_image(tmp, tiny):
    (tmp / "in.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return "generate.py", ["--model", NOPE, "--prompt", "x", "--init-image", str(tmp / "in.png"), "--out",
                           str(tmp / "o")], "--init-image"


def _checkpoint_published(tmp, tiny):
    (tmp / "step_000002").mkdir()
    (tmp / "step_000002" / "state.json").write_text("{}")
    return "publish.py", ["--model", str(tmp / "step_000002"), "--repo-id", "me/m", "--dry-run"], "training checkpoint"


def _pickle_as_model(tmp, tiny):
    import torch

    torch.save({"unet": torch.zeros(4)}, tmp / "model.safetensors")  # a pickle under a safetensors name
    return "generate.py", ["--model", str(tmp / "model.safetensors"), "--prompt", "x", "--out", str(tmp / "o")], \
        "a PyTorch checkpoint"


def _cut_short_single_file(tmp, tiny):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(256)}, str(tmp / "whole.safetensors"))
    data = (tmp / "whole.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return "single_file.py", ["import", "--file", str(tmp / "cut.safetensors"), "--out", str(tmp / "pipe")], \
        "cut short"


SITUATIONS = {
    "a fresh run into a used output_dir": _used_output_dir,
    "a YAML section given twice": _repeated_section,
    "a YAML syntax error": _yaml_syntax,
    "stage 1 into a folder holding a VAE": _vae_in_use,
    "metadata.jsonl holding a JSON array": _json_array,
    "resume from a damaged state.json": _damaged_state,
    "generate --out into a used folder": _used_out,
    "generate --init-image that is not an image": _broken_init_image,
    "generate --steps 0": lambda tmp, tiny: ("generate.py", ["--model", NOPE, "--prompt", "x", "--steps", "0", "--out",
                                                              str(tmp / "o")], "--steps"),
    "generate --guidance-scale -1": lambda tmp, tiny: ("generate.py", ["--model", NOPE, "--prompt", "x",
                                                                        "--guidance-scale", "-1"], "--guidance-scale"),
    "generate --prompts-file that does not exist": lambda tmp, tiny: ("generate.py", [
        "--model", NOPE, "--prompts-file", f"{NOPE}.txt"], "--prompts-file"),
    "publish a checkpoint folder": _checkpoint_published,
    "generate --model a pickle named .safetensors": _pickle_as_model,
    "generate --model a missing .safetensors": lambda tmp, tiny: ("generate.py", [
        "--model", f"{NOPE}.safetensors", "--prompt", "x", "--out", str(tmp / "o")], "no such file"),
    "single_file.py import of a file cut short": _cut_short_single_file,
}


@pytest.mark.parametrize("situation", sorted(SITUATIONS))
def test_a_bad_situation_exits_2_with_one_message_that_names_it(situation, tiny, tmp_path):
    script, args, expected = SITUATIONS[situation](tmp_path, tiny)
    proc = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1 and expected in proc.stderr
