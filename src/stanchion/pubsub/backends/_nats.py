"""nats:// -- NATS JetStream: one stream per prefix, one durable pull consumer per group.

The broker owns one stream named after ``?prefix=`` (default ``stanchion``)
capturing subjects ``<prefix>.>``; topic ``a.b`` is subject ``<prefix>.a.b``
(NATS wildcards ``*`` and ``>`` work as is). A group is a durable pull
consumer on that stream filtered to the topic (``DeliverAll``: it sees the
stream's history), with explicit acks and ``ack_wait = ack_timeout``: a
crashed member's messages are redelivered by JetStream after ``ack_wait``;
live members send ``+WPI`` (in progress) for what they hold. The delivery
count is JetStream's ``num_delivered``.

``publish`` waits for JetStream's PubAck of every message (pipelined for a
batch). The message id goes in ``Nats-Msg-Id``, so JetStream also drops a
re-publish of the same id within its duplicate window (2 minutes).

Query parameters: ``prefix``, ``max_age`` (seconds to keep messages, default
forever), ``replicas`` (default 1), ``storage`` (file|memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from stanchion.errors import BackendUnavailable, ConfigError, PublishError
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = ["NATSDriver"]

CAPABILITIES: Final = Capabilities(
    wildcards=True,
    redelivery_bound="ack_timeout (JetStream ack_wait; live consumers send in-progress)",
)

_H_KEY = "Stanchion-Key"
_H_TS = "Stanchion-Ts"
_H_ID = "Nats-Msg-Id"
_H_MID = "Stanchion-Id"
_INTERNAL = {_H_KEY, _H_TS, _H_ID, _H_MID}


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


def _name(text: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    if clean != text or len(clean) > 48:
        clean = clean[:40] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return clean


class NATSDriver:
    """JetStream driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, nc: Any, prefix: str, stream: str, url: str) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=10)
        self._p = prefix
        self.stream = stream
        self._url = url
        self._declared: set[tuple[str, str]] = set()

    @classmethod
    async def open(cls, url: ParsedURL) -> NATSDriver:
        """Connect and create the stream if missing."""
        host, port = url.host or "127.0.0.1", url.port or 4222
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            w.close()
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable(
                f"cannot reach NATS at {url.masked()}: {exc}", url=url.masked()
            ) from exc
        prefix = url.query.get("prefix", "stanchion")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ConfigError(f"{url.masked()}: prefix must be letters, digits, _ or -")
        server = f"nats://{host}:{port}"
        try:
            nc = await nats.connect(
                servers=[server],
                user=url.username,
                password=url.password,
                connect_timeout=5,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as exc:
            raise BackendUnavailable(f"cannot connect to NATS: {exc}", url=url.masked()) from exc
        drv = cls(nc, prefix, prefix, url.masked())
        storage = (
            api.StorageType.MEMORY if url.query.get("storage") == "memory" else api.StorageType.FILE
        )
        cfg = api.StreamConfig(
            name=prefix,
            subjects=[f"{prefix}.>"],
            storage=storage,
            num_replicas=url.get_int("replicas", 1),
            max_age=url.get_float("max_age", 0.0) or None,
            duplicate_window=120.0,
        )
        try:
            try:
                await drv._js.stream_info(prefix)
            except nats.js.errors.NotFoundError:
                await drv._js.add_stream(cfg)
        except Exception as exc:
            await nc.close()
            raise BackendUnavailable(f"cannot create JetStream stream {prefix!r}: {exc}") from exc
        return drv

    def subject(self, topic: str) -> str:
        """The subject of ``topic``."""
        return f"{self._p}.{topic}"

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish and wait for every PubAck (pipelined)."""

        async def one(m: OutboundMessage) -> None:
            headers = dict(m.headers)
            # JetStream dedupes on Nats-Msg-Id across the whole stream: scope it by
            # topic (and group, for dead-letter copies) so copies are not dropped.
            group = m.headers.get("x-group")
            headers[_H_ID] = f"{m.topic}/{m.id}" + (f"/{group}" if group else "")
            headers[_H_MID] = m.id
            headers[_H_TS] = str(m.ts)
            if m.key is not None:
                headers[_H_KEY] = m.key
            await self._js.publish(self.subject(m.topic), m.data, headers=headers)

        try:
            if len(messages) == 1:
                await one(messages[0])
            else:
                await asyncio.gather(*(one(m) for m in messages))
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
            raise BackendUnavailable(f"NATS unavailable: {exc}", url=self._url) from exc
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            raise PublishError(f"JetStream did not acknowledge the message: {exc!r}") from exc
        except nats.js.errors.APIError as exc:
            raise PublishError(f"JetStream refused the message: {exc}") from exc

    def _durable(self, pattern: TopicPattern, group: str) -> str:
        return _name(f"{group}__{pattern.pattern}")

    async def _ensure(self, pattern: TopicPattern, group: str, ack_wait: float) -> str:
        durable = self._durable(pattern, group)
        if (pattern.pattern, group) in self._declared:
            return durable
        cfg = api.ConsumerConfig(
            durable_name=durable,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=-1,
            filter_subject=self.subject(pattern.translate(rest=">")),
        )
        try:
            try:
                await self._js.consumer_info(self.stream, durable)
            except nats.js.errors.NotFoundError:
                await self._js.add_consumer(self.stream, cfg)
        except nats.js.errors.APIError as exc:
            raise PublishError(f"cannot create JetStream consumer {durable!r}: {exc}") from exc
        self._declared.add((pattern.pattern, group))
        return durable

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Create the group's durable consumer (ack_wait 30 s until a member sets it)."""
        await self._ensure(pattern, group, 30.0)

    async def consumer(self, spec: ConsumerSpec) -> _NATSConsumer:
        """A member: a pull subscription bound to the group's durable consumer."""
        durable = self._durable(spec.pattern, spec.group)
        info = None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await self._js.consumer_info(self.stream, durable)
        if info is not None and info.config.ack_wait != spec.ack_timeout:
            # Update ack_wait to this member's ack_timeout (the last one wins).
            cfg = info.config
            cfg.ack_wait = spec.ack_timeout
            with contextlib.suppress(nats.js.errors.APIError):
                await self._js.add_consumer(self.stream, cfg)
        else:
            await self._ensure(spec.pattern, spec.group, spec.ack_timeout)
        self._declared.add((spec.pattern.pattern, spec.group))
        psub = await self._js.pull_subscribe_bind(durable, self.stream)
        return _NATSConsumer(self, spec, psub, durable)

    async def close(self) -> None:
        """Drain and disconnect."""
        with contextlib.suppress(Exception):
            await self._nc.close()


class _NATSConsumer:
    def __init__(self, driver: NATSDriver, spec: ConsumerSpec, psub: Any, durable: str) -> None:
        self._d = driver
        self._s = spec
        self._psub = psub
        self._durable = durable
        self._cut = len(driver._p) + 1

    def _delivery(self, m: Any) -> Delivery:
        hdrs = m.headers or {}
        headers = {k: v for k, v in hdrs.items() if k not in _INTERNAL}
        try:
            count = int(m.metadata.num_delivered)
        except Exception:
            count = 1
        ts = hdrs.get(_H_TS)
        msg = Message(
            hdrs.get(_H_MID) or hdrs.get(_H_ID) or m.reply or "",
            m.subject[self._cut :],
            hdrs.get(_H_KEY),
            m.data,
            headers,
            count,
            _ts(int(ts)) if ts else datetime.now(UTC),
        )
        return Delivery(msg, m)

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        try:
            msgs = await self._psub.fetch(max_messages, timeout=wait)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
            raise BackendUnavailable(f"NATS unavailable: {exc}", url=self._d._url) from exc
        return [self._delivery(m) for m in msgs]

    async def ack(self, tokens: Sequence[object]) -> None:
        await asyncio.gather(*(t.ack() for t in tokens))  # type: ignore[attr-defined]

    async def extend(self, tokens: Sequence[object]) -> None:
        await asyncio.gather(*(t.in_progress() for t in tokens))  # type: ignore[attr-defined]

    async def release(self, tokens: Sequence[object]) -> None:
        await asyncio.gather(*(t.nak() for t in tokens))  # type: ignore[attr-defined]

    async def lag(self) -> int | None:
        info = await self._d._js.consumer_info(self._d.stream, self._durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
