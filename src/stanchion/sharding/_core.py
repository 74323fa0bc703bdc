"""Sharding strategies and reshard planning: pure, deterministic, no I/O.

Theory of operation
-------------------

A *strategy* maps a key to a shard name. Every process, on every platform and
every Python version, must make the same choice, so nothing here uses
``hash()`` (salted per process) or any other process-local state:

* A key is first *encoded* to bytes, the same way everywhere: ``str`` as
  UTF-8, ``bytes`` as is, ``int`` as 8 bytes big-endian signed. Any other
  type (``bool`` included, it is too easily a bug) is a ``TypeError`` naming
  the type.
* The bytes are hashed with BLAKE2b truncated to 64 bits (``_h64``), which
  is in the standard library, fast, and specified byte for byte.

Strategies are immutable values. ``add(shard)`` and ``remove(shard)`` return
a *new* strategy; the old one stays valid, which is exactly what resharding
needs (route by the old one until the cutover, by the new one after it).

``HashRing``
    Consistent hashing. Each shard owns ``vnodes * weight`` points on a 64-bit
    ring (the hash of ``"<shard>#<i>"``); a key belongs to the first point at
    or after its hash, wrapping around. Adding a shard moves only the keys
    that fall into the new shard's arcs (about 1/(n+1) of them); removing one
    moves only that shard's keys. The load spread shrinks like
    1/sqrt(vnodes): the default of 2048 points per unit of weight keeps
    max/mean load at or under 1.1 (uhashring's 160 gives about 1.12).

``Rendezvous``
    Highest random weight: each (shard, key) pair gets a score, the highest
    wins. Perfect minimal movement and no tuning, O(shards) per lookup.
    Optional weights use the logarithmic method (score = w / -ln(u)).

``JumpHash``
    Lamping and Veach's jump consistent hash: O(ln n), no memory, ideal
    balance and movement, but shards are numbered: one can only be added or
    removed at the end.

``RangeStrategy``
    Explicit key ranges, ``[(upper_bound, shard), ...]`` with exclusive upper
    bounds in increasing order and ``None`` for "no upper bound" last. Keys
    compare in their natural order (ints as numbers, str as str, bytes as
    bytes); a key whose type differs from the bounds' is a ``TypeError``.

``Directory``
    An explicit mapping (region -> shard, tenant -> shard) with an optional
    default. ``assign(key, shard)`` returns a new directory that moves one key.

Planning: ``plan_reshard(old, new, keys=None)`` compares two strategies. With
keys, the moves are exact counts; without, they are measured on a fixed
deterministic sample (20,000 integers for hash strategies, the union of the
directory keys, the elementary intervals of two range strategies). The
reshard engine itself never relies on the estimate: it asks both strategies
about every row it scans and copies exactly the rows whose owner changes.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, ClassVar, Final, TypeAlias

from stanchion.errors import ConfigError, UnknownShard

__all__ = [
    "DEFAULT_VNODES",
    "Directory",
    "HashRing",
    "JumpHash",
    "Key",
    "Move",
    "RangeStrategy",
    "Rendezvous",
    "StatementInfo",
    "Strategy",
    "decode_json_value",
    "encode_json_value",
    "encode_key",
    "inspect_statement",
    "plan_reshard",
    "strategy_from_dict",
    "translate_named",
]

Key: TypeAlias = "str | bytes | int"
"""A shard key: ``str``, ``bytes`` or ``int`` (8-byte signed)."""

DEFAULT_VNODES: Final = 2048
"""Default ring points per shard (per unit of weight) of :class:`HashRing`."""

_MASK64: Final = (1 << 64) - 1
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 63) - 1


def encode_key(key: object) -> bytes:
    """Encode a shard key to bytes, the same way in every process and version.

    ``str`` is UTF-8, ``bytes`` is as is, ``int`` is 8 bytes big-endian signed.

    Raises:
        TypeError: the key is of any other type (the message names it).
        OverflowError: an int outside the signed 64-bit range.
    """
    cls = type(key)
    if cls is str:
        return key.encode("utf-8")  # type: ignore[attr-defined,no-any-return]
    if cls is bytes:
        return key  # type: ignore[return-value]
    if cls is int:
        try:
            return key.to_bytes(8, "big", signed=True)  # type: ignore[attr-defined,no-any-return]
        except OverflowError:
            raise OverflowError(
                f"shard key {key} does not fit in 8 bytes signed "
                f"(allowed range {_INT_MIN}..{_INT_MAX})"
            ) from None
    raise TypeError(
        f"shard key must be str, bytes or int, not {cls.__name__} "
        f"({key!r:.60}); convert it first (str(key), key.bytes, ...)"
    )


def _h64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def _key_hash(key: object, _b2b: Any = blake2b, _from: Any = int.from_bytes) -> int:
    # encode_key + _h64 inlined: this is on every routed query's path
    cls = type(key)
    if cls is str:
        data = key.encode()  # type: ignore[attr-defined]
    elif cls is int and _INT_MIN <= key <= _INT_MAX:  # type: ignore[operator]
        data = key.to_bytes(8, "big", signed=True)  # type: ignore[attr-defined]
    elif cls is bytes:
        data = key
    else:
        data = encode_key(key)
    return _from(_b2b(data, digest_size=8).digest(), "big")  # type: ignore[no-any-return]


def _check_name(shard: object) -> str:
    if not isinstance(shard, str) or not shard:
        raise ConfigError(f"shard names must be non-empty strings, got {shard!r}")
    return shard


def _unique(shards: Iterable[str], what: str) -> tuple[str, ...]:
    names = tuple(_check_name(s) for s in shards)
    if not names:
        raise ConfigError(f"{what} needs at least one shard")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ConfigError(f"{what}: duplicate shard name(s) {dupes}")
    return names


def _weights(
    shards: Iterable[str] | Mapping[str, float], what: str
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if isinstance(shards, Mapping):
        names = _unique(shards.keys(), what)
        weights = []
        for n in names:
            w = shards[n]
            if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
                raise ConfigError(f"{what}: weight of shard {n!r} must be a number > 0, got {w!r}")
            weights.append(float(w))
        return names, tuple(weights)
    if isinstance(shards, str | bytes):
        raise ConfigError(f"{what}: shards must be a list of names or a name -> weight mapping")
    names = _unique(shards, what)
    return names, tuple(1.0 for _ in names)


def _with_weights(
    shards: Iterable[str] | Mapping[str, float], weights: Mapping[str, float] | None, what: str
) -> Iterable[str] | Mapping[str, float]:
    if weights is None:
        return shards
    if isinstance(shards, Mapping):
        raise ConfigError(f"{what}: give weights either in the shard mapping or as weights=")
    names = list(shards)
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise UnknownShard(
            unknown[0], tuple(names), f"{what}: weights name unknown shard(s) {unknown}"
        )
    return {n: weights.get(n, 1.0) for n in names}


def _unknown(shard: str, shards: Sequence[str]) -> UnknownShard:
    return UnknownShard(shard, tuple(shards))


# -- JSON-safe values (keys and bounds keep their type across a round trip) ---


def encode_json_value(value: object) -> Any:
    """Encode a key (or range bound) so that JSON round trips keep its type."""
    if value is None:
        return None
    cls = type(value)
    if cls is str:
        return {"s": value}
    if cls is int:
        return {"i": value}
    if cls is bytes:
        return {"b": value.hex()}  # type: ignore[attr-defined]
    raise TypeError(f"cannot store a {cls.__name__} as a shard key")


def decode_json_value(obj: Any) -> Any:
    """Inverse of :func:`encode_json_value`."""
    if obj is None:
        return None
    if isinstance(obj, dict) and len(obj) == 1:
        ((tag, v),) = obj.items()
        if tag == "s":
            return str(v)
        if tag == "i":
            return int(v)
        if tag == "b":
            return bytes.fromhex(v)
    raise ConfigError(f"malformed stored key {obj!r}")


# -- the strategies -----------------------------------------------------------


class Strategy:
    """Base of every sharding strategy: an immutable key -> shard function.

    Subclasses implement :meth:`shard_for`, :meth:`add`, :meth:`remove` and
    :meth:`to_dict`; :func:`strategy_from_dict` rebuilds one from its dict.

    .. versionadded:: 0.1
    """

    kind: ClassVar[str] = ""
    __slots__ = ("_shards",)
    _shards: tuple[str, ...]

    @property
    def shards(self) -> tuple[str, ...]:
        """The shard names this strategy can return, in a stable order."""
        return self._shards

    def shard_for(self, key: Key) -> str:
        """The shard that owns ``key``.

        Raises:
            TypeError: ``key`` is not str, bytes or int.
        """
        raise NotImplementedError

    def add(self, shard: str) -> Strategy:
        """A new strategy with ``shard`` added (this one is unchanged)."""
        raise NotImplementedError

    def remove(self, shard: str) -> Strategy:
        """A new strategy without ``shard`` (this one is unchanged)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description; :func:`strategy_from_dict` inverts it."""
        raise NotImplementedError

    def _check_new(self, shard: str) -> str:
        _check_name(shard)
        if shard in self._shards:
            raise ConfigError(f"shard {shard!r} is already in {self!r}")
        return shard

    def _check_known(self, shard: str) -> str:
        if shard not in self._shards:
            raise _unknown(shard, self._shards)
        if len(self._shards) == 1:
            raise ConfigError(f"cannot remove {shard!r}: it is the last shard")
        return shard

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))


class HashRing(Strategy):
    """Consistent hashing on a 64-bit ring with virtual nodes, optionally weighted.

    Args:
        shards: shard names, or a ``{name: weight}`` mapping (weight > 0; a
            shard of weight 2 gets twice the points, so about twice the keys).
        vnodes: ring points per shard per unit of weight (default 2048, which
            keeps max/mean load <= 1.1).
        weights: alternatively, ``{name: weight}`` for some of ``shards``
            (the others weigh 1).

    .. versionadded:: 0.1
    """

    kind = "hashring"
    __slots__ = ("_owners", "_points", "_vnodes", "_weights")

    def __init__(
        self,
        shards: Iterable[str] | Mapping[str, float],
        vnodes: int = DEFAULT_VNODES,
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ConfigError(f"HashRing: vnodes must be an integer >= 1, got {vnodes!r}")
        names, weights_ = _weights(_with_weights(shards, weights, "HashRing"), "HashRing")
        self._shards = names
        self._weights = weights_
        self._vnodes = vnodes
        ring: dict[int, str] = {}
        for name, weight in zip(names, weights_):
            prefix = name.encode("utf-8") + b"#"
            for i in range(max(1, round(vnodes * weight))):
                point = _h64(prefix + str(i).encode())
                # A collision of two 64-bit points is astronomically rare; break it by name.
                other = ring.get(point)
                if other is None or name < other:
                    ring[point] = name
        points = sorted(ring)
        self._points = points
        self._owners = [ring[p] for p in points]

    @property
    def vnodes(self) -> int:
        """Ring points per shard per unit of weight."""
        return self._vnodes

    @property
    def weights(self) -> dict[str, float]:
        """Each shard's weight."""
        return dict(zip(self._shards, self._weights))

    def shard_for(self, key: Key) -> str:
        """The shard owning the first ring point at or after the key's hash."""
        i = bisect.bisect_left(self._points, _key_hash(key))
        return self._owners[i if i < len(self._owners) else 0]

    def add(self, shard: str, weight: float = 1.0) -> HashRing:
        """A new ring with ``shard`` (of ``weight``) added; ~1/(n+1) of keys move to it."""
        self._check_new(shard)
        return HashRing({**self.weights, shard: weight}, vnodes=self._vnodes)

    def remove(self, shard: str) -> HashRing:
        """A new ring without ``shard``; only its keys move."""
        self._check_known(shard)
        w = self.weights
        del w[shard]
        return HashRing(w, vnodes=self._vnodes)

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "hashring", "shards": {name: weight}, "vnodes": n}``."""
        return {"type": self.kind, "shards": self.weights, "vnodes": self._vnodes}

    def __repr__(self) -> str:
        return f"HashRing({list(self._shards)!r}, vnodes={self._vnodes})"


class Rendezvous(Strategy):
    """Rendezvous (highest random weight) hashing, optionally weighted.

    Args:
        shards: shard names, or a ``{name: weight}`` mapping.
        weights: alternatively, ``{name: weight}`` for some of ``shards``.

    .. versionadded:: 0.1
    """

    kind = "rendezvous"
    __slots__ = ("_prefixes", "_weighted", "_weights")

    def __init__(
        self,
        shards: Iterable[str] | Mapping[str, float],
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        names, ws = _weights(_with_weights(shards, weights, "Rendezvous"), "Rendezvous")
        self._shards = names
        self._weights = ws
        self._weighted = any(w != 1.0 for w in ws)
        self._prefixes = [(n.encode("utf-8") + b"\x00", n, w) for n, w in zip(names, ws)]

    @property
    def weights(self) -> dict[str, float]:
        """Each shard's weight."""
        return dict(zip(self._shards, self._weights))

    def shard_for(self, key: Key) -> str:
        """The shard with the highest score for this key."""
        kb = encode_key(key)
        best = ""
        if not self._weighted:
            top = -1
            for prefix, name, _ in self._prefixes:
                h = int.from_bytes(blake2b(prefix + kb, digest_size=8).digest(), "big")
                if h > top or (h == top and name < best):
                    top, best = h, name
            return best
        score_top = -1.0
        for prefix, name, weight in self._prefixes:
            h = int.from_bytes(blake2b(prefix + kb, digest_size=8).digest(), "big")
            u = (h + 1) / 18446744073709551617.0  # (0, 1)
            score = weight / -math.log(u)
            if score > score_top or (score == score_top and name < best):
                score_top, best = score, name
        return best

    def add(self, shard: str, weight: float = 1.0) -> Rendezvous:
        """A new strategy with ``shard`` added; only keys it now wins move."""
        self._check_new(shard)
        return Rendezvous({**self.weights, shard: weight})

    def remove(self, shard: str) -> Rendezvous:
        """A new strategy without ``shard``; only its keys move."""
        self._check_known(shard)
        w = self.weights
        del w[shard]
        return Rendezvous(w)

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "rendezvous", "shards": {name: weight}}``."""
        return {"type": self.kind, "shards": self.weights}

    def __repr__(self) -> str:
        return f"Rendezvous({list(self._shards)!r})"


class JumpHash(Strategy):
    """Jump consistent hash over an ordered list of shards.

    Shards are numbered by position, so only the last one can be removed
    (and new ones are appended).

    .. versionadded:: 0.1
    """

    kind = "jump"
    __slots__ = ()

    def __init__(self, shards: Iterable[str]) -> None:
        if isinstance(shards, Mapping):
            raise ConfigError("JumpHash takes a list of shard names (it has no weights)")
        self._shards = _unique(shards, "JumpHash")

    def shard_for(self, key: Key) -> str:
        """The shard at the position jump hash picks for this key."""
        k = _key_hash(key)
        n = len(self._shards)
        b, j = -1, 0
        while j < n:
            b = j
            k = (k * 2862933555777941757 + 1) & _MASK64
            j = int((b + 1) * (2147483648.0 / float((k >> 33) + 1)))
        return self._shards[b]

    def add(self, shard: str) -> JumpHash:
        """A new strategy with ``shard`` appended; ~1/(n+1) of keys move to it."""
        self._check_new(shard)
        return JumpHash((*self._shards, shard))

    def remove(self, shard: str) -> JumpHash:
        """A new strategy without the LAST shard.

        Raises:
            ConfigError: ``shard`` is not the last one (jump hash numbers its
                shards; removing another would remap most keys).
        """
        self._check_known(shard)
        if shard != self._shards[-1]:
            raise ConfigError(
                f"JumpHash can only remove the last shard ({self._shards[-1]!r}), "
                f"not {shard!r}: jump hash numbers its shards, so removing another one "
                "would move most keys; use HashRing or Rendezvous to remove any shard"
            )
        return JumpHash(self._shards[:-1])

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "jump", "shards": [names]}``."""
        return {"type": self.kind, "shards": list(self._shards)}

    def __repr__(self) -> str:
        return f"JumpHash({list(self._shards)!r})"


