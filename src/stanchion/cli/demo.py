"""``stanchion demo``: the reference shop built from all eight patterns.

stanchion demo [--port 8700] [--data-dir .stanchion-demo] [--rate 2] [--no-load]
               [--open] [--services]
stanchion demo scenario NAME [--services] ...
stanchion demo scenario --list
"""

from __future__ import annotations

from pathlib import Path

HELP = "run the reference online shop (all eight patterns) with a live dashboard"


def _common(p: object) -> None:
    from stanchion.cli import _util

    assert isinstance(p, _util.ArgumentParser)
    p.add_argument(
        "--data-dir",
        default=_util.env("DEMO_DATA_DIR", ".stanchion-demo"),
        help="where the demo keeps its files (.stanchion-demo)",
    )
    p.add_argument(
        "--services",
        action="store_true",
        help="use PostgreSQL, Redis and etcd instead of SQLite files "
        "(URLs from STANCHION_DEMO_POSTGRES_URL, ..._BROKER_URL, ..._REDIS_URL, ..._ETCD_URL)",
    )


def main(argv: list[str]) -> int:
    """Run the demo (or one of its scenarios) until Ctrl-C."""
    from stanchion.cli import _util

    if argv and argv[0] == "scenario":
        return _scenario(argv[1:])
    p = _util.parser("demo", "Run the stanchion reference shop with a live dashboard.")
    p.add_argument(
        "--port",
        type=int,
        default=int(_util.env("DEMO_PORT", "8700") or 8700),
        help="dashboard port (8700)",
    )
    p.add_argument(
        "--rate", type=float, default=2.0, help="orders per second from the load generator (2)"
    )
    p.add_argument("--no-load", action="store_true", help="do not generate orders")
    p.add_argument("--open", action="store_true", help="open the dashboard in a browser")
    _common(p)
    args = p.parse_args(argv)
    return _util.run(_run(args))


async def _run(args: object) -> int:
    import asyncio
    import signal

    from stanchion.demo import Demo, DemoOptions
    from stanchion.observability import configure_logging

    configure_logging("WARNING")
    opts = DemoOptions(
        port=args.port,  # type: ignore[attr-defined]
        data_dir=Path(args.data_dir),  # type: ignore[attr-defined]
        rate=args.rate,  # type: ignore[attr-defined]
        load=not args.no_load,  # type: ignore[attr-defined]
        services=args.services,  # type: ignore[attr-defined]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"stanchion demo: starting ({'services' if opts.services else 'embedded'} mode,"
        f" data in {opts.data_dir})...",
        flush=True,
    )
    async with Demo(opts) as demo:
        print(f"stanchion demo: dashboard at {demo.dashboard_url}  (Ctrl-C to stop)", flush=True)
        if args.open:  # type: ignore[attr-defined]
            import webbrowser

            webbrowser.open(demo.dashboard_url)
        await stop.wait()
        print("stanchion demo: stopping...", flush=True)
    print("stanchion demo: stopped", flush=True)
    return 0


def _scenario(argv: list[str]) -> int:
    from stanchion.cli import _util
    from stanchion.demo._scenarios import SCENARIOS

    p = _util.parser(
        "demo scenario", "Run a scripted chaos scenario headless and report PASS/FAIL."
    )
    p.add_argument("name", nargs="?", help="scenario: " + ", ".join(SCENARIOS))
    p.add_argument("--list", action="store_true", help="list the scenarios")
    p.add_argument("--port", type=int, default=0, help="dashboard port (a free one by default)")
    _common(p)
    args = p.parse_args(argv)
    if args.list or not args.name:
        for name, scenario in SCENARIOS.items():
            print(
                f"{name:<18} {scenario.__doc__.strip().splitlines()[0] if scenario.__doc__ else ''}"
            )
        return 0 if args.list else 2
    if args.name not in SCENARIOS:
        p.error(f"unknown scenario {args.name!r}; choose one of {', '.join(SCENARIOS)}")
    from stanchion.demo._scenarios import run_scenario
    from stanchion.observability import configure_logging

    configure_logging("ERROR")
    return _util.run(
        run_scenario(args.name, Path(args.data_dir), port=args.port, services=args.services)
    )
