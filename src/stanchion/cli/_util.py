"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``stanchion <cmd>: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print one clear line and exit with status 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"Run '{self.prog} --help' for usage.", file=sys.stderr)
        raise SystemExit(2)


def parser(command: str, description: str) -> ArgumentParser:
    """An argument parser for ``stanchion <command>``."""
    return ArgumentParser(prog=f"stanchion {command}", description=description)


def env(name: str, default: str | None = None) -> str | None:
    """The value of ``STANCHION_<NAME>`` or ``default`` (options fall back to it)."""
    return os.environ.get(f"STANCHION_{name.upper()}", default)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop where available, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)
