"""The public API of stanchion.pubsub is what __all__ says, each name documented."""

from __future__ import annotations

import stanchion.pubsub as pubsub


def test_all_public_names_exist_and_have_docstrings() -> None:
    for name in pubsub.__all__:
        obj = getattr(pubsub, name)
        if name in ("Handler", "Middleware"):
            continue  # type aliases
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_issue_interface_names() -> None:
    import inspect

    sig = inspect.signature(pubsub.Broker.subscribe)
    for param in (
        "group", "concurrency", "max_deliveries", "retry_backoff", "dead_letter",
        "ordered_by_key", "prefetch", "ack_timeout",
    ):  # fmt: skip
        assert param in sig.parameters
    assert sig.parameters["ack_timeout"].default == 30.0
    assert sig.parameters["max_deliveries"].default == 5
    assert sig.parameters["concurrency"].default == 1
    pub = inspect.signature(pubsub.Broker.publish)
    assert {"key", "headers", "id"} <= set(pub.parameters)
    fields = [f for f in pubsub.Message.__dataclass_fields__]
    assert fields == ["id", "topic", "key", "data", "headers", "delivery", "published_at"]
