"""Command and query buses with middleware."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, overload

import msgspec

from stanchion.cqrs._core import HandlerTable
from stanchion.errors import ConfigError, InvalidMessage, WrongExpectedVersion
from stanchion.observability import Metrics, StructLogger, get_logger

__all__ = [
    "CommandBus",
    "CommandResult",
    "Middleware",
    "Next",
    "QueryBus",
    "Trace",
    "current_trace",
    "logging_middleware",
    "metrics_middleware",
    "retry_on_conflict",
    "tracing_middleware",
    "validation_middleware",
]

T = TypeVar("T")
M = TypeVar("M")
Handler = Callable[[Any], Any]
Next = Callable[[Any], Awaitable[Any]]
"""The rest of the chain: ``await call_next(message)`` runs the handler."""


class Middleware(Protocol):
    """``async def mw(message, call_next) -> result``: wraps every dispatch of a bus.

    It may inspect or replace the message, call ``await call_next(message)``
    zero or more times (retry), and inspect or replace the result. The first
    middleware of a bus is the outermost.
    """

    def __call__(self, message: Any, call_next: Next, /) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class CommandResult(Generic[T]):
    """What a command handler returned, with the global position of its events.

    Attributes:
        value: the handler's return value (an ``AppendResult`` when it
            returned one).
        position: the global position of the last event the command wrote,
            for read-your-writes (``await runner.wait_for(result.position)``);
            None when it wrote nothing or did not say.

    A handler may return a ``CommandResult`` itself; any other return value
    with a ``last_position`` attribute (an ``AppendResult``) fills
    ``position`` from it.

    .. versionadded:: 0.1
    """

    value: T
    position: int | None = None


def _as_result(value: Any) -> CommandResult[Any]:
    if isinstance(value, CommandResult):
        return value
    position = getattr(value, "last_position", None)
    if not isinstance(position, int) or isinstance(position, bool):
        position = None
    return CommandResult(value, position)


class _Waitable(Protocol):
    async def wait_for(self, position: int, timeout: float | None = ...) -> None: ...  # noqa: ASYNC109


class _Bus:
    _kind = "bus"

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self._table: HandlerTable[Handler] = HandlerTable()
        self._middleware: list[Middleware] = list(middleware)

    def use(self, middleware: Middleware) -> None:
        """Append ``middleware`` (it runs inside those added before it)."""
        self._middleware.append(middleware)

    def handles(self, message_type: type[Any]) -> bool:
        """True when a handler is registered for ``message_type`` (or a base)."""
        try:
            self._table.lookup(message_type)
        except LookupError:
            return False
        except Exception:
            return False
        return True

    def unregister(self, message_type: type[Any]) -> None:
        """Remove the handler of ``message_type``."""
        self._table.unregister(message_type)

    async def _run(self, message: Any, handler: Handler) -> Any:
        async def call(msg: Any) -> Any:
            result = handler(msg)
            if inspect.isawaitable(result):
                result = await result
            return result

        chain: Next = call
        for mw in reversed(self._middleware):
            chain = _bind(mw, chain)
        return await chain(message)

    def _check(self, message: Any) -> Handler:
        if isinstance(message, type):
            raise ConfigError(f"dispatch an instance of {message.__qualname__}, not the class")
        return self._table.lookup(type(message))


def _bind(mw: Middleware, nxt: Next) -> Next:
    async def step(message: Any) -> Any:
        return await mw(message, nxt)

    return step


class CommandBus(_Bus):
    """Routes each command type to exactly one handler, through middleware.

    Example::

        bus = CommandBus(middleware=[retry_on_conflict(attempts=3)])

        @bus.register(PlaceOrder)
        async def place(cmd: PlaceOrder) -> AppendResult:
            order = Order.place(cmd.order_id, cmd.items)
            return await orders.save(order)

        result = await bus.dispatch(PlaceOrder(...))
        await runner.wait_for(result.position)

    Raises:
        HandlerAlreadyRegistered: from :meth:`register`, a second handler.
        HandlerNotFound: from :meth:`dispatch`, no handler for the type.

    .. versionadded:: 0.1
    """

    _kind = "command"

    @overload
    def register(
        self, command_type: type[M]
    ) -> Callable[[Callable[[M], Any]], Callable[[M], Any]]: ...
    @overload
    def register(
        self, command_type: type[M], handler: Callable[[M], Any]
    ) -> Callable[[M], Any]: ...
    def register(self, command_type: type[M], handler: Callable[[M], Any] | None = None) -> Any:
        """Register ``handler`` for ``command_type`` (or use as a decorator)."""
        if handler is None:

            def deco(fn: Callable[[M], Any]) -> Callable[[M], Any]:
                self._table.register(command_type, fn)
                return fn

            return deco
        self._table.register(command_type, handler)
        return handler

    async def dispatch(self, command: Any) -> CommandResult[Any]:
        """Run the command's handler through the middleware.

        Returns:
            a :class:`CommandResult` carrying the handler's value and the
            global position of the events it wrote.
        """
        handler = self._check(command)
        return _as_result(await self._run(command, handler))

    send = dispatch


class QueryBus(_Bus):
    """Routes each query type to exactly one handler that reads a view.

    A handler registered with ``view=`` (a :class:`ProjectionRunner`, or any
    object with ``async wait_for(position, timeout)``) supports
    read-your-writes: ``await bus.dispatch(query, wait_for=position)`` first
    waits until that view has applied the event at ``position``.

    .. versionadded:: 0.1
    """

    _kind = "query"

    def __init__(self, middleware: Sequence[Middleware] = (), *, timeout: float = 5.0) -> None:
        super().__init__(middleware)
        self._views: dict[type[Any], _Waitable] = {}
        self.timeout = timeout

    @overload
    def register(
        self, query_type: type[M], *, view: _Waitable | None = None
    ) -> Callable[[Callable[[M], Any]], Callable[[M], Any]]: ...
    @overload
    def register(
        self, query_type: type[M], handler: Callable[[M], Any], *, view: _Waitable | None = None
    ) -> Callable[[M], Any]: ...
    def register(
        self,
        query_type: type[M],
        handler: Callable[[M], Any] | None = None,
        *,
        view: _Waitable | None = None,
    ) -> Any:
        """Register ``handler`` for ``query_type`` (or use as a decorator).

        Args:
            view: what the handler reads, for ``dispatch(..., wait_for=)``.
        """

        def bind(fn: Callable[[M], Any]) -> Callable[[M], Any]:
            self._table.register(query_type, fn)
            if view is not None:
                self._views[query_type] = view
            return fn

        if handler is None:
            return bind
        return bind(handler)

    async def dispatch(
        self,
        query: Any,
        *,
        wait_for: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Answer ``query`` from its view.

        Args:
            wait_for: a global position (``CommandResult.position``); the
                query runs only once the view has reached it.
            timeout: seconds to wait for that (default: the bus's ``timeout``).

        Raises:
            HandlerNotFound: no handler for the query type.
            TimeoutError: the view did not reach ``wait_for`` in time.
        """
        handler = self._check(query)
        if wait_for is not None:
            view = self._views.get(type(query))
            if view is None:
                raise ConfigError(
                    f"query {type(query).__qualname__} was registered without view=; "
                    "pass the ProjectionRunner (or read-model waiter) to wait on"
                )
            await view.wait_for(wait_for, self.timeout if timeout is None else timeout)
        return await self._run(query, handler)

    ask = dispatch


