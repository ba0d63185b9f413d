"""The errors a user can fix: their messages name the problem and the fix (scripts print them without a traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake or a situation the user can fix (the message says how); scripts print it without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key and what would be valid."""
