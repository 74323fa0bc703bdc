"""The sidecar as a real process: signals, exit codes, restart policy, bad config,
multiline records, a 1 MB line, the file/stdout sinks, /health and /metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stanchion.testing.servers import free_port, wait_for_port

CHILD_SIGNALS = textwrap.dedent("""
    import signal, sys, time
    def on(sig, _):
        print(f"child got {signal.Signals(sig).name}", flush=True)
        if sig == signal.SIGTERM:
            sys.exit(7)
        if sig == signal.SIGINT:
            sys.exit(130)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
""")


def config(tmp: Path, extra: str = "", sidecar: str = "", sink: str | None = None) -> Path:
    out = tmp / "out.ndjson"
    cfg = tmp / "sidecar.toml"
    cfg.write_text(
        f"""
[sidecar]
state_dir = "{tmp / "state"}"
passthrough = false
grace = 0.5
{sidecar}
{extra}
"""
        + (
            sink
            if sink is not None
            else f"""
[[sinks]]
name = "out"
type = "file"
path = "{out}"
batch_timeout = 0.01
"""
        )
    )
    return cfg


def records(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "out.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def sidecar(cfg: Path, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stanchion", "sidecar", "--config", str(cfg), "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def messages(tmp: Path) -> list[str]:
    return [r["message"] for r in records(tmp)]


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGTERM, 7), (signal.SIGINT, 130)])
def test_signals_forwarded_and_exit_code_passed_through(
    tmp_path: Path, stop: signal.Signals, status: int
) -> None:
    cfg = config(tmp_path, '[capture]\nformat = "text"')
    p = sidecar(cfg, sys.executable, "-c", CHILD_SIGNALS)
    try:
        wait_for(lambda: "ready" in messages(tmp_path))
        p.send_signal(signal.SIGHUP)  # forwarded, the child keeps running
        wait_for(lambda: "child got SIGHUP" in messages(tmp_path))
        assert p.poll() is None
        p.send_signal(stop)
        assert p.wait(20) == status  # the child's own exit status
    finally:
        p.kill()
    assert messages(tmp_path)[-1] == f"child got {stop.name}"


def test_grace_then_sigkill(tmp_path: Path) -> None:
    stubborn = "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    stubborn += "print('up', flush=True)\nwhile True: time.sleep(1)"
    cfg = config(tmp_path, '[capture]\nformat = "text"')
    p = sidecar(cfg, sys.executable, "-c", stubborn)
    try:
        wait_for(lambda: "up" in messages(tmp_path))
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 128 + signal.SIGKILL
        assert time.monotonic() - t0 >= 0.45  # waited the grace period first
    finally:
        p.kill()


@pytest.mark.parametrize(
    ("policy", "child_exit", "runs", "status"),
    [
        ("never", 1, 1, 1),
        ("on-failure", 0, 1, 0),
        ("on-failure", 3, 3, 3),  # first run + max_restarts = 2
        ("always", 0, 3, 0),
    ],
)
async def test_restart_policy(
    tmp_path: Path, policy: str, child_exit: int, runs: int, status: int
) -> None:
    from stanchion.sidecar import Sidecar, load_config

    sc = f'restart = "{policy}"\nmax_restarts = 2\nbackoff_initial = 0.05\nbackoff_max = 0.1'
    cfg = config(tmp_path, '[capture]\nformat = "text"', sc)
    child = f"import sys; print('run', flush=True); sys.exit({child_exit})"
    sidecar = Sidecar(load_config(cfg), [sys.executable, "-c", child])
    assert await sidecar.run() == status
    assert messages(tmp_path).count("run") == runs
    ids = {r["id"].split("/")[1] for r in records(tmp_path)}
    assert len(ids) == runs  # each run is its own stream identity
    assert sidecar.restarts == runs - 1


def test_bad_config_fails_before_the_child_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stanchion.cli import main

    marker = tmp_path / "child-ran"
    child = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"]
    cases = {
        '[capture]\nformat = "xml"\n[[sinks]]\ntype = "stdout"': "unknown format 'xml'",
        '[sidecar2]\nx = 1\n[[sinks]]\ntype = "stdout"': "unknown key(s) sidecar2",
        '[capture]\nformat = "regex"\npattern = "("\n[[sinks]]\ntype = "stdout"': "regex",
        '[sidecar]\nrestart = "sometimes"\n[[sinks]]\ntype = "stdout"': "on-failure",
        '[sidecar]\nservice = "x"': "at least one [[sinks]]",
        '[[sinks]]\ntype = "loki"': "needs a url",
        '[[sinks]]\ntype = "kafka"': "unknown type 'kafka'",
        '[[sinks]]\ntype = "syslog"\naddress = "nowhere"': "not HOST:PORT",
        "not toml [": "not valid TOML",
    }
    for text, needle in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        assert main(["sidecar", "--config", str(cfg), "--", *child]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ConfigError: ") and needle in err, (text, err)
    assert main(["sidecar", "--config", str(tmp_path / "missing.toml"), "--", *child]) == 1
    assert "not found" in capsys.readouterr().err
    # and as a real process: exit 1, one clear line, the child never ran
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[capture]\nformat = "xml"\n[[sinks]]\ntype = "stdout"')
    p = sidecar(cfg, *child)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and err.strip().splitlines() == [
        f"ConfigError: {cfg} [capture]: unknown format 'xml'; use one of json, logfmt, regex, text"
    ]
    assert not marker.exists()


def test_multiline_and_a_1mb_line_from_stdout_and_a_file(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    extra = f"""
[capture]
format = "text"
multiline_start = '^\\d{{4}}-'
max_line_bytes = 65536

