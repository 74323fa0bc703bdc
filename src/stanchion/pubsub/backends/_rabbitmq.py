"""amqp:// -- RabbitMQ: a topic exchange, one durable quorum queue per group, confirms.

Messages go to the durable topic exchange ``<prefix>.topics`` (default
prefix ``stanchion``) with the topic as routing key, persistent, on a channel
with publisher confirms: ``publish`` returns when RabbitMQ confirmed every
message. A group is a durable **quorum** queue ``<prefix>:<group>:<pattern>``
bound with the pattern (``*`` one word, ``#``/``>`` the rest). Members consume
it on their own channel with ``basic.qos(prefetch)``; a member that dies loses
its connection and RabbitMQ requeues its unacked messages at once (the bound
is the TCP/heartbeat detection of the dead connection, not ``ack_timeout``).
The delivery count is the quorum queue's ``x-delivery-count`` + 1.

A queue keeps messages only once it exists: messages published to a topic
before any group declared a queue on it are dropped by RabbitMQ
(``capabilities.history`` is False; call ``broker.declare(topic, group=...)``
first). With ``?mandatory=true`` such a publish raises :class:`PublishError`.

Query parameters: ``prefix``, ``mandatory`` (default false), ``heartbeat``
(seconds, default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractIncomingMessage

from stanchion.errors import BackendUnavailable, PublishError
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = ["RabbitMQDriver"]

CAPABILITIES: Final = Capabilities(
    wildcards=True,
    history=False,
    leases=False,
    redelivery_bound="immediately when the dead consumer's connection closes (heartbeat)",
)

_H_KEY = "x-stanchion-key"
_H_TS = "x-stanchion-ts"
_INTERNAL = {_H_KEY, _H_TS, "x-delivery-count"}
_UNAVAILABLE = (aiormq.exceptions.AMQPConnectionError, ConnectionError, OSError)


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class RabbitMQDriver:
    """RabbitMQ driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(
        self, conn: Any, channel: Any, exchange: Any, prefix: str, mandatory: bool
    ) -> None:
        self._conn = conn
        self._ch = channel
        self._ex = exchange
        self._p = prefix
        self._mandatory = mandatory
        self._declared: set[tuple[str, str]] = set()

    @classmethod
    async def open(cls, url: ParsedURL) -> RabbitMQDriver:
        """Connect (robust: reconnects), declare the exchange, open a confirm channel."""
        prefix = url.query.get("prefix", "stanchion")
        mandatory = url.get_bool("mandatory", False)
        try:
            conn = await asyncio.wait_for(
                aio_pika.connect_robust(
                    url.without_query(), heartbeat=url.get_int("heartbeat", 10), timeout=5
                ),
                10,
            )
        except (*_UNAVAILABLE, TimeoutError) as exc:
            raise BackendUnavailable(
                f"cannot reach RabbitMQ at {url.masked()}: {exc}", url=url.masked()
            ) from exc
        ch = await conn.channel(publisher_confirms=True, on_return_raises=mandatory)
        ex = await ch.declare_exchange(
            f"{prefix}.topics", aio_pika.ExchangeType.TOPIC, durable=True
        )
        return cls(conn, ch, ex, prefix, mandatory)

    def queue_name(self, pattern: TopicPattern, group: str) -> str:
        """The queue of ``group`` on ``pattern``."""
        words = pattern.translate(one="STAR", rest="REST")
        return f"{self._p}:{group}:{words}"

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish persistent messages and wait for every confirm."""

        async def one(m: OutboundMessage) -> None:
            headers: dict[str, Any] = dict(m.headers)
            headers[_H_TS] = m.ts
            if m.key is not None:
                headers[_H_KEY] = m.key
            msg = aio_pika.Message(
                m.data,
                headers=headers,
                message_id=m.id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type=m.headers.get("content-type"),
                correlation_id=m.headers.get("x-correlation-id"),
            )
            await self._ex.publish(msg, routing_key=m.topic, mandatory=self._mandatory)

        try:
            if len(messages) == 1:
                await one(messages[0])
            else:
                await asyncio.gather(*(one(m) for m in messages))
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishError(
                f"RabbitMQ did not route or confirm the message (no queue bound to the topic? "
                f"declare a group first): {exc!r}"
            ) from exc
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"RabbitMQ unavailable: {exc}") from exc

    async def _queue(self, ch: Any, pattern: TopicPattern, group: str) -> Any:
        q = await ch.declare_queue(
            self.queue_name(pattern, group),
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await q.bind(self._ex, routing_key=pattern.translate(rest="#"))
        return q

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Declare the group's durable quorum queue and bind it."""
        if (pattern.pattern, group) in self._declared:
            return
        await self._queue(self._ch, pattern, group)
        self._declared.add((pattern.pattern, group))

    async def consumer(self, spec: ConsumerSpec) -> _RabbitConsumer:
        """A member: its own channel with basic.qos(prefetch), consuming the group's queue."""
        ch = await self._conn.channel()
        await ch.set_qos(prefetch_count=spec.prefetch)
        q = await self._queue(ch, spec.pattern, spec.group)
        c = _RabbitConsumer(ch, q)
        c.tag = await q.consume(c.on_message, no_ack=False)
        return c

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            await self._conn.close()


class _RabbitConsumer:
    def __init__(self, ch: Any, q: Any) -> None:
        self._ch = ch
        self._q = q
        self._buf: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.tag: str | None = None

    async def on_message(self, m: AbstractIncomingMessage) -> None:
        self._buf.put_nowait(m)

    def _delivery(self, m: AbstractIncomingMessage) -> Delivery:
        hdrs: dict[str, Any] = dict(m.headers or {})
        count = hdrs.get("x-delivery-count")
        delivery = int(count) + 1 if isinstance(count, int) else (2 if m.redelivered else 1)
        ts = hdrs.get(_H_TS)
        key = hdrs.get(_H_KEY)
        headers = {
            k: (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in hdrs.items()
            if k not in _INTERNAL
        }
        msg = Message(
            m.message_id or "",
            m.routing_key or "",
            key.decode() if isinstance(key, bytes) else key,
            m.body,
            headers,
            delivery,
            _ts(int(ts)) if ts is not None else datetime.now(UTC),
        )
        return Delivery(msg, m)

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        out: list[Delivery] = []
        if self._buf.empty():
            try:
                first = await asyncio.wait_for(self._buf.get(), wait)
            except TimeoutError:
                return out
            out.append(self._delivery(first))
        while len(out) < max_messages and not self._buf.empty():
            out.append(self._delivery(self._buf.get_nowait()))
        return out

    async def ack(self, tokens: Sequence[object]) -> None:
        for t in tokens:
            await t.ack()  # type: ignore[attr-defined]

    async def extend(self, tokens: Sequence[object]) -> None:
        return None

    async def release(self, tokens: Sequence[object]) -> None:
        for t in tokens:
            with contextlib.suppress(Exception):
                await t.nack(requeue=True)  # type: ignore[attr-defined]

    async def lag(self) -> int | None:
        res = await self._q.declare()
        return int(getattr(res, "message_count", 0) or 0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.tag is not None:
                await self._q.cancel(self.tag)
        while not self._buf.empty():
            m = self._buf.get_nowait()
            with contextlib.suppress(Exception):
                await m.nack(requeue=True)
        with contextlib.suppress(Exception):
            await self._ch.close()
