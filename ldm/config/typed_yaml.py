"""Typed values from plain YAML: a nested dict checked against dataclass annotations (Literal, Optional,
lists, nested dataclasses), with errors that name the dotted key, the valid choices and, for an
unknown key, the closest known one. The schema itself lives in `ldm.config`."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

import yaml

from ldm.errors import ConfigError


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in inner) + " or null"
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in its typed form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected {describe_type(tp)}, got {value!r}")
        return build(tp, value, key)
    if origin is typing.Union:
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in choices:
            raise ConfigError(
                f"config key '{key}': {value!r} is not valid; choose one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {describe_type(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; take it as the number it spells.
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {describe_type(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{full}'.{hint} Valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=2e-4' -> ('train.lr', 0.0002). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None
