"""The documentation: the README's two commands are the ones CI runs, the generated reference pages are in step
with the schema and the scripts, every config key says what it does, and measurements live on results pages."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from ldm.config.reference import config_reference, undocumented

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:12] if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and commands[0].endswith("python scripts/quickstart.py")
    ci = (ROOT / ".ci" / "run").read_text()
    steps = commands[1].replace("pip install ", "pip install -q ").split(" && ")
    places = [ci.find(step) for step in steps]
    assert -1 not in places and places == sorted(places), f"CI must run, in order: {steps}"


def test_the_readme_is_a_first_screen():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_config_key_says_what_it_does():
    assert undocumented() == []

    @dataclasses.dataclass
    class Planted:  # negative control: a field without a docstring is found
        documented: int = 1
        """a documented field"""
        silent: int = 2

    assert undocumented(Planted) == ["silent"]


def test_the_config_reference_is_generated_from_the_schema():
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert page == config_reference(), "run python scripts/docs_reference.py"
    assert "| `train.lr` |" in page and "| `data.buckets.step` |" in page


def test_the_scripts_reference_is_every_scripts_help():
    done = subprocess.run([sys.executable, "scripts/docs_reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    page = (ROOT / "docs" / "reference" / "scripts.md").read_text()
    assert all(f"## `scripts/{p.name}`" in page for p in (ROOT / "scripts").glob("*.py"))


# A table cell holding a measurement: a number with a unit of time, speed, memory or share.
MEASUREMENT = re.compile(r"\d(\.\d+)?\s*(%|×|ms\b|s/step|img/s|images/s|MiB|GiB|dB|min\b|TFLOP|MFU)")


def measurement_tables(markdown: str) -> list[str]:
    """The first row of every Markdown table whose body holds a measurement."""
    found, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append(row)
            if MEASUREMENT.search("\n".join(body)):
                found.append(line)
    return found


def test_measurement_tables_live_on_results_pages():
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    outside = {str(p.relative_to(ROOT)): t for p in pages if "results" not in p.relative_to(ROOT).parts
               and (t := measurement_tables(p.read_text()))}
    assert outside == {}
    planted = "| run | s/step |\n| --- | --- |\n| a | 0.41 s/step |\n"  # negative control
    assert measurement_tables(planted) == ["| run | s/step |"]
    assert measurement_tables("| key | default |\n| --- | --- |\n| `train.lr` | `0.0001` |\n") == []


def test_every_results_table_says_when_where_and_how_it_was_measured():
    for page in (ROOT / "docs" / "results").glob("*.md"):
        if page.name == "index.md":
            continue
        text = page.read_text()
        sections = re.split(r"\n## ", text)
        for section in sections:
            if measurement_tables(section):
                assert re.search(r"\d{4}-\d{2}-\d{2}", section), (page.name, section[:80])
                assert "machine" in section and "command" in section.lower(), (page.name, section[:80])
