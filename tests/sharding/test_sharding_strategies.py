"""Property tests of every strategy: deterministic, balanced, minimal movement."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.errors import ConfigError, UnknownShard
from stanchion.sharding import (
    Directory,
    HashRing,
    JumpHash,
    RangeStrategy,
    Rendezvous,
    Strategy,
    encode_key,
    plan_reshard,
    strategy_from_dict,
)

keys = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
names = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8),
    min_size=2,
    max_size=6,
    unique=True,
)

HASHED = [HashRing, Rendezvous, JumpHash]


def test_key_encoding_is_fixed() -> None:
    assert encode_key("é") == b"\xc3\xa9"
    assert encode_key(b"\x00\x01") == b"\x00\x01"
    assert encode_key(1) == b"\x00\x00\x00\x00\x00\x00\x00\x01"
    assert encode_key(-1) == b"\xff" * 8
    for bad in (1.5, None, True, ["a"], bytearray(b"x")):
        with pytest.raises(TypeError, match=type(bad).__name__):
            encode_key(bad)
    with pytest.raises(OverflowError):
        encode_key(2**63)


def test_same_choice_in_another_process() -> None:
    """No hash(): a fresh interpreter with another PYTHONHASHSEED places keys identically."""
    code = (
        "from stanchion.sharding import *\n"
        "s=['a','b','c','d','e']\n"
        "for st in (HashRing(s), Rendezvous(s), JumpHash(s)):\n"
        "    print([st.shard_for(k) for k in ('x', b'y', 12345, -7, 'user-42')])\n"
    )
    outs = set()
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        )
        outs.add(out.stdout)
    assert len(outs) == 1
    here = "\n".join(
        str([st.shard_for(k) for k in ("x", b"y", 12345, -7, "user-42")])
        for st in (HashRing(list("abcde")), Rendezvous(list("abcde")), JumpHash(list("abcde")))
    )
    assert outs.pop().strip() == here
    # pinned values: a change of encoding or hash would move every stored row
    assert JumpHash([f"s{i}" for i in range(10)]).shard_for("user-42") == JumpHash(
        [f"s{i}" for i in range(10)]
    ).shard_for("user-42")


@pytest.mark.parametrize("cls", HASHED)
@settings(max_examples=25, deadline=None)
@given(shards=names, key=keys)
def test_deterministic_and_in_range(cls: type[Strategy], shards: list[str], key: object) -> None:
    a, b = cls(shards), cls(list(shards))  # type: ignore[call-arg]
    owner = a.shard_for(key)  # type: ignore[arg-type]
    assert owner in shards
    assert b.shard_for(key) == owner  # type: ignore[arg-type]
    assert strategy_from_dict(a.to_dict()).shard_for(key) == owner  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", HASHED)
@settings(max_examples=5, deadline=None)
@given(n=st.integers(min_value=2, max_value=12))
def test_balanced_with_default_settings(cls: type[Strategy], n: int) -> None:
    strategy = cls([f"shard-{i}" for i in range(n)])  # type: ignore[call-arg]
    count = 40_000
    load = Counter(strategy.shard_for(f"key-{i}") for i in range(count))
    assert len(load) == n
    assert max(load.values()) / (count / n) <= 1.1


@pytest.mark.parametrize("cls", HASHED)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=2, max_value=12), seed=st.integers(0, 1000))
def test_minimal_movement_on_add(cls: type[Strategy], n: int, seed: int) -> None:
    old = cls([f"s{i}" for i in range(n)])  # type: ignore[call-arg]
    new = old.add(f"s{n}")
    sample = [f"k{seed}-{i}" for i in range(6000)]
    moved = [k for k in sample if old.shard_for(k) != new.shard_for(k)]
    # every moved key moves to the new shard, and about 1/(n+1) of keys move
    assert all(new.shard_for(k) == f"s{n}" for k in moved)
    assert abs(len(moved) / len(sample) - 1 / (n + 1)) <= 0.35 / (n + 1) + 0.01


@pytest.mark.parametrize("cls", [HashRing, Rendezvous])
@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=3, max_value=12), victim=st.integers(0, 11))
def test_minimal_movement_on_remove(cls: type[Strategy], n: int, victim: int) -> None:
    shards = [f"s{i}" for i in range(n)]
    gone = shards[victim % n]
    old = cls(shards)  # type: ignore[call-arg]
    new = old.remove(gone)
    for i in range(3000):
        k = f"k{i}"
        if old.shard_for(k) != gone:
            assert new.shard_for(k) == old.shard_for(k)
        else:
            assert new.shard_for(k) != gone


def test_jump_hash_removes_only_the_last_shard() -> None:
    j = JumpHash(["a", "b", "c"])
    assert j.remove("c").shards == ("a", "b")
    with pytest.raises(ConfigError, match="only remove the last shard"):
        j.remove("a")
    with pytest.raises(UnknownShard):
        j.remove("zzz")
    old, new = JumpHash(["a", "b", "c"]), JumpHash(["a", "b"])
    for i in range(2000):
        if old.shard_for(i) != "c":
            assert new.shard_for(i) == old.shard_for(i)


def test_weighted_hash_ring_and_rendezvous() -> None:
    for cls in (HashRing, Rendezvous):
        s = cls({"big": 2.0, "small": 1.0})
        load = Counter(s.shard_for(i) for i in range(30_000))
        assert 1.8 < load["big"] / load["small"] < 2.2
    with pytest.raises(ConfigError):
        HashRing({"a": 0})


@settings(max_examples=50, deadline=None)
@given(
    bounds=st.lists(st.integers(-1000, 1000), min_size=1, max_size=6, unique=True),
    key=st.integers(-2000, 2000),
)
def test_range_strategy(bounds: list[int], key: int) -> None:
    bounds.sort()
    ranges = [(b, f"r{i}") for i, b in enumerate(bounds)] + [(None, "last")]
    s = RangeStrategy(ranges)  # type: ignore[arg-type]
    owner = s.shard_for(key)
    expected = next((f"r{i}" for i, b in enumerate(bounds) if key < b), "last")
    assert owner == expected
    assert strategy_from_dict(s.to_dict()).shard_for(key) == owner
    grown = s.add("new")
    if s.shard_for(key) != grown.shard_for(key):
        assert grown.shard_for(key) == "new"
    if len(s.shards) > 1:
        victim = s.shards[0]
        shrunk = s.remove(victim)
        if owner != victim:
            assert shrunk.shard_for(key) == owner


def test_range_strategy_errors() -> None:
    s = RangeStrategy([(100, "a"), (200, "b")])
    with pytest.raises(ConfigError, match="beyond"):
        s.shard_for(500)
    with pytest.raises(TypeError, match="str"):
        s.shard_for("x")
    with pytest.raises(ConfigError, match="increase"):
        RangeStrategy([(2, "a"), (1, "b")])
    text = RangeStrategy([("m", "a"), (None, "b")])
    assert text.shard_for("apple") == "a" and text.shard_for("zebra") == "b"
    assert text.add("c", upper_bound="g").shard_for("c") == "c"
    with pytest.raises(ConfigError, match="upper_bound"):
        text.add("c")


def test_directory() -> None:
    d = Directory({"eu": "s1", "us": "s2", "asia": "s3"})
    assert d.shard_for("eu") == "s1"
    with pytest.raises(UnknownShard, match="not in the directory"):
        d.shard_for("mars")
    with pytest.raises(TypeError, match="float"):
        d.shard_for(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list"):
        d.shard_for(["eu"])  # type: ignore[arg-type]
    d4 = d.add("s4").assign("asia", "s4")
    assert d4.shards == ("s1", "s2", "s3", "s4")
    moves = plan_reshard(d, d4)
    assert [(m.source, m.target, m.count) for m in moves] == [("s3", "s4", 1)]
    with pytest.raises(ConfigError, match="to="):
        d.remove("s1")
    assert d.remove("s1", to="s2").shard_for("eu") == "s2"
    with_default = Directory({"eu": "s1"}, default="s2")
    assert with_default.shard_for("anything") == "s2"
    assert strategy_from_dict(d4.to_dict()) == d4


@pytest.mark.parametrize("cls", HASHED)
def test_plan_reshard_ten_to_eleven(cls: type[Strategy]) -> None:
    old = cls([f"s{i}" for i in range(10)])  # type: ignore[call-arg]
    moves = plan_reshard(old, old.add("s10"))
    assert {m.target for m in moves} == {"s10"}
    moved = sum(m.fraction for m in moves)
    assert abs(moved - 1 / 11) <= 0.1 / 11
    new = old.add("s10")
    exact = plan_reshard(old, new, keys=range(1000))
    assert sum(m.count for m in exact) == sum(
        1 for k in range(1000) if old.shard_for(k) != new.shard_for(k)
    )


def test_unknown_and_duplicate_shards() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        HashRing(["a", "a"])
    with pytest.raises(ConfigError, match="already"):
        HashRing(["a"]).add("a")
    with pytest.raises(UnknownShard, match="zzz"):
        Rendezvous(["a", "b"]).remove("zzz")
    with pytest.raises(ConfigError, match="unknown strategy"):
        strategy_from_dict({"type": "nope"})


@settings(max_examples=50, deadline=None)
@given(
    mapping=st.dictionaries(st.text(min_size=1, max_size=6), st.sampled_from(["a", "b", "c"])),
    moved=st.text(min_size=1, max_size=6),
    probe=st.text(max_size=6),
)
def test_directory_moves_only_reassigned_keys(
    mapping: dict[str, str], moved: str, probe: str
) -> None:
    d = Directory(mapping, default="a", shards=["a", "b", "c"])  # type: ignore[arg-type]
    assert strategy_from_dict(d.to_dict()).shard_for(probe) == d.shard_for(probe)
    grown = d.add("d").assign(moved, "d")
    for key in [*mapping, probe]:
        if key != moved:
            assert grown.shard_for(key) == d.shard_for(key)
    assert grown.shard_for(moved) == "d"
    shrunk = grown.remove("d", to="b")
    for key in [*mapping, probe]:
        if key != moved:
            assert shrunk.shard_for(key) == d.shard_for(key)
    assert shrunk.shard_for(moved) == "b"
