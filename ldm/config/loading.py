"""Config files: YAML read strictly (duplicate keys refused), dotted overrides applied, the result checked; and
saved."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from ldm.config.checks import check_config
from ldm.config.schema import Config
from ldm.config.typed_yaml import build, parse_override, set_dotted
from ldm.errors import ConfigError


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (or start from defaults), apply dotted overrides, type-check and validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (see configs/ for examples)")
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model, data, train…)")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    cfg = build(Config, tree)
    check_config(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently,
    so a second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                                  "merge the two into one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax or encoding error, or a repeated key, names the file and the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem} (check the indentation "
                          "and quoting there)") from None


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
