"""``stanchion shard status|plan|reshard|resume|abort --map URL``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from stanchion.cli import main
from stanchion.sharding import Directory, HashRing, ShardedDatabase, ShardMap


def _setup(tmp_path: Path, strategy: object = None) -> tuple[str, dict[str, str]]:
    urls = {n: f"sqlite:///{tmp_path / (n + '.db')}" for n in ("s1", "s2", "s3")}
    store = f"sqlite:///{tmp_path / 'map.db'}"

    async def go() -> None:
        shard_map = ShardMap(strategy or HashRing(list(urls)), urls, store=store)  # type: ignore[arg-type]
        db = await ShardedDatabase.connect(
            shard_map,
            tables={"users": "region"},
            schema=["CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, region TEXT)"],
        )
        for i, region in enumerate(["eu", "us", "asia", "eu", "asia"]):
            await db.execute(
                region, "INSERT INTO users (id, region) VALUES (:i, :r)", {"i": i, "r": region}
            )
        await db.close()

    asyncio.run(go())
    return store, urls


def test_status_and_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = _setup(tmp_path)
    assert main(["shard", "status", "--map", store]) == 0
    out = capsys.readouterr().out
    assert "version:" in out and "HashRing" in out and "users (key region)" in out
    assert "reshard:   none" in out
    assert main(["shard", "--map", store, "status", "--json"]) == 0  # --map first works too
    assert json.loads(capsys.readouterr().out)["tables"] == {"users": "region"}
    s4 = f"sqlite:///{tmp_path / 's4.db'}"
    assert main(["shard", "plan", "--map", store, "--add", f"s4={s4}", "--json"]) == 0
    moves = json.loads(capsys.readouterr().out)
    assert {m["target"] for m in moves} == {"s4"}
    assert abs(sum(m["fraction"] for m in moves) - 0.25) < 0.03


def test_reshard_directory_by_region(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = _setup(tmp_path, Directory({"eu": "s1", "us": "s2", "asia": "s3"}))
    s4 = f"sqlite:///{tmp_path / 's4.db'}"
    argv = ["shard", "reshard", "--map", store, "--add", f"s4={s4}", "--assign", "asia=s4"]
    assert main([*argv, "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "phase=done" in out
    assert main(["shard", "status", "--map", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["strategy"]["shards"] == ["s1", "s2", "s3", "s4"]
    assert info["reshard"] is None

    async def check() -> list[dict[str, object]]:
        db = await ShardedDatabase.connect(store)
        try:
            assert db.shard_for("asia") == "s4"
            return await db.fetch("asia", "SELECT id FROM users WHERE region = 'asia'")
        finally:
            await db.close()

    assert sorted(r["id"] for r in asyncio.run(check())) == [2, 4]  # type: ignore[type-var]


def test_bad_usage_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, _ = _setup(tmp_path)
    assert main(["shard", "status"]) == 2
    assert "--map" in capsys.readouterr().err
    assert main(["shard", "plan", "--map", store]) == 2
    assert main(["shard", "resume", "--map", store]) == 1
    assert "ReshardError: no reshard is in progress" in capsys.readouterr().err
    assert main(["shard", "abort", "--map", store]) == 1
    assert main(["shard", "plan", "--map", store, "--remove", "nope"]) == 1
    assert "UnknownShard" in capsys.readouterr().err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["shard", "status", "--map", empty]) == 1
    assert "no shard map stored" in capsys.readouterr().err
