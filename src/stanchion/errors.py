"""The one error hierarchy of stanchion.

Every error stanchion raises on purpose derives from :class:`StanchionError`,
so ``except StanchionError`` catches them all; drivers' exceptions never leak
past a backend adapter (they are mapped here and chained with ``from exc``).
Errors carry their data as attributes and their message says what to do next::

    StanchionError
    ├── ConfigError (ValueError)        bad URL, option, config file, missing extra
    │   ├── UnknownShard                sharding: no such shard / key has no shard
    │   └── ShardKeyRequired            sharding: SQL on a sharded table lacks its key
    ├── BackendError                    the engine behind a backend misbehaved
    │   ├── BackendUnavailable          cannot reach it (connect, timeout, down)
    │   └── ConflictError               a concurrent writer won
    │       ├── WrongExpectedVersion    eventsourcing: stream version mismatch
    │       ├── DuplicateEventId        eventsourcing: event id already used elsewhere
    │       ├── StaleFencingToken       election: a write from a deposed leader
    │       └── ShardMapChanged         sharding: the map changed under a transaction
    ├── CircuitOpenError                resilience: the breaker rejected the call
    ├── RetryExhausted                  resilience: every attempt failed
    ├── CallTimeout (TimeoutError)      resilience: the call did not finish in time
    ├── BulkheadFull                    resilience: no free slot within max_wait
    ├── RateLimited                     resilience: no token available
    ├── StreamDeleted                   eventsourcing: the stream has a tombstone
    ├── AggregateNotFound               eventsourcing: no events for that id
    ├── PublishError                    pubsub: the broker did not accept a message
    ├── LeadershipLost                  election: the lease is gone
    ├── ShardUnavailable                sharding: one or more shards failed
    ├── ReshardError                    sharding: a reshard cannot proceed
    ├── HandlerNotFound                 cqrs: no handler for a message type
    ├── HandlerAlreadyRegistered        cqrs: a second handler for a message type
    ├── ProjectionError                 cqrs: a projection handler failed
    └── InvalidMessage (ValueError)     cqrs: a command or query failed validation

.. versionadded:: 0.1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AggregateNotFound",
    "BackendError",
    "BackendUnavailable",
    "BulkheadFull",
    "CallTimeout",
    "CircuitOpenError",
    "ConfigError",
    "ConflictError",
    "DuplicateEventId",
    "HandlerAlreadyRegistered",
    "HandlerNotFound",
    "InvalidMessage",
    "LeadershipLost",
    "ProjectionError",
    "PublishError",
    "RateLimited",
    "ReshardError",
    "RetryExhausted",
    "ShardKeyRequired",
    "ShardMapChanged",
    "ShardUnavailable",
    "StaleFencingToken",
    "StanchionError",
    "StreamDeleted",
    "UnknownShard",
    "WrongExpectedVersion",
]


class StanchionError(Exception):
    """Root of every error stanchion raises on purpose."""


class ConfigError(StanchionError, ValueError):
    """A URL, option or configuration file is invalid, or an extra is missing."""


class BackendError(StanchionError):
    """The engine behind a backend failed in a way the caller may handle."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (connection refused, timeout, server down).

    Attributes:
        url: the backend URL with any password masked, when known.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ConflictError(BackendError):
    """A concurrent writer changed the data first; reload and retry."""


# -- resilience ---------------------------------------------------------------


class CircuitOpenError(StanchionError):
    """The circuit breaker rejected the call without running it.

    Attributes:
        name: the breaker's name.
        retry_after: seconds until the next trial call is admitted (0.0 when
            the breaker is half-open with no free trial slot).
    """

    # Rejections are a hot path: the data lives in ``args`` (so the breaker can
    # build the error with the C-level ``BaseException.__new__`` alone) and the
    # message is formatted only when shown.

    def __init__(self, name: str, retry_after: float, state: str = "open") -> None:
        super().__init__(name, retry_after, state)

    @property
    def name(self) -> str:
        """The breaker's name."""
        return str(self.args[0])

    @property
    def retry_after(self) -> float:
        """Seconds until the next trial call is admitted."""
        return float(self.args[1])

    @property
    def state(self) -> str:
        """The breaker state that rejected the call."""
        return str(self.args[2]) if len(self.args) > 2 else "open"

    def __str__(self) -> str:
        return (
            f"circuit {self.name!r} is {self.state}: call rejected; "
            f"next trial in {self.retry_after:.3f}s"
        )


