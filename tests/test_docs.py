"""The README documents every config key, and its two commands are the ones CI runs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from ldm.config.schema import Config

ROOT = Path(__file__).resolve().parents[1]


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_readme_config_reference_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in _keys(Config) if f"`{k}`" not in readme]
    assert not missing, f"add these keys to the README's configuration reference: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:12] if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and commands[0].endswith("python scripts/quickstart.py")
    ci = (ROOT / ".ci" / "run").read_text()
    steps = commands[1].replace("pip install ", "pip install -q ").split(" && ")
    places = [ci.find(step) for step in steps]
    assert -1 not in places and places == sorted(places), f"CI must run, in order: {steps}"
