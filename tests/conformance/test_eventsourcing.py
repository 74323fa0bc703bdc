"""The event store conformance suite over memory, SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.eventsourcing import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params


@pytest.fixture(params=backend_params("memory", "sqlite", "postgresql"))
def backend_url(request: pytest.FixtureRequest) -> str:
    fixture = {"memory": "memory_url", "sqlite": "sqlite_url", "postgresql": "postgres_url"}
    return str(request.getfixturevalue(fixture[request.param]))
