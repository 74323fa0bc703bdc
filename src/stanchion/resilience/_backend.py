"""The contract of a shared breaker-state store, and its capabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stanchion.urls import ParsedURL

__all__ = ["BreakerStore", "Capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a store offers.

    Attributes:
        cross_process: replicas in other OS processes share the state.
        expires: idle records expire by themselves (``ttl``).
    """

    cross_process: bool
    expires: bool


@runtime_checkable
class BreakerStore(Protocol):
    """A versioned blob per breaker name, updated by compare-and-set.

    The breaker's pure machine is serialised to a blob; replicas read it,
    apply their outcomes with the same pure core, and write it back only if
    nobody wrote in between (optimistic concurrency, atomic in the engine:
    a Lua script for Redis). Calls are synchronous and bounded by the store's
    timeout; they run on the breaker's background sync thread, never on the
    call path. Errors are raised as
    :class:`~stanchion.errors.BackendUnavailable`.
    """

    capabilities: Capabilities

    @classmethod
    def from_url(cls, url: ParsedURL) -> BreakerStore:
        """Build the store from its URL (``?prefix=`` prefixes every key)."""
        ...

    def load(self, name: str) -> tuple[int, bytes] | None:
        """The (version, blob) stored for ``name``, or None."""
        ...

    def compare_and_set(self, name: str, version: int, blob: bytes, ttl: float) -> bool:
        """Store ``blob`` as version ``version + 1`` if the version is still ``version``.

        ``version`` 0 means "no record yet". Returns False on a conflict.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...
