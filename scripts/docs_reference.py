"""Write the generated reference pages: docs/reference/config.md (from the config schema) and
docs/reference/scripts.md (from every script's --help).

    python scripts/docs_reference.py            # rewrite both pages
    python scripts/docs_reference.py --check    # exit 1 if either page is out of date
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_INTRO = """# Scripts reference

Every script takes `--help`; this page is their `--help`, generated (`python scripts/docs_reference.py`). The
training scripts take `--config file.yaml` plus dotted overrides of any [config key](config.md).
"""


def scripts_reference() -> str:
    parts = [SCRIPTS_INTRO]
    for script in sorted((ROOT / "scripts").glob("*.py")):
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                              env={"COLUMNS": "100", "PATH": "", "HF_HUB_OFFLINE": "1"}, timeout=60)
        if done.returncode:
            raise SystemExit(f"{script.name} --help failed:\n{done.stderr}")
        usage = done.stdout.replace(str(ROOT) + "/", "").rstrip()
        parts += ["", f"## `scripts/{script.name}`", "", "```text", usage, "```"]
    return "\n".join(parts) + "\n"


def pages() -> dict[Path, str]:
    from ldm.config.reference import config_reference

    return {ROOT / "docs" / "reference" / "config.md": config_reference(),
            ROOT / "docs" / "reference" / "scripts.md": scripts_reference()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a page differs from what would be written")
    args = parser.parse_args()
    stale = []
    for path, text in pages().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        raise SystemExit(f"out of date: {', '.join(stale)}; run python scripts/docs_reference.py")


if __name__ == "__main__":
    main()
