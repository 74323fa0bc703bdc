"""Sinks: syslog into a real rsyslogd; Loki, Elasticsearch and OTLP payloads against
recording HTTP endpoints; several sinks at once, each with its own buffer."""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from stanchion.sidecar import LogRecord, Sidecar
from stanchion.sidecar._config import options_from_dict
from stanchion.testing.servers import free_port, wait_for_port

RSYSLOGD = "/usr/sbin/rsyslogd"
CHILD = (
    "import json,sys\n"
    "for i in range(50):\n"
    "    lvl = 'error' if i % 10 == 0 else 'info'\n"
    "    print(json.dumps({'level': lvl, 'msg': f'event {i}', 'i': i}))\n"
)


def opts(tmp: Path, sinks: list[dict[str, Any]], drain: float = 10.0) -> Any:
    return options_from_dict(
        {
            "sidecar": {
                "service": "orders",
                "state_dir": str(tmp / "state"),
                "passthrough": False,
                "drain_timeout": drain,
            },
            "labels": {"env": "test"},
            "sinks": sinks,
        }
    )


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if not os.path.exists(RSYSLOGD):
        if os.environ.get("STANCHION_REQUIRE_SERVICES") == "1":
            pytest.fail("rsyslogd is not installed")
        pytest.skip("rsyslogd is not installed")
    d = tmp_path / "rsyslog"
    d.mkdir()
    port = free_port()
    out = d / "out.log"
    conf = d / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{d}")
module(load="imtcp")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="t" type="string"
         string="%syslogseverity-text%|%hostname%|%app-name%|%structured-data%|%msg%\\n")
