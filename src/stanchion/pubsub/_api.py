"""The Broker facade and the consumer runtime, written once above the drivers.

The runtime of a subscription is three small loops:

* the *fetch loop* asks the driver for at most ``prefetch - held`` messages
  (``held`` counts every message fetched and not yet acked: running, waiting
  for a retry, or waiting behind its key), so a slow consumer bounds memory;
* each message runs in its own task under a ``concurrency`` semaphore,
  through the middleware chain; a failure asks :class:`DeliveryPolicy` what to
  do and either schedules the redelivery on a timer (``loop.call_later``; the
  consumer keeps consuming) or copies the message to the dead-letter topic;
* the *ack loop* batches acks, and the *lease loop* renews the visibility
  leases of held messages every ``ack_timeout / 3`` so that only a dead
  consumer's messages go to another member.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final, Self

from prometheus_client import CollectorRegistry

from stanchion.clock import Clock, monotonic
from stanchion.codec import json_codec
from stanchion.errors import ConfigError
from stanchion.observability import Metrics, StructLogger, get_logger
from stanchion.pubsub._backend import (
    Capabilities,
    Consumer,
    ConsumerSpec,
    Delivery,
    Driver,
    OutboundMessage,
)
from stanchion.pubsub._core import (
    DEFAULT_DEAD_SUFFIX,
    H_CONTENT_TYPE,
    H_CORRELATION,
    H_TRACEPARENT,
    DeadLetter,
    DeliveryPolicy,
    KeyGate,
    Message,
    TopicPattern,
    child_traceparent,
    dead_letter_headers,
    validate_topic,
)
from stanchion.urls import BackendRegistry, default_registry

__all__ = [
    "Broker",
    "Connecting",
    "Handler",
    "Middleware",
    "Outgoing",
    "Subscription",
    "current_message",
    "current_subscription",
]

Handler = Callable[[Message], Awaitable[Any]]
"""``async def handler(msg: Message) -> None``: return to ack, raise to retry."""

Middleware = Callable[[Handler], Handler]
"""Wraps a handler in another (Watermill style): ``def mw(next: Handler) -> Handler``."""

_current: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "stanchion_pubsub_message", default=None
)
_current_sub: contextvars.ContextVar[Subscription | None] = contextvars.ContextVar(
    "stanchion_pubsub_subscription", default=None
)
_log = get_logger("stanchion.pubsub")


def current_message() -> Message | None:
    """The message whose handler is running in this task, or None.

    Messages published from inside a handler inherit its correlation id and
    trace (``traceparent``) through this.

    .. versionadded:: 0.1
    """
    return _current.get()


def current_subscription() -> Subscription | None:
    """The subscription whose handler is running in this task, or None.

    .. versionadded:: 0.1
    """
    return _current_sub.get()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for :meth:`Broker.publish_many`.

    .. versionadded:: 0.1
    """

    topic: str
    data: object
    key: str | None = None
    headers: Mapping[str, str] | None = None
    id: str | None = None


def _now_us() -> int:
    return time.time_ns() // 1000


def _encode_data(data: object, headers: dict[str, str]) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        headers.setdefault(H_CONTENT_TYPE, "text/plain; charset=utf-8")
        return data.encode()
    headers.setdefault(H_CONTENT_TYPE, "application/json")
    return json_codec.encode(data)


def _as_async(handler: Callable[[Message], Any]) -> Handler:
    # Accept plain functions too (they run on the event loop: keep them short).
    call = getattr(handler, "__call__", None)  # noqa: B004
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call):
        return handler

    async def adapter(msg: Message) -> Any:
        result = handler(msg)
        if inspect.isawaitable(result):
            return await result
        return result

    return adapter


