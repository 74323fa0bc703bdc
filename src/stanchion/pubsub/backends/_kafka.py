"""kafka:// -- Apache Kafka (and Kafka-protocol brokers) through aiokafka.

Mapping
-------

* A topic ``a.b`` is the Kafka topic ``<prefix>.a.b`` (``?prefix=`` joined by a
  dot unless it already ends in ``.``, ``-`` or ``_``). Characters Kafka does
  not allow in topic names (``:@$~``) are replaced and a short hash keeps names
  apart. Topics are created on first use (publish, subscribe or declare) with
  ``?partitions=`` (default 1, Kafka's own default) and ``?replication=``
  (default 1); with ``?create_topics=false`` they must exist and a missing
  topic is an error.
* A group is the Kafka consumer group ``<prefix>.<group>``; a new group starts
  at the earliest offset (``?offset_reset=latest`` to start at the end), so a
  group declared after a message was published still gets it.
* ``key`` is the record key (UTF-8): the default murmur2 partitioner sends a
  key to one partition, which is where per-key order comes from. Messages
  without a key of one ``publish``/``publish_many`` call go to one partition
  (round-robin across calls), so a batch stays in order and in one request.
* Headers are record headers; the message id travels in ``stanchion-id``.

Publishing
----------

``acks=all``; idempotence (``enable.idempotence``) is requested and kept when
the broker grants a producer id (``?idempotence=auto``, the default; ``true``
makes its absence an error, ``false`` never asks). ``publish_many`` builds one
record batch per partition and sends them together (one produce request per
partition), then waits for every acknowledgement.

Consuming and commits
---------------------

Manual commits only. Messages of a partition finish out of order (concurrency,
scheduled retries); :class:`_Offsets` (the semantics of
:class:`~stanchion.pubsub._core.OffsetTracker`, in amortised O(1)) moves the
committed offset of a partition only past messages that *and every earlier
message of the partition* were acked or dead-lettered, so a crash never skips a
message (it may redeliver handled ones: at-least-once). A failing message waits
for its back-off in the runtime while the messages behind it are handled; it
holds back only the commit of its partition, never its consumption.

Rebalances (eager, as aiokafka does them): when partitions are revoked, the
consumer stops handing their messages to handlers (the runtime asks
:meth:`_KafkaConsumer.owns` before it starts one; fetched-but-not-started
messages are dropped and will be read again by the new owner), waits for the
handlers already running on them to finish and commits their offsets, and only
then lets the partitions go. A handler still running after
``?revoke_timeout=`` seconds (default 25) is abandoned: its offset stays
uncommitted and the new owner handles the message again. So no message is
handled by two live members at once unless a handler outlives that bound.

A dead member is noticed by the group coordinator after the session timeout
(liveness is the member's heartbeat, not the handler's duration):
``?session_timeout=`` seconds, else ``ack_timeout`` clamped to
``[min_session_timeout, 10]``; ``?min_session_timeout=`` defaults to 6
(Kafka's ``group.min.session.timeout.ms``). Its partitions then go to the
other members, which resume from the last committed offsets. Kafka counts no
deliveries, so ``Message.delivery`` counts only this member's retries.

As with any Kafka consumer, a member that does not poll for
``?max_poll_interval=`` seconds (default 300) leaves the group; the runtime
stops polling while its ``prefetch`` window is full of unfinished messages, so
raise it for handlers that can hold the whole window longer than that.

Security (query parameters)
---------------------------

``security_protocol`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; ``tls=true``
picks SSL / SASL_SSL), ``sasl_mechanism`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512;
the user and password come from the URL), ``ssl_cafile``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_check_hostname`` (default true). Other parameters:
``client_id``, ``compression`` (gzip, snappy, lz4, zstd), ``linger_ms``,
``max_poll_interval``, ``rebalance_timeout``, ``heartbeat_interval``,
``request_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kerr
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import OffsetAndMetadata

from stanchion.errors import BackendUnavailable, ConfigError, PublishError
from stanchion.observability import get_logger
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = ["KafkaDriver", "bootstrap_servers", "kafka_name"]

CAPABILITIES: Final = Capabilities(
    wildcards=False,
    delivery_count=False,
    partitions=True,
    leases=False,
    redelivery_bound=(
        "the Kafka session timeout (?session_timeout=, else ack_timeout clamped "
        "to [min_session_timeout (6 s), 10 s]) plus the rebalance"
    ),
)

_H_ID: Final = "stanchion-id"
_LEGAL = re.compile(r"^[A-Za-z0-9._-]+$")
_log = get_logger("stanchion.pubsub.kafka")


def kafka_name(text: str) -> str:
    """``text`` as a legal Kafka topic / group name (a short hash when changed)."""
    if _LEGAL.match(text) and len(text) <= 200:
        return text
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:180]
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def bootstrap_servers(url: ParsedURL) -> list[str]:
    """``host:port`` of every broker in ``kafka://h1:p1,h2:p2/...`` (default port 9092)."""
    netloc = urlsplit(url.raw).netloc.rpartition("@")[2]
    out: list[str] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or "9092"
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "9092")
        if not port.isdigit():
            raise ConfigError(f"{url.masked()}: bad broker address {part!r}")
        out.append(f"{unquote(host) or '127.0.0.1'}:{port}")
    return out or ["127.0.0.1:9092"]