# -- middleware --------------------------------------------------------------


def validation_middleware() -> Middleware:
    """Validate each message before its handler runs.

    A msgspec Struct is re-checked against its field types and constraints
    (``Annotated[int, Meta(gt=0)]``); a message with a ``validate()`` method
    has it called. Failures raise :class:`~stanchion.errors.InvalidMessage`.
    """

    async def validate(message: Any, call_next: Next) -> Any:
        cls = type(message)
        try:
            if isinstance(message, msgspec.Struct):
                msgspec.convert(msgspec.to_builtins(message), cls)
            check = getattr(message, "validate", None)
            if callable(check):
                out = check()
                if inspect.isawaitable(out):
                    await out
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            if isinstance(exc, InvalidMessage):
                raise
            raise InvalidMessage(cls, str(exc)) from exc
        return await call_next(message)

    return validate


def logging_middleware(logger: StructLogger | None = None) -> Middleware:
    """Log each dispatch (``cqrs.handled`` / ``cqrs.failed``) with type and duration."""
    log = logger or get_logger("stanchion.cqrs")

    async def logged(message: Any, call_next: Next) -> Any:
        start = time.perf_counter()
        name = type(message).__qualname__
        try:
            result = await call_next(message)
        except Exception as exc:
            log.warning(
                "cqrs.failed",
                message_type=name,
                error=f"{type(exc).__name__}: {exc}",
                seconds=round(time.perf_counter() - start, 6),
            )
            raise
        log.debug("cqrs.handled", message_type=name, seconds=round(time.perf_counter() - start, 6))
        return result

    return logged