class RetryExhausted(StanchionError):
    """Every attempt failed, or the deadline or retry budget ran out.

    Attributes:
        attempts: how many attempts were made.
        last_exception: the exception of the last attempt, if it raised.
        last_result: the result of the last attempt, if it returned.
        reason: why it stopped: ``"attempts"``, ``"deadline"`` or ``"budget"``.
    """

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        last_exception: BaseException | None = None,
        last_result: object = None,
        reason: str = "attempts",
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_exception = last_exception
        self.last_result = last_result
        self.reason = reason


class CallTimeout(StanchionError, TimeoutError):
    """A call did not complete within its timeout.

    Attributes:
        timeout: the limit, in seconds.
    """

    def __init__(self, timeout: float, message: str | None = None) -> None:
        super().__init__(message or f"call did not complete within {timeout:.3f}s")
        self.timeout = timeout


class BulkheadFull(StanchionError):
    """The bulkhead had no free slot within ``max_wait``.

    Attributes:
        name: the bulkhead's name.
        max_concurrent: its capacity.
    """

    def __init__(self, name: str, max_concurrent: int) -> None:
        super().__init__(
            f"bulkhead {name!r} is full ({max_concurrent} calls in flight); "
            "retry later or raise max_concurrent"
        )
        self.name = name
        self.max_concurrent = max_concurrent


class RateLimited(StanchionError):
    """The rate limiter had no token for this call.

    Attributes:
        name: the limiter's name.
        retry_after: seconds until a token is available.
    """

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"rate limit {name!r} exceeded; retry in {retry_after:.3f}s")
        self.name = name
        self.retry_after = retry_after


# -- event sourcing -----------------------------------------------------------


class WrongExpectedVersion(ConflictError):
    """An append's expected version did not match the stream.

    Attributes:
        stream: the stream name.
        expected: the expected version given (an int or a constant's name).
        actual: the stream's current version (-1 when it does not exist).
    """

    def __init__(self, stream: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream!r}: expected version {expected}, actual {actual}; "
            "reload the stream and decide again"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class DuplicateEventId(ConflictError):
    """An event id is already used, at another stream or version.

    Attributes:
        event_id: the reused id.
        stream: the stream of the rejected append.
    """

    def __init__(self, event_id: object, stream: str) -> None:
        super().__init__(
            f"event id {event_id} is already stored elsewhere; "
            f"append to {stream!r} rejected (give each new event a fresh id)"
        )
        self.event_id = event_id
        self.stream = stream


class StreamDeleted(StanchionError):
    """The stream was deleted (it has a tombstone) and accepts no appends or reads.

    Attributes:
        stream: the stream name.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream!r} is deleted")
        self.stream = stream


class AggregateNotFound(StanchionError):
    """No events exist for the aggregate id asked for.

    Attributes:
        aggregate_id: the id looked up.
    """

    def __init__(self, aggregate_id: object, message: str | None = None) -> None:
        super().__init__(message or f"aggregate {aggregate_id} not found")
        self.aggregate_id = aggregate_id


# -- pub/sub -----------------------------------------------------------------


class PublishError(StanchionError):
    """The broker did not durably accept a message.

    Attributes:
        topic: the topic published to.
    """

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


# -- election ----------------------------------------------------------------


class LeadershipLost(StanchionError):
    """This node's lease expired, failed to renew, or was taken over.

    Attributes:
        group: the election group.
        token: the fencing token of the lost term.
    """

    def __init__(self, group: str, token: int | None, message: str | None = None) -> None:
        super().__init__(message or f"leadership of {group!r} lost (term token {token})")
        self.group = group
        self.token = token


class StaleFencingToken(ConflictError):
    """A write carried a fencing token older than one already seen.

    Attributes:
        resource: the fenced resource.
        token: the token presented.
        current: the highest token seen for the resource.
    """

    def __init__(self, resource: str, token: int, current: int | None) -> None:
        super().__init__(
            f"fencing token {token} for {resource!r} is stale (current {current}); "
            "this node is no longer leader"
        )
        self.resource = resource
        self.token = token
        self.current = current


# -- sharding ----------------------------------------------------------------


class ShardUnavailable(StanchionError):
    """One or more shards could not serve the request.

    Attributes:
        shards: the failed shard names, each mapped to its exception.
    """

    def __init__(self, shards: Mapping[str, BaseException | None] | str) -> None:
        failed: dict[str, BaseException | None] = (
            {shards: None} if isinstance(shards, str) else dict(shards)
        )
        detail = ", ".join(
            f"{name} ({type(exc).__name__}: {exc})" if exc else name for name, exc in failed.items()
        )
        super().__init__(f"shard(s) unavailable: {detail}")
        self.shards = failed

    @property
    def shard(self) -> str:
        """The first failed shard's name."""
        return next(iter(self.shards))


