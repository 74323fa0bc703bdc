"""``etcd://host:port``: leases and transactions through etcd's v3 JSON gateway.

A candidate checks the group key, grants an etcd lease of ``ceil(ttl)``
seconds, and puts the key with that lease in a transaction guarded by
"the key does not exist" (``create_revision == 0``). The fencing token is the
revision of that transaction: etcd's Raft log makes it strictly increasing
and durable across restarts, and it comes from the same atomic step that
grants the lease. Followers watch the key between attempts and retry the
moment it is deleted. Renewal is a lease keep-alive; a keep-alive answered with
TTL 0 means the lease expired and the key is gone. Release revokes the
lease, which deletes the key at once.

etcd grants at least its minimum TTL (about 2 s on a default single node);
the local deadline still uses the elector's ``ttl``, which is never longer
than what etcd granted, so the leader steps down first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from typing import Any

import aiohttp

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

__all__ = ["EtcdLeases"]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdLeases:
    """Leases in etcd (v3 API over HTTP/JSON with aiohttp)."""

    capabilities = Capabilities(detects_death=False, multi_host=True, persistent_tokens=True)

    def __init__(self, base: str, *, prefix: str = "", timeout: float = 5.0) -> None:
        self._base = base.rstrip("/")
        self._prefix = prefix
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._leases: dict[tuple[str, int], str] = {}
        self._seen: dict[str, int] = {}  # key -> store revision of our last read

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> EtcdLeases:
        """Build from a parsed ``etcd://host:port`` URL (``etcd+https://`` for TLS)."""
        if not parsed.host:
            raise ConfigError(
                f"{parsed.masked()}: etcd:// needs a host, e.g. etcd://127.0.0.1:2379"
            )
        scheme = "https" if parsed.driver == "https" else "http"
        base = f"{scheme}://{parsed.host}:{parsed.port or 2379}"
        return cls(base, prefix=parsed.query.get("prefix", ""), timeout=connect_timeout)

    def _key(self, group: str) -> str:
        return f"{self._prefix}stanchion/election/{group}"

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._timeout)
            )
        try:
            async with self._session.post(self._base + path, data=json.dumps(body)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise BackendUnavailable(
                        f"etcd at {self._base}{path} answered {resp.status}: {text[:200]}"
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise BackendUnavailable(f"etcd at {self._base}: {exc!r}") from exc
        answer: dict[str, Any] = json.loads(text) if text else {}
        return answer

    async def _range(self, key: str) -> dict[str, Any] | None:
        answer = await self._post("/v3/kv/range", {"key": _b64(key)})
        revision = answer.get("header", {}).get("revision")
        if revision is not None:
            self._seen[key] = int(revision)
        kvs = answer.get("kvs") or []
        return kvs[0] if kvs else None

    async def _revoke(self, lease_id: str) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": lease_id})
        except BackendUnavailable as exc:
            if "not found" not in str(exc):
                raise

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if the key is absent; the txn revision is the token."""
        key = self._key(group)
        if await self._range(key) is not None:
            return None
        granted = await self._post("/v3/lease/grant", {"TTL": max(math.ceil(ttl), 1)})
        lease_id = str(granted["ID"])
        try:
            answer = await self._post(
                "/v3/kv/txn",
                {
                    "compare": [
                        {"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}
                    ],
                    "success": [
                        {"request_put": {"key": _b64(key), "value": _b64(identity),
                                         "lease": lease_id}}
                    ],
                },
            )  # fmt: skip
        except BaseException:
            await asyncio.shield(self._revoke_quietly(lease_id))
            raise
        if not answer.get("succeeded"):
            await self._revoke_quietly(lease_id)
            return None
        token = int(answer["header"]["revision"])
        self._leases[(group, token)] = lease_id
        return Grant(token)

    async def _revoke_quietly(self, lease_id: str) -> None:
        try:
            await self._revoke(lease_id)
        except BackendUnavailable:
            pass  # it expires on its own

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Keep the term's etcd lease alive; False when it already expired."""
        lease_id = self._leases.get((group, token))
        if lease_id is None:
            return False
        answer = await self._post("/v3/lease/keepalive", {"ID": lease_id})
        result = answer.get("result", answer)
        if int(result.get("TTL", 0)) <= 0:
            self._leases.pop((group, token), None)
            return False
        return True

    async def release(self, group: str, identity: str, token: int) -> None:
        """Revoke the term's lease (deleting the key) if it is still ours."""
        lease_id = self._leases.pop((group, token), None)
        if lease_id is not None:
            await self._revoke(lease_id)
            return
        key = self._key(group)
        await self._post(
            "/v3/kv/txn",
            {
                "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                             "create_revision": str(token)}],
                "success": [{"request_delete_range": {"key": _b64(key)}}],
            },
        )  # fmt: skip

    async def observe(self, group: str) -> Holder | None:
        """The current holder and its lease's remaining TTL."""
        kv = await self._range(self._key(group))
        if kv is None:
            return None
        remaining = 0.0
        if kv.get("lease"):
            ttl = await self._post("/v3/lease/timetolive", {"ID": kv["lease"]})
            remaining = float(ttl.get("TTL", 0))
            if remaining <= 0:
                return None
        identity = base64.b64decode(kv.get("value", "")).decode()
        return Holder(identity, int(kv["create_revision"]), remaining)

    async def wait(self, group: str, seconds: float) -> bool:
        """Watch the group key for up to ``seconds``; True as soon as it is deleted.

        The watch starts just after the revision of our last read, so a
        deletion between that read and this call is not missed.
        """
        key = self._key(group)
        request: dict[str, Any] = {"key": _b64(key)}
        if key in self._seen:
            request["start_revision"] = str(self._seen[key] + 1)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout, connect=self._timeout)
            )
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(seconds):
                async with self._session.post(
                    self._base + "/v3/watch",
                    data=json.dumps({"create_request": request}),
                    timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout),
                ) as resp:
                    if resp.status != 200:
                        raise BackendUnavailable(f"etcd watch answered {resp.status}")
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        events = json.loads(line).get("result", {}).get("events") or []
                        if any(e.get("type") == "DELETE" for e in events):
                            return True
        except TimeoutError:
            return False
        except (aiohttp.ClientError, OSError, ValueError, BackendUnavailable):
            # No watch (etcd down): sleep out the interval; the next attempt reports it.
            left = seconds - (asyncio.get_running_loop().time() - started)
            await asyncio.sleep(max(left, 0.0))
        return False

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
