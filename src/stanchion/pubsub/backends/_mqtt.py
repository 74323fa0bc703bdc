"""mqtt:// -- MQTT 5 (Mosquitto): QoS 1, shared subscriptions for groups.

Topic ``a.b`` is the MQTT topic ``<prefix>/a/b`` (default prefix
``stanchion``); a pattern's ``*`` is ``+`` and its final ``>`` is ``#``. A group
is a shared subscription ``$share/<group>/<prefix>/...`` at QoS 1: the broker
hands each message to one member of each group. The whole message (id, key,
headers, payload, time) travels as one msgpack envelope in the payload, since
MQTT 3 has no headers; a payload that is not an envelope (a device publishing
raw bytes) is delivered as ``data`` with a generated id.

``publish`` returns when the broker sent PUBACK (QoS 1). Each member acks
(PUBACK) only after its handler finished (manual acks) and announces a
``Receive Maximum`` of ``prefetch``, so the broker never has more than
``prefetch`` unacked messages in flight to it.

What MQTT cannot guarantee (``capabilities`` says so, and the conformance
suite marks these tests as documented limitations):

* **No history, no resume.** A group exists only while a member is connected:
  messages published while a group has no connected member are not kept for
  it (``history=False``, ``resume=False``). With ``?client_id=NAME`` members
  use persistent sessions (``clean_start=False``, id ``NAME-<group>``): the
  member subscribes without ``$share`` (it is the group's one member, since
  Mosquitto queues nothing for offline members of a shared subscription) and
  the broker queues QoS 1 messages for it while it is offline, up to
  Mosquitto's ``max_queued_messages`` (default 1000; beyond it, messages are
  dropped), and only if the broker persists its sessions.
* **No redelivery to another member after a crash** (``crash_redelivery=False``):
  an unacked message stays in the dead member's session; Mosquitto does not
  hand it to another member of the shared subscription.
* **No delivery count**: only the DUP flag (a redelivery is counted as 2).
* **Durability** of accepted messages depends on the broker's persistence
  (Mosquitto saves to disk every ``autosave_interval``; a crash before it
  loses them).
* Retries and dead letters work as everywhere (the runtime holds the message
  unacked during its back-off), within one member's connection.

Query parameters: ``prefix``, ``client_id``, ``keepalive`` (seconds, default 30).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from stanchion.errors import BackendUnavailable, ConfigError, PublishError
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import (
    Envelope,
    Message,
    TopicPattern,
    decode_envelope,
    encode_envelope,
)
from stanchion.urls import ParsedURL

__all__ = ["MQTTDriver"]

CAPABILITIES: Final = Capabilities(
    wildcards=True,
    history=False,
    resume=False,
    crash_redelivery=False,
    delivery_count=False,
    leases=False,
    redelivery_bound="never to another member (only to the same persistent session)",
)


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class MQTTDriver:
    """MQTT 5 driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, url: ParsedURL, client: aiomqtt.Client, prefix: str) -> None:
        self._url = url
        self._client = client
        self._p = prefix
        self._client_id = url.query.get("client_id")
        self._keepalive = url.get_int("keepalive", 30)

    def _new_client(
        self, identifier: str, *, clean: bool, receive_max: int | None
    ) -> aiomqtt.Client:
        props = None
        if receive_max is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.ReceiveMaximum = max(1, min(receive_max, 65535))
            if not clean:
                props.SessionExpiryInterval = 7 * 86400
        return aiomqtt.Client(
            self._url.host or "127.0.0.1",
            self._url.port or 1883,
            username=self._url.username,
            password=self._url.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean,
            properties=props,
            keepalive=self._keepalive,
            timeout=10,
        )

    @classmethod
    async def open(cls, url: ParsedURL) -> MQTTDriver:
        """Connect the publishing client."""
        prefix = url.query.get("prefix", "stanchion")
        if any(c in prefix for c in "+#/"):
            raise ConfigError(f"{url.masked()}: prefix must not contain + # or /")
        drv = cls.__new__(cls)
        drv._url = url
        drv._p = prefix
        drv._client_id = url.query.get("client_id")
        drv._keepalive = url.get_int("keepalive", 30)
        client = drv._new_client(
            f"{prefix}-pub-{uuid.uuid4().hex[:12]}", clean=True, receive_max=None
        )
        try:
            await asyncio.wait_for(client.__aenter__(), 10)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(
                f"cannot reach MQTT broker at {url.masked()}: {exc}", url=url.masked()
            ) from exc
        drv._client = client
        return drv

    def topic(self, topic: str) -> str:
        """The MQTT topic of ``topic``."""
        return f"{self._p}/{topic.replace('.', '/')}"

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish at QoS 1; return when the broker acknowledged every message."""

        async def one(m: OutboundMessage) -> None:
            env = Envelope(m.id, m.key, m.headers, m.data, m.ts)
            await self._client.publish(self.topic(m.topic), encode_envelope(env), qos=1)

        try:
            if len(messages) == 1:
                await one(messages[0])
            else:
                await asyncio.gather(*(one(m) for m in messages))
        except aiomqtt.MqttCodeError as exc:
            raise BackendUnavailable(f"MQTT broker unavailable: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise PublishError(f"MQTT broker did not acknowledge the message: {exc}") from exc

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Nothing to do: an MQTT group exists only while a member is subscribed."""

    async def consumer(self, spec: ConsumerSpec) -> _MQTTConsumer:
        """A member: its own connection, subscribed to ``$share/<group>/...`` at QoS 1."""
        if self._client_id:
            ident, clean = f"{self._client_id}-{spec.group}", False
        else:
            ident, clean = f"{self._p}-{spec.consumer}", True
        client = self._new_client(ident, clean=clean, receive_max=spec.prefetch)
        client._client.manual_ack_set(True)  # aiomqtt has no public switch for it
        try:
            await asyncio.wait_for(client.__aenter__(), 10)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"cannot reach MQTT broker: {exc}") from exc
        filt = spec.pattern.translate(sep="/", one="+", rest="#")
        c = _MQTTConsumer(self, client, spec)
        c.task = asyncio.get_running_loop().create_task(c.pump())
        # Mosquitto queues nothing for an offline member of a shared subscription,
        # so a persistent (client_id) member subscribes directly: it is the one
        # durable member of its group.
        share = "" if self._client_id else f"$share/{spec.group}/"
        await client.subscribe(f"{share}{self._p}/{filt}", qos=1)
        return c

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            await self._client.__aexit__(None, None, None)


