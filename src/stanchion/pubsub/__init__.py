"""stanchion.pubsub: one broker API over memory, SQLite, Redis, NATS, RabbitMQ and MQTT.

Publishers send messages to a topic; every *group* subscribed to the topic
receives every message (fan-out) and, within a group, each message goes to
one consumer (competing consumers). Handlers return to ack and raise to have
the message redelivered after a back-off, then dead-lettered after
``max_deliveries``. Middleware and a :class:`Router` in the Watermill /
FastStream style compose handlers; :func:`idempotent` deduplicates by message
id for effectively-once processing.

Example::

    from stanchion.pubsub import Broker, Message

    async def on_reading(msg: Message) -> None:
        print(msg.json())

    async with await Broker.connect("sqlite:///iot.db") as broker:
        await broker.subscribe("sensors.>", on_reading, group="analytics")
        await broker.publish("sensors.room1.temp", {"celsius": 21.5}, key="room1")

Guarantees by backend (``broker.capabilities`` has them as flags):

==========  =========  ==========  ==============  =========  ==================================
backend     durable    history(1)  crash redeliv.  wildcards  a dead consumer's message returns
==========  =========  ==========  ==============  =========  ==================================
memory      no         yes         yes             yes        after ``ack_timeout`` (one process)
sqlite      yes        yes         yes             yes        after ``ack_timeout`` (leases)
redis       AOF/RDB    yes         yes             no         ``ack_timeout`` + reclaim period
nats        yes        yes         yes             yes        after ``ack_timeout`` (ack_wait)
amqp        yes        declare(2)  yes             yes        when its connection closes
mqtt        broker(3)  no          no              yes        never to another member
==========  =========  ==========  ==============  =========  ==================================

(1) a group created after a message was published still receives it.
(2) RabbitMQ keeps messages only for queues that exist: ``broker.declare()``.
(3) see :mod:`stanchion.pubsub.backends._mqtt` for exactly what MQTT cannot
guarantee. Delivery is at-least-once everywhere except MQTT after a consumer
crash (at-most-once for the crashed member's in-flight messages); the
:func:`idempotent` middleware makes redeliveries harmless. Per-key order
(``ordered_by_key``) holds within one subscription; several members of a
group each keep order only for the messages they receive.

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.pubsub._api import (
    Broker,
    Handler,
    Middleware,
    Outgoing,
    Subscription,
    current_message,
    current_subscription,
)
from stanchion.pubsub._backend import Capabilities
from stanchion.pubsub._core import DeliveryPolicy, Message, TopicPattern
from stanchion.pubsub._middleware import (
    DedupeStore,
    idempotent,
    log_messages,
    timeout,
)
from stanchion.pubsub._router import Router

__all__ = [
    "Broker",
    "Capabilities",
    "DedupeStore",
    "DeliveryPolicy",
    "Handler",
    "Message",
    "Middleware",
    "Outgoing",
    "Router",
    "Subscription",
    "TopicPattern",
    "current_message",
    "current_subscription",
    "idempotent",
    "log_messages",
    "timeout",
]
