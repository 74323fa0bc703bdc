"""The driver protocol every pub/sub backend implements, and its capabilities.

A driver is a thin adapter over one engine. It stores and hands out messages;
it knows nothing of handlers, retries, dead letters, middleware or routing,
which :mod:`stanchion.pubsub._api` implements once above it.

The contract, in the order the runtime uses it:

``open(url)``
    connect (a :class:`ParsedURL`, already validated); honour ``?prefix=`` by
    prefixing every key, stream, subject, queue, exchange or topic created.
``publish(messages)``
    store a batch; return only once the engine durably accepted every message
    (confirms / acks where it has them); raise :class:`PublishError` or
    :class:`BackendUnavailable` otherwise.
``declare(pattern, group)``
    make sure ``group`` exists over ``pattern`` so messages published from now
    on are kept for it (a Redis consumer group, a JetStream durable consumer, a
    RabbitMQ queue, a SQLite cursor). Idempotent.
``consumer(spec)``
    a :class:`Consumer`: one member of the group.

A :class:`Consumer` is pull-shaped, so the runtime bounds memory: it asks
``fetch(n, timeout)`` for at most ``n`` deliveries, where ``n`` is what is left
of ``prefetch``. Push-based engines (AMQP, MQTT) set the engine's own window
(basic.qos, receive maximum) to ``prefetch`` and buffer at most that much.
``ack(tokens)`` is batched; ``extend(tokens)`` renews the visibility lease of
messages still being handled or waiting for their retry (so another member
does not take them while this one is alive); ``release(tokens)`` hands
unprocessed messages back on a clean stop.

Partitioned engines (Kafka) fit the same shape: a :class:`Delivery` carries its
``partition``; acks arrive out of order and the driver commits, per partition,
only the offset below which every message is done
(:class:`stanchion.pubsub._core.OffsetTracker`). A partitioned consumer may
also define ``owns(token) -> bool``: the runtime calls it right before it
starts a handler and drops the delivery (unacked) when it returns False, so
messages of a partition revoked by a rebalance are not handled by two members.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stanchion.errors import ConfigError
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = [
    "Capabilities",
    "Consumer",
    "ConsumerSpec",
    "Delivery",
    "Driver",
    "DriverFactory",
    "OutboundMessage",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can guarantee; the conformance suite reads these flags.

    Attributes:
        durable: messages survive a restart of the broker.
        multi_process: several processes can share the broker.
        history: a group declared after a message was published still gets it.
        resume: a stopped group resumes where it left off (messages published
            while no member was connected are kept for it).
        crash_redelivery: a message delivered to a consumer that died before
            acking goes to another member of the group.
        wildcards: topic patterns (``*``, ``>``) can be subscribed to.
        delivery_count: the engine counts deliveries (survives a consumer crash).
        partitions: deliveries carry a partition; order and commits per partition.
        leases: the runtime must renew leases of held messages (``extend``).
        redelivery_bound: how soon a dead consumer's message is redelivered.
    """

    durable: bool = True
    multi_process: bool = True
    history: bool = True
    resume: bool = True
    crash_redelivery: bool = True
    wildcards: bool = False
    delivery_count: bool = True
    partitions: bool = False
    leases: bool = True
    redelivery_bound: str = "ack_timeout"


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """A message on its way to the driver (already encoded and validated)."""

    topic: str
    id: str
    key: str | None
    headers: dict[str, str]
    data: bytes
    ts: int  # microseconds since the epoch


@dataclass(slots=True)
class Delivery:
    """A message handed to a consumer.

    Attributes:
        message: the message; its ``delivery`` is the engine's count (1 when
            the engine does not count).
        token: the driver's handle to ack, extend or release it.
        partition: for partitioned engines, the partition (else None).
    """

    message: Message
    token: object
    partition: object | None = None


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What a consumer is asked to consume.

    Attributes:
        pattern: the topic or pattern.
        group: the group name.
        consumer: this member's name (unique).
        prefetch: at most this many unacked messages held by the member.
        ack_timeout: seconds after which an unacked, un-renewed message of a
            dead member is redelivered to another.
    """

    pattern: TopicPattern
    group: str
    consumer: str
    prefetch: int
    ack_timeout: float

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ConfigError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.ack_timeout <= 0:
            raise ConfigError(f"ack_timeout must be > 0, got {self.ack_timeout}")


@runtime_checkable
class Consumer(Protocol):
    """One member of a group, as seen by the runtime."""

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``wait`` seconds for one."""
        ...

    async def ack(self, tokens: Sequence[object]) -> None:
        """Acknowledge handled (or dead-lettered) messages."""
        ...

    async def extend(self, tokens: Sequence[object]) -> None:
        """Renew the leases of messages still held (handler running or retry waiting)."""
        ...

    async def release(self, tokens: Sequence[object]) -> None:
        """Hand back messages this member will not handle (clean stop)."""
        ...

    async def lag(self) -> int | None:
        """Messages of the group not yet acked, where the engine knows; else None."""
        ...

    async def close(self) -> None:
        """Stop consuming and free the resources."""
        ...


@runtime_checkable
class Driver(Protocol):
    """A connected backend."""

    capabilities: Capabilities

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Store messages; return once the engine durably accepted all of them."""
        ...

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Make sure ``group`` exists over ``pattern`` (idempotent)."""
        ...

    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        """A new member of ``spec.group``."""
        ...

    async def close(self) -> None:
        """Disconnect."""
        ...


class DriverFactory(Protocol):
    """What the backend registry returns: a class with an async ``open``."""

    async def open(self, url: ParsedURL) -> Driver:
        """Connect to the engine at ``url``."""
        ...