def _bool(url: ParsedURL, key: str, default: bool) -> bool:
    return url.get_bool(key, default)


class _Config(NamedTuple):
    servers: list[str]
    prefix: str
    partitions: int
    replication: int
    create_topics: bool
    idempotence: str
    offset_reset: str
    session_timeout: float | None
    min_session_timeout: float
    heartbeat_interval: float | None
    max_poll_interval: float
    rebalance_timeout: float
    revoke_timeout: float
    request_timeout: float
    client: dict[str, Any]
    producer: dict[str, Any]


def _config(url: ParsedURL) -> _Config:
    q = url.query
    prefix = q.get("prefix", "")
    if prefix and not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise ConfigError(f"{url.masked()}: prefix must be letters, digits, '.', '_' or '-'")
    if prefix and prefix[-1] not in ".-_":
        prefix += "."
    partitions = url.get_int("partitions", 1)
    replication = url.get_int("replication", url.get_int("replication_factor", 1))
    if partitions < 1 or replication < 1:
        raise ConfigError(f"{url.masked()}: partitions and replication must be >= 1")
    idem = q.get("idempotence", "auto").lower()
    if idem not in ("auto", "true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{url.masked()}: idempotence must be auto, true or false")
    idem = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(idem, idem)
    reset = q.get("offset_reset", "earliest")
    if reset not in ("earliest", "latest"):
        raise ConfigError(f"{url.masked()}: offset_reset must be earliest or latest")
    tls = _bool(url, "tls", False)
    sasl = q.get("sasl_mechanism")
    proto = q.get("security_protocol") or (
        ("SASL_SSL" if tls else "SASL_PLAINTEXT") if sasl or url.username else
        ("SSL" if tls else "PLAINTEXT")
    )  # fmt: skip
    proto = proto.upper()
    if proto not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(f"{url.masked()}: unknown security_protocol {proto!r}")
    client: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(url),
        "client_id": q.get("client_id", "stanchion"),
        "security_protocol": proto,
        "request_timeout_ms": int(url.get_float("request_timeout", 30.0) * 1000),
    }
    if proto.startswith("SASL"):
        mech = (sasl or "PLAIN").upper()
        if mech not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ConfigError(f"{url.masked()}: unsupported sasl_mechanism {mech!r}")
        if url.username is None:
            raise ConfigError(f"{url.masked()}: SASL needs a user and password in the URL")
        client.update(
            sasl_mechanism=mech,
            sasl_plain_username=url.username,
            sasl_plain_password=url.password or "",
        )
    if proto.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        ctx = create_ssl_context(
            cafile=q.get("ssl_cafile"),
            certfile=q.get("ssl_certfile"),
            keyfile=q.get("ssl_keyfile"),
        )
        ctx.check_hostname = _bool(url, "ssl_check_hostname", True)
        client["ssl_context"] = ctx
    producer: dict[str, Any] = {
        "linger_ms": url.get_int("linger_ms", 0),
        "max_batch_size": url.get_int("batch_size", 1_000_000),
    }
    if q.get("compression"):
        comp = q["compression"].lower()
        if comp not in ("gzip", "snappy", "lz4", "zstd", "none"):
            raise ConfigError(f"{url.masked()}: unknown compression {comp!r}")
        if comp != "none":
            producer["compression_type"] = comp
    session = url.get_float("session_timeout", 0.0) or None
    hb = url.get_float("heartbeat_interval", 0.0) or None
    return _Config(
        servers=client["bootstrap_servers"],
        prefix=prefix,
        partitions=partitions,
        replication=replication,
        create_topics=_bool(url, "create_topics", True),
        idempotence=idem,
        offset_reset=reset,
        session_timeout=session,
        min_session_timeout=url.get_float("min_session_timeout", 6.0),
        heartbeat_interval=hb,
        max_poll_interval=url.get_float("max_poll_interval", 300.0),
        rebalance_timeout=url.get_float("rebalance_timeout", 30.0),
        revoke_timeout=url.get_float("revoke_timeout", 25.0),
        request_timeout=url.get_float("request_timeout", 30.0),
        client=client,
        producer=producer,
    )


