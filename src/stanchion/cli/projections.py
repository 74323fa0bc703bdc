"""``stanchion projections``: status, rebuild and run of an application's projections.

    stanchion projections status [NAME] --app module:attr [--json]
    stanchion projections rebuild NAME --app module:attr
    stanchion projections run [NAME ...] --app module:attr

``--app`` names a ``stanchion.cqrs.App`` (or a function returning one, sync
or async) listing the event store, the projections and their read models;
it falls back to ``$STANCHION_APP``. The current directory is on the import
path, as with ``python -m``.
"""

from __future__ import annotations

import sys
from typing import Any

HELP = "projections: status (checkpoints and lag), rebuild NAME into a shadow view, run"


def _load(ref: str) -> Any:
    import importlib
    import inspect
    import os

    from stanchion.errors import ConfigError

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app {ref!r}: expected module:attr, e.g. myshop.views:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {ref!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--app {ref!r}: {module_name!r} has no attribute {attr!r}") from None
    if callable(obj) and not hasattr(obj, "projections"):
        obj = obj()
    if not inspect.isawaitable(obj) and not hasattr(obj, "projections"):
        raise ConfigError(f"--app {ref!r} is not a stanchion.cqrs.App")
    return obj


async def _app(ref: str) -> Any:
    import inspect

    from stanchion.cqrs import App
    from stanchion.errors import ConfigError

    app = _load(ref)
    if inspect.isawaitable(app):
        app = await app
    if not isinstance(app, App):
        raise ConfigError(f"--app {ref!r} is a {type(app).__name__}, not a stanchion.cqrs.App")
    return app


def _fmt_age(ts: float | None) -> str:
    import time

    if ts is None:
        return "-"
    return f"{max(0.0, time.time() - ts):.1f}s ago"


async def _status(ref: str, names: list[str], as_json: bool) -> int:
    import json

    app = await _app(ref)
    try:
        chosen = names or sorted(app.projections)
        rows = []
        for name in chosen:
            runner = await app.runner(name, elected=False)
            st = await runner.status()
            cp = await (await app.read_model_of(name)).checkpoint(name)
            rows.append((st, cp))
    finally:
        await app.aclose()
    if as_json:
        out = [
            {
                "name": st.name,
                "checkpoint": st.checkpoint,
                "head": st.head,
                "lag_events": st.lag.events,
                "lag_seconds": st.lag.seconds,
                "parked": st.parked,
                "token": cp.token,
                "updated_at": cp.updated_at,
            }
            for st, cp in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    header = ("PROJECTION", "CHECKPOINT", "HEAD", "LAG", "LAG_S", "PARKED", "TOKEN", "UPDATED")
    table = [header]
    for st, cp in rows:
        table.append(
            (
                st.name,
                str(st.checkpoint),
                "-" if st.head is None else str(st.head),
                "-" if st.lag.events is None else str(st.lag.events),
                "-" if st.lag.seconds is None else f"{st.lag.seconds:.2f}",
                str(st.parked),
                "-" if cp.token is None else str(cp.token),
                _fmt_age(cp.updated_at),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


async def _rebuild(ref: str, name: str) -> int:
    import time

    app = await _app(ref)
    try:
        start = time.perf_counter()
        cp = await app.rebuild(name)
        took = time.perf_counter() - start
    finally:
        await app.aclose()
    print(f"rebuilt {name}: checkpoint {cp.position} in {took:.2f}s (swapped in atomically)")
    return 0


async def _run(ref: str, names: list[str]) -> int:
    import asyncio

    app = await _app(ref)
    try:
        if names:
            for n in names:
                app.projection(n)
            for n in list(app.projections):
                if n not in names:
                    del app.projections[n]
        print(
            f"projecting {', '.join(sorted(app.projections))} as {app.identity}",
            file=sys.stderr,
            flush=True,
        )
        await app.run()
    except asyncio.CancelledError:
        pass
    finally:
        await app.aclose()
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``stanchion projections``."""
    from stanchion.cli import _util

    p = _util.parser("projections", "Status, rebuild and run of an application's projections.")
    p.add_argument("action", choices=["status", "rebuild", "run"], help="what to do")
    p.add_argument("names", nargs="*", metavar="NAME", help="projection name(s)")
    p.add_argument(
        "--app",
        default=_util.env("APP"),
        help="module:attr of the stanchion.cqrs.App ($STANCHION_APP)",
    )
    p.add_argument("--json", action="store_true", help="status as JSON")
    args = p.parse_args(argv)
    if not args.app:
        p.error("--app module:attr is required (or set STANCHION_APP)")
    if args.action == "status":
        return _util.run(_status(args.app, args.names, args.json))
    if args.action == "rebuild":
        if len(args.names) != 1:
            p.error("rebuild takes exactly one projection NAME")
        return _util.run(_rebuild(args.app, args.names[0]))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return _util.run(_run(args.app, args.names))
