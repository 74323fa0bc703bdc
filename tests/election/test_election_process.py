"""Real OS processes: kill -9 the leader, SIGSTOP it past its TTL, lose the backend."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stanchion.testing.pytest_plugin import ServerFactory, backend_params
from stanchion.urls import parse_url

WORKER = Path(__file__).with_name("election_worker.py")
BACKENDS = ("sqlite", "file", "postgresql", "redis", "etcd")


def ttl_for(url: str) -> float:
    # etcd grants whole seconds and at least ~2 s; the others take 1 s.
    return 2.0 if parse_url(url).scheme == "etcd" else 1.0


def fence_for(url: str, tmp_path: Path) -> str:
    scheme = parse_url(url).scheme
    if scheme in ("sqlite", "postgresql", "redis"):
        return url
    return f"sqlite:///{tmp_path / 'fence.db'}"  # file:// and etcd: fence a SQLite resource


@dataclass(frozen=True)
class Event:
    kind: str
    ident: str
    token: int
    t: float
    extra: str = ""


def read_log(path: Path) -> list[Event]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            events.append(Event(parts[0], parts[1], int(parts[2]), float(parts[3]), *parts[4:5]))
    return events


class Cluster:
    def __init__(self, url: str, log: Path, fence: str | None, ttl: float) -> None:
        self.url, self.log, self.fence, self.ttl = url, log, fence, ttl
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, ident: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(WORKER), self.url, "g", ident, str(self.ttl), str(self.log)]
        if self.fence:
            argv.append(self.fence)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.procs[ident] = proc
        return proc

    def events(self, kind: str | None = None, ident: str | None = None) -> list[Event]:
        return [
            e
            for e in read_log(self.log)
            if (kind is None or e.kind == kind) and (ident is None or e.ident == ident)
        ]

    def wait_for(self, pred: Callable[[], Event | None], timeout: float, what: str) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pred()
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; log:\n" + self.log.read_text()[-3000:]
            if self.log.exists()
            else ""
        )

    def first(self, kind: str, ident: str | None = None, after: float = 0.0) -> Event | None:
        found = [e for e in self.events(kind, ident) if e.t > after]
        return found[0] if found else None

    def nth(self, kind: str, n: int) -> Event | None:
        found = self.events(kind)
        return found[n - 1] if len(found) >= n else None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(url: str, *, fence: bool = True, ttl: float | None = None) -> Cluster:
        c = Cluster(url, tmp_path / "events.log", fence_for(url, tmp_path) if fence else None,
                    ttl or ttl_for(url))  # fmt: skip
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(params=backend_params(*BACKENDS))
def proc_url(request: pytest.FixtureRequest) -> str:
    name = "postgres" if request.param == "postgresql" else request.param
    return str(request.getfixturevalue(f"{name}_url"))


def assert_never_two_at_once(events: list[Event]) -> None:
    spans: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e.kind in ("elected", "act"):
            span = spans.setdefault((e.ident, e.token), [e.t, e.t])
            span[0], span[1] = min(span[0], e.t), max(span[1], e.t)
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (key_a, (_, end_a)), (key_b, (start_b, _)) in itertools.pairwise(ordered):
        assert end_a < start_b, f"{key_a} acted until {end_a}, after {key_b} began at {start_b}"
        assert key_b[1] > key_a[1], f"token went backwards: {key_a} then {key_b}"


def test_kill_9_leader_fails_over_within_ttl_plus_renew_plus_1s(
    proc_url: str, cluster_factory: Callable[..., Cluster]
) -> None:
    c = cluster_factory(proc_url, fence=False)
    for ident in ("a", "b", "c"):
        c.start(ident)
    first = c.wait_for(lambda: c.first("elected"), 15, "a first leader")
    c.wait_for(lambda: c.nth("ready", 3), 15, "every candidate campaigning")
    time.sleep(0.3)
    os.kill(c.procs[first.ident].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    bound = c.ttl + c.ttl / 3 + 1.0
    second = c.wait_for(lambda: c.first("elected", after=killed_at), bound + 2, "a new leader")
    assert second.ident != first.ident and second.token > first.token
    failover = second.t - killed_at
    assert failover < bound, f"failover took {failover:.2f}s (bound {bound:.2f}s)"
    if parse_url(proc_url).scheme == "file":
        assert failover < 0.5, f"flock failover took {failover:.2f}s"
    assert_never_two_at_once(c.events())


def test_sigstop_leader_stops_acting_before_successor_and_is_fenced(
    proc_url: str, cluster_factory: Callable[..., Cluster]
) -> None:
    c = cluster_factory(proc_url)
    a = c.start("a")
    elected_a = c.wait_for(lambda: c.first("elected", "a"), 15, "a elected")
    c.start("b")
    c.wait_for(lambda: c.first("ready", "b"), 15, "b campaigning")
    time.sleep(0.2 + c.ttl / 2)  # b campaigns, a keeps renewing
    assert c.first("elected", "b") is None, "b was elected while a was healthy"
    os.kill(a.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    elected_b = c.wait_for(lambda: c.first("elected", "b"), c.ttl + 5, "b elected")
    assert elected_b.token > elected_a.token
    # etcd revokes expired leases in a background loop (every 500 ms, then a Raft
    # commit), which lags on a loaded machine: allow it a little more.
    slack = 3.0 if parse_url(proc_url).scheme == "etcd" else 1.5
    assert elected_b.t - stopped_at < c.ttl + c.ttl / 3 + slack
    c.wait_for(lambda: c.first("act", "b", after=elected_b.t), 5, "b acting")
    time.sleep(0.3)
    os.kill(a.pid, signal.SIGCONT)
    stale = c.wait_for(lambda: c.first("stale", "a"), 5, "a's write after resuming")
    time.sleep(0.2)
    # The old leader stopped acting before the new one was elected ...
    acts_a = [e.t for e in c.events("act", "a") if e.token == elected_a.token]
    assert acts_a and max(acts_a) < elected_b.t, (
        f"a acted at {max(acts_a):.3f}, after b was elected at {elected_b.t:.3f}"
    )
    # ... it noticed on waking, without acting first ...
    lost = c.first("lost", "a")
    assert lost is not None and lost.token == elected_a.token
    # ... and its write through the fence was rejected.
    assert (stale.token, stale.extra) == (elected_a.token, "rejected")
    assert_never_two_at_once(c.events())


@pytest.mark.parametrize("engine", ["redis", "etcd"])
def test_backend_briefly_unavailable(
    engine: str, servers: ServerFactory, cluster_factory: Callable[..., Cluster]
) -> None:
    server = servers.redis() if engine == "redis" else servers.etcd()
    url = server.url + ("?prefix=t:" if engine == "redis" else "?prefix=/t/")
    c = cluster_factory(url, fence=False)
    for ident in ("a", "b", "c"):
        c.start(ident)
    first = c.wait_for(lambda: c.first("elected"), 15, "a first leader")
    c.wait_for(lambda: c.nth("ready", 3), 15, "every candidate campaigning")
    time.sleep(0.3)
    server.kill()
    killed_at = time.monotonic()
    # The leader steps down on time: no act later than its lease allows.
    lost = c.wait_for(lambda: c.first("lost", first.ident), c.ttl + 2, "the leader stepping down")
    assert lost.t - killed_at < c.ttl + 0.2, f"stepped down {lost.t - killed_at:.2f}s after outage"
    acts = [e.t for e in c.events("act", first.ident) if e.token == first.token]
    assert max(acts) < killed_at + c.ttl
    time.sleep(0.5)
    assert all(e.t < killed_at + c.ttl for e in c.events("act"))  # nobody leads during the outage
    server.start()
    restarted_at = time.monotonic()
    again = c.wait_for(
        lambda: c.first("elected", after=restarted_at), 2 * c.ttl + 6, "a leader after recovery"
    )
    assert again.token > first.token  # never reissued, even by a Redis that came back empty
    time.sleep(0.5)
    assert_never_two_at_once(c.events())