class _Metrics:
    __slots__ = (
        "acked",
        "dead",
        "delivered",
        "in_flight",
        "lag",
        "latency",
        "published",
        "retried",
    )

    def __init__(self, m: Metrics) -> None:
        self.published = m.counter("pubsub_published", "Messages published", ["topic"])
        self.delivered = m.counter(
            "pubsub_delivered", "Messages delivered to handlers", ["topic", "group"]
        )
        self.acked = m.counter("pubsub_acked", "Messages handled and acked", ["topic", "group"])
        self.retried = m.counter(
            "pubsub_retried", "Handler failures scheduled for redelivery", ["topic", "group"]
        )
        self.dead = m.counter(
            "pubsub_dead_lettered", "Messages moved to a dead-letter topic", ["topic", "group"]
        )
        self.latency = m.histogram(
            "pubsub_handler_seconds", "Handler latency in seconds", ["topic", "group"]
        )
        self.lag = m.gauge(
            "pubsub_consumer_lag", "Messages of the group not yet acked", ["topic", "group"]
        )
        self.in_flight = m.gauge(
            "pubsub_in_flight", "Messages held by subscriptions", ["topic", "group"]
        )


class Broker:
    """One broker API over every backend; build it with :meth:`connect`.

    Example::

        async with await Broker.connect("sqlite:///app.db") as broker:
            await broker.subscribe("orders.placed", handle, group="billing")
            await broker.publish("orders.placed", {"order": 42})

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        driver: Driver,
        *,
        url: str = "",
        middleware: Sequence[Middleware] = (),
        metrics: CollectorRegistry | None = None,
        clock: Clock = monotonic,
        logger: StructLogger | None = None,
    ) -> None:
        self._driver = driver
        self.url = url
        self._middleware = tuple(middleware)
        self.metrics = Metrics(metrics)
        self._m = _Metrics(self.metrics)
        self._clock = clock
        self._log = logger or _log
        self._subs: set[Subscription] = set()
        self._routers: list[Any] = []
        self._closed = False

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        middleware: Sequence[Middleware] = (),
        metrics: CollectorRegistry | None = None,
        clock: Clock = monotonic,
        logger: StructLogger | None = None,
        backends: BackendRegistry | None = None,
    ) -> Connecting:
        """Connect to the broker at ``url``: ``await Broker.connect(url)`` or
        ``async with Broker.connect(url) as broker``.

        ``memory://name``, ``sqlite:///path.db``, ``redis://host:6379/0``,
        ``nats://host:4222``, ``amqp://user:pass@host/vhost``,
        ``mqtt://host:1883``; every URL takes ``?prefix=`` to namespace what
        the backend creates.

        Args:
            url: the backend URL.
            middleware: wraps every handler of this broker (outermost first).
            metrics: a Prometheus registry (default: a private one).
            clock: monotonic clock (tests).
            logger: structured logger.
            backends: the backend registry (default: stanchion's).

        Raises:
            ConfigError: bad URL, unknown scheme, missing extra.
            BackendUnavailable: the broker cannot be reached.
        """

        async def open_() -> Broker:
            factory, parsed = (backends or default_registry).load("pubsub", url)
            opener = getattr(factory, "open", None)
            if opener is None:
                raise ConfigError(f"pubsub backend for {parsed.masked()} has no open()")
            driver = await opener(parsed)
            return cls(
                driver,
                url=parsed.masked(),
                middleware=middleware,
                metrics=metrics,
                clock=clock,
                logger=logger,
            )

        return Connecting(open_)

    @property
    def capabilities(self) -> Capabilities:
        """What this backend guarantees (see :class:`Capabilities`)."""
        return self._driver.capabilities

    @property
    def driver(self) -> Driver:
        """The backend driver (for tests and advanced use)."""
        return self._driver

    # -- publishing ---------------------------------------------------------

    def _outbound(
        self,
        topic: str,
        data: object,
        key: str | None,
        headers: Mapping[str, str] | None,
        id: object | None,
    ) -> OutboundMessage:
        validate_topic(topic)
        hdrs: dict[str, str] = {}
        if headers:
            for k, v in headers.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ConfigError(f"headers must map str to str, got {k!r}: {type(v).__name__}")
                hdrs[k] = v
        if key is not None and not isinstance(key, str):
            raise ConfigError(f"key must be a str or None, got {type(key).__name__}")
        payload = _encode_data(data, hdrs)
        rnd = os.urandom(40).hex()
        mid = str(id) if id is not None else rnd[48:80]
        if not mid:
            raise ConfigError("message id must not be empty")
        parent = _current.get()
        if H_CORRELATION not in hdrs:
            inherited = parent.headers.get(H_CORRELATION) if parent is not None else None
            hdrs[H_CORRELATION] = inherited or mid
        tp = hdrs.get(H_TRACEPARENT) or (parent.headers.get(H_TRACEPARENT) if parent else None)
        hdrs[H_TRACEPARENT] = child_traceparent(tp, rnd[:32], rnd[32:48])
        return OutboundMessage(topic, mid, key, hdrs, payload, _now_us())

    async def publish(
        self,
        topic: str,
        data: bytes | dict[str, Any] | object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
    ) -> str:
        """Publish one message; return its id once the broker durably accepted it.

        Args:
            topic: dot-separated words, no wildcards.
            data: bytes as they are; str as UTF-8; anything else as JSON.
            key: the ordering key (see ``ordered_by_key``).
            headers: string headers; ``x-correlation-id`` and ``traceparent``
                are added (inherited from the message being handled, if any).
            id: the message id (default: a new UUID); the dedupe key.

        Raises:
            ConfigError: invalid topic, headers or key; ``EncodeError`` (a
                ``ConfigError`` and ``TypeError``) for an unserialisable payload.
            PublishError: the broker refused the message.
            BackendUnavailable: the broker cannot be reached.
        """
        self._check_open()
        out = self._outbound(topic, data, key, headers, id)
        await self._driver.publish([out])
        self._m.published.labels(topic).inc()
        return out.id

    async def publish_many(
        self,
        topic_or_messages: str | Iterable[Outgoing | tuple[str, object]],
        items: Iterable[object] | None = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Publish a batch; return the ids once the broker durably accepted all.

        Either ``publish_many("topic", [data, ...])`` or
        ``publish_many([Outgoing(topic, data, ...), (topic, data), ...])``.

        Raises:
            the same errors as :meth:`publish`; nothing is sent when a message
            of the batch is invalid.
        """
        self._check_open()
        outs: list[OutboundMessage] = []
        if isinstance(topic_or_messages, str):
            for data in items or ():
                outs.append(self._outbound(topic_or_messages, data, key, headers, None))
        else:
            if items is not None:
                raise ConfigError("publish_many(messages) takes no second argument")
            for item in topic_or_messages:
                if isinstance(item, Outgoing):
                    outs.append(
                        self._outbound(item.topic, item.data, item.key, item.headers, item.id)
                    )
                elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    outs.append(self._outbound(item[0], item[1], key, headers, None))
                else:
                    raise ConfigError(
                        f"publish_many items must be Outgoing or (topic, data), got {item!r:.80}"
                    )
        if outs:
            await self._driver.publish(outs)
        for o in outs:
            self._m.published.labels(o.topic).inc()
        return [o.id for o in outs]

    # -- subscribing --------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        handler: Handler,
        *,
        group: str,
        concurrency: int = 1,
        max_deliveries: int = 5,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        dead_letter: str | bool | None = None,
        ordered_by_key: bool = False,
        prefetch: int | None = None,
        ack_timeout: float = 30.0,
        middleware: Sequence[Middleware] = (),
    ) -> Subscription:
        """Start a consumer of ``group`` on ``topic`` (a topic or a wildcard pattern).

        Every group receives every message of the topic; within a group each
        message goes to one consumer. The handler returning acks the message;
        raising redelivers it after a back-off (scheduled: the messages behind
        it keep flowing); after ``max_deliveries`` it is copied to the
        dead-letter topic with headers ``x-error`` and ``x-deliveries``.

        Args:
            topic: topic, or pattern with ``*`` (one word) / final ``>`` (the rest).
            handler: ``async def handler(msg: Message) -> None``.
            group: the consumer group.
            concurrency: handlers running at once in this consumer.
            max_deliveries: deliveries before dead-lettering (>= 1).
            retry_backoff: ``(base, max)`` seconds of the exponential back-off.
            dead_letter: dead-letter topic; default ``<topic>.dead``; ``False``
                drops failed messages (logged) instead.
            ordered_by_key: one message per key at a time, in order; a failing
                message holds back only its own key. Order holds within this
                subscription (each member of a group orders what it receives).
            prefetch: at most this many unacked messages held (default
                ``max(16, 4 * concurrency)``).
            ack_timeout: a message held by a consumer that died is redelivered
                to another member after this many seconds (see the backend's
                ``capabilities.redelivery_bound``).
            middleware: wraps this handler (inside the broker's middleware).

        Raises:
            ConfigError: invalid options, or wildcards on a backend without them.
            BackendUnavailable: the broker cannot be reached.
        """
        self._check_open()
        if not isinstance(group, str) or not group:
            raise ConfigError("group must be a non-empty string")
        validate_topic(group.replace(".", "_"))
        pattern = TopicPattern(topic)
        if pattern.is_wildcard and not self.capabilities.wildcards:
            raise ConfigError(
                f"this backend ({self.url}) does not support topic wildcards: {topic!r}"
            )
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not callable(handler):
            raise ConfigError("handler must be an async callable taking a Message")
        try:
            base, cap = retry_backoff
        except (TypeError, ValueError):
            raise ConfigError(f"retry_backoff must be (base, max), got {retry_backoff!r}") from None
        policy = DeliveryPolicy(max_deliveries, float(base), float(cap))
        if dead_letter is None or dead_letter is True:
            dead: str | None = (
                topic + DEFAULT_DEAD_SUFFIX
                if not pattern.is_wildcard
                else ".".join(w for w in pattern.words if w not in ("*", ">", "#"))
                + DEFAULT_DEAD_SUFFIX
            )
        elif dead_letter is False:
            dead = None
        else:
            dead = validate_topic(str(dead_letter))
        spec = ConsumerSpec(
            pattern=pattern,
            group=group,
            consumer=f"{group}-{uuid.uuid4().hex[:12]}",
            prefetch=prefetch if prefetch is not None else max(16, 4 * concurrency),
            ack_timeout=float(ack_timeout),
        )
        wrapped = _as_async(handler)
        for mw in reversed((*self._middleware, *middleware)):
            wrapped = mw(wrapped)
        await self._driver.declare(pattern, group)
        sub = Subscription(
            self,
            spec,
            wrapped,
            policy=policy,
            dead_letter=dead,
            ordered_by_key=ordered_by_key,
            concurrency=concurrency,
        )
        await sub._start()
        self._subs.add(sub)
        return sub

    async def declare(self, topic: str, *, group: str) -> None:
        """Create ``group`` on ``topic`` now, so it keeps messages published before it subscribes.

        Needed on engines that only keep messages for existing groups
        (RabbitMQ queues); harmless elsewhere.
        """
        self._check_open()
        await self._driver.declare(TopicPattern(topic), group)

    def include_router(self, router: Any) -> None:
        """Register a :class:`Router`'s handlers; :meth:`start` subscribes them."""
        self._routers.append(router)

    async def start(self) -> list[Subscription]:
        """Subscribe every handler of the included routers."""
        subs: list[Subscription] = []
        for r in self._routers:
            subs.extend(await r.start(self))
        return subs

    # -- lifecycle ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the broker is closed")

    async def close(self, timeout: float | None = 30.0) -> None:  # noqa: ASYNC109
        """Stop every subscription (draining in-flight handlers) and disconnect.

        Args:
            timeout: seconds each subscription waits for its running handlers
                before cancelling them (their messages are redelivered).
        """
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            with contextlib.suppress(Exception):
                await sub.stop(timeout)
        await self._driver.close()

    async def aclose(self) -> None:
        """Alias of :meth:`close`."""
        await self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Connecting:
    """What :meth:`Broker.connect` returns: await it, or use it with ``async with``.

    .. versionadded:: 0.1
    """

    __slots__ = ("_broker", "_open")

    def __init__(self, open_: Callable[[], Awaitable[Broker]]) -> None:
        self._open = open_
        self._broker: Broker | None = None

    def __await__(self) -> Generator[Any, None, Broker]:
        return self._open().__await__()

    async def __aenter__(self) -> Broker:
        self._broker = await self._open()
        return self._broker

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._broker is not None:
            await self._broker.close()


