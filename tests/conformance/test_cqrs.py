"""The CQRS read-model conformance suite over every read-model backend."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.cqrs import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params


@pytest.fixture(params=backend_params("sqlite", "postgresql", "redis"))
def backend_url(request: pytest.FixtureRequest) -> str:
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url", "redis": "redis_url"}
    return str(request.getfixturevalue(fixture[request.param]))
