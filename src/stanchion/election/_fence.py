"""Fencing: reject the writes of a deposed leader (Kleppmann's token rule)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, final

from stanchion.election._api import _takes_an_argument
from stanchion.errors import ConfigError
from stanchion.urls import BackendRegistry, default_registry, parse_url

__all__ = ["Fence"]

T = TypeVar("T")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@final
class Fence:
    """A resource that accepts a write only with the highest fencing token seen so far.

    ``await fence.write(lease.token, fn)`` checks, atomically with the write,
    that no newer term has written to ``resource``: the token is compared
    with the highest recorded for the resource, recorded, and ``fn(handle)``
    runs in the same transaction. A token below the recorded one raises
    :class:`~stanchion.errors.StaleFencingToken` and ``fn`` does not run.
    Equal tokens pass (one leader writes many times in its term).

    ``handle`` is what ``fn`` writes through, inside the transaction:

    - ``sqlite://``: the :class:`sqlite3.Connection` (``BEGIN IMMEDIATE``);
    - ``postgresql://``: the asyncpg connection (a transaction; the fence
      row is locked ``FOR UPDATE``);
    - ``redis://``: a :class:`redis.asyncio.client.Pipeline` in ``MULTI``
      after ``WATCH`` of the fence key; queue commands on it, the fence
      update and your commands run in one ``EXEC``;
    - ``file:///dir``: the directory (the resource's token file is locked
      while ``fn`` runs);
    - ``etcd://``: None (the token is advanced by compare-and-swap, then
      ``fn`` runs);
    - ``memory://``: None.

    ``fn`` may be a plain function or a coroutine function, taking the
    handle or no argument at all.

    For tables of your own, put the rule in the statement instead:
    :meth:`update_sql` builds ``UPDATE … SET …, fencing_token = $n WHERE …
    AND fencing_token <= $n``; zero rows updated means a newer leader wrote.

    Args:
        url: ``sqlite:///path.db``, ``postgresql://…``, ``redis://…``,
            ``file:///dir``, ``etcd://host:port`` or ``memory://name``
            (``?prefix=`` honoured).
        resource: the name of the fenced resource.

    .. versionadded:: 0.1
    """

    __slots__ = ("_backend", "resource", "url")

    SQL = (
        "UPDATE {table} SET {assignments}, fencing_token = $1 "
        "WHERE ({where}) AND fencing_token <= $1"
    )
    """The fencing rule as a SQL snippet (PostgreSQL placeholders; ``$1`` is the token).

    Zero rows updated means a newer term has written: the caller is deposed.
    :meth:`update_sql` fills it in with checked identifiers.
    """

    def __init__(
        self,
        url: str,
        resource: str,
        *,
        connect_timeout: float = 5.0,
        registry: BackendRegistry | None = None,
    ) -> None:
        if not isinstance(resource, str) or not resource:
            raise ConfigError(f"resource must be a non-empty string, got {resource!r}")
        target, parsed = (registry or default_registry).load("fence", parse_url(url))
        factory: Any = getattr(target, "from_url")  # noqa: B009
        self._backend: Any = factory(parsed, connect_timeout=connect_timeout)
        self.resource = resource
        self.url = parsed.masked()

    async def write(self, token: int, fn: Callable[[Any], Awaitable[T] | T]) -> T:
        """Run ``fn(handle)`` only if ``token`` is not older than any token seen.

        Returns:
            What ``fn`` returned.

        Raises:
            StaleFencingToken: a newer term already wrote to the resource.
            BackendUnavailable: the backend could not be reached.
        """
        if isinstance(token, bool) or not isinstance(token, int):
            raise ConfigError(f"a fencing token is an int, got {token!r}")
        call: Callable[[Any], Awaitable[T] | T] = fn
        if not _takes_an_argument(fn):
            call = lambda _handle: fn()  # type: ignore[call-arg]  # noqa: E731
        result: T = await self._backend.write(self.resource, token, call)
        return result

    async def current(self) -> int | None:
        """The highest token accepted for the resource so far, or None."""
        value: int | None = await self._backend.current(self.resource)
        return value

    @staticmethod
    def update_sql(
        table: str,
        assignments: str,
        where: str,
        *,
        column: str = "fencing_token",
        param: str = "$1",
    ) -> str:
        """A fenced ``UPDATE`` for your own table.

        Example::

            Fence.update_sql("accounts", "balance = $2", "id = $3")
            # UPDATE accounts SET balance = $2, fencing_token = $1
            #   WHERE (id = $3) AND fencing_token <= $1

        Run it with the lease token as ``param``; if it updates no row, a
        newer leader has written: raise
        :class:`~stanchion.errors.StaleFencingToken`. Use ``param="?"``-style
        placeholders only with named or positional care (SQLite: ``:token``).
        """
        for name in (table, column):
            if not _IDENT.match(name):
                raise ConfigError(f"{name!r} is not a plain SQL identifier")
        return (
            f"UPDATE {table} SET {assignments}, {column} = {param} "
            f"WHERE ({where}) AND {column} <= {param}"
        )

    async def aclose(self) -> None:
        """Release the backend's connections."""
        await self._backend.aclose()

    async def __aenter__(self) -> Fence:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Fence {self.url} resource={self.resource!r}>"
