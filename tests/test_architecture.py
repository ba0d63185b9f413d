"""The package's rules, checked so they stay: layers and no circles (import-linter, with planted violations),
ldm imports at module level, module and function sizes, no question about which kind trains outside the
trainables, and wrappers that forward the whole "what trains" interface."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    lint = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "ldm", tmp_path / "ldm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    root = _copy_package(tmp_path)
    with (root / "ldm" / "data" / "transforms.py").open("a") as f:
        f.write("\nimport ldm.training.loop  # planted: data must not import training\n")
    done = _lint_imports(root)
    assert done.returncode != 0
    assert "ldm.data.transforms -> ldm.training.loop" in done.stdout


def test_a_circle_between_sibling_modules_breaks_the_acyclic_contract(tmp_path):
    root = _copy_package(tmp_path)  # ldm.data.stream imports ldm.data.transforms: plant the way back
    with (root / "ldm" / "data" / "transforms.py").open("a") as f:
        f.write("\nimport ldm.data.stream  # planted circle\n")
    done = _lint_imports(root)
    assert done.returncode != 0
    assert "No import circles among the modules of any package BROKEN" in done.stdout


def _python_files() -> list[Path]:
    return sorted((ROOT / "ldm").rglob("*.py"))


def deferred_ldm_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every `ldm` import inside a function."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] == "ldm":
                    found.append((inner.lineno, inner.module))
                elif isinstance(inner, ast.Import):
                    found += [(inner.lineno, a.name) for a in inner.names if a.name.split(".")[0] == "ldm"]
    return found


def test_ldm_imports_sit_at_module_level_but_the_listed_deferrals():
    allowed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ldm"]["deferred_imports"])
    found = {f"{p.relative_to(ROOT)}: {module}" for p in _python_files()
             for _, module in deferred_ldm_imports(p.read_text())}
    assert found == allowed, f"unlisted: {sorted(found - allowed)}; listed but gone: {sorted(allowed - found)}"
    # negative control: an import inside a function is found
    assert deferred_ldm_imports("def f():\n    from ldm.diffusion import snr\n") == [(2, "ldm.diffusion")]


def oversized(source: str, name: str) -> list[str]:
    """What breaks the size rules in one module's source."""
    problems = []
    if len(source.splitlines()) > MAX_MODULE_LINES:
        problems.append(f"{name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                problems.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return problems


def test_modules_and_functions_stay_small():
    problems = [p for f in _python_files() for p in oversized(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized(long_function, "f.py") == [f"f.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]  # negative control
    assert oversized("x = 1\n" * (MAX_MODULE_LINES + 1), "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines"]


# A branch on which kind a config or a trainable trains: the config's kind keys, a trained text encoder's
# presence, or the class of a trainable.
KIND_QUESTION = re.compile(r"\.lora\.enabled|conditioning\.type|distill\.enabled|text_encoder\.train\b|"
                           r"trainable\.(text_encoder|controlnet|adapter|sketch_threshold)|"
                           r"\b(LoRA|SketchControlNet|StyleAdapter|ConsistencyDistillation|TrainedTextEncoder)\b")


def kind_questions(source: str) -> list[str]:
    """The conditions (if, ternary, while, assert, comprehension filters, boolean operands) and isinstance /
    hasattr calls in `source` that ask which kind trains."""
    found = []
    for node in ast.walk(ast.parse(source)):
        tests = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, ast.comprehension):
            tests += node.ifs
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "hasattr", "getattr"):
            tests.append(node)
        found += [ast.unparse(t) for t in tests if KIND_QUESTION.search(ast.unparse(t))]
    return found


def test_only_the_trainables_and_the_config_ask_which_kind_trains():
    exempt = (ROOT / "ldm" / "training" / "trainables", ROOT / "ldm" / "config")
    found = {str(p.relative_to(ROOT)): q for p in _python_files() if not p.is_relative_to(exempt[0])
             and not p.is_relative_to(exempt[1]) and (q := kind_questions(p.read_text()))}
    assert found == {}
    # negative controls: the questions the old loop asked are found
    assert kind_questions("x = a if cfg.lora.enabled else b") == ["cfg.lora.enabled"]
    assert kind_questions("if trainable.text_encoder is not None:\n    pass") == ["trainable.text_encoder is not None"]
    assert kind_questions("ok = isinstance(t, LoRA)") == ["isinstance(t, LoRA)"]


def unforwarded(wrapper: type, base: type) -> list[str]:
    """Public methods of `base` that `wrapper` inherits from `base` itself (neither forwarded nor overridden)."""
    names = [n for n, v in vars(base).items() if callable(v) and not n.startswith("_")]
    return [n for n in names if getattr(wrapper, n) is getattr(base, n)]


def test_every_wrapper_forwards_or_overrides_the_whole_interface():
    from ldm.training.trainables.base import Trainable, Wrapper
    from ldm.training.trainables.lora import LoRA
    from ldm.training.trainables.text_encoder import TrainedTextEncoder

    for wrapper in (Wrapper, LoRA, TrainedTextEncoder):
        assert unforwarded(wrapper, Trainable) == [], wrapper.__name__
    # negative control: a method added to the interface and not to the wrapper is found
    extended = type("Extended", (Trainable,), {"new_method": lambda self: None})
    forwarding = {name: getattr(Wrapper, name) for name in vars(Wrapper) if not name.startswith("__")}
    half = type("Half", (extended,), forwarding)
    assert unforwarded(half, extended) == ["new_method"]

