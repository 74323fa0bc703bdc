"""The pure core: topics, delivery policy, key gate, offsets, the in-memory log."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stanchion.errors import ConfigError
from stanchion.pubsub._core import (
    DeadLetter,
    DeliveryPolicy,
    Envelope,
    GroupLog,
    KeyGate,
    OffsetTracker,
    Redeliver,
    TopicPattern,
    child_traceparent,
    decode_envelope,
    encode_envelope,
    parse_traceparent,
    validate_topic,
)


@pytest.mark.parametrize(
    ("pattern", "topic", "match"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.#", "a.b", True),
        ("*.b.*", "x.b.y", True),
        ("*.b.*", "x.c.y", False),
        (">", "anything.at.all", True),
    ],
)
def test_topic_pattern(pattern: str, topic: str, match: bool) -> None:
    assert TopicPattern(pattern).match(topic) is match


def test_topic_translation() -> None:
    p = TopicPattern("s.*.temp.>")
    assert p.translate(sep="/", one="+", rest="#") == "s/+/temp/#"
    assert p.translate(rest="#") == "s.*.temp.#"
    assert p.is_wildcard and not TopicPattern("s.t").is_wildcard


@pytest.mark.parametrize("bad", ["", "a..b", "a.*", "a b", "a/b", "a.>.b", "+"])
def test_invalid_topics(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_topic(bad)


def test_invalid_patterns() -> None:
    with pytest.raises(ConfigError):
        TopicPattern("a.>.b")
    with pytest.raises(ConfigError):
        TopicPattern("a..b")


def test_delivery_policy_backoff_and_dead_letter() -> None:
    p = DeliveryPolicy(max_deliveries=4, backoff_base=0.5, backoff_max=1.5)
    assert p.on_failure(1) == Redeliver(0.5)
    assert p.on_failure(2) == Redeliver(1.0)
    assert p.on_failure(3) == Redeliver(1.5)
    assert isinstance(p.on_failure(4), DeadLetter)
    assert not p.exceeded(4) and p.exceeded(5)


@pytest.mark.parametrize(("n", "base", "cap"), [(0, 1, 2), (3, -1, 2), (3, 3, 2)])
def test_delivery_policy_validation(n: int, base: float, cap: float) -> None:
    with pytest.raises(ConfigError):
        DeliveryPolicy(n, base, cap)


@given(st.integers(1, 20), st.integers(1, 40))
def test_never_dead_letters_early(max_deliveries: int, delivery: int) -> None:
    decision = DeliveryPolicy(max_deliveries, 0.1, 5.0).on_failure(delivery)
    assert isinstance(decision, DeadLetter) == (delivery >= max_deliveries)
    if isinstance(decision, Redeliver):
        assert 0 <= decision.delay <= 5.0


def test_key_gate() -> None:
    g = KeyGate()
    assert g.admit("a", 1)
    assert not g.admit("a", 2)
    assert g.admit("b", 3)
    assert not g.admit("a", 4)
    assert g.waiting() == 2
    assert g.release("a") == 2
    assert g.release("a") == 4
    assert g.release("a") is None
    assert g.admit("a", 5)


@given(st.permutations(list(range(30))))
def test_offset_tracker_commits_only_contiguous(order: list[int]) -> None:
    t = OffsetTracker()
    for o in range(30):
        t.track("p0", o)
    finished: set[int] = set()
    committed = 0
    for o in order:
        finished.add(o)
        c = t.done("p0", o)
        if c is not None:
            assert c > committed
            committed = c
        # never past an unfinished message
        assert all(x in finished for x in range(committed))
    assert committed == 30


def test_offset_tracker_gaps() -> None:
    t = OffsetTracker()
    for o in (10, 12, 15):
        t.track(0, o)
    assert t.done(0, 12) is None
    assert t.done(0, 10) == 15
    assert t.done(0, 15) == 16
    assert t.done(0, 99) is None


def test_group_log_leases_and_redelivery() -> None:
    log = GroupLog()
    log.ensure_group("t", "g")
    for i in range(3):
        log.append("t", f"m{i}", None, {}, b"x", 0)
    log.append("other", "o", None, {}, b"x", 0)
    a = log.claim("t", "g", "A", 2, now=0.0, lease=10.0)
    assert [c.message.id for c in a] == ["m0", "m1"] and all(c.deliveries == 1 for c in a)
    b = log.claim("t", "g", "B", 5, now=1.0, lease=25.0)
    assert [c.message.id for c in b] == ["m2"]
    log.ack("t", "g", [a[0].message.seq])
    log.extend("t", "g", "A", [a[1].message.seq], until=30.0)
    assert log.claim("t", "g", "B", 5, now=20.0, lease=10.0) == []
    again = log.claim("t", "g", "B", 5, now=31.0, lease=10.0)
    assert [(c.message.id, c.deliveries) for c in again] == [("m1", 2), ("m2", 2)]
    log.ensure_group("t", "late")
    assert len(log.claim("t", "late", "C", 10, now=0.0, lease=1.0)) == 3


def test_traceparent() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert parse_traceparent(tp) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
    child = child_traceparent(tp, "1" * 32, "2" * 16)
    assert child == "00-0af7651916cd43dd8448eb211c80319c-2222222222222222-01"
    assert child_traceparent("garbage", "1" * 32, "2" * 16) == f"00-{'1' * 32}-{'2' * 16}-01"
    assert parse_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None


def test_envelope_round_trip() -> None:
    env = Envelope("id", "k", {"h": "v"}, b"\x00data", 123)
    assert decode_envelope(encode_envelope(env)) == env
    assert decode_envelope(b"plain bytes from a device") is None
