"""The ``stanchion`` command.

Each subcommand is a module ``stanchion.cli.<name>`` (``-`` in the command
name is ``_`` in the module name) that defines ``HELP`` (one line) and
``main(argv: list[str]) -> int``. Subcommand modules import heavy things inside
``main`` so that ``stanchion --help`` stays fast.

Exit codes: 0 ok, 1 runtime error (printed as ``ErrorName: message``, no
traceback unless ``--debug`` or ``STANCHION_DEBUG=1``), 2 usage error,
130 interrupted.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
from collections.abc import Sequence
from types import ModuleType

from stanchion import __version__
from stanchion.errors import StanchionError

__all__ = ["main"]

_USAGE = "usage: stanchion [--version] [--debug] [--help] <command> [args...]"


def _commands() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "main") and hasattr(module, "HELP"):
            found[info.name.replace("_", "-")] = module
    return found


def _help(commands: dict[str, ModuleType]) -> str:
    width = max((len(n) for n in commands), default=8) + 2
    lines = [
        _USAGE,
        "",
        "stanchion: circuit breaker, ambassador, sidecar, pub/sub, event sourcing,",
        "CQRS, sharding and leader election for Python services.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}{mod.HELP}" for name, mod in sorted(commands.items())]
    lines += [
        "",
        "options:",
        "  --version     print stanchion, Python and platform versions",
        "  --debug       show tracebacks for errors",
        "  -h, --help    show this help",
        "",
        "Run 'stanchion <command> --help' for a command's options.",
    ]
    return "\n".join(lines)


def _fail_usage(message: str) -> int:
    print(f"stanchion: error: {message}", file=sys.stderr)
    print(_USAGE, file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stanchion`` command line; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("STANCHION_DEBUG", "") not in ("", "0")
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-h", "--help"):
            print(_help(_commands()))
            return 0
        if opt == "--version":
            print(
                f"stanchion {__version__} (Python {platform.python_version()}, "
                f"{platform.system()} {platform.machine()})"
            )
            return 0
        if opt == "--debug":
            debug = True
            continue
        return _fail_usage(f"unknown option {opt!r}")
    if not args:
        print(_help(_commands()), file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    commands = _commands()
    module = commands.get(name)
    if module is None:
        known = ", ".join(sorted(commands)) or "none"
        return _fail_usage(f"unknown command {name!r} (commands: {known})")
    try:
        code: int = module.main(rest)
        return code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except StanchionError as exc:
        if debug:
            raise
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if debug:
            raise
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
