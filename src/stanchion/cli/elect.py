"""``stanchion elect``: run a command only while this node is the elected leader.

    stanchion elect --url URL --group G --id ID [--ttl S] -- CMD ARGS...
    stanchion elect --url URL --group G --status

The command gets ``STANCHION_FENCING_TOKEN`` (plus ``STANCHION_ELECTION_GROUP``
and ``STANCHION_ELECTION_ID``) in its environment. When leadership is lost the
command is stopped (SIGTERM to its process group, SIGKILL after ``--grace``)
and this node campaigns again. The lease is trusted ``--grace`` seconds less
than usual, so the command is gone before another node can be elected. When
the command exits on its own, the node resigns and ``stanchion elect`` exits
with the command's status. If ``stanchion elect`` itself dies, the kernel
kills the command (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import sys
from typing import Any

HELP = "run a command only while this node is the elected leader (leases + fencing token)"


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _parse(argv: list[str]) -> tuple[Any, list[str]]:
    from stanchion.cli import _util

    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    else:
        command = []
    p = _util.parser("elect", "Run CMD only while this node is the elected leader of GROUP.")
    p.usage = (
        "stanchion elect --url URL --group G --id ID [--ttl S] [--grace S] -- CMD ARGS...\n"
        "       stanchion elect --url URL --group G --status [--json]"
    )
    p.add_argument(
        "--url", default=_util.env("ELECTION_URL"), help="backend URL ($STANCHION_ELECTION_URL)"
    )
    p.add_argument("--group", default=_util.env("ELECTION_GROUP"), help="election group")
    p.add_argument(
        "--id", dest="identity", default=_util.env("ELECTION_ID"), help="this node's identity"
    )
    p.add_argument("--ttl", type=float, default=10.0, help="lease length in seconds (10)")
    p.add_argument(
        "--renew-every", type=float, default=None, help="seconds between renewals (ttl/3)"
    )
    p.add_argument(
        "--grace", type=float, default=None,
        help="seconds between SIGTERM and SIGKILL when leadership is lost (ttl/4, at most 10)",
    )  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=5.0, help="backend connect timeout (5)")
    p.add_argument("--log-level", default="warning", help="JSON logs to stderr at this level")
    p.add_argument("--status", action="store_true", help="print the current leader and exit")
    p.add_argument("--json", action="store_true", help="with --status: print JSON")
    args = p.parse_args(argv)
    if not args.url:
        p.error("--url is required (or STANCHION_ELECTION_URL)")
    if not args.group:
        p.error("--group is required (or STANCHION_ELECTION_GROUP)")
    if not args.status:
        if not args.identity:
            p.error("--id is required (or STANCHION_ELECTION_ID)")
        if not command:
            p.error("a command is required after '--': stanchion elect ... -- CMD ARGS...")
    if args.ttl <= 0:
        p.error("--ttl must be positive")
    if args.grace is None:
        args.grace = min(args.ttl / 4, 10.0)
    if args.grace < 0:
        p.error("--grace must be >= 0")
    return args, command


def main(argv: list[str]) -> int:
    """Entry point of ``stanchion elect``."""
    args, command = _parse(argv)
    from stanchion.cli import _util
    from stanchion.observability import configure_logging

    configure_logging(args.log_level.upper())

    if args.status:
        return _util.run(_status(args))
    return _util.run(_elect(args, command))


async def _status(args: Any) -> int:
    import json
    import socket

    from stanchion.election import LeaderElector

    elector = LeaderElector.from_url(
        args.url, args.group, args.identity or f"status@{socket.gethostname()}",
        ttl=max(args.ttl, 0.1), connect_timeout=args.connect_timeout,
    )  # fmt: skip
    try:
        info = await elector.leader()
        left = None if info is None else max(info.expires_at - elector.clock(), 0.0)
    finally:
        await elector.backend.aclose()
    if args.json:
        print(json.dumps(None if info is None else {
            "group": args.group, "leader": info.identity, "token": info.token,
            "expires_in": round(left or 0.0, 3),
        }))  # fmt: skip
    elif info is None:
        print(f"group {args.group}: no leader")
    else:
        print(
            f"group {args.group}: leader {info.identity} (token {info.token}, "
            f"lease expires in {left:.2f}s)"
        )
    return 0


def _say(message: str) -> None:
    print(f"stanchion elect: {message}", file=sys.stderr, flush=True)


async def _stop(proc: Any, grace: float) -> int:
    import asyncio
    import contextlib
    import os
    import signal

    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            _say(f"command did not stop within {grace:g}s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group
    code: int = proc.returncode
    return code


async def _elect(args: Any, command: list[str]) -> int:
    import asyncio
    import os
    import signal

    from stanchion.election import LeaderElector
    from stanchion.election._core import LeaseOptions
    from stanchion.errors import BackendUnavailable, ConfigError

    base = LeaseOptions(ttl=args.ttl, renew_every=args.renew_every)
    margin = base.margin + args.grace
    if base.renewal + margin >= args.ttl:
        raise ConfigError(
            f"--grace {args.grace:g}s is too long for --ttl {args.ttl:g}s: the command must be "
            f"stopped before the lease can pass to another node; use --grace below "
            f"{max(args.ttl - base.renewal - base.margin, 0):.2f}s or a longer --ttl"
        )
    elector = LeaderElector.from_url(
        args.url, args.group, args.identity, ttl=args.ttl, renew_every=args.renew_every,
        safety_margin=margin, connect_timeout=args.connect_timeout,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    ever_elected = False
    try:
        while not stop.is_set():
            campaign = asyncio.ensure_future(elector.campaign())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({campaign, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not campaign.done():
                campaign.cancel()
                break
            try:
                lease = campaign.result()
            except BackendUnavailable as exc:
                if not ever_elected:
                    raise
                _say(f"backend unavailable ({exc}); campaigning again")
                await asyncio.sleep(elector.options.poll)
                continue
            ever_elected = True
            env = dict(os.environ)
            env.update(
                STANCHION_FENCING_TOKEN=str(lease.token),
                STANCHION_ELECTION_GROUP=args.group,
                STANCHION_ELECTION_ID=args.identity,
            )
            _say(f"{args.identity} leads {args.group} (token {lease.token}); running {command[0]}")
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command, env=env, start_new_session=True, preexec_fn=_pdeathsig
                )
            except OSError as exc:
                await elector.resign()
                _say(f"cannot run {command[0]!r}: {exc}")
                return 127
            waiter = asyncio.ensure_future(proc.wait())
            lost = asyncio.ensure_future(lease.lost.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for fut in (lost, stopper):
                fut.cancel()
            if waiter.done():
                code = int(proc.returncode or 0)
                await elector.resign()
                _say(f"command exited with status {code}; resigned")
                return code if code >= 0 else 128 - code
            waiter.cancel()
            if lease.lost.is_set():
                _say(f"leadership lost ({lease.reason}); stopping the command")
                await _stop(proc, args.grace)
                continue
            await _stop(proc, args.grace)
        return 128 + (received[0] if received else signal.SIGTERM)
    finally:
        await elector.aclose()
