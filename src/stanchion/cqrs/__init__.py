"""CQRS: command and query buses, projections into read models, the outbox.

The command side dispatches typed commands to one handler each
(:class:`CommandBus`), which load an aggregate, decide and save; the query
side answers typed queries from denormalised views (:class:`QueryBus`).
A :class:`ProjectionRunner` folds the event store's log into a read model
(SQLite, PostgreSQL or Redis) with each view change and its checkpoint in one
transaction, so the views are exactly-once in effect and rebuildable at any
time; :class:`Outbox` relays the events to a pub/sub topic.

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.cqrs._app import App
from stanchion.cqrs._backend import ParkedEvent, ReadModel, SQLTransaction, Transaction, View
from stanchion.cqrs._bus import (
    CommandBus,
    CommandResult,
    Middleware,
    QueryBus,
    Trace,
    current_trace,
    logging_middleware,
    metrics_middleware,
    retry_on_conflict,
    tracing_middleware,
    validation_middleware,
)
from stanchion.cqrs._core import Checkpoint, Lag
from stanchion.cqrs._outbox import Outbox
from stanchion.cqrs._projection import Projection, handles
from stanchion.cqrs._runner import ProjectionRunner, ProjectionStatus
from stanchion.errors import (
    HandlerAlreadyRegistered,
    HandlerNotFound,
    InvalidMessage,
    ProjectionError,
)

__all__ = [
    "App",
    "Checkpoint",
    "CommandBus",
    "CommandResult",
    "HandlerAlreadyRegistered",
    "HandlerNotFound",
    "InvalidMessage",
    "Lag",
    "Middleware",
    "Outbox",
    "ParkedEvent",
    "Projection",
    "ProjectionError",
    "ProjectionRunner",
    "ProjectionStatus",
    "QueryBus",
    "ReadModel",
    "SQLTransaction",
    "Trace",
    "Transaction",
    "View",
    "current_trace",
    "handles",
    "logging_middleware",
    "metrics_middleware",
    "retry_on_conflict",
    "tracing_middleware",
    "validation_middleware",
]
