"""The sharding conformance suite over SQLite and PostgreSQL shards."""

from __future__ import annotations

import pytest

from stanchion.testing.conformance.sharding import *  # noqa: F403

pytestmark = pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)
