"""The public API of stanchion.election is what we meant, and documented."""

from __future__ import annotations

import inspect

import stanchion.election as election


def test_public_names_exist_and_are_documented() -> None:
    assert sorted(election.__all__) == sorted(set(election.__all__))
    for name in election.__all__:
        obj = getattr(election, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"


def test_the_interface_named_by_the_issue() -> None:
    from stanchion.election import Fence, LeaderElector, LeaderInfo, Lease

    sig = inspect.signature(LeaderElector.from_url)
    assert list(sig.parameters)[:4] == ["url", "group", "identity", "ttl"]
    assert sig.parameters["ttl"].default == 10.0
    assert sig.parameters["renew_every"].default is None
    assert "clock" in sig.parameters
    for method in ("campaign", "resign", "leader", "leadership", "on_elected", "on_revoked"):
        assert callable(getattr(LeaderElector, method))
    assert [f for f in LeaderInfo.__dataclass_fields__] == ["identity", "token", "expires_at"]
    assert callable(Lease.is_valid)
    assert list(inspect.signature(Fence.write).parameters) == ["self", "token", "fn"]
    assert list(inspect.signature(Fence.__init__).parameters)[:3] == ["self", "url", "resource"]
