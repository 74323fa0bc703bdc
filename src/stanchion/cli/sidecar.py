"""``stanchion sidecar``: run a service under supervision and ship its logs."""

from __future__ import annotations

HELP = "run a command under supervision and ship its logs (stdout, stderr, files)"


def main(argv: list[str]) -> int:
    """Parse ``--config sidecar.toml -- CMD ARGS...`` and run the sidecar."""
    from stanchion.cli import _util

    if "--" in argv:
        i = argv.index("--")
        own, cmd = argv[:i], argv[i + 1 :]
    else:
        own, cmd = argv, []
    p = _util.parser(
        "sidecar",
        "Start CMD as a child process, forward SIGTERM/SIGINT/SIGHUP to it, restart it by "
        "policy, and ship its stdout/stderr and log files to the configured sinks. "
        "Exits with the child's status. Usage: stanchion sidecar --config sidecar.toml -- CMD ...",
    )
    p.add_argument(
        "--config",
        default=_util.env("SIDECAR_CONFIG"),
        help="the sidecar.toml file (env STANCHION_SIDECAR_CONFIG)",
    )
    p.add_argument(
        "--listen",
        default=_util.env("SIDECAR_LISTEN"),
        help="HOST:PORT for /health and /metrics (overrides [sidecar] listen)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--log-level", default=_util.env("LOG_LEVEL", "INFO"), help="sidecar's logs")
    args = p.parse_args(own)
    if not args.config:
        p.error("--config is required")
    from stanchion.observability import configure_logging
    from stanchion.sidecar import Sidecar, load_config

    options = load_config(args.config)  # a bad config fails here, before the child starts
    if args.listen is not None:
        import dataclasses

        options = dataclasses.replace(options, listen=args.listen)
    if args.check:
        print(
            f"{args.config}: ok ({len(options.sinks)} sink(s), {len(options.files)} file input(s))"
        )
        return 0
    if not cmd and not options.files:
        p.error("give a command after '--' (or configure [[files]] to tail without a child)")
    configure_logging(args.log_level.upper())
    return _util.run(Sidecar(options, cmd).run())