def _bound_kind(value: object) -> type:
    cls = type(value)
    if cls not in (int, str, bytes):
        raise ConfigError(f"range bounds must be int, str or bytes, not {cls.__name__}")
    return cls


class RangeStrategy(Strategy):
    """Explicit key ranges: ``[(upper_bound, shard), ...]``.

    Upper bounds are exclusive and strictly increasing; the last may be
    ``None`` (no upper bound). A shard may own several ranges. Keys compare
    in their own type, which must be the bounds' type.

    Example: ``RangeStrategy([(1000, "a"), (2000, "b"), (None, "c")])``.

    .. versionadded:: 0.1
    """

    kind = "range"
    __slots__ = ("_bounds", "_kind", "_owners")

    def __init__(self, ranges: Iterable[tuple[Key | None, str]]) -> None:
        items = list(ranges)
        if not items:
            raise ConfigError("RangeStrategy needs at least one (upper_bound, shard) range")
        bounds: list[Any] = []
        owners: list[str] = []
        kind: type | None = None
        for pos, item in enumerate(items):
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ConfigError(f"RangeStrategy: range #{pos} must be (upper_bound, shard)")
            bound, shard = item
            _check_name(shard)
            if bound is None:
                if pos != len(items) - 1:
                    raise ConfigError("RangeStrategy: only the last range may have bound None")
            else:
                k = _bound_kind(bound)
                if kind is None:
                    kind = k
                elif k is not kind:
                    raise ConfigError(f"RangeStrategy: bounds mix {kind.__name__} and {k.__name__}")
                if bounds and not bounds[-1] < bound:
                    raise ConfigError(
                        f"RangeStrategy: bounds must increase strictly ({bounds[-1]!r} "
                        f"then {bound!r})"
                    )
            bounds.append(bound)
            owners.append(shard)
        self._bounds = bounds
        self._owners = owners
        self._kind = kind
        self._shards = tuple(dict.fromkeys(owners))

    @property
    def ranges(self) -> list[tuple[Key | None, str]]:
        """The ``(upper_bound, shard)`` list."""
        return list(zip(self._bounds, self._owners))

    def _index(self, key: Key) -> int:
        if self._kind is not None and type(key) is not self._kind:
            encode_key(key)  # wrong kinds of key get the standard TypeError
            raise TypeError(
                f"this RangeStrategy has {self._kind.__name__} bounds; "
                f"a {type(key).__name__} key cannot be placed"
            )
        encode_key(key)
        finite = len(self._bounds) - (1 if self._bounds[-1] is None else 0)
        i = bisect.bisect_right(self._bounds, key, 0, finite)
        if i >= len(self._bounds):
            raise ConfigError(
                f"key {key!r} is beyond the last range bound {self._bounds[-1]!r}; "
                "add a final (None, shard) range"
            )
        return i

    def shard_for(self, key: Key) -> str:
        """The owner of the first range whose upper bound is above ``key``."""
        return self._owners[self._index(key)]

    def add(self, shard: str, upper_bound: Key | None = None) -> RangeStrategy:
        """A new strategy where ``shard`` takes part of one range.

        With ``upper_bound``, the range containing it is split: keys from that
        range's lower bound up to ``upper_bound`` (exclusive) move to
        ``shard``. Without it (int bounds only), the widest finite range is
        split at its midpoint and ``shard`` takes the upper half.

        Raises:
            ConfigError: no ``upper_bound`` and the bounds are not ints.
        """
        self._check_new(shard)
        bounds, owners = list(self._bounds), list(self._owners)
        if upper_bound is None:
            if self._kind is not int:
                raise ConfigError(
                    "RangeStrategy.add(shard) needs upper_bound=... unless the bounds are ints"
                )
            lows = [_INT_MIN, *bounds[:-1]]
            best, width = -1, 0
            for i, (lo, hi) in enumerate(zip(lows, bounds)):
                if hi is None:
                    continue
                if hi - lo > width:
                    best, width = i, hi - lo
            if best < 0 or width < 2:
                raise ConfigError("RangeStrategy.add: no finite range wide enough to split")
            mid = lows[best] + width // 2
            # the old owner keeps [lo, mid), the new shard takes [mid, hi)
            bounds.insert(best, mid)
            owners.insert(best, self._owners[best])
            owners[best + 1] = shard
            return RangeStrategy(list(zip(bounds, owners)))
        i = self._index(upper_bound)
        if self._bounds[i] == upper_bound:
            raise ConfigError(f"RangeStrategy.add: {upper_bound!r} is already a bound")
        bounds.insert(i, upper_bound)
        owners.insert(i, shard)
        return RangeStrategy(list(zip(bounds, owners)))

    def remove(self, shard: str) -> RangeStrategy:
        """A new strategy without ``shard``: each of its ranges joins the next range
        (or the previous one, for the last range)."""
        self._check_known(shard)
        pairs = list(zip(self._bounds, self._owners))
        out: list[tuple[Any, str]] = []
        for pos, (bound, owner) in enumerate(pairs):
            if owner != shard:
                out.append((bound, owner))
                continue
            nxt = next((o for _, o in pairs[pos + 1 :] if o != shard), None)
            if nxt is None:  # last ranges: the previous owner extends up to this bound
                prev_owner = out[-1][1]
                out[-1] = (bound, prev_owner)
            else:
                out.append((bound, nxt))
        merged: list[tuple[Any, str]] = []
        for bound, owner in out:  # adjacent ranges of one owner collapse into one
            if merged and merged[-1][1] == owner:
                merged[-1] = (bound, owner)
            else:
                merged.append((bound, owner))
        return RangeStrategy(merged)

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "range", "ranges": [[bound, shard], ...]}`` (bounds type-tagged)."""
        return {
            "type": self.kind,
            "ranges": [[encode_json_value(b), o] for b, o in zip(self._bounds, self._owners)],
        }

    def __repr__(self) -> str:
        return f"RangeStrategy({self.ranges!r})"


class Directory(Strategy):
    """Explicit placement: ``{key: shard}`` (region -> shard), with an optional default.

    Args:
        mapping: key -> shard name. Keys are str, bytes or int.
        default: the shard of keys not in ``mapping``; ``None`` makes an
            unmapped key a :class:`~stanchion.errors.UnknownShard` error.
        shards: extra shard names that own no key yet (``add`` uses it).

    .. versionadded:: 0.1
    """

    kind = "directory"
    __slots__ = ("_default", "_map")

    def __init__(
        self,
        mapping: Mapping[Key, str],
        default: str | None = None,
        *,
        shards: Iterable[str] = (),
    ) -> None:
        if not isinstance(mapping, Mapping):
            raise ConfigError("Directory takes a mapping of key -> shard name")
        m: dict[Key, str] = {}
        for k, shard in mapping.items():
            encode_key(k)
            m[k] = _check_name(shard)
        if default is not None:
            _check_name(default)
        self._map = m
        self._default = default
        names = list(dict.fromkeys([*m.values(), *([default] if default else []), *shards]))
        for n in names:
            _check_name(n)
        if not names:
            raise ConfigError("Directory needs at least one shard (a mapping or a default)")
        self._shards = tuple(sorted(names))

    @property
    def mapping(self) -> dict[Key, str]:
        """A copy of the key -> shard mapping."""
        return dict(self._map)

    @property
    def default(self) -> str | None:
        """The shard of unmapped keys, or ``None``."""
        return self._default

    def shard_for(self, key: Key) -> str:
        """The mapped shard, else the default.

        Raises:
            TypeError: wrong key type.
            UnknownShard: the key is unmapped and there is no default.
        """
        shard = self._map.get(key)
        if shard is not None and type(key) is not bool:
            return shard
        encode_key(key)
        if self._default is None:
            raise UnknownShard(
                None, self._shards, f"key {key!r} is not in the directory and it has no default"
            )
        return self._default

    def assign(self, key: Key, shard: str) -> Directory:
        """A new directory with ``key`` placed on ``shard``."""
        encode_key(key)
        m = dict(self._map)
        m[key] = _check_name(shard)
        return Directory(m, self._default, shards=self._shards)

    def add(self, shard: str) -> Directory:
        """A new directory that knows ``shard`` (no key moves until assigned)."""
        self._check_new(shard)
        return Directory(self._map, self._default, shards=(*self._shards, shard))

    def remove(self, shard: str, to: str | None = None) -> Directory:
        """A new directory without ``shard``; its keys go to ``to`` (or the default).

        Raises:
            ConfigError: ``shard`` owns keys and neither ``to`` nor a default remains.
        """
        self._check_known(shard)
        target = to if to is not None else (self._default if self._default != shard else None)
        if to is not None and to not in self._shards:
            raise _unknown(to, self._shards)
        owned = [k for k, s in self._map.items() if s == shard]
        if (owned or self._default == shard) and target is None:
            raise ConfigError(
                f"Directory.remove({shard!r}): it owns keys; say where they go with to=..."
            )
        m = {k: (target if s == shard else s) for k, s in self._map.items()}
        default = target if self._default == shard else self._default
        rest = [s for s in self._shards if s != shard]
        return Directory(m, default, shards=rest)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "directory", "mapping": [[key, shard]], "default": ..., "shards": [...]}``."""
        return {
            "type": self.kind,
            "mapping": [[encode_json_value(k), s] for k, s in self._map.items()],
            "default": self._default,
            "shards": list(self._shards),
        }

    def __repr__(self) -> str:
        return f"Directory({self._map!r}, default={self._default!r})"


