"""Pure logic of stanchion.pubsub: messages, topics, delivery policy, ordering, offsets.

Theory of operation
===================

A *broker* stores messages per *topic*; a *group* is a named cursor over a
topic (or a wildcard pattern of topics). Every group receives every message
(fan-out); inside a group, each message goes to one *consumer* (competing
consumers). Engines differ in everything else, so this module holds what must
behave the same on all of them, as data and pure functions, with time passed
in as ``now``:

``Message``
    what a handler sees. ``delivery`` counts the deliveries of the message to
    its group, from 1: the engine's own count (a crashed consumer's message
    handed to another) plus the local retries of this consumer.

``TopicPattern``
    topics are dot-separated words (``sensors.room1.temp``). A pattern may use
    ``*`` for exactly one word and ``>`` (or ``#``) as its last word for one or
    more words, as in NATS and AMQP. Each engine translates patterns to its
    own syntax (MQTT ``+``/``#`` on ``/``-separated levels).

``DeliveryPolicy``
    a failed handler is redelivered after an exponential back-off until
    ``max_deliveries`` is reached, then dead-lettered. The decision is a value
    (:class:`Redeliver` or :class:`DeadLetter`); the runtime schedules the
    redelivery on a timer and keeps consuming: it never sleeps inline, so a
    failing message never blocks the messages behind it.

``KeyGate``
    with ``ordered_by_key``, at most one message per key is in the handler
    (or waiting for its retry) at a time; later messages of the same key wait
    in a FIFO, other keys go on.

``OffsetTracker``
    for partitioned logs (Kafka): messages of one partition complete out of
    order (concurrency, retries) but the committed offset only moves past a
    message when it *and every earlier message of the partition* are done.

``GroupLog``
    the whole broker in memory: a log with per-group cursors and pending
    entries with leases (the memory backend and the reference semantics the
    SQLite backend reproduces in SQL). A claim hands out expired pending
    entries first (a crashed consumer's messages), then new ones; an ack
    removes the pending entry; an expired lease makes a message claimable by
    any consumer of the group again, with its delivery count incremented.

Invariants: a message is acked at most once per group; a message is never
dead-lettered before ``max_deliveries`` deliveries; the committed offset of a
partition never passes an unfinished message.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from stanchion.codec import json_codec
from stanchion.errors import ConfigError

__all__ = [
    "DEFAULT_DEAD_SUFFIX",
    "H_CONTENT_TYPE",
    "H_CORRELATION",
    "H_DELIVERIES",
    "H_ERROR",
    "H_GROUP",
    "H_ORIGINAL_TOPIC",
    "H_TRACEPARENT",
    "Claim",
    "DeadLetter",
    "DeliveryPolicy",
    "Envelope",
    "GroupLog",
    "KeyGate",
    "Message",
    "OffsetTracker",
    "Redeliver",
    "TopicPattern",
    "child_traceparent",
    "dead_letter_headers",
    "decode_envelope",
    "encode_envelope",
    "parse_traceparent",
    "validate_topic",
]

H_CORRELATION: Final = "x-correlation-id"
H_TRACEPARENT: Final = "traceparent"
H_ERROR: Final = "x-error"
H_DELIVERIES: Final = "x-deliveries"
H_ORIGINAL_TOPIC: Final = "x-original-topic"
H_GROUP: Final = "x-group"
H_CONTENT_TYPE: Final = "content-type"
DEFAULT_DEAD_SUFFIX: Final = ".dead"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as a handler receives it.

    Attributes:
        id: the message id (unique per message; the dedupe key).
        topic: the topic it was published to.
        key: the ordering key, or ``None``.
        data: the payload bytes.
        headers: string headers, including ``x-correlation-id`` and the W3C
            ``traceparent``.
        delivery: how many times this message was delivered to this group,
            counting from 1.
        published_at: when it was published (UTC).

    .. versionadded:: 0.1
    """

    id: str
    topic: str
    key: str | None
    data: bytes
    headers: Mapping[str, str]
    delivery: int = 1
    published_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def json(self) -> Any:
        """The payload decoded as JSON.

        Raises:
            stanchion.codec.DecodeError: the payload is not valid JSON.
        """
        return json_codec.decode(self.data)

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.data.decode()

    @property
    def correlation_id(self) -> str | None:
        """The ``x-correlation-id`` header, if present."""
        return self.headers.get(H_CORRELATION)

    @property
    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` header, if present."""
        return self.headers.get(H_TRACEPARENT)


# -- topics ------------------------------------------------------------------

_WORD = re.compile(r"^[A-Za-z0-9_\-:@$~]+$")


def validate_topic(topic: str, *, pattern: bool = False) -> str:
    """Check a topic (or, with ``pattern``, a subscription pattern) and return it.

    Raises:
        ConfigError: empty words, characters outside ``[A-Za-z0-9_-:@$~]``,
            or a wildcard in a topic to publish to.
    """
    if not isinstance(topic, str) or not topic:
        raise ConfigError(
            f"invalid topic {topic!r}: expected a non-empty string like 'orders.placed'"
        )
    words = topic.split(".")
    for i, word in enumerate(words):
        if pattern and word == "*":
            continue
        if pattern and word in (">", "#") and i == len(words) - 1:
            continue
        if not _WORD.match(word):
            what = "pattern" if pattern else "topic"
            hint = "" if pattern else " (wildcards * and > are only for subscribing)"
            raise ConfigError(
                f"invalid {what} {topic!r}: word {word!r} must be letters, digits or _-:@$~, "
                f"words separated by dots{hint}"
            )
    return topic


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A subscription pattern: a topic, or words with ``*`` / a final ``>`` (or ``#``).

    .. versionadded:: 0.1
    """

    pattern: str

    def __post_init__(self) -> None:
        validate_topic(self.pattern, pattern=True)

    @property
    def words(self) -> list[str]:
        """The pattern's dot-separated words."""
        return self.pattern.split(".")

    @property
    def is_wildcard(self) -> bool:
        """True if the pattern matches more than one topic."""
        return any(w in ("*", ">", "#") for w in self.words)

    def match(self, topic: str) -> bool:
        """True if ``topic`` matches this pattern."""
        if not self.is_wildcard:
            return topic == self.pattern
        pw = self.words
        tw = topic.split(".")
        for i, p in enumerate(pw):
            if p in (">", "#"):
                return len(tw) > i
            if i >= len(tw):
                return False
            if p != "*" and p != tw[i]:
                return False
        return len(tw) == len(pw)

    def translate(self, sep: str = ".", one: str = "*", rest: str = ">") -> str:
        """The pattern in another engine's syntax (MQTT: ``sep='/', one='+', rest='#'``)."""
        out = []
        for w in self.words:
            if w == "*":
                out.append(one)
            elif w in (">", "#"):
                out.append(rest)
            else:
                out.append(w)
        return sep.join(out)


# -- delivery policy -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redeliver:
    """Decision: deliver the message again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Decision: give up; copy the message to the dead-letter topic and ack it."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """Retries with exponential back-off, then a dead letter.

    Args:
        max_deliveries: deliveries before the message is dead-lettered (>= 1).
        backoff_base: delay before the second delivery, in seconds.
        backoff_max: cap of the delay, in seconds.

    .. versionadded:: 0.1
    """

    max_deliveries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_deliveries, int) or self.max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be an int >= 1, got {self.max_deliveries!r}")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise ConfigError(
                f"retry_backoff must be (base, max) with 0 <= base <= max, "
                f"got ({self.backoff_base}, {self.backoff_max})"
            )

    def delay(self, delivery: int) -> float:
        """The back-off after the ``delivery``-th delivery failed."""
        exp = min(max(delivery - 1, 0), 62)
        return float(min(self.backoff_max, self.backoff_base * (2**exp)))

    def on_failure(self, delivery: int) -> Redeliver | DeadLetter:
        """What to do after delivery number ``delivery`` (from 1) failed."""
        if delivery >= self.max_deliveries:
            return DeadLetter(
                f"failed {delivery} deliveries (max_deliveries={self.max_deliveries})"
            )
        return Redeliver(self.delay(delivery))

    def exceeded(self, delivery: int) -> bool:
        """True if a message arriving with this delivery count must not run again."""
        return delivery > self.max_deliveries


def dead_letter_headers(
    headers: Mapping[str, str], *, error: str, deliveries: int, topic: str, group: str
) -> dict[str, str]:
    """The headers of a dead-letter copy: the original ones plus the failure's facts."""
    out = dict(headers)
    out[H_ERROR] = error
    out[H_DELIVERIES] = str(deliveries)
    out[H_ORIGINAL_TOPIC] = topic
    out[H_GROUP] = group
    return out


# -- tracing -------------------------------------------------------------------

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_span_id, flags)`` of a valid W3C traceparent, else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
        return None
    return m.group(2), m.group(3), m.group(4)


def child_traceparent(parent: str | None, new_trace_id: str, new_span_id: str) -> str:
    """A traceparent for a new span: in ``parent``'s trace if valid, else a new trace."""
    parsed = parse_traceparent(parent)
    if parsed is None:
        return f"00-{new_trace_id}-{new_span_id}-01"
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{new_span_id}-{flags}"


# -- ordering ------------------------------------------------------------------


class KeyGate:
    """At most one in-flight item per key; the rest wait in arrival order.

    ``admit(key, item)`` returns True when the item may run now; otherwise it
    is queued. ``release(key)`` returns the next queued item of that key (which
    is now in flight), or None when the key is idle.
    """

    __slots__ = ("_busy",)

    def __init__(self) -> None:
        self._busy: dict[str, deque[object]] = {}

    def admit(self, key: str, item: object) -> bool:
        """Take ``item``; True if it may run now."""
        waiting = self._busy.get(key)
        if waiting is None:
            self._busy[key] = deque()
            return True
        waiting.append(item)
        return False

    def release(self, key: str) -> object | None:
        """The in-flight item of ``key`` finished; return the next one to run, if any."""
        waiting = self._busy.get(key)
        if waiting is None:
            return None
        if waiting:
            return waiting.popleft()
        del self._busy[key]
        return None

    def waiting(self) -> int:
        """How many items wait behind a busy key."""
        return sum(len(q) for q in self._busy.values())

    def drain(self) -> list[object]:
        """Remove and return every waiting item (on stop)."""
        out: list[object] = []
        for q in self._busy.values():
            out.extend(q)
        self._busy.clear()
        return out


class OffsetTracker:
    """Committable offsets of partitioned logs whose messages finish out of order.

    ``track(partition, offset)`` when a message is handed out (in offset
    order, as a partition is read), ``done(...)`` when it is acked or
    dead-lettered; ``done`` returns the new offset to commit (the next offset
    to read, Kafka's convention) when it moved, else None. The committed
    offset is the smallest still-open offset, or one past the highest handed
    out when none is open: offsets never handed out (gaps left by compaction
    or transaction markers) do not hold it back.
    """

    __slots__ = ("_committed", "_high", "_open")

    def __init__(self) -> None:
        self._open: dict[Any, set[int]] = {}
        self._high: dict[Any, int] = {}
        self._committed: dict[Any, int] = {}

    def track(self, partition: Any, offset: int) -> None:
        """A message at ``offset`` of ``partition`` was handed out."""
        self._open.setdefault(partition, set()).add(offset)
        self._committed.setdefault(partition, offset)
        if offset > self._high.get(partition, -1):
            self._high[partition] = offset

    def done(self, partition: Any, offset: int) -> int | None:
        """The message finished; the offset to commit if it moved, else None."""
        opened = self._open.get(partition)
        if opened is None or offset not in opened:
            return None
        opened.discard(offset)
        new = min(opened) if opened else self._high[partition] + 1
        if new > self._committed.get(partition, -1):
            self._committed[partition] = new
            return new
        return None

    def pending(self, partition: Any) -> int:
        """Messages of ``partition`` handed out and not finished."""
        return len(self._open.get(partition, ()))

    def forget(self, partition: Any) -> None:
        """Drop a partition's state (it was revoked)."""
        self._open.pop(partition, None)
        self._high.pop(partition, None)
        self._committed.pop(partition, None)


# -- wire envelope -------------------------------------------------------------


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """A message on engines that carry only a payload (MQTT): everything, packed."""

    id: str
    key: str | None
    headers: dict[str, str]
    data: bytes
    ts: int  # microseconds since the epoch


_env_enc = msgspec.msgpack.Encoder()
_env_dec = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(env: Envelope) -> bytes:
    """Pack an envelope (msgpack)."""
    return _env_enc.encode(env)


def decode_envelope(raw: bytes) -> Envelope | None:
    """Unpack an envelope; None if ``raw`` is not one (a foreign publisher's payload)."""
    try:
        return _env_dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


# -- the in-memory log ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in a :class:`GroupLog`."""

    seq: int
    topic: str
    id: str
    key: str | None
    headers: dict[str, str]
    data: bytes
    ts: int


@dataclass(slots=True)
class _Pending:
    deliveries: int
    lease_until: float
    consumer: str


@dataclass(slots=True)
class _Group:
    pattern: TopicPattern
    cursor: int  # index into the log of the next message to look at
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claim:
    """A message handed to a consumer, with its delivery count."""

    message: StoredMessage
    deliveries: int


class GroupState(enum.Enum):
    """Whether a group existed before (used for metrics and logs)."""

    NEW = "new"
    EXISTING = "existing"


class GroupLog:
    """Messages plus per-group cursors and leased pending entries (pure).

    Args:
        max_retained: messages kept once every group has read them; older ones
            are dropped (a new group starts at the oldest retained message).
    """

    __slots__ = ("_base", "_groups", "_log", "_seq", "max_retained")

    def __init__(self, max_retained: int = 100_000) -> None:
        self._log: list[StoredMessage] = []
        self._base = 0  # seq of _log[0]
        self._seq = 0
        self._groups: dict[tuple[str, str], _Group] = {}
        self.max_retained = max_retained

    def append(
        self, topic: str, id: str, key: str | None, headers: dict[str, str], data: bytes, ts: int
    ) -> int:
        """Store a message; return its sequence number."""
        seq = self._seq
        self._seq += 1
        self._log.append(StoredMessage(seq, topic, id, key, headers, data, ts))
        return seq

    def ensure_group(self, pattern: str, group: str) -> GroupState:
        """Create ``group`` over ``pattern`` (starting at the oldest retained message)."""
        k = (pattern, group)
        if k in self._groups:
            return GroupState.EXISTING
        self._groups[k] = _Group(TopicPattern(pattern), self._base)
        return GroupState.NEW

    def claim(
        self, pattern: str, group: str, consumer: str, n: int, now: float, lease: float
    ) -> list[Claim]:
        """Hand up to ``n`` messages to ``consumer``: expired pending ones first, then new ones."""
        g = self._groups[(pattern, group)]
        out: list[Claim] = []
        if g.pending:
            for seq, p in g.pending.items():
                if len(out) >= n:
                    break
                if p.lease_until <= now:
                    msg = self._get(seq)
                    if msg is None:
                        continue
                    p.deliveries += 1
                    p.lease_until = now + lease
                    p.consumer = consumer
                    out.append(Claim(msg, p.deliveries))
        end = self._base + len(self._log)
        while len(out) < n and g.cursor < end:
            msg = self._log[g.cursor - self._base]
            g.cursor += 1
            if g.pattern.match(msg.topic):
                g.pending[msg.seq] = _Pending(1, now + lease, consumer)
                out.append(Claim(msg, 1))
        return out

    def _get(self, seq: int) -> StoredMessage | None:
        i = seq - self._base
        if 0 <= i < len(self._log):
            return self._log[i]
        return None

    def ack(self, pattern: str, group: str, seqs: Iterable[int]) -> int:
        """Remove pending entries; return how many existed."""
        g = self._groups.get((pattern, group))
        if g is None:
            return 0
        n = 0
        for seq in seqs:
            if g.pending.pop(seq, None) is not None:
                n += 1
        self._trim()
        return n

    def extend(
        self, pattern: str, group: str, consumer: str, seqs: Iterable[int], until: float
    ) -> None:
        """Renew the leases of ``consumer``'s pending messages."""
        g = self._groups.get((pattern, group))
        if g is None:
            return
        for seq in seqs:
            p = g.pending.get(seq)
            if p is not None and p.consumer == consumer:
                p.lease_until = until

    def release(
        self, pattern: str, group: str, consumer: str, seqs: Iterable[int], now: float
    ) -> None:
        """Make ``consumer``'s pending messages claimable again at once (a clean stop)."""
        self.extend(pattern, group, consumer, seqs, now)

    def lag(self, pattern: str, group: str) -> int:
        """Messages not yet handed to the group plus pending ones (an upper bound)."""
        g = self._groups.get((pattern, group))
        if g is None:
            return 0
        return self._base + len(self._log) - g.cursor + len(g.pending)

    def _trim(self) -> None:
        if len(self._log) <= self.max_retained:
            return
        low = self._base + len(self._log)
        for g in self._groups.values():
            low = min(low, g.cursor, *(g.pending.keys() or [low]))
        drop = min(low - self._base, len(self._log) - self.max_retained)
        if drop > 0:
            del self._log[:drop]
            self._base += drop

    def __len__(self) -> int:
        return len(self._log)

    def messages(self) -> Iterator[StoredMessage]:
        """The retained messages, oldest first."""
        return iter(self._log)
