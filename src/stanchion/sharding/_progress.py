"""Reshard progress, as reported to callbacks, the CLI and the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ReshardProgress"]


@dataclass(frozen=True, slots=True)
class ReshardProgress:
    """Where a reshard stands.

    Attributes:
        phase: ``copy``, ``catchup``, ``pause``, ``cleanup``, ``aborting``,
            ``done`` or ``aborted``.
        rows_copied: rows written to their new shards (copy and catch-up).
        keys_copied: distinct keys copied in the bulk copy.
        keys_moved: keys whose owner changes, as seen so far.
        changes_applied: change-log entries processed (catch-up).
        lag: change-log entries not yet processed, at the last check.
        rows_deleted: old copies removed in cleanup.
        elapsed: seconds since the reshard started (wall clock, across resumes).
        pause_seconds: how long writes to moving keys were paused.
        old_version: shard-map version when the reshard started.
        version: shard-map version now.
    """

    phase: str
    rows_copied: int = 0
    keys_copied: int = 0
    keys_moved: int = 0
    changes_applied: int = 0
    lag: int = 0
    rows_deleted: int = 0
    elapsed: float = 0.0
    pause_seconds: float = 0.0
    old_version: int = 0
    version: int = 0

    @classmethod
    def from_state(cls, state: Mapping[str, Any], now: float) -> ReshardProgress:
        """Build from the stored reshard state."""
        c = state.get("counters", {})
        return cls(
            phase=str(state.get("phase", "?")),
            rows_copied=int(c.get("rows_copied", 0)),
            keys_copied=int(c.get("keys_copied", 0)),
            keys_moved=int(c.get("keys_moved", 0)),
            changes_applied=int(c.get("changes_applied", 0)),
            lag=int(c.get("lag", 0)),
            rows_deleted=int(c.get("rows_deleted", 0)),
            elapsed=max(0.0, now - float(state.get("started", now))),
            pause_seconds=float(c.get("pause_seconds", 0.0)),
            old_version=int(state.get("old_version", 0)),
            version=int(state.get("version", 0)),
        )
