"""The pub/sub conformance suite over every backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stanchion.testing.conformance.pubsub import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params, need_service
from stanchion.testing.services import run_sync, with_query

BACKENDS = ("memory", "sqlite", "redis", "nats", "amqp", "mqtt")

# The shared Redis does not persist: the warning is asserted in tests/pubsub.
pytestmark = pytest.mark.filterwarnings("ignore:Redis at .* does not persist:RuntimeWarning")


@pytest.fixture
def fast_amqp_url(namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Like the ``amqp_url`` fixture, but deletes what the test declared over AMQP.

    (``rabbitmqctl`` costs about a second per call; a test declares ~10 queues.)
    """
    from stanchion.pubsub.backends import _rabbitmq

    base = need_service("amqp")
    names: set[str] = set()
    original = _rabbitmq.RabbitMQDriver.queue_name

    def recording(self: _rabbitmq.RabbitMQDriver, pattern: object, group: str) -> str:
        name = original(self, pattern, group)  # type: ignore[arg-type]
        names.add(name)
        return name

    monkeypatch.setattr(_rabbitmq.RabbitMQDriver, "queue_name", recording)
    yield with_query(base, prefix=namespace)

    async def cleanup() -> None:
        import aio_pika

        conn = await aio_pika.connect(base)
        try:
            ch = await conn.channel()
            for name in names:
                await ch.queue_delete(name)
            await ch.exchange_delete(f"{namespace}.topics")
        finally:
            await conn.close()

    run_sync(cleanup)


@pytest.fixture(params=backend_params(*BACKENDS))
def backend_url(request: pytest.FixtureRequest) -> str:
    scheme = request.param
    fixture = "fast_amqp_url" if scheme == "amqp" else f"{scheme}_url"
    return str(request.getfixturevalue(fixture))