class _MQTTConsumer:
    def __init__(self, driver: MQTTDriver, client: aiomqtt.Client, spec: ConsumerSpec) -> None:
        self._d = driver
        self._c = client
        self._s = spec
        self._buf: asyncio.Queue[Any] = asyncio.Queue()
        self._cut = len(driver._p) + 1
        self.task: asyncio.Task[None] | None = None

    async def pump(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError):
            async for m in self._c.messages:
                self._buf.put_nowait(m)

    def _delivery(self, m: Any) -> Delivery:
        topic = str(m.topic)[self._cut :].replace("/", ".")
        raw = m.payload if isinstance(m.payload, bytes) else bytes(m.payload or b"")
        env = decode_envelope(raw)
        dup = bool(getattr(m, "_dup", False) or getattr(getattr(m, "_message", None), "dup", False))
        count = 2 if dup else 1
        if env is None:
            msg = Message(uuid.uuid4().hex, topic, None, raw, {}, count, datetime.now(UTC))
        else:
            msg = Message(env.id, topic, env.key, env.data, env.headers, count, _ts(env.ts))
        return Delivery(msg, m.mid)

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
        paho = self._c._client
        for mid in tokens:
            paho.ack(int(mid), 1)  # type: ignore[call-overload]

    async def extend(self, tokens: Sequence[object]) -> None:
        return None

    async def release(self, tokens: Sequence[object]) -> None:
        # MQTT cannot hand a message back; it stays unacked in this session
        # until the connection closes (then it is lost with a clean session).
        return None

    async def lag(self) -> int | None:
        return None

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(Exception):
            await self._c.__aexit__(None, None, None)
