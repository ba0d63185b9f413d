"""The configuration reference, generated from the schema: every key with its type, default and the docstring
written under its field (docs/reference/config.md is this module's output; a test keeps them equal)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from typing import Any, Iterator

from ldm.config.schema import Config
from ldm.config.typed_yaml import describe_type

INTRO = """# Configuration reference

A config is YAML with the sections below; every key has a default, and any key can be set on the command line
as a dotted override (`train.lr=2e-4`). Unknown keys, wrong types and impossible values (a resolution the VAE and
UNet cannot divide, a cross-attention width that does not match the text encoder, a missing dataset column) fail
before any model is built, with a message that names the key and what would be valid. The resolved config is
saved beside every checkpoint and in every export (`ldm_config.yaml`).

This page is generated from the schema (`python scripts/docs_reference.py`).
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (PEP 257 attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field, str | None]]:
    """(dotted key, annotation, field, docstring) of every leaf key, sections in schema order."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f, docs.get(f.name)


def undocumented(cls: type = Config) -> list[str]:
    """The keys whose field has no docstring (each key must say what it does)."""
    return [key for key, _, _, doc in keys(cls) if not doc]


def _default(f: dataclasses.Field) -> str:
    value: Any = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"  # numbers and lists as YAML reads them


def config_reference() -> str:
    """The Markdown page: one table per top-level section."""
    lines, section = [INTRO], None
    for key, tp, f, doc in keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        kind = describe_type(tp).replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {_default(f).replace('|', chr(92) + '|')} | "
                     f"{(doc or '').replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
