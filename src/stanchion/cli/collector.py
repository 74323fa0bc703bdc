"""``stanchion collector``: the central log store for sidecars."""

from __future__ import annotations

HELP = "receive logs from sidecars, store them, serve queries and a live tail"


def main(argv: list[str]) -> int:
    """Parse the options and serve until SIGTERM/SIGINT."""
    from stanchion.cli import _util

    p = _util.parser(
        "collector",
        "Receive record batches from sidecars (POST /api/push), deduplicate by id, store them, "
        "and serve GET /api/logs, GET /api/tail (SSE), /health and /metrics.",
    )
    p.add_argument("--listen", default=_util.env("COLLECTOR_LISTEN", "127.0.0.1:8600"),
                   help="HOST:PORT (default 127.0.0.1:8600)")  # fmt: skip
    p.add_argument("--store", default=_util.env("COLLECTOR_STORE", "sqlite:///logs.db"),
                   help="sqlite:///logs.db (default) or postgresql://...")  # fmt: skip
    p.add_argument("--token", default=_util.env("COLLECTOR_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on pushes")  # fmt: skip
    p.add_argument("--max-body", default="16MB", help="largest push request (default 16MB)")
    p.add_argument("--retention", default=None, help="delete records older than this (e.g. 7d)")
    p.add_argument("--max-records", type=int, default=None, help="keep only the newest N")
    p.add_argument("--prune-interval", default="60s", help="how often retention runs")
    p.add_argument("--log-level", default=_util.env("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)

    import asyncio
    import signal

    from stanchion.observability import configure_logging
    from stanchion.sidecar import Collector, CollectorOptions, open_store
    from stanchion.sidecar._config import _split_listen
    from stanchion.sidecar._core import parse_duration

    host, port = _split_listen(args.listen)
    options = CollectorOptions(
        token=args.token or None,
        max_body_bytes=_size(args.max_body),
        retention=parse_duration(args.retention) if args.retention else None,
        max_records=args.max_records,
        prune_interval=parse_duration(args.prune_interval),
    )
    store = open_store(args.store)
    configure_logging(args.log_level.upper())

    async def serve() -> int:
        collector = Collector(store, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await collector.start(host, port)
        print(f"stanchion collector listening on http://{host}:{port}", flush=True)
        await stop.wait()
        await collector.aclose()
        return 0

    return _util.run(serve())


def _size(text: str) -> int:
    from stanchion.errors import ConfigError

    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        return int(float(num) * mult)
    except ValueError:
        raise ConfigError(f"{text!r} is not a size (use e.g. 16MB, 512KB)") from None
