"""The pub/sub conformance suite over every backend."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.pubsub import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params

BACKENDS = ("memory", "sqlite", "redis", "nats", "amqp", "mqtt", "kafka")

# The shared Redis does not persist: the warning is asserted in tests/pubsub.
pytestmark = pytest.mark.filterwarnings("ignore:Redis at .* does not persist:RuntimeWarning")


@pytest.fixture(params=backend_params(*BACKENDS))
def backend_url(request: pytest.FixtureRequest) -> str:
    scheme = request.param
    fixture = "pubsub_amqp_url" if scheme == "amqp" else f"{scheme}_url"
    return str(request.getfixturevalue(fixture))
