"""The collector log store conformance suite over every backend."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.sidecar import *  # noqa: F403
from stanchion.testing.pytest_plugin import backend_params

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=backend_params(*BACKENDS))
def backend_url(request: pytest.FixtureRequest) -> str:
    return str(
        request.getfixturevalue(
            f"{'postgres' if request.param == 'postgresql' else request.param}_url"
        )
    )
