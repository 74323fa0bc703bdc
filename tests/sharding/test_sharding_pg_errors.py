"""The PostgreSQL shard adapter never lets a driver exception through."""

from __future__ import annotations

import asyncpg

from stanchion.errors import BackendError, BackendUnavailable
from stanchion.sharding.backends._postgres import _map_error


def test_broken_connection_errors_are_unavailable() -> None:
    for exc in (
        asyncpg.exceptions.InternalClientError("got result for unknown protocol state 3"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.ObjectNotInPrerequisiteStateError(
            'database "x" is not currently accepting connections'
        ),
        OSError("connection refused"),
    ):
        assert isinstance(_map_error(exc, "pg://x"), BackendUnavailable), exc


def test_other_driver_errors_become_backend_errors() -> None:
    mapped = _map_error(asyncpg.exceptions.InvalidSQLStatementNameError("nope"), "pg://x")
    assert isinstance(mapped, BackendError) and not isinstance(mapped, BackendUnavailable)
    mapped = _map_error(asyncpg.exceptions.OutdatedSchemaCacheError("stale"), "pg://x")
    assert isinstance(mapped, BackendError)
