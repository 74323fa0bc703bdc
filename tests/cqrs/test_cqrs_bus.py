"""Command and query buses, middleware and the pure core."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stanchion.cqrs import (
    CommandBus,
    CommandResult,
    HandlerAlreadyRegistered,
    HandlerNotFound,
    InvalidMessage,
    QueryBus,
    current_trace,
    logging_middleware,
    metrics_middleware,
    retry_on_conflict,
    tracing_middleware,
    validation_middleware,
)
from stanchion.cqrs._core import (
    Conflict,
    Lag,
    classify_conflict,
    event_type_name,
    fresh,
    qmark_to_dollar,
    replay_plan,
)
from stanchion.errors import ConfigError, WrongExpectedVersion
from stanchion.observability import Metrics


class PlaceOrder(msgspec.Struct):
    order_id: str
    qty: Annotated[int, msgspec.Meta(gt=0)]


@dataclasses.dataclass(frozen=True)
class GetOrder:
    order_id: str


class Positioned:
    last_position = 42


async def test_command_bus_one_handler_per_type() -> None:
    bus = CommandBus()
    seen: list[PlaceOrder] = []

    @bus.register(PlaceOrder)
    async def place(cmd: PlaceOrder) -> str:
        seen.append(cmd)
        return "ok"

    result = await bus.dispatch(PlaceOrder("o1", 2))
    assert result == CommandResult("ok", None)
    assert seen == [PlaceOrder("o1", 2)]
    with pytest.raises(HandlerAlreadyRegistered) as info:
        bus.register(PlaceOrder, place)
    assert info.value.message_type is PlaceOrder
    with pytest.raises(HandlerNotFound, match="GetOrder"):
        await bus.dispatch(GetOrder("o1"))
    with pytest.raises(ConfigError):
        bus.register(int, place)  # not a message type
    with pytest.raises(ConfigError):
        await bus.dispatch(PlaceOrder)  # a class, not a message


async def test_command_result_carries_position() -> None:
    bus = CommandBus()
    bus.register(PlaceOrder, lambda cmd: Positioned())
    result = await bus.dispatch(PlaceOrder("o", 1))
    assert result.position == 42
    bus2 = CommandBus()
    bus2.register(PlaceOrder, lambda cmd: CommandResult("v", 7))  # sync handlers work too
    assert (await bus2.dispatch(PlaceOrder("o", 1))).position == 7


async def test_query_bus_and_wait_for_option() -> None:
    class FakeView:
        def __init__(self) -> None:
            self.waited: list[tuple[int, float | None]] = []

        async def wait_for(self, position: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
            self.waited.append((position, timeout))

    view = FakeView()
    bus = QueryBus(timeout=3.0)
    bus.register(GetOrder, lambda q: {"id": q.order_id}, view=view)
    assert await bus.dispatch(GetOrder("a")) == {"id": "a"}
    assert await bus.dispatch(GetOrder("b"), wait_for=10) == {"id": "b"}
    assert await bus.ask(GetOrder("c"), wait_for=11, timeout=1.0) == {"id": "c"}
    assert view.waited == [(10, 3.0), (11, 1.0)]
    with pytest.raises(HandlerAlreadyRegistered):
        bus.register(GetOrder, lambda q: None)
    bare = QueryBus()
    bare.register(GetOrder, lambda q: None)
    with pytest.raises(ConfigError, match="view="):
        await bare.dispatch(GetOrder("x"), wait_for=1)


async def test_middleware_order_validation_and_tracing() -> None:
    calls: list[str] = []

    async def outer(msg: Any, nxt: Any) -> Any:
        calls.append("outer>")
        out = await nxt(msg)
        calls.append("<outer")
        return out

    async def inner(msg: Any, nxt: Any) -> Any:
        calls.append("inner>")
        return await nxt(msg)

    bus = CommandBus([outer, validation_middleware(), tracing_middleware(), inner])
    traces = []

    @bus.register(PlaceOrder)
    async def handler(cmd: PlaceOrder) -> None:
        calls.append("handler")
        traces.append(current_trace())

    await bus.dispatch(PlaceOrder("o", 1))
    assert calls == ["outer>", "inner>", "handler", "<outer"]
    trace = traces[0]
    assert trace is not None and trace.correlation_id == trace.message_id
    assert trace.metadata()["causation_id"] == trace.message_id
    with pytest.raises(InvalidMessage, match="PlaceOrder"):
        await bus.dispatch(PlaceOrder("o", 0))  # qty must be > 0
    assert current_trace() is None


async def test_retry_on_wrong_expected_version() -> None:
    attempts = 0
    bus = CommandBus([retry_on_conflict(attempts=3, backoff=0.0)])

    @bus.register(PlaceOrder)
    async def flaky(cmd: PlaceOrder) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise WrongExpectedVersion("order-1", 0, 1)
        return "saved"

    assert (await bus.dispatch(PlaceOrder("o", 1))).value == "saved"
    assert attempts == 3
    attempts = -10
    with pytest.raises(WrongExpectedVersion):
        await bus.dispatch(PlaceOrder("o", 1))
    with pytest.raises(ConfigError):
        retry_on_conflict(attempts=0)


async def test_logging_and_metrics_middleware() -> None:
    metrics = Metrics()
    bus = CommandBus([logging_middleware(), metrics_middleware(metrics)])

    @bus.register(PlaceOrder)
    async def handler(cmd: PlaceOrder) -> None:
        if cmd.order_id == "bad":
            raise RuntimeError("nope")

    await bus.dispatch(PlaceOrder("o", 1))
    with pytest.raises(RuntimeError):
        await bus.dispatch(PlaceOrder("bad", 1))
    text = metrics.render().decode()
    assert 'stanchion_cqrs_messages_total{bus="command",outcome="ok",type="PlaceOrder"} 1.0' in text
    assert 'outcome="RuntimeError"' in text


def test_core_checkpoint_rules() -> None:
    assert classify_conflict(5, 3, 5, 3) is None
    assert classify_conflict(5, 4, 5, 3) is Conflict.STALE
    assert classify_conflict(6, 3, 5, 3) is Conflict.MOVED
    assert classify_conflict(6, None, 5, None) is Conflict.MOVED
    assert classify_conflict(5, 9, 5, None) is None  # unfenced writer
    assert replay_plan([1, 2, 3]) == [[1], [2], [3]]
    assert Lag.compute(10, 10, None, None, 100.0) == Lag(0, 0.0)
    assert Lag.compute(10, 15, None, 90.0, 100.0) == Lag(5, 10.0)
    assert Lag.compute(10, None, 3, None, 0.0) == Lag(3, None)


@given(st.lists(st.integers(min_value=-5, max_value=50)), st.integers(-1, 40))
def test_fresh_drops_redeliveries(positions: list[int], checkpoint: int) -> None:
    out = fresh(positions, checkpoint, lambda p: p)
    assert all(p > checkpoint for p in out)
    assert out == sorted(set(out))
    # Every position above the checkpoint and above all earlier ones is kept.
    high = checkpoint
    for p in positions:
        if p > high:
            assert p in out
            high = p


def test_qmark_to_dollar() -> None:
    assert qmark_to_dollar("SELECT 1") == "SELECT 1"
    assert qmark_to_dollar("INSERT INTO t VALUES (?, ?)") == "INSERT INTO t VALUES ($1, $2)"
    assert qmark_to_dollar("SELECT '?' , ? -- ?\n, ?") == "SELECT '?' , $1 -- ?\n, $2"
    assert qmark_to_dollar("SELECT $1 WHERE x ? 'k'") == "SELECT $1 WHERE x ? 'k'"


def test_event_type_name() -> None:
    class OrderPlaced(msgspec.Struct):
        order_id: str

    class Named(msgspec.Struct):
        event_type = "order.named"

    assert event_type_name(OrderPlaced) == "OrderPlaced"
    assert event_type_name(Named) == "order.named"
    assert event_type_name("X") == "X"
    with pytest.raises(ConfigError):
        event_type_name("")
