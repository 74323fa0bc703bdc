"""``stanchion shard``: inspect a shard map, plan and run online reshards."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from stanchion.cli import _util

if TYPE_CHECKING:
    from stanchion.sharding import ReshardProgress, Strategy

HELP = "shard map status, reshard plan, online reshard / resume / abort"

_DESCRIPTION = """\
Inspect and change a stored shard map (see stanchion.sharding).

  stanchion shard status  --map URL
  stanchion shard plan    --map URL --add s4=postgresql://host/s4
  stanchion shard reshard --map URL --add s4=postgresql://host/s4
  stanchion shard reshard --map URL --assign asia=s4 --add s4=sqlite:///s4.db
  stanchion shard resume  --map URL
  stanchion shard abort   --map URL

--map is the map store URL (sqlite:///maps.db, postgresql://host/db); it
falls back to $STANCHION_SHARD_MAP.
"""


def _build() -> argparse.ArgumentParser:
    p = _util.parser("shard", _DESCRIPTION)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--map", dest="map_global", default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="action", metavar="{status,plan,reshard,resume,abort}")

    def common(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.error = p.error  # type: ignore[method-assign]
        sp.add_argument(
            "--map",
            dest="map",
            default=_util.env("SHARD_MAP"),
            help="shard map store URL (default $STANCHION_SHARD_MAP)",
        )
        sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    common("status", "show the map: version, strategy, shards, tables, reshard progress")
    for name, text in (
        ("plan", "show which keys a change would move (nothing is changed)"),
        ("reshard", "move to a new strategy online (copy, catch up, cut over, clean up)"),
    ):
        sp = common(name, text)
        sp.add_argument(
            "--add",
            action="append",
            default=[],
            metavar="NAME=URL",
            help="add a shard (repeatable)",
        )
        sp.add_argument(
            "--remove", action="append", default=[], metavar="NAME", help="remove a shard"
        )
        sp.add_argument(
            "--assign",
            action="append",
            default=[],
            metavar="KEY=SHARD",
            help="Directory maps: place a key on a shard (repeatable)",
        )
        sp.add_argument(
            "--strategy", metavar="JSON", help="the new strategy as JSON (Strategy.to_dict())"
        )
        if name == "reshard":
            sp.add_argument("--batch-size", type=int, default=500, help="keys per batch")
            sp.add_argument(
                "--grace", type=float, default=None, help="seconds between cutover and cleanup"
            )
    sp = common("resume", "continue an interrupted reshard (or abort)")
    sp.add_argument("--grace", type=float, default=None, help="seconds before cleanup")
    common("abort", "abandon a reshard that has not cut over")
    return p


def _pairs(items: list[str], what: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            parser.error(f"{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _new_strategy(
    current: Strategy, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[Strategy, dict[str, str]]:
    from stanchion.errors import ConfigError
    from stanchion.sharding import Directory, strategy_from_dict

    adds = _pairs(args.add, "--add", parser)
    assigns = _pairs(args.assign, "--assign", parser)
    if not (adds or args.remove or assigns or args.strategy):
        parser.error("say what changes: --add NAME=URL, --remove NAME, --assign or --strategy")
    if args.strategy:
        try:
            strategy = strategy_from_dict(json.loads(args.strategy))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--strategy is not valid JSON: {exc}") from None
    else:
        strategy = current
        for name in adds:
            strategy = strategy.add(name)
        for name in args.remove:
            strategy = strategy.remove(name)
    if assigns:
        if not isinstance(strategy, Directory):
            raise ConfigError("--assign works on Directory strategies only")
        for key, shard in assigns.items():
            strategy = strategy.assign(key, shard)
    return strategy, adds


def _progress_line(p: ReshardProgress) -> str:
    return (
        f"phase={p.phase} rows_copied={p.rows_copied} keys_moved={p.keys_moved} "
        f"changes_applied={p.changes_applied} lag={p.lag} rows_deleted={p.rows_deleted} "
        f"pause={p.pause_seconds:.3f}s elapsed={p.elapsed:.1f}s"
    )


def _printer(as_json: bool) -> Any:
    last_t = [0.0]
    last_phase = [""]

    def report(p: ReshardProgress) -> None:
        now = time.monotonic()
        if p.phase == last_phase[0] and now - last_t[0] < 0.5:
            return
        last_t[0], last_phase[0] = now, p.phase
        if as_json:
            from dataclasses import asdict

            print(json.dumps(asdict(p)), flush=True)
        else:
            print(_progress_line(p), flush=True)

    return report


async def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dataclasses import asdict

    from stanchion.sharding import ShardedDatabase, ShardMap, plan_reshard
    from stanchion.sharding._reshard import progress_of
    from stanchion.urls import parse_url

    if args.action == "status" or args.action == "plan":
        shard_map = await ShardMap.load(args.map)
        try:
            state = shard_map.state
            if args.action == "status":
                rs = await shard_map.reshard_state()
                info: dict[str, Any] = {
                    "version": state.version,
                    "strategy": state.strategy.to_dict(),
                    "shards": {n: parse_url(u).masked() for n, u in state.urls.items()},
                    "tables": state.tables,
                    "reference_tables": list(state.reference_tables),
                    "reshard": asdict(progress_of(rs)) if rs else None,
                }
                if args.json:
                    print(json.dumps(info, indent=2))
                    return 0
                print(f"map:       {parse_url(args.map).masked()}")
                print(f"version:   {state.version}")
                print(f"strategy:  {state.strategy!r}")
                print("shards:")
                for name, url in info["shards"].items():
                    print(f"  {name:<12} {url}")
                tables = ", ".join(f"{t} (key {c})" for t, c in state.tables.items())
                print(f"tables:    {tables or '-'}")
                print(f"reference: {', '.join(state.reference_tables) or '-'}")
                if rs:
                    print(f"reshard:   {_progress_line(progress_of(rs))}")
                else:
                    print("reshard:   none")
                return 0
            new, _ = _new_strategy(state.strategy, args, parser)
            moves = plan_reshard(state.strategy, new)
            if args.json:
                print(json.dumps([asdict(m) for m in moves], indent=2))
                return 0
            print(f"from: {state.strategy!r}")
            print(f"to:   {new!r}")
            if not moves:
                print("nothing moves")
                return 0
            print(f"{'source':<12} {'target':<12} {'share of keys':>14}")
            for m in moves:
                print(f"{m.source:<12} {m.target:<12} {m.fraction:>13.2%}")
            print(f"total moved: {sum(m.fraction for m in moves):.2%} of keys (estimate)")
            return 0
        finally:
            await shard_map.close()

    db = await ShardedDatabase.connect(args.map)
    try:
        if args.action == "reshard":
            new, adds = _new_strategy(db.shard_map.strategy, args, parser)
            done = await db.reshard(
                new,
                urls=adds,
                batch_size=args.batch_size,
                on_progress=_printer(args.json),
                grace=args.grace,
            )
        elif args.action == "resume":
            done = await db.resume_reshard(on_progress=_printer(args.json), grace=args.grace)
        else:
            done = await db.abort_reshard()
        if args.json:
            print(json.dumps(asdict(done)))
        else:
            print(_progress_line(done))
            print(f"shard map version {db.shard_map.version}: {db.shard_map.strategy!r}")
        return 0
    finally:
        await db.close()


def main(argv: list[str]) -> int:
    """Run ``stanchion shard``."""
    parser = _build()
    args = parser.parse_args(argv)
    if not args.action:
        parser.print_help(sys.stderr)
        return 2
    args.map = args.map_global or args.map
    if not args.map:
        parser.error("--map URL is required (or set STANCHION_SHARD_MAP)")
    return _util.run(_main(args, parser))