class _Held:
    __slots__ = ("delivery", "failures", "timer")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.failures = 0
        self.timer: asyncio.TimerHandle | None = None


_POLL: Final = 0.25


class Subscription:
    """A running consumer; :meth:`stop` drains it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        broker: Broker,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        policy: DeliveryPolicy,
        dead_letter: str | None,
        ordered_by_key: bool,
        concurrency: int,
    ) -> None:
        self._broker = broker
        self.spec = spec
        self._handler = handler
        self.policy = policy
        self.dead_letter = dead_letter
        self.ordered_by_key = ordered_by_key
        self.concurrency = concurrency
        self._ready: asyncio.Queue[_Held | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._gate = KeyGate()
        self._held: dict[int, _Held] = {}
        self._room = asyncio.Event()
        self._acks: list[object] = []
        self._ack_wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._consumer: Consumer | None = None
        self._owns: Callable[[object], bool] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self.max_held = 0
        self._release: list[object] = []
        self._acks_closing = False
        self._low_water = max(1, spec.prefetch // 2)
        self._delivered = 0  # flushed to the counter by the fetch loop
        self._dead_declared = False
        topic = spec.pattern.pattern
        m = broker._m
        self._m_delivered = m.delivered.labels(topic, spec.group)
        self._m_acked = m.acked.labels(topic, spec.group)
        self._m_retried = m.retried.labels(topic, spec.group)
        self._m_dead = m.dead.labels(topic, spec.group)
        self._m_latency = m.latency.labels(topic, spec.group)
        self._m_lag = m.lag.labels(topic, spec.group)
        self._m_in_flight = m.in_flight.labels(topic, spec.group)
        self._log = broker._log.bind(topic=topic, group=spec.group)

    @property
    def topic(self) -> str:
        """The topic or pattern consumed."""
        return self.spec.pattern.pattern

    @property
    def group(self) -> str:
        """The consumer group."""
        return self.spec.group

    @property
    def held(self) -> int:
        """Messages fetched and not yet acked (bounded by ``prefetch``)."""
        return len(self._held)

    @property
    def running(self) -> bool:
        """True until :meth:`stop` was called."""
        return not self._stopping

    async def _start(self) -> None:
        self._consumer = await self._broker._driver.consumer(self.spec)
        self._owns = getattr(self._consumer, "owns", None)
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._fetch_loop()), loop.create_task(self._ack_loop())]
        self._workers = [loop.create_task(self._worker()) for _ in range(self.concurrency)]
        if self._broker.capabilities.leases:
            self._loops.append(loop.create_task(self._lease_loop()))

    # -- loops ------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        failures = 0
        last_lag = 0.0
        while not self._stopping:
            if self._delivered:
                self._m_delivered.inc(self._delivered)
                self._delivered = 0
            room = self.spec.prefetch - len(self._held)
            # Refill in batches: wait for half the window to free up (a fetch
            # of one message per ack would cost a round trip per message).
            if room <= 0 or (self._held and room < self._low_water):
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), _POLL)
                continue
            try:
                batch = await consumer.fetch(room, _POLL)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._log.warning("pubsub.fetch_failed", error=repr(exc), attempt=failures)
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                continue
            for d in batch:
                self._dispatch(d)
            self._m_in_flight.set(len(self._held))
            now = self._broker._clock()
            if now - last_lag > 2.0:
                last_lag = now
                with contextlib.suppress(Exception):
                    lag = await consumer.lag()
                    if lag is not None:
                        self._m_lag.set(lag)

    async def _ack_loop(self) -> None:
        assert self._consumer is not None
        while True:
            if not self._acks:
                if self._acks_closing:
                    return
                await self._ack_wake.wait()
                self._ack_wake.clear()
                continue
            batch, self._acks = self._acks, []
            try:
                await self._consumer.ack(batch)
                self._m_acked.inc(len(batch))
            except Exception as exc:
                # The messages stay unacked: the engine redelivers them
                # (at-least-once); a dedupe middleware makes that harmless.
                self._log.warning("pubsub.ack_failed", error=repr(exc), count=len(batch))

    async def _lease_loop(self) -> None:
        assert self._consumer is not None
        interval = max(0.02, self.spec.ack_timeout / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            tokens = [h.delivery.token for h in self._held.values()]
            if tokens:
                try:
                    await self._consumer.extend(tokens)
                except Exception as exc:
                    self._log.warning("pubsub.extend_failed", error=repr(exc))

    # -- dispatch ---------------------------------------------------------

    def _dispatch(self, d: Delivery) -> None:
        h = _Held(d)
        self._held[id(h)] = h
        self.max_held = max(self.max_held, len(self._held))
        key = d.message.key
        if self.ordered_by_key and key is not None and not self._gate.admit(key, h):
            return
        self._run(h)

    def _run(self, h: _Held) -> None:
        self._ready.put_nowait(h)

    async def _worker(self) -> None:
        # ``concurrency`` long-lived workers take ready messages in order.
        _current_sub.set(self)  # each worker is its own task: set once
        while True:
            h = await self._ready.get()
            if h is None:
                return
            await self._handle(h)

    async def _handle(self, h: _Held) -> None:
        h.timer = None
        if self._owns is not None and not self._owns(h.delivery.token):
            # Its partition was revoked (Kafka rebalance): the new owner reads it again.
            self._finish(h, ack=False)
            return
        base = h.delivery.message
        msg = replace(base, delivery=base.delivery + h.failures) if h.failures else base
        if self.policy.exceeded(msg.delivery):
            # Delivered too often by the engine (consumers crashed on it).
            await self._give_up(h, msg, f"exceeded max_deliveries={self.policy.max_deliveries}")
            return
        if self._stopping and h.failures:
            self._finish(h, ack=False)
            return
        self._delivered += 1
        token = _current.set(msg)
        t0 = time.perf_counter()
        try:
            await self._handler(msg)
        except Exception as exc:
            self._m_latency.observe(time.perf_counter() - t0)
            _current.reset(token)
            await self._failed(h, msg, exc)
            return
        self._m_latency.observe(time.perf_counter() - t0)
        _current.reset(token)
        self._finish(h, ack=True)

    async def _failed(self, h: _Held, msg: Message, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        decision = self.policy.on_failure(msg.delivery)
        if isinstance(decision, DeadLetter):
            await self._give_up(h, msg, error)
            return
        self._m_retried.inc()
        self._log.info(
            "pubsub.retry", id=msg.id, delivery=msg.delivery, delay=decision.delay, error=error
        )
        h.failures += 1
        if self._stopping:
            self._finish(h, ack=False)
            return
        h.timer = asyncio.get_running_loop().call_later(decision.delay, self._retry, h)

    def _retry(self, h: _Held) -> None:
        h.timer = None
        if self._stopping:
            self._finish(h, ack=False)
            return
        self._run(h)

    async def _give_up(self, h: _Held, msg: Message, error: str) -> None:
        if self.dead_letter is not None:
            headers = dead_letter_headers(
                msg.headers, error=error, deliveries=msg.delivery, topic=msg.topic, group=self.group
            )
            out = OutboundMessage(self.dead_letter, msg.id, msg.key, headers, msg.data, _now_us())
            try:
                if not self._dead_declared:
                    # Keep dead letters for this group even on engines that only
                    # keep messages for declared groups (RabbitMQ); created on
                    # first use so no empty dead-letter topics pile up.
                    await self._broker._driver.declare(TopicPattern(self.dead_letter), self.group)
                    self._dead_declared = True
                await self._broker._driver.publish([out])
            except Exception as exc:
                # Not acked: try again later rather than lose the message.
                self._log.error("pubsub.dead_letter_failed", id=msg.id, error=repr(exc))
                if self._stopping:
                    self._finish(h, ack=False)
                else:
                    h.timer = asyncio.get_running_loop().call_later(
                        self.policy.backoff_max, self._retry, h
                    )
                return
            self._broker._m.published.labels(self.dead_letter).inc()
        self._m_dead.inc()
        self._log.warning(
            "pubsub.dead_lettered",
            id=msg.id,
            deliveries=msg.delivery,
            error=error,
            dead_letter=self.dead_letter,
        )
        self._finish(h, ack=True)

    def _finish(self, h: _Held, *, ack: bool) -> None:
        if self._held.pop(id(h), None) is None:
            return
        if ack:
            self._acks.append(h.delivery.token)
        else:
            self._release.append(h.delivery.token)
        self._ack_wake.set()
        if len(self._held) <= self.spec.prefetch - self._low_water:
            self._room.set()
        key = h.delivery.message.key
        if self.ordered_by_key and key is not None:
            nxt = self._gate.release(key)
            if nxt is not None:
                assert isinstance(nxt, _Held)
                if self._stopping:
                    self._finish(nxt, ack=False)
                else:
                    self._run(nxt)

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop fetching, wait for running handlers, ack them, hand back the rest.

        Messages waiting for a retry or behind their key are released to the
        group (another member, or the next subscription, gets them).

        Args:
            timeout: seconds to wait for running handlers (None: no limit);
                handlers still running after it are cancelled and their
                messages released.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._broker._subs.discard(self)
        self._room.set()
        try:
            fetch = self._loops[0] if self._loops else None
            if fetch is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(fetch, max(2.0, 4 * _POLL))
            for h in list(self._held.values()):
                if h.timer is not None:
                    h.timer.cancel()
                    self._finish(h, ack=False)
            for item in self._gate.drain():
                assert isinstance(item, _Held)
                self._finish(item, ack=False)
            # Fetched but not started: hand back. Running: let them finish.
            while not self._ready.empty():
                item = self._ready.get_nowait()
                if item is not None:
                    self._finish(item, ack=False)
            for _ in self._workers:
                self._ready.put_nowait(None)
            if self._workers:
                _, pending = await asyncio.wait(set(self._workers), timeout=timeout)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending)
            for h in list(self._held.values()):
                self._finish(h, ack=False)
            self._acks_closing = True
            self._ack_wake.set()
            ack_loop = self._loops[1] if len(self._loops) > 1 else None
            if ack_loop is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(ack_loop, 10.0)
            for t in self._loops:
                t.cancel()
            assert self._consumer is not None
            if self._acks:
                with contextlib.suppress(Exception):
                    await self._consumer.ack(self._acks)
                    self._m_acked.inc(len(self._acks))
                self._acks = []
            if self._release:
                with contextlib.suppress(Exception):
                    await self._consumer.release(self._release)
                self._release = []
            with contextlib.suppress(Exception):
                await self._consumer.close()
        finally:
            self._m_in_flight.set(0)
            if self._delivered:
                self._m_delivered.inc(self._delivered)
                self._delivered = 0
            self._stopped.set()

    async def lag(self) -> int | None:
        """Messages of the group not yet acked, where the backend knows; else None."""
        if self._consumer is None:
            return None
        return await self._consumer.lag()

    def __repr__(self) -> str:
        return f"<Subscription {self.topic!r} group={self.group!r} held={len(self._held)}>"