class ReshardError(StanchionError):
    """A resharding operation cannot start, continue or be aborted."""


class UnknownShard(ConfigError):
    """A shard name is not in the strategy or map, or a key has no shard.

    Attributes:
        shard: the unknown shard name (``None`` when a key has no shard).
        known: the shard names that exist.
    """

    def __init__(
        self, shard: str | None, known: tuple[str, ...] = (), message: str | None = None
    ) -> None:
        super().__init__(
            message or f"unknown shard {shard!r}; known shards: {', '.join(known) or 'none'}"
        )
        self.shard = shard
        self.known = known


class ShardKeyRequired(ConfigError):
    """A statement on a sharded table does not mention the table's shard key.

    Attributes:
        table: the sharded table.
        column: its shard key column.
    """

    def __init__(self, table: str, column: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"statement on sharded table {table!r} must use its shard key column "
            f"{column!r} (in the WHERE clause, or the INSERT column list); "
            "use fetch_all() to query every shard"
        )
        self.table = table
        self.column = column


class ShardMapChanged(ConflictError):
    """The shard map changed (a reshard cut over) during a transaction; retry it.

    Attributes:
        version: the shard-map version now in force, when known.
    """

    def __init__(self, message: str, *, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


# -- cqrs --------------------------------------------------------------------


class HandlerNotFound(StanchionError):
    """No handler is registered for the message's type.

    Attributes:
        message_type: the type dispatched.
    """

    def __init__(self, message_type: type[Any]) -> None:
        super().__init__(
            f"no handler registered for {message_type.__qualname__}; register one first"
        )
        self.message_type = message_type


class HandlerAlreadyRegistered(StanchionError):
    """A handler is already registered for the message's type.

    Attributes:
        message_type: the type registered twice.
    """

    def __init__(self, message_type: type[Any]) -> None:
        super().__init__(f"a handler for {message_type.__qualname__} is already registered")
        self.message_type = message_type


class ProjectionError(StanchionError):
    """A projection handler failed; the checkpoint stays before the event.

    Attributes:
        projection: the projection name.
        event_id: the id of the failing event.
        position: its global position.
        event_type: its type name, when known.
        checkpoint: the projection's checkpoint after the failure (the
            position of the event before the failing one), when known.
    """

    def __init__(
        self,
        projection: str,
        event_id: object,
        position: int,
        cause: str,
        *,
        event_type: str | None = None,
        checkpoint: int | None = None,
    ) -> None:
        kind = f" ({event_type})" if event_type else ""
        stays = "the event before it" if checkpoint is None else f"position {checkpoint}"
        super().__init__(
            f"projection {projection!r} failed on event {event_id}{kind} at position {position}: "
            f"{cause}; the checkpoint stays at {stays}; "
            "fix the handler (or park the event) and run again"
        )
        self.projection = projection
        self.event_id = event_id
        self.position = position
        self.event_type = event_type
        self.checkpoint = checkpoint


class InvalidMessage(StanchionError, ValueError):
    """A command or query failed validation before reaching its handler.

    Attributes:
        message_type: the message's type.
        reason: what is wrong with it.
    """

    def __init__(self, message_type: type[Any], reason: str) -> None:
        super().__init__(f"invalid {message_type.__qualname__}: {reason}")
        self.message_type = message_type
        self.reason = reason
