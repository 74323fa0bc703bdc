"""Shared helpers of the SQL backends (names and prefixes)."""

from __future__ import annotations

import re

from stanchion.errors import ConfigError
from stanchion.urls import ParsedURL

__all__ = ["table_prefix"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def table_prefix(parsed: ParsedURL) -> str:
    """The ``?prefix=`` of a SQL URL as a safe identifier prefix ('' when absent)."""
    raw = parsed.query.get("prefix", "")
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", raw)
    if prefix and not _IDENT.match(prefix):
        prefix = "p_" + prefix
    if prefix and not _IDENT.match(prefix):
        raise ConfigError(f"{parsed.masked()}: prefix {raw!r} cannot name a table")
    return prefix