def strategy_from_dict(data: Mapping[str, Any]) -> Strategy:
    """Rebuild a strategy from :meth:`Strategy.to_dict` output.

    Raises:
        ConfigError: unknown type or malformed fields.
    """
    try:
        kind = data["type"]
        if kind == HashRing.kind:
            return HashRing(dict(data["shards"]), vnodes=int(data.get("vnodes", DEFAULT_VNODES)))
        if kind == Rendezvous.kind:
            return Rendezvous(dict(data["shards"]))
        if kind == JumpHash.kind:
            return JumpHash(list(data["shards"]))
        if kind == RangeStrategy.kind:
            return RangeStrategy([(decode_json_value(b), o) for b, o in data["ranges"]])
        if kind == Directory.kind:
            return Directory(
                {decode_json_value(k): s for k, s in data["mapping"]},
                data.get("default"),
                shards=data.get("shards", ()),
            )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"malformed strategy description {dict(data)!r}: {exc}") from None
    raise ConfigError(
        f"unknown strategy type {data.get('type')!r} "
        "(known: hashring, rendezvous, jump, range, directory)"
    )


# -- planning -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Move:
    """Keys that change owner from ``source`` to ``target`` in a reshard.

    Attributes:
        source: the shard that owns them under the old strategy.
        target: the shard that owns them under the new strategy.
        count: how many keys of the sample (or of the keys given) move.
        fraction: ``count`` over the sample size: the estimated share of all keys.

    .. versionadded:: 0.1
    """

    source: str
    target: str
    count: int
    fraction: float


