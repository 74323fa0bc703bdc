"""Clock, codec, errors and observability: the shared core."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import uuid

import msgspec
import pytest

from stanchion.clock import Clock, ManualClock, monotonic
from stanchion.codec import DecodeError, EncodeError, JsonCodec
from stanchion.errors import (
    BackendError,
    BackendUnavailable,
    CircuitOpenError,
    ConfigError,
    ConflictError,
    StanchionError,
    WrongExpectedVersion,
)
from stanchion.observability import Metrics, configure_logging, get_logger


def test_manual_clock() -> None:
    clock = ManualClock(10.0)
    assert clock() == 10.0
    assert clock.advance(2.5) == 12.5
    assert clock.jump(20.0) == 20.0
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.jump(5.0)
    assert isinstance(clock, Clock) and isinstance(monotonic, Clock)


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Item:
    sku: str
    qty: int


def test_codec_round_trips() -> None:
    codec = JsonCodec()
    ident = uuid.uuid4()
    raw = codec.encode({"p": Point(1, 2), "i": Item("a", 2), "id": ident})
    assert codec.decode(raw) == {
        "p": {"x": 1, "y": 2},
        "i": {"sku": "a", "qty": 2},
        "id": str(ident),
    }
    assert codec.decode(b'{"x":1,"y":2}', Point) == Point(1, 2)


def test_codec_errors_are_clear() -> None:
    codec = JsonCodec()
    with pytest.raises(EncodeError, match="cannot encode"):
        codec.encode({"f": object()})
    with pytest.raises(DecodeError):
        codec.decode(b"{not json")
    with pytest.raises(DecodeError):
        codec.decode(b'{"x":"a","y":2}', Point)


def test_error_tree() -> None:
    assert issubclass(ConfigError, StanchionError) and issubclass(ConfigError, ValueError)
    assert issubclass(BackendUnavailable, BackendError)
    assert issubclass(WrongExpectedVersion, ConflictError)
    err = CircuitOpenError("db", 1.5)
    assert err.name == "db" and err.retry_after == 1.5 and "db" in str(err)


def test_metrics_are_idempotent_and_private() -> None:
    a, b = Metrics(), Metrics()
    c1 = a.counter("calls", "calls", ["outcome"])
    assert a.counter("calls", "calls", ["outcome"]) is c1
    b.counter("calls", "calls", ["outcome"])  # a second registry does not clash
    c1.labels("ok").inc()
    assert b'stanchion_calls_total{outcome="ok"} 1.0' in a.render()


def test_structured_json_logs() -> None:
    stream = io.StringIO()
    configure_logging(logging.DEBUG, stream=stream)
    try:
        get_logger("stanchion.test").bind(component="x").info("thing.happened", n=3)
        line = json.loads(stream.getvalue().strip().splitlines()[-1])
        assert line["event"] == "thing.happened" and line["n"] == 3
        assert line["component"] == "x" and line["level"] == "info"
    finally:
        logging.getLogger("stanchion").handlers.clear()
