"""The command line every script shares: `--config file.yaml` plus dotted overrides (`train.lr=2e-4`), and a
user's mistake reported as one message with exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ldm.config import ConfigError


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (see configs/); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.resolution=256")
    return parser


def run_script(main: Callable[[], None]) -> None:
    """Run a script's `main()`: a user's mistake (a ConfigError: a bad key, value, path or file) prints one
    message that names it and the fix, and exits with status 2; tracebacks are left for ldm's own bugs."""
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