_SAMPLE: Final = 20000


def _sample(old: Strategy, new: Strategy) -> list[Any]:
    if isinstance(old, Directory) or isinstance(new, Directory):
        keys: dict[Any, None] = {}
        for s in (old, new):
            if isinstance(s, Directory):
                keys.update(dict.fromkeys(s.mapping))
        return list(keys)
    if isinstance(old, RangeStrategy) and isinstance(new, RangeStrategy):
        kind = old._kind or new._kind or int
        points: set[Any] = {b for b in (*old._bounds, *new._bounds) if b is not None}
        lowest: Any = {int: _INT_MIN, str: "", bytes: b""}[kind]
        points.add(lowest)
        return sorted(points)
    if isinstance(old, RangeStrategy) or isinstance(new, RangeStrategy):
        rs = old if isinstance(old, RangeStrategy) else new
        assert isinstance(rs, RangeStrategy)
        if rs._kind not in (None, int):
            raise ConfigError("plan_reshard: pass keys=... to compare these strategies")
    return list(range(_SAMPLE))


def plan_reshard(old: Strategy, new: Strategy, keys: Iterable[Key] | None = None) -> list[Move]:
    """The moves from ``old`` to ``new``: one :class:`Move` per (source, target) pair.

    Args:
        old: the current strategy.
        new: the strategy after the reshard.
        keys: the keys to plan for (exact counts); without them, a fixed
            deterministic sample estimates the fractions.

    Returns:
        Moves sorted by source then target; an empty list when nothing moves.
    """
    sample: Iterator[Any] | list[Any] = list(keys) if keys is not None else _sample(old, new)
    total = 0
    counts: Counter[tuple[str, str]] = Counter()
    for key in sample:
        total += 1
        a, b = old.shard_for(key), new.shard_for(key)
        if a != b:
            counts[(a, b)] += 1
    return [
        Move(src, dst, n, n / total if total else 0.0) for (src, dst), n in sorted(counts.items())
    ]


