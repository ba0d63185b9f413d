"""Every script: a user's mistake exits with status 2 and one message that names it, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_resume import ROOT, _env

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
    proc = subprocess.run([sys.executable, f"scripts/{script}", *CASES[case]], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert ("nonexistent" in proc.stderr) or ("train.lrr" in proc.stderr)  # it names the culprit
