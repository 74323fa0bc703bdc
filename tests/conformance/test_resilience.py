"""The shared breaker-state store suite over every backend."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.resilience import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params


@pytest.fixture(params=backend_params("memory", "redis"))
def backend_url(request: pytest.FixtureRequest) -> str:
    fixture = {"memory": "memory_url", "redis": "redis_url"}[request.param]
    return str(request.getfixturevalue(fixture))