def _unavailable(url: str, exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(f"Kafka unavailable at {url}: {exc!r}", url=url)


async def _reachable(servers: Sequence[str], url: str) -> None:
    last: BaseException | None = None
    for hp in servers:
        host, _, port = hp.rpartition(":")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 5)
            w.close()
            return
        except (OSError, TimeoutError) as exc:
            last = exc
    raise BackendUnavailable(f"cannot reach any Kafka broker of {url}: {last}", url=url)


class KafkaDriver:
    """aiokafka driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, cfg: _Config, producer: Any, admin: Any, url: str) -> None:
        self._cfg = cfg
        self._producer = producer
        self._admin = admin
        self._url = url
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._rr = itertools.count()
        self._partitioner = DefaultPartitioner()
        self._consumers: set[_KafkaConsumer] = set()
        self.idempotent = False

    # -- connection ---------------------------------------------------------

    @classmethod
    async def open(cls, url: ParsedURL) -> KafkaDriver:
        """Connect the producer and the admin client."""
        cfg = _config(url)
        masked = url.masked()
        await _reachable(cfg.servers, masked)
        admin = AIOKafkaAdminClient(**cfg.client)
        try:
            await asyncio.wait_for(admin.start(), cfg.request_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await admin.close()
            raise _unavailable(masked, exc) from exc
        producer = None
        try:
            producer, idem = await cls._producer_for(cfg, masked)
        finally:
            if producer is None:
                with contextlib.suppress(Exception):
                    await admin.close()
        drv = cls(cfg, producer, admin, masked)
        drv.idempotent = idem
        return drv

    @staticmethod
    async def _producer_for(cfg: _Config, masked: str) -> tuple[Any, bool]:
        attempts = [True, False] if cfg.idempotence == "auto" else [cfg.idempotence == "true"]
        last: BaseException | None = None
        for idem in attempts:
            producer = AIOKafkaProducer(
                acks="all", enable_idempotence=idem, **cfg.client, **cfg.producer
            )
            try:
                await asyncio.wait_for(producer.start(), cfg.request_timeout)
                if idem is False and cfg.idempotence == "auto":
                    _log.warning(
                        "pubsub.kafka.no_idempotence",
                        url=masked,
                        error=repr(last),
                        detail="the broker grants no producer id; publishing with acks=all "
                        "without idempotence (a retried send may duplicate a record)",
                    )
                return producer, idem
            except Exception as exc:
                last = exc
                with contextlib.suppress(Exception):
                    await producer.stop()
                if isinstance(exc, kerr.KafkaConnectionError | TimeoutError):
                    raise _unavailable(masked, exc) from exc
        if cfg.idempotence == "true":
            raise PublishError(
                f"the Kafka broker at {masked} refused an idempotent producer: {last!r}"
            )
        raise _unavailable(masked, last or RuntimeError("producer did not start"))

    async def close(self) -> None:
        """Stop the producer and the admin client."""
        for c in list(self._consumers):
            with contextlib.suppress(Exception):
                await c.close()
        with contextlib.suppress(Exception):
            await self._producer.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()

    # -- names and topics -----------------------------------------------------

    def topic_name(self, topic: str) -> str:
        """The Kafka topic of ``topic``."""
        return kafka_name(self._cfg.prefix + topic)

    def group_name(self, group: str) -> str:
        """The Kafka consumer group of ``group``."""
        return kafka_name(self._cfg.prefix + group)

    async def _ensure_topics(self, names: Iterable[str], *, for_publish: bool) -> None:
        missing = [n for n in dict.fromkeys(names) if n not in self._topics]
        if not missing:
            return
        async with self._topic_lock:
            missing = [n for n in missing if n not in self._topics]
            if not missing:
                return
            try:
                if self._cfg.create_topics:
                    resp = await self._admin.create_topics(
                        [NewTopic(n, self._cfg.partitions, self._cfg.replication) for n in missing]
                    )
                    for name, code, message in _topic_errors(resp):
                        if code not in (0, kerr.TopicAlreadyExistsError.errno):
                            raise PublishError(
                                f"Kafka refused to create topic {name!r} (error {code}): {message}"
                            )
                else:
                    existing = set(await self._admin.list_topics())
                    absent = [n for n in missing if n not in existing]
                    if absent:
                        text = (
                            f"Kafka topic(s) {absent} do not exist and create_topics=false "
                            f"({self._url}): create them first"
                        )
                        raise PublishError(text) if for_publish else ConfigError(text)
            except (kerr.KafkaConnectionError, kerr.KafkaTimeoutError, TimeoutError) as exc:
                raise _unavailable(self._url, exc) from exc
            except kerr.KafkaError as exc:
                raise PublishError(f"Kafka topic creation failed: {exc!r}") from exc
            self._topics.update(missing)

    # -- publishing -------------------------------------------------------------

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Send and wait for every acknowledgement (acks=all)."""
        p = self._producer
        await self._ensure_topics((self.topic_name(m.topic) for m in messages), for_publish=True)
        try:
            if len(messages) == 1:
                m = messages[0]
                await p.send_and_wait(
                    self.topic_name(m.topic),
                    m.data,
                    key=m.key.encode() if m.key is not None else None,
                    headers=_headers(m),
                    timestamp_ms=m.ts // 1000,
                )
                return
            await self._publish_batches(messages)
        except (kerr.KafkaConnectionError, kerr.KafkaTimeoutError, kerr.NodeNotReadyError) as exc:
            raise _unavailable(self._url, exc) from exc
        except kerr.KafkaError as exc:
            raise PublishError(f"Kafka refused the message: {exc!r}") from exc

    async def _publish_batches(self, messages: Sequence[OutboundMessage]) -> None:
        p = self._producer
        parts: dict[str, list[int]] = {}
        sticky: dict[str, int] = {}
        batches: dict[tuple[str, int], list[Any]] = {}
        for m in messages:
            name = self.topic_name(m.topic)
            all_parts = parts.get(name)
            if all_parts is None:
                all_parts = parts[name] = sorted(await p.partitions_for(name))
            key = m.key.encode() if m.key is not None else None
            if key is None:
                if name not in sticky:
                    sticky[name] = all_parts[next(self._rr) % len(all_parts)]
                part = sticky[name]
            else:
                part = self._partitioner(key, all_parts, all_parts)
            chain = batches.setdefault((name, part), [p.create_batch()])
            hdrs = _headers(m)
            if (
                chain[-1].append(key=key, value=m.data, timestamp=m.ts // 1000, headers=hdrs)
                is None
            ):
                nxt = p.create_batch()
                if nxt.append(key=key, value=m.data, timestamp=m.ts // 1000, headers=hdrs) is None:
                    raise PublishError(f"message {m.id!r} is larger than the batch size")
                chain.append(nxt)
        futures = []
        for (name, part), chain in batches.items():
            for b in chain:
                b.close()
                futures.append(await p.send_batch(b, name, partition=part))
        await asyncio.gather(*futures)

    # -- groups and consumers -----------------------------------------------------

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Make sure the topic exists (a new group starts at the earliest offset)."""
        await self._ensure_topics([self.topic_name(pattern.pattern)], for_publish=False)

    async def consumer(self, spec: ConsumerSpec) -> _KafkaConsumer:
        """A member of the Kafka consumer group."""
        if spec.pattern.is_wildcard:
            raise ConfigError("kafka:// does not support topic wildcards")
        topic = self.topic_name(spec.pattern.pattern)
        await self._ensure_topics([topic], for_publish=False)
        cfg = self._cfg
        session = cfg.session_timeout or max(cfg.min_session_timeout, min(spec.ack_timeout, 10.0))
        hb = cfg.heartbeat_interval or min(3.0, session / 3)
        c = _KafkaConsumer(self, spec, topic)
        consumer = AIOKafkaConsumer(
            group_id=self.group_name(spec.group),
            enable_auto_commit=False,
            auto_offset_reset=cfg.offset_reset,
            session_timeout_ms=int(session * 1000),
            heartbeat_interval_ms=max(1, int(hb * 1000)),
            max_poll_interval_ms=int(cfg.max_poll_interval * 1000),
            rebalance_timeout_ms=int(cfg.rebalance_timeout * 1000),
            fetch_max_wait_ms=250,
            **cfg.client,
        )
        consumer.subscribe([topic], listener=_Listener(c))
        try:
            await asyncio.wait_for(consumer.start(), cfg.request_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise _unavailable(self._url, exc) from exc
        c._c = consumer
        self._consumers.add(c)
        return c


def _topic_errors(resp: Any) -> list[tuple[str, int, str]]:
    out = []
    for item in getattr(resp, "topic_errors", ()) or ():
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else ""
        out.append((name, int(code), str(message or "")))
    return out


def _headers(m: OutboundMessage) -> list[tuple[str, bytes]]:
    hdrs = [(k, v.encode()) for k, v in m.headers.items()]
    hdrs.append((_H_ID, m.id.encode()))
    return hdrs


class _Offsets:
    """Committable offsets per partition, amortised O(1) per message.

    The semantics of :class:`stanchion.pubsub._core.OffsetTracker` (the commit
    never passes an unfinished message; offsets never handed out do not hold
    it back), for offsets handed out in increasing order as a partition is read:
    a FIFO of open offsets whose head only moves when it is done.
    """

    __slots__ = ("_done", "_high", "_open")

    def __init__(self) -> None:
        self._open: dict[Any, deque[int]] = {}
        self._done: dict[Any, set[int]] = {}
        self._high: dict[Any, int] = {}

    def track(self, partition: Any, offset: int) -> None:
        q = self._open.get(partition)
        if q is None:
            q = self._open[partition] = deque()
            self._done[partition] = set()
        q.append(offset)
        if offset > self._high.get(partition, -1):
            self._high[partition] = offset

    def done(self, partition: Any, offset: int) -> int | None:
        q = self._open.get(partition)
        if not q:
            return None
        if offset != q[0]:
            if q[0] < offset <= q[-1]:
                self._done[partition].add(offset)
            return None
        finished = self._done[partition]
        q.popleft()
        while q and q[0] in finished:
            finished.discard(q.popleft())
        return q[0] if q else self._high[partition] + 1

    def pending(self, partition: Any) -> int:
        return len(self._open.get(partition, ())) - len(self._done.get(partition, ()))

    def forget(self, partition: Any) -> None:
        self._open.pop(partition, None)
        self._done.pop(partition, None)
        self._high.pop(partition, None)


class _Token(NamedTuple):
    tp: TopicPartition
    offset: int
    epoch: int


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: _KafkaConsumer) -> None:
        self._c = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._c._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._c._assign(set(assigned))


class _KafkaConsumer:
    def __init__(self, driver: KafkaDriver, spec: ConsumerSpec, topic: str) -> None:
        self._d = driver
        self._s = spec
        self._topic = topic
        self._c: Any = None
        self._tracker = _Offsets()
        self._epoch: dict[TopicPartition, int] = {}
        self._owned: set[TopicPartition] = set()
        self._revoking: set[TopicPartition] = set()
        self._running: set[_Token] = set()
        self._changed = asyncio.Event()
        self._committed: dict[TopicPartition, int] = {}
        self._closed = False

    # -- rebalance ------------------------------------------------------------

    def _assign(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
            self._tracker.forget(tp)
            self._committed.pop(tp, None)
        self._owned = set(assigned)
        _log.debug(
            "pubsub.kafka.assigned",
            topic=self._topic,
            partitions=sorted(t.partition for t in assigned),
        )

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        self._owned -= revoked
        self._revoking |= revoked
        deadline = time.monotonic() + self._d._cfg.revoke_timeout
        try:
            while any(t.tp in revoked for t in self._running):
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning(
                        "pubsub.kafka.revoke_abandoned",
                        topic=self._topic,
                        running=sum(1 for t in self._running if t.tp in revoked),
                    )
                    break
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        finally:
            for tp in revoked:
                self._tracker.forget(tp)
                self._committed.pop(tp, None)
            self._revoking -= revoked
            self._running = {t for t in self._running if t.tp not in revoked}

    def _valid(self, t: _Token) -> bool:
        return self._epoch.get(t.tp) == t.epoch and (t.tp in self._owned or t.tp in self._revoking)

    def owns(self, token: object) -> bool:
        """Called by the runtime before a handler starts: False drops the delivery."""
        assert isinstance(token, _Token)
        if self._epoch.get(token.tp) == token.epoch and token.tp in self._owned:
            self._running.add(token)
            return True
        if token in self._running:
            self._running.discard(token)
            self._changed.set()
        return False

    # -- the Consumer protocol --------------------------------------------------

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        try:
            got = await self._c.getmany(timeout_ms=int(wait * 1000), max_records=max_messages)
        except (kerr.KafkaConnectionError, kerr.NodeNotReadyError) as exc:
            raise _unavailable(self._d._url, exc) from exc
        out: list[Delivery] = []
        name = self._s.pattern.pattern
        for tp, records in got.items():
            if tp not in self._owned:
                continue
            epoch = self._epoch[tp]
            for r in records:
                self._tracker.track(tp, r.offset)
                hdrs: dict[str, str] = {}
                mid = None
                for k, v in r.headers or ():
                    text = v.decode("utf-8", "replace") if v is not None else ""
                    if k == _H_ID:
                        mid = text
                    else:
                        hdrs[k] = text
                msg = Message(
                    mid or f"{tp.topic}-{tp.partition}-{r.offset}",
                    name,
                    r.key.decode("utf-8", "replace") if r.key is not None else None,
                    r.value if r.value is not None else b"",
                    hdrs,
                    1,
                    datetime.fromtimestamp(r.timestamp / 1000, UTC),
                )
                out.append(Delivery(msg, _Token(tp, r.offset, epoch), tp.partition))
        return out

    async def ack(self, tokens: Sequence[object]) -> None:
        try:
            await self._commit(tokens)
        finally:
            # Only now (the commit landed or failed) may a revocation waiting
            # for these handlers let their partitions go.
            for t in tokens:
                self._running.discard(t)  # type: ignore[arg-type, unused-ignore]
            self._changed.set()

    async def _commit(self, tokens: Sequence[object]) -> None:
        commit: dict[TopicPartition, int] = {}
        for t in tokens:
            assert isinstance(t, _Token)
            if not self._valid(t):
                continue  # revoked meanwhile: the new owner handles it again
            new = self._tracker.done(t.tp, t.offset)
            if new is not None:
                commit[t.tp] = new
        if not commit:
            return
        offsets = {tp: OffsetAndMetadata(off, "") for tp, off in commit.items()}
        try:
            await self._c.commit(offsets)
        except (kerr.CommitFailedError, kerr.IllegalStateError) as exc:
            # The group rebalanced: the partition's new owner resumes from the
            # last committed offset (the messages are handled again).
            _log.info("pubsub.kafka.commit_failed", topic=self._topic, error=repr(exc))
            return
        except (kerr.KafkaConnectionError, kerr.NodeNotReadyError) as exc:
            raise _unavailable(self._d._url, exc) from exc
        for tp, off in commit.items():
            self._committed[tp] = max(off, self._committed.get(tp, 0))

    async def extend(self, tokens: Sequence[object]) -> None:
        return None  # liveness is the group session (heartbeats), not per message

    async def release(self, tokens: Sequence[object]) -> None:
        # Not committed: the next owner of the partition reads them again.
        for t in tokens:
            self._running.discard(t)  # type: ignore[arg-type, unused-ignore]
        self._changed.set()

    async def lag(self) -> int | None:
        total = 0
        known = False
        for tp in self._owned:
            high = self._c.highwater(tp)
            if high is None:
                continue
            known = True
            base = self._committed.get(tp)
            if base is None:
                base = await self._c.committed(tp) or 0
            total += max(0, high - base)
        return total if known else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._d._consumers.discard(self)
        with contextlib.suppress(Exception):
            await self._c.stop()