# -- SQL helpers (lexical, no parsing beyond what routing needs) ----------------

_WORD_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_WORD = _WORD_START | frozenset("0123456789")


def _scan(sql: str) -> Iterator[tuple[str, str]]:
    """Split SQL into ("code", text) and ("skip", literal/comment/quoted) pieces."""
    i, n, start = 0, len(sql), 0
    while i < n:
        c = sql[i]
        end = -1
        if c == "'":
            j = i + 1
            while j < n:
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            end = j + 1
        elif c == '"':
            j = sql.find('"', i + 1)
            end = n if j < 0 else j + 1
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            end = n if j < 0 else j
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            end = n if j < 0 else j + 2
        if end >= 0:
            if start < i:
                yield "code", sql[start:i]
            yield "skip", sql[i:end]
            i = start = end
        else:
            i += 1
    if start < n:
        yield "code", sql[start:]


def translate_named(sql: str) -> tuple[str, tuple[str, ...]]:
    """Rewrite ``:name`` parameters to PostgreSQL's ``$1, $2, ...``.

    String literals, quoted identifiers, comments and ``::`` casts are left
    alone; a name used twice gets the same number.

    Returns:
        The rewritten SQL and the parameter names in ``$n`` order.
    """
    names: list[str] = []
    index: dict[str, int] = {}
    out: list[str] = []
    for kind, text in _scan(sql):
        if kind == "skip":
            out.append(text)
            continue
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c == ":":
                if i + 1 < n and text[i + 1] == ":":
                    out.append("::")
                    i += 2
                    continue
                if i + 1 < n and text[i + 1] in _WORD_START and (i == 0 or text[i - 1] != ":"):
                    j = i + 1
                    while j < n and text[j] in _WORD:
                        j += 1
                    name = text[i + 1 : j]
                    if name not in index:
                        names.append(name)
                        index[name] = len(names)
                    out.append(f"${index[name]}")
                    i = j
                    continue
            out.append(c)
            i += 1
    return "".join(out), tuple(names)


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What the router needs to know about a statement.

    Attributes:
        kind: the first keyword, lower case (select, insert, update, ...).
        sharded: the sharded tables it names.
        reference: the reference tables it names.
        writes: True for insert/update/delete/replace/merge/upsert.
        missing_key: the first ``(table, column)`` whose key is not mentioned
            where one is required, or ``None``.
    """

    kind: str
    sharded: tuple[str, ...]
    reference: tuple[str, ...]
    writes: bool
    missing_key: tuple[str, str] | None


_WRITE_KINDS: Final = frozenset({"insert", "update", "delete", "replace", "merge", "upsert"})
_QUERY_KINDS: Final = _WRITE_KINDS | {"select", "with"}


def _words(code: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    for ch in code:
        if ch in _WORD or ch == ".":
            cur.append(ch)
        else:
            if cur:
                out.append("".join(cur))
                cur = []
            if ch in "()=,;":
                out.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def inspect_statement(
    sql: str, tables: Mapping[str, str], reference: Iterable[str] = ()
) -> StatementInfo:
    """Find the sharded and reference tables a statement names, and whether it
    mentions each sharded table's key where routing to one shard needs it.

    A SELECT, UPDATE or DELETE must name the key column after ``WHERE``; an
    INSERT with a column list must list it. Statements of other kinds (DDL)
    are not checked.
    """
    tokens: list[str] = []
    for kind, text in _scan(sql):
        if kind == "code":
            tokens += _words(text)
        elif text.startswith('"'):
            tokens.append(text[1:-1].replace('""', '"'))
        elif text.startswith("'"):
            tokens.append("'")
    low = [t.lower() for t in tokens]
    first = next((t for t in low if t not in ("(",)), "")
    refs = set(reference)
    sharded: list[str] = []
    ref_used: list[str] = []
    for pos in range(1, len(low)):
        if low[pos - 1] in ("from", "join", "into", "update", "table"):
            name = tokens[pos].split(".")[-1]
            if name in tables and name not in sharded:
                sharded.append(name)
            elif name in refs and name not in ref_used:
                ref_used.append(name)
    missing: tuple[str, str] | None = None
    if first in _QUERY_KINDS:
        for table in sharded:
            col = tables[table].lower()
            if first == "insert" or first == "replace" or first == "upsert":
                try:
                    at = low.index("into")
                    # no column list means every column, the key included
                    ok = low[at + 2] != "(" or col in low[at : low.index(")", at)]
                except (ValueError, IndexError):
                    ok = False
            else:
                ok = "where" in low and col in low[low.index("where") :]
                if not ok and "on" in low:  # join ... on t.key = ... also pins the key
                    ok = any(t.split(".")[-1] == col for t in low[low.index("on") :])
            if not ok:
                missing = (table, tables[table])
                break
    return StatementInfo(
        kind=first,
        sharded=tuple(sharded),
        reference=tuple(ref_used),
        writes=first in _WRITE_KINDS,
        missing_key=missing,
    )