def metrics_middleware(metrics: Metrics | None = None, *, bus: str = "command") -> Middleware:
    """Count dispatches by type and outcome, and time handlers (Prometheus).

    Metrics: ``stanchion_cqrs_messages_total{bus,type,outcome}`` and
    ``stanchion_cqrs_handler_seconds{bus,type}``.
    """
    m = metrics or Metrics()
    count = m.counter("cqrs_messages", "Messages dispatched", ("bus", "type", "outcome"))
    seconds = m.histogram("cqrs_handler_seconds", "Handler latency", ("bus", "type"))

    async def measured(message: Any, call_next: Next) -> Any:
        name = type(message).__qualname__
        start = time.perf_counter()
        try:
            result = await call_next(message)
        except Exception as exc:
            count.labels(bus, name, type(exc).__name__).inc()
            raise
        finally:
            seconds.labels(bus, name).observe(time.perf_counter() - start)
        count.labels(bus, name, "ok").inc()
        return result

    return measured


@dataclass(frozen=True, slots=True)
class Trace:
    """The tracing context of the message being handled.

    Attributes:
        message_id: a fresh id of this dispatch.
        correlation_id: shared by every message caused by the same request.
        causation_id: the id of the dispatch that caused this one, if any.
    """

    message_id: str
    correlation_id: str
    causation_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """As event metadata: ``correlation_id`` and ``causation_id``."""
        out = {"correlation_id": self.correlation_id, "causation_id": self.message_id}
        out.update(self.extra)
        return out


_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "stanchion_cqrs_trace", default=None
)


def current_trace() -> Trace | None:
    """The :class:`Trace` of the dispatch running in this task, or None."""
    return _TRACE.get()


def tracing_middleware() -> Middleware:
    """Give each dispatch a :class:`Trace`; nested dispatches share the correlation id.

    Handlers read it with :func:`current_trace` and put ``trace.metadata()``
    on the events they record, so correlation and causation ids flow from
    command to events.
    """

    async def traced(message: Any, call_next: Next) -> Any:
        outer = _TRACE.get()
        message_id = str(uuid.uuid4())
        given = getattr(message, "correlation_id", None)
        correlation = (
            outer.correlation_id if outer else (given if isinstance(given, str) else message_id)
        )
        trace = Trace(message_id, correlation, outer.message_id if outer else None)
        token = _TRACE.set(trace)
        try:
            return await call_next(message)
        finally:
            _TRACE.reset(token)

    return traced


def retry_on_conflict(
    attempts: int = 3,
    *,
    backoff: float = 0.005,
    max_backoff: float = 0.2,
    on: tuple[type[BaseException], ...] = (WrongExpectedVersion,),
) -> Middleware:
    """Re-run a command whose save lost an optimistic-concurrency race.

    The handler loads, decides and saves again, so a retry sees the winner's
    events. After ``attempts`` tries the last ``WrongExpectedVersion`` is
    raised. Backoff is exponential with full jitter, capped at ``max_backoff``.
    """
    if attempts < 1:
        raise ConfigError(f"retry_on_conflict: attempts must be >= 1, got {attempts}")
    if backoff < 0 or max_backoff < 0:
        raise ConfigError("retry_on_conflict: backoff must be >= 0")

    async def retrying(message: Any, call_next: Next) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return await call_next(message)
            except on:
                if attempt >= attempts:
                    raise
                delay = min(max_backoff, backoff * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, delay))
        raise AssertionError("unreachable")  # pragma: no cover

    return retrying
