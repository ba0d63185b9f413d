"""The command line every script shares: `--config file.yaml` plus dotted overrides (`train.lr=2e-4`), and a
user's mistake reported as one message with exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from ldm.data.decode import BadSample, decode_image
from ldm.errors import ConfigError, UserError


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (see configs/); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.resolution=256")
    return parser


def run_script(main: Callable[[], None]) -> None:
    """Run a script's `main()`: a user's mistake (a UserError: a bad key, value, path or file, a full disk) prints
    one message that names it and the fix, and exits with status 2; tracebacks are left for ldm's own bugs."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A process of a multi-process launch, its work written and flushed: leave without tearing down the
        # process group, whose gloo destructor can deadlock (see ldm.training.finish._KEPT_UNTIL_EXIT).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def text_argument(path: str, flag: str) -> str:
    """The UTF-8 text of a file given on the command line; a missing or unreadable one is a user error."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag} {path!r}: cannot be read as UTF-8 text ({err})") from None


def image_argument(path: Optional[str], flag: str):
    """A picture given on the command line, decoded as training decodes one (EXIF rotation, first frame);
    None when the flag was not given. A missing or damaged file is a user error naming the flag."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag} {path!r}: no such file")
    try:
        return decode_image(file, path)
    except BadSample as bad:
        raise ConfigError(f"{flag} {bad}; give a PNG, JPEG or WebP picture") from None
