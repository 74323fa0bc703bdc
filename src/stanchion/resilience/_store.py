"""Shared breaker state through a store (Redis): the replica side of the protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stanchion.errors import ConfigError
from stanchion.resilience._core import Transition

if TYPE_CHECKING:
    from stanchion.resilience._breaker import CircuitBreaker


class SharedState:
    """Keeps one breaker in step with the shared store (not landed yet)."""

    def __init__(self, breaker: CircuitBreaker, url: str, *, sync_interval: float) -> None:
        self.fallback: bool = False
        self.errors: int = 0
        raise ConfigError("shared breaker state (store=...) is not available yet")

    def note(self, outcome: int, now: float) -> None:
        """Queue a local outcome for the store."""

    def local_transition(self, t: Transition) -> None:
        """A transition decided locally."""

    def close(self) -> None:
        """Stop syncing."""
