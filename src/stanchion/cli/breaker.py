"""``stanchion breaker``: inspect or steer a circuit breaker shared through a store."""

from __future__ import annotations

import argparse
import json
import math
import time

from stanchion.cli import _util

HELP = "show or change a shared circuit breaker (status, force-open, disable, reset)"

_DESCRIPTION = """\
Inspect or change a circuit breaker whose state is shared through a store
(CircuitBreaker(name, store=URL), see stanchion.resilience). Every replica
follows a change within its sync interval.

  stanchion breaker status     NAME --store redis://host/0?prefix=app:
  stanchion breaker force-open NAME --store URL   reject every call
  stanchion breaker disable    NAME --store URL   admit every call, record nothing
  stanchion breaker reset      NAME --store URL   back to closed, empty window

--store falls back to $STANCHION_BREAKER_STORE.
"""

_ACTIONS = {
    "status": None,
    "force-open": "force_open",
    "disable": "disable",
    "reset": "reset",
    "open": "open",
}


def _build() -> argparse.ArgumentParser:
    p = _util.parser("breaker", _DESCRIPTION)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("action", choices=list(_ACTIONS), help="what to do")
    p.add_argument("name", help="the breaker's name")
    p.add_argument(
        "--store",
        default=_util.env("BREAKER_STORE"),
        help="store URL (default $STANCHION_BREAKER_STORE)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str]) -> int:
    """Run ``stanchion breaker``."""
    p = _build()
    args = p.parse_args(argv)
    if not args.store:
        p.error("--store is required (or set STANCHION_BREAKER_STORE)")
    from stanchion.resilience._store import open_store, read_shared, update_shared

    store = open_store(args.store)
    try:
        op = _ACTIONS[args.action]
        if op is None:
            found = read_shared(store, args.name)
            if found is None:
                print(
                    json.dumps({"name": args.name, "state": None})
                    if args.json
                    else f"breaker {args.name!r}: no shared record (no replica has synced yet)"
                )
                return 1
            version, machine = found
        else:
            machine = update_shared(store, args.name, lambda m, now: getattr(m, op)(now))
            version = -1
        wall = time.time()
        m = machine.metrics(wall)
        ra = machine.retry_after(wall)
        info: dict[str, object] = {
            "name": args.name,
            "state": m.state.value,
            "since_s": round(max(0.0, wall - machine.changed_at), 3),
            "retry_after_s": None if math.isinf(ra) else round(ra, 3),
            "failure_rate": m.failure_rate,
            "slow_call_rate": m.slow_call_rate,
            "buffered_calls": m.buffered_calls,
            "failed_calls": m.failed_calls,
            "slow_calls": m.slow_calls,
            "not_permitted_calls": m.not_permitted_calls,
        }
        if version >= 0:
            info["version"] = version
        if args.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                print(f"{k:20} {v}")
        return 0
    finally:
        store.close()