*.* action(type="omfile" file="{out}" template="t")
""")
    proc = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(d / "pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, 20)
        yield port, out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_syslog_rfc5424_to_a_real_rsyslogd(tmp_path: Path, rsyslog: tuple[int, Path]) -> None:
    port, out = rsyslog
    o = opts(tmp_path, [{"name": "sys", "type": "syslog", "address": f"127.0.0.1:{port}"}])
    code = await Sidecar(o, [sys.executable, "-c", CHILD]).run()
    assert code == 0
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines() if out.exists() else []
        if len(lines) >= 50:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 50
    sev, host, app, sd, msg = lines[10].split("|", 4)
    assert (sev, app, msg) == ("err", "orders", "event 10")
    assert sd.startswith('[stanchion@32473 id="stdout/') and 'source="stdout"' in sd
    assert [line.split("|")[4] for line in lines] == [f"event {i}" for i in range(50)]
    assert lines[1].split("|")[0] == "info" and host


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.fail = 0  # answer 503 to this many requests first
        self.app = web.Application()
        self.app.router.add_post("/{tail:.*}", self.handle)
        self.es_dupes: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        if self.fail:
            self.fail -= 1
            return web.Response(status=503, text="busy")
        self.requests.append((request.path, dict(request.headers), body))
        if request.path == "/_bulk":
            items = []
            lines = body.splitlines()
            for action in lines[0::2]:
                _id = msgspec.json.decode(action)["create"]["_id"]
                status = 409 if _id in self.es_dupes else 201
                self.es_dupes.add(_id)
                items.append({"create": {"_id": _id, "status": status}})
            return web.json_response(
                {"errors": any(i["create"]["status"] != 201 for i in items), "items": items}
            )
        return web.Response(status=204 if request.path.startswith("/loki") else 200)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    runner = web.AppRunner(rec.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rec, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_loki_elasticsearch_otlp_payloads(
    tmp_path: Path, recorder: tuple[Recorder, str]
) -> None:
    rec, base = recorder
    rec.fail = 2  # the first sends fail: backoff, then delivered
    sinks = [
        {"name": "loki", "type": "loki", "url": base, "tenant": "t1", "backoff_initial": 0.01},
        {
            "name": "es",
            "type": "elasticsearch",
            "url": base,
            "index": "logs-x",
            "backoff_initial": 0.01,
        },
        {"name": "otel", "type": "otlp", "url": base, "backoff_initial": 0.01},
    ]

    def tag(rec: LogRecord) -> LogRecord | None:  # a processor: drop one, tag the others
        if rec.fields.get("i") == 7:
            return None
        rec.fields["via"] = "proc"
        return rec

    sidecar = Sidecar(opts(tmp_path, sinks), [sys.executable, "-c", CHILD], processors=[tag])
    assert await sidecar.run() == 0
    by_path: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for path, headers, body in rec.requests:
        by_path.setdefault(path, []).append((headers, body))
    # Loki: streams by label set, nanosecond timestamps, JSON lines carrying the id
    loki = [msgspec.json.decode(b) for _, b in by_path["/loki/api/v1/push"]]
    assert by_path["/loki/api/v1/push"][0][0]["X-Scope-OrgID"] == "t1"
    values = [(s["stream"], v) for doc in loki for s in doc["streams"] for v in s["values"]]
    assert len(values) == 49
    stream, (ns, line) = values[0]
    assert stream["service"] == "orders" and stream["env"] == "test" and "level" in stream
    assert len(ns) >= 18 and msgspec.json.decode(line)["id"].startswith("stdout/")
    # Elasticsearch: bulk create with _id = record id (re-sends are 409 = fine)
    bulk = b"".join(b for _, b in by_path["/_bulk"]).splitlines()
    actions = [msgspec.json.decode(x) for x in bulk[0::2]]
    docs = [msgspec.json.decode(x) for x in bulk[1::2]]
    assert len(docs) == 49 and actions[0]["create"]["_index"] == "logs-x"
    assert actions[3]["create"]["_id"] == docs[3]["id"] and docs[3]["@timestamp"]
    assert "event 7" not in {d["message"] for d in docs}
    assert docs[9]["level"] == "error" and docs[9]["fields"] == {"i": 10, "via": "proc"}
    # OTLP/HTTP logs JSON
    otlp = [msgspec.json.decode(b) for _, b in by_path["/v1/logs"]]
    logs = [
        r
        for d in otlp
        for rl in d["resourceLogs"]
        for sl in rl["scopeLogs"]
        for r in sl["logRecords"]
    ]
    assert len(logs) == 49
    attrs = {a["key"]: a["value"] for a in otlp[0]["resourceLogs"][0]["resource"]["attributes"]}
    assert attrs["service.name"] == {"stringValue": "orders"}
    assert logs[9]["severityText"] == "ERROR" and logs[9]["severityNumber"] == 17
    assert logs[9]["body"] == {"stringValue": "event 10"}
    assert {"key": "log.record.uid", "value": {"stringValue": docs[9]["id"]}} in logs[9][
        "attributes"
    ]


async def test_elasticsearch_duplicates_count_as_delivered(
    tmp_path: Path, recorder: tuple[Recorder, str]
) -> None:
    from stanchion.sidecar._sinks import ElasticsearchSink

    _rec, base = recorder
    sink = ElasticsearchSink("es", {"url": base})
    from stanchion.sidecar import LogRecord

    batch = msgspec.json.Encoder().encode_lines(
        [
            LogRecord(id=f"x/{i}", source="s", ts="2024-01-01T00:00:00Z", level="info", message="m")
            for i in range(3)
        ]
    )
    await sink.send(batch, 3)
    await sink.send(batch, 3)  # all 409: no error raised
    await sink.close()


async def test_two_sinks_each_with_its_own_buffer(
    tmp_path: Path, recorder: tuple[Recorder, str]
) -> None:
    rec, base = recorder
    dead = f"http://127.0.0.1:{free_port()}"
    sinks = [
        {"name": "up", "type": "file", "path": str(tmp_path / "up.ndjson")},
        {
            "name": "down",
            "type": "collector",
            "url": dead,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
        },
    ]
    o = opts(tmp_path, sinks, drain=1.0)
    assert await Sidecar(o, [sys.executable, "-c", CHILD]).run() == 0
    up = (tmp_path / "up.ndjson").read_text().splitlines()
    assert len(up) == 50  # the healthy sink got everything though the other one is down
    # the down sink kept its records on disk; with the endpoint back, a restart delivers them
    sinks[1]["url"] = base
    shutil.rmtree(tmp_path / "state" / "buffers" / "up")
    o2 = opts(tmp_path, sinks)
    assert await Sidecar(o2, [sys.executable, "-c", "pass"]).run() == 0
    pushed = b"".join(b for p, _, b in rec.requests if p == "/api/push").splitlines()
    assert [msgspec.json.decode(x)["message"] for x in pushed] == [f"event {i}" for i in range(50)]


async def test_batches_too_large_for_the_collector_are_split(tmp_path: Path) -> None:
    from stanchion.sidecar import Collector, CollectorOptions, open_store

    port = free_port()
    collector = Collector(
        open_store(f"sqlite:///{tmp_path / 'logs.db'}"), CollectorOptions(max_body_bytes=8192)
    )
    await collector.start("127.0.0.1", port)
    try:
        child = (
            "import json\n"
            "for i in range(100): print(json.dumps({'msg': f'm{i}', 'pad': 'x' * 100}))\n"
            "print(json.dumps({'msg': 'huge', 'pad': 'y' * 20000}))\n"
        )
        sinks = [{"name": "c", "type": "collector", "url": f"http://127.0.0.1:{port}",
                  "batch_max_bytes": 1048576, "batch_timeout": 0.5}]  # fmt: skip
        sidecar = Sidecar(opts(tmp_path, sinks), [sys.executable, "-c", child])
        assert await sidecar.run() == 0
        assert await collector.store.count() == 100  # all, in batches that fit
        text = sidecar.metrics.render().decode()
        assert 'stanchion_sidecar_records_dropped_total{reason="rejected",sink="c"} 1.0' in text
    finally:
        await collector.aclose()
