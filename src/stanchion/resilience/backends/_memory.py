"""In-process shared breaker state (``memory://<namespace>``), for tests and one-process apps."""

from __future__ import annotations

import threading
from typing import ClassVar

from stanchion.resilience._backend import Capabilities
from stanchion.urls import ParsedURL

__all__ = ["MemoryStore"]


class MemoryStore:
    """Breakers of one process sharing state through a dict per ``memory://`` namespace."""

    capabilities = Capabilities(cross_process=False, expires=False)
    _spaces: ClassVar[dict[str, dict[str, tuple[int, bytes]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, namespace: str = "") -> None:
        with self._lock:
            self._data = self._spaces.setdefault(namespace, {})

    @classmethod
    def from_url(cls, url: ParsedURL) -> MemoryStore:
        """``memory://<namespace>``; breakers with the same namespace share."""
        return cls((url.host or "") + url.path + url.query.get("prefix", ""))

    def load(self, name: str) -> tuple[int, bytes] | None:
        """The (version, blob) for ``name``."""
        with self._lock:
            return self._data.get(name)

    def compare_and_set(self, name: str, version: int, blob: bytes, ttl: float) -> bool:
        """Write if unchanged since ``version``."""
        with self._lock:
            cur = self._data.get(name)
            if (cur[0] if cur else 0) != version:
                return False
            self._data[name] = (version + 1, blob)
            return True

    def close(self) -> None:
        """Nothing to release."""
