"""The contract every election backend implements (thin adapters, no policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgspec

__all__ = ["Capabilities", "FenceBackend", "Grant", "Holder", "LeaseBackend"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers beyond the contract.

    Attributes:
        detects_death: a crashed holder is noticed at once (a kernel lock),
            not only when its lease expires.
        multi_host: candidates may run on different hosts.
        persistent_tokens: the term counter survives a restart of the backend;
            when False the backend derives tokens from its clock instead.
    """

    detects_death: bool = False
    multi_host: bool = True
    persistent_tokens: bool = True


class Grant(msgspec.Struct, frozen=True):
    """A lease granted by the backend: the term's fencing token."""

    token: int


class Holder(msgspec.Struct, frozen=True):
    """The current holder of a group's lease, as the backend sees it.

    Attributes:
        identity: the holder's identity.
        token: the fencing token of its term.
        remaining: seconds until the lease expires by the backend's clock.
    """

    identity: str
    token: int
    remaining: float


class LeaseBackend(Protocol):
    """Leases with fencing tokens for election groups.

    Each call is one atomic step on the backend. Errors reaching the engine
    raise :class:`~stanchion.errors.BackendUnavailable`.
    """

    capabilities: Capabilities

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease when it is free or expired.

        When another candidate holds it, return that :class:`Holder` if the
        backend knows it cheaply (the follower then retries right when the
        lease runs out), else None.

        The token strictly increases with every grant of the group, in the same
        atomic step that grants the lease.
        """
        ...

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease of term ``token`` by ``ttl``; False when it is no longer ours."""
        ...

    async def release(self, group: str, identity: str, token: int) -> None:
        """Give up term ``token`` if it is still ours (no-op otherwise)."""
        ...

    async def observe(self, group: str) -> Holder | None:
        """The current holder, or None when the lease is free or expired."""
        ...

    async def wait(self, group: str, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True early when the lease may be free.

        Backends without change notification sleep and return False.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and locks."""
        ...


class FenceBackend(Protocol):
    """A fenced resource: rejects writes carrying a token below the highest seen."""

    async def current(self, resource: str) -> int | None:
        """The highest token accepted for ``resource`` so far, or None."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
