"""``stanchion ambassador``: run the outbound HTTP proxy, or check a config file."""

from __future__ import annotations

import sys

HELP = "run the ambassador HTTP proxy (--config FILE), or 'check-config FILE'"


def main(argv: list[str]) -> int:
    """Entry point of ``stanchion ambassador``."""
    from stanchion.cli import _util

    if argv and argv[0] == "check-config":
        p = _util.parser("ambassador check-config", "Validate an ambassador TOML file.")
        p.add_argument("file", help="the TOML config file")
        args = p.parse_args(argv[1:])
        from stanchion.ambassador._core import check_config_file

        try:
            with open(args.file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
            return 1
        problems = check_config_file(args.file, text)
        for line in problems:
            print(line)
        if problems:
            print(f"{args.file}: {len(problems)} error(s)", file=sys.stderr)
            return 1
        print(f"{args.file}: OK")
        return 0

    p = _util.parser("ambassador", "An out-of-process HTTP/1.1 proxy for outbound calls.")
    p.add_argument(
        "--config",
        default=_util.env("AMBASSADOR_CONFIG"),
        help="TOML config file (env STANCHION_AMBASSADOR_CONFIG)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="override [listen] workers (processes sharing the port; 0 = one per CPU)",
    )
    p.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        help="seconds between config file change checks (0 disables; SIGHUP always reloads)",
    )
    import argparse

    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.config:
        p.error("--config FILE is required (or 'check-config FILE')")
    from stanchion.ambassador._serve import serve

    return serve(
        args.config,
        workers=args.workers,
        watch_interval=args.watch_interval,
        worker_index=args.worker_index,
        report_fd=args.report_fd,
    )
