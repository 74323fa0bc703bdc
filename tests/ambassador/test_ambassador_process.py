"""The ambassador as a real process: 1 GB streaming in bounded memory, hot reload under load,
admin endpoints, workers sharing the port, check-config, TLS verification."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import UpstreamFactory, request, upstream_toml
from stanchion.testing.servers import free_port, wait_for_port

GB = 1 << 30


class Proc:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin
        self.log = log

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")


@pytest.fixture
def start_ambassador(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(body: str, *, workers: int = 1, extra_listen: str = "") -> Proc:
        port, admin = free_port(), free_port()
        cfg = tmp_path / "ambassador.toml"
        cfg.write_text(
            f'[listen]\naddress = "127.0.0.1:{port}"\nworkers = {workers}\n{extra_listen}\n'
            f'[admin]\naddress = "127.0.0.1:{admin}"\n' + body
        )
        log = tmp_path / "access.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "stanchion", "ambassador", "--config", str(cfg),
             "--watch-interval", "0.2"],
            stdout=log.open("wb"),
            stderr=(tmp_path / "stderr.log").open("wb"),
        )  # fmt: skip
        procs.append(proc)
        wait_for_port(port, timeout=15)
        wait_for_port(admin, timeout=15)
        return Proc(proc, port, admin, log)

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class _Sink(asyncio.Protocol):
    """An upstream that swallows a request body fast and answers with its size."""

    def __init__(self, total: list[int]) -> None:
        self.total = total
        self.t: asyncio.Transport | None = None
        self.head = b""
        self.remaining = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.remaining < 0:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.remaining = int(line.split(b":")[1])
        self.remaining -= len(data)
        self.total[0] += len(data)
        if self.remaining == 0 and self.t is not None:
            body = str(self.total[0]).encode()
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.remaining = -1
            self.head = b""


async def test_1gb_streams_both_ways_with_bounded_memory(
    start_ambassador: object, upstream: UpstreamFactory
) -> None:
    loop = asyncio.get_running_loop()
    total = [0]
    sink = await loop.create_server(lambda: _Sink(total), "127.0.0.1", 0)
    source = await upstream("source")
    sink_url = f"http://127.0.0.1:{sink.sockets[0].getsockname()[1]}"
    amb = start_ambassador(  # type: ignore[operator]
        upstream_toml("sink", sink_url)
        + upstream_toml("source", source.url)
        + '[[routes]]\nprefix="/upload"\nupstream="sink"\ntimeout = 60.0\n'
        + '[[routes]]\nprefix="/"\nupstream="source"\ntimeout = 60.0\n'
        + '[log]\naccess = ""\n'
    )
    # upload: 1 GiB request body through the proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", amb.port)
    writer.write(b"PUT /upload HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % GB)
    chunk = b"u" * (1 << 20)
    t0 = time.monotonic()
    for _ in range(GB // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    async with asyncio.timeout(60):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert int(await reader.readexactly(length)) == GB
    up_s = time.monotonic() - t0
    # download: 1 GiB response body through the proxy
    writer.write(b"GET /big/%d HTTP/1.1\r\nhost: x\r\n\r\n" % GB)
    async with asyncio.timeout(60):
        head2 = await reader.readuntil(b"\r\n\r\n")
        assert head2.startswith(b"HTTP/1.1 200"), head2
        t1 = time.monotonic()
        got = 0
        while got < GB:
            data = await reader.read(1 << 20)
            assert data
            got += len(data)
    down_s = time.monotonic() - t1
    writer.close()
    sink.close()
    assert total[0] == GB and got == GB
    rss = amb.peak_rss_mb()
    up_mb, down_mb = GB / up_s / 1e6, GB / down_s / 1e6
    print(f"upload {up_mb:.0f} MB/s, download {down_mb:.0f} MB/s, peak RSS {rss:.1f} MB")
    assert rss < 100, rss


async def test_hot_reload_under_load_loses_nothing(
    start_ambassador: object, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    a, b = await upstream("a"), await upstream("b")
    body_a = upstream_toml("a", a.url) + upstream_toml("b", b.url)
    amb = start_ambassador(body_a + '[[routes]]\nprefix="/"\nupstream="a"\n')  # type: ignore[operator]
    cfg = tmp_path / "ambassador.toml"
    failures: list[object] = []
    served_by: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                r = await request(amb.port, "GET", "/x")
                if r.status != 200:
                    failures.append(r.status)
                else:
                    served_by.append(r.json()["upstream"])
            except Exception as exc:
                failures.append(repr(exc))

    tasks = [asyncio.ensure_future(client()) for _ in range(8)]
    await asyncio.sleep(0.5)
    text = cfg.read_text()
    # 1) file change -> route now points at b
    cfg.write_text(text.replace('upstream="a"', 'upstream="b"'))
    await asyncio.sleep(1.0)
    # 2) a bad config is rejected and the old one stays
    cfg.write_text(text.replace('upstream="a"', 'upstream="nope"'))
    await asyncio.sleep(0.8)
    mid = len(served_by)
    await asyncio.sleep(0.5)
    after_bad = served_by[mid:]
    # 3) SIGHUP with a valid file -> back to a
    cfg.write_text(text)
    amb.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert failures == []
    assert len(served_by) > 200
    assert "b" in served_by and after_bad and set(after_bad) == {"b"}
    assert served_by[-1] == "a"
    assert amb.proc.poll() is None
    err = (tmp_path / "stderr.log").read_text()
    assert "ambassador.reload_rejected" in err and "unknown upstream 'nope'" in err


async def test_admin_endpoints_and_access_log(
    start_ambassador: object, upstream: UpstreamFactory
) -> None:
    up = await upstream()
    amb = start_ambassador(  # type: ignore[operator]
        upstream_toml("pay", up.url, extra="[upstreams.circuit_breaker]\nminimum_calls = 5\n")
        + '[[routes]]\nname="charge"\nprefix="/"\nupstream="pay"\n'
    )
    for _ in range(3):
        assert (await request(amb.port, "GET", "/x")).status == 200
    assert (await request(amb.port, "GET", "/status/503")).status == 503
    ready = await request(amb.admin, "GET", "/ready")
    assert ready.status == 200
    metrics = (await request(amb.admin, "GET", "/metrics")).body.decode()
    assert (
        'stanchion_ambassador_requests_total{route="charge",status="200",upstream="pay"} 3.0'
        in metrics
    )
    assert 'status="503"' in metrics
    assert "stanchion_ambassador_request_duration_seconds_bucket" in metrics
    assert 'stanchion_ambassador_circuit_state{upstream="pay"} 0.0' in metrics
    config = (await request(amb.admin, "GET", "/config")).json()
    assert config["routes"][0]["name"] == "charge"
    assert config["listen"]["max_headers"] == 100  # effective: defaults filled in
    circuits = (await request(amb.admin, "GET", "/circuits")).json()
    assert circuits["upstreams"]["pay"]["breaker"]["state"] == "closed"
    await asyncio.sleep(0.3)
    lines = [json.loads(x) for x in amb.log.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[0]["route"] == "charge" and lines[0]["status"] == 200
    assert {"method", "path", "upstream", "duration_ms", "attempts"} <= set(lines[0])


async def test_two_workers_share_the_port(
    start_ambassador: object, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up, other = await upstream("u"), await upstream("other")
    amb = start_ambassador(  # type: ignore[operator]
        upstream_toml("u", up.url)
        + upstream_toml("other", other.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n',
        workers=2,
    )
    rs = await asyncio.gather(*(request(amb.port, "GET", f"/{i}") for i in range(200)))
    assert [r.status for r in rs] == [200] * 200, [
        (r.status, r.body) for r in rs if r.status != 200
    ]
    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == amb.proc.pid]
    assert len(children) == 2
    metrics = (await request(amb.admin, "GET", "/metrics")).body.decode()
    line = next(
        x for x in metrics.splitlines() if x.startswith("stanchion_ambassador_requests_total{")
    )
    assert line.endswith(" 200.0"), line  # summed over both workers
    circuits = (await request(amb.admin, "GET", "/circuits")).json()
    assert len(circuits["workers"]) == 2
    assert sum(1 for w in circuits["workers"] if w["upstreams"]) == 2
    # a config change reaches every worker (the parent validates, then signals them)
    cfg = tmp_path / "ambassador.toml"
    cfg.write_text(cfg.read_text().replace('upstream="u"', 'upstream="other"'))
    await asyncio.sleep(1.5)
    rs = await asyncio.gather(*(request(amb.port, "GET", f"/{i}") for i in range(50)))
    assert {r.json()["upstream"] for r in rs} == {"other"}


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rpartition(")")[2].split()[1])


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[upstreams]]\nname = "u"\nendpoints = ["http://127.0.0.1:1"]\n'
        '[[routes]]\nprefix = "/"\nupstream = "u"\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[listen]\nmax_headers = "many"\n[[upstreams]]\nname = "u"\nendpoints = []\n'
        '[[routes]]\nprefix = "/"\nupstream = "v"\n[routes.retry]\non = ["never"]\n'
    )
    cmd = [sys.executable, "-m", "stanchion", "ambassador", "check-config"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "OK" in ok.stdout
    out = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert f"{bad}:2: listen.max_headers" in lines[0]
    assert any(f"{bad}:5: upstreams[0].endpoints" in x for x in lines)
    assert any(f"{bad}:8: routes[0].upstream" in x for x in lines)
    assert any(f"{bad}:10: routes[0].retry.on" in x for x in lines)
    assert "Traceback" not in out.stderr
    run = subprocess.run(
        [sys.executable, "-m", "stanchion", "ambassador", "--config", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 1 and "ConfigError" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    code = (
        "import ssl, http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    protocol_version = 'HTTP/1.1'\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('content-length', '6')\n"
        "        self.end_headers(); self.wfile.write(b'secure')\n"
        "    def log_message(self, *a): pass\n"
        f"s = http.server.ThreadingHTTPServer(('127.0.0.1', {port}), H)\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        f"ctx.load_cert_chain({str(cert)!r}, {str(key)!r})\n"
        "s.socket = ctx.wrap_socket(s.socket, server_side=True)\n"
        "s.serve_forever()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for_port(port, timeout=10)
        yield port, cert
    finally:
        proc.kill()
        proc.wait()


async def test_tls_upstream_verified_by_default(
    tls_upstream: tuple[int, Path], ambassador: object
) -> None:
    port, cert = tls_upstream
    url = f"https://127.0.0.1:{port}"
    amb = await ambassador(  # type: ignore[operator]
        upstream_toml("unverified", url)
        + upstream_toml("pinned", url, extra=f'[upstreams.tls]\nca_file = "{cert}"\n')
        + '[[routes]]\nprefix="/a"\nupstream="unverified"\n'
        + '[[routes]]\nprefix="/b"\nupstream="pinned"\n'
    )
    bad = await request(amb.port, "GET", "/a")
    assert bad.status == 502  # self-signed certificate rejected
    good = await request(amb.port, "GET", "/b")
    assert good.status == 200 and good.body == b"secure"


def test_sigterm_exits_cleanly(start_ambassador: object, upstream: UpstreamFactory) -> None:
    amb = start_ambassador(  # type: ignore[operator]
        upstream_toml("u", "http://127.0.0.1:9") + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    amb.proc.send_signal(signal.SIGTERM)
    assert amb.proc.wait(10) == 0