[[files]]
name = "app"
paths = ["{log}"]
format = "text"
multiline_start = '^\\d{{4}}-'
max_line_bytes = 65536
poll_interval = 0.02
"""
    child = textwrap.dedent(f"""
        import sys
        trace = ("2024-05-01 ERROR boom\\nTraceback (most recent call last):\\n"
                 '  File "app.py", line 3, in <module>\\nValueError: bad\\n')
        big = "2024-05-01 INFO " + "x" * (1024 * 1024) + "\\n"
        after = "2024-05-01 INFO after\\n"
        for out in (sys.stdout, open({str(log)!r}, "a")):
            out.write(trace + big + after)
            out.flush()
    """)
    p = sidecar(config(tmp_path, extra), sys.executable, "-c", child)
    assert p.wait(30) == 0
    for source in ("stdout", "app"):
        recs = [r for r in records(tmp_path) if r["source"] == source]
        assert [r["message"][:21] for r in recs] == [
            "2024-05-01 ERROR boom",
            "2024-05-01 INFO xxxxx",
            "2024-05-01 INFO after",
        ], source
        assert recs[0]["message"].endswith("ValueError: bad")
        assert recs[0]["message"].count("\n") == 3  # the trace is one record
        assert len(recs[1]["message"]) == 65536 and recs[1]["fields"] == {"truncated": True}
        assert recs[2]["fields"] == {}
        # the id after the big line counts every byte of it (offsets are stream offsets)
        assert int(recs[2]["id"].rsplit("/", 1)[1]) > 1024 * 1024


def test_health_and_metrics_endpoints(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, '[capture]\nformat = "json"')
    child = "import json,sys,time\nfor i in range(5): print(json.dumps({'msg': i}), flush=True)\n"
    child += "print('oops on stderr', file=sys.stderr, flush=True)\ntime.sleep(30)"
    p = subprocess.Popen(
        [sys.executable, "-m", "stanchion", "sidecar", "--config", str(cfg),
         "--listen", f"127.0.0.1:{port}", "--", sys.executable, "-c", child],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port, 20)
        wait_for(lambda: len(records(tmp_path)) == 6)
        err = next(r for r in records(tmp_path) if r["source"] == "stderr")
        assert err["message"] == "oops on stderr" and err["labels"]["stream"] == "stderr"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "ok" and doc["child"]["alive"] and doc["child"]["restarts"] == 0
        assert doc["sinks"]["out"]["reachable"] and doc["sinks"]["out"]["pending_records"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'stanchion_sidecar_records_in_total{source="stdout"} 5.0' in text
        assert 'stanchion_sidecar_records_in_total{source="stderr"} 1.0' in text
        assert 'stanchion_sidecar_records_out_total{sink="out"} 6.0' in text
        assert "stanchion_sidecar_buffer_bytes" in text
        assert "stanchion_sidecar_child_restarts_total 0.0" in text
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 128 + signal.SIGTERM
    finally:
        p.kill()


def test_buffer_cap_drops_oldest_counted_and_logged(tmp_path: Path) -> None:
    port = free_port()
    dead = free_port()  # nothing listens: the sink is down the whole time
    sink = f"""
[[sinks]]
name = "down"
type = "collector"
url = "http://127.0.0.1:{dead}"
buffer_max_bytes = 262144
backoff_initial = 0.05
backoff_max = 0.1
"""
    cfg = config(
        tmp_path,
        '[capture]\nformat = "json"',
        f'listen = "127.0.0.1:{port}"\ndrain_timeout = 0.5',
        sink,
    )
    child = "import json\nfor i in range(20000): print(json.dumps({'msg': 'x' * 50, 'i': i}))\n"
    child += "import time; time.sleep(30)"
    p = sidecar(cfg, sys.executable, "-c", child)
    try:
        wait_for_port(port, 20)

        def dropped() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("stanchion_sidecar_records_dropped_total{"):
                        return float(line.rsplit(" ", 1)[1])
            return 0.0

        wait_for(lambda: dropped() > 0)
        status = Path(f"/proc/{p.pid}/status").read_text()
        peak_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
        assert peak_kb < 100 * 1024  # memory stays bounded under the burst
        seg = sum(f.stat().st_size for f in (tmp_path / "state/buffers/down").glob("*.seg"))
        assert seg <= 262144
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert "sidecar.buffer_full" in err
    finally:
        p.kill()


def test_files_appearing_later_and_a_partial_last_line(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    extra = f'[[files]]\nname = "app"\npaths = ["{logs}/*.log"]\nformat = "logfmt"\n'
    extra += "poll_interval = 0.02\n"
    child = textwrap.dedent(f"""
        import time
        time.sleep(0.3)  # the file does not exist when the sidecar starts
        with open({str(logs / "late.log")!r}, "a") as f:
            f.write('level=info msg="first"\\nlevel=warn msg="sec')
            f.flush()
            time.sleep(0.5)  # a partial last line waits for its newline
            f.write('ond half"\\n')
    """)
    p = sidecar(config(tmp_path, extra), sys.executable, "-c", child)
    assert p.wait(30) == 0
    recs = [r for r in records(tmp_path) if r["source"] == "app"]
    assert [(r["level"], r["message"]) for r in recs] == [
        ("info", "first"),
        ("warning", "second half"),
    ]


def test_command_not_found_exits_127(tmp_path: Path) -> None:
    p = sidecar(config(tmp_path), str(tmp_path / "no-such-binary"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 127 and "cannot start" in err


async def test_rename_out_of_the_glob_keeps_reading_the_old_file(tmp_path: Path) -> None:
    from stanchion.sidecar import Sidecar, load_config

    log = tmp_path / "svc.log"
    extra = f'[[files]]\nname = "svc"\npaths = ["{log}"]\nformat = "text"\n'
    extra += "poll_interval = 0.02\nrotate_wait = 5.0\n"
    child = textwrap.dedent(f"""
        import os, time
        f = open({str(log)!r}, "a")
        for i in range(3):
            f.write(f"old {{i}}\\n"); f.flush()
        time.sleep(0.3)
        os.rename({str(log)!r}, {str(log)!r} + ".1")   # not matched by the glob
        time.sleep(0.3)
        f.write("old 3, written after the rename\\n"); f.flush()  # still the old fd
        g = open({str(log)!r}, "a")
        g.write("new 0\\n"); g.flush()
        time.sleep(0.2)
    """)
    code = await Sidecar(load_config(config(tmp_path, extra)),
                         [sys.executable, "-c", child]).run()  # fmt: skip
    assert code == 0
    got = [r["message"] for r in records(tmp_path) if r["source"] == "svc"]
    assert got == ["old 0", "old 1", "old 2", "old 3, written after the rename", "new 0"]


def test_collector_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from stanchion.cli import main

    assert main(["collector", "--retention", "soon"]) == 1
    assert "ConfigError: 'soon' is not a duration" in capsys.readouterr().err
    assert main(["collector", "--store", "redis://127.0.0.1:6379/0"]) == 1
    assert capsys.readouterr().err.startswith("ConfigError: ")
    assert main(["collector", "--listen", "nowhere"]) == 1
    assert "not HOST:PORT" in capsys.readouterr().err
    assert main(["collector", "--max-body", "lots"]) == 1
    assert "is not a size" in capsys.readouterr().err


async def test_a_grandchild_holding_the_pipe_does_not_block_the_exit(tmp_path: Path) -> None:
    from stanchion.sidecar import Sidecar, load_config

    cfg = config(tmp_path, '[capture]\nformat = "text"')
    # the shell leaves a background sleeper holding stdout, then exits with 5
    child = ["sh", "-c", "echo before; (sleep 4 &) ; echo after; exit 5"]
    t0 = time.monotonic()
    assert await Sidecar(load_config(cfg), child).run() == 5
    assert time.monotonic() - t0 < 15
    assert messages(tmp_path) == ["before", "after"]


async def test_two_sidecars_cannot_share_a_state_dir(tmp_path: Path) -> None:
    import asyncio

    from stanchion.errors import ConfigError
    from stanchion.sidecar import Sidecar, load_config

    options = load_config(config(tmp_path, '[capture]\nformat = "text"'))
    first = asyncio.create_task(
        Sidecar(options, [sys.executable, "-c", "import time; time.sleep(1.5)"]).run()
    )
    await asyncio.sleep(0.3)
    with pytest.raises(ConfigError, match="in use by another sidecar"):
        await Sidecar(options, [sys.executable, "-c", "pass"]).run()
    assert await first == 0
    assert await Sidecar(options, [sys.executable, "-c", "pass"]).run() == 0  # free again


def test_stdout_sink_writes_ndjson_records(tmp_path: Path) -> None:
    sink = '[[sinks]]\nname = "out"\ntype = "stdout"\nbatch_timeout = 0.01\n'
    cfg = config(tmp_path, '[capture]\nformat = "logfmt"', sink=sink)
    p = sidecar(cfg, sys.executable, "-c", "print('level=error msg=\"disk full\" dev=sda')")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["level"], r["message"], r["fields"]) for r in recs] == [
        ("error", "disk full", {"dev": "sda"})
    ]
