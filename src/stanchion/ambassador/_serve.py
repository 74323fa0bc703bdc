"""Process management for ``stanchion ambassador``: signals, reloads, workers.

One worker runs the proxy in this process. Several workers are child processes
(``python -m stanchion ambassador --config FILE --worker-index i``), each
binding the same port with ``SO_REUSEPORT`` so the kernel spreads connections
over both cores; the parent serves the admin listener, aggregating the
children's metrics and circuits, watches the file and forwards ``SIGHUP``
after validating the new config (a bad file is rejected once, in the parent,
and the workers keep the old one). A worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from stanchion.ambassador._core import AmbassadorConfig, load_config
from stanchion.errors import ConfigError
from stanchion.observability import CONTENT_TYPE, configure_logging, get_logger

__all__ = ["serve"]

_log = get_logger("stanchion.ambassador")


def _read(path: str) -> AmbassadorConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    return load_config(path, text)


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def serve(
    path: str,
    *,
    workers: int | None = None,
    watch_interval: float = 1.0,
    worker_index: int | None = None,
    report_fd: int | None = None,
) -> int:
    """Run the ambassador until SIGTERM/SIGINT; returns the exit code."""
    from stanchion.cli import _util

    configure_logging()
    config = _read(path)
    if worker_index is not None:
        return _util.run(_run_one(path, config, 0.0, worker_index, True, report_fd))
    n = config.listen.workers if workers is None else workers
    if n <= 0:
        n = os.cpu_count() or 1
    if n == 1:
        return _util.run(_run_one(path, config, watch_interval, 0, False, None))
    if config.listen.port == 0:
        raise ConfigError(f"{path}: listen.address needs a fixed port when workers > 1")
    return _util.run(_supervise(path, config, n, watch_interval))


async def _watch(path: str, interval: float, on_change: Callable[[], None]) -> None:
    stamp = _stamp(path)
    while True:
        await asyncio.sleep(interval)
        now = _stamp(path)
        if now != stamp:
            stamp = now
            on_change()


async def _run_one(
    path: str,
    config: AmbassadorConfig,
    watch_interval: float,
    worker: int,
    child: bool,
    report_fd: int | None,
) -> int:
    from stanchion.ambassador._proxy import Ambassador

    if child:
        # Children serve their admin on an ephemeral loopback port for the parent.
        from dataclasses import replace

        config = replace(config, admin=replace(config.admin, host="127.0.0.1", port=0))
    amb = Ambassador(config, reuse_port=child, worker=worker)
    await amb.start()
    if report_fd is not None:
        os.write(report_fd, f"{amb.admin_port}\n".encode())
        os.close(report_fd)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = _read(path)
        except ConfigError as exc:
            amb._m_reloads.labels("rejected").inc()
            _log.error("ambassador.reload_rejected", error=str(exc))
            return
        if child:
            from dataclasses import replace

            new = replace(new, admin=replace(new.admin, host="127.0.0.1", port=0))
        amb.reload(new)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    watcher = None
    if watch_interval > 0:
        watcher = asyncio.ensure_future(_watch(path, watch_interval, reload))
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await amb.close()
    return 0


# --------------------------------------------------------------------------- supervisor


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_port = 0


async def _spawn(path: str, w: _Worker) -> None:
    rfd, wfd = os.pipe()
    try:
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stanchion",
            "ambassador",
            "--config",
            path,
            "--worker-index",
            str(w.index),
            "--report-fd",
            str(wfd),
            pass_fds=(wfd,),
        )
    finally:
        os.close(wfd)
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, _read_line, rfd)
    w.admin_port = int(data) if data.strip().isdigit() else 0


def _read_line(fd: int) -> str:
    out = b""
    try:
        while not out.endswith(b"\n"):
            chunk = os.read(fd, 64)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    return out.decode()


async def _fetch(port: int, path: str) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    _, _, body = data.partition(b"\r\n\r\n")
    return body


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _merge_metrics(texts: list[str]) -> bytes:
    """Sum counters and histograms over workers; gauges take the maximum."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            entry = families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            samples = entry[2]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if fam.type == "gauge":
                    samples[key] = max(samples.get(key, s.value), s.value)
                else:
                    samples[key] = samples.get(key, 0.0) + s.value
    out: list[str] = []
    for name, (kind, doc, samples) in families.items():
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        for (sname, labels), value in samples.items():
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{sname}{{{lab}}} {value!r}" if lab else f"{sname} {value!r}")
    return ("\n".join(out) + "\n").encode()


async def _supervise(path: str, config: AmbassadorConfig, n: int, watch_interval: float) -> int:
    from stanchion.ambassador._admin import config_json, serve_admin

    workers = [_Worker(i) for i in range(n)]
    await asyncio.gather(*(_spawn(path, w) for w in workers))
    state: dict[str, Any] = {"config": config}

    async def handle(req_path: str) -> tuple[int, str, bytes]:
        if req_path == "/config":
            return 200, "application/json", msgspec.json.encode(config_json(state["config"]))
        results: list[bytes] = []
        for w in workers:
            try:
                results.append(await _fetch(w.admin_port, req_path))
            except (OSError, TimeoutError):
                if req_path == "/ready":
                    return 503, "application/json", b'{"status":"worker down"}'
                results.append(b"")
        if req_path == "/ready":
            return 200, "application/json", b'{"status":"ready","workers":%d}' % n
        if req_path == "/metrics":
            return 200, CONTENT_TYPE, _merge_metrics([r.decode() for r in results])
        if req_path == "/circuits":
            parsed = [msgspec.json.decode(r) for r in results if r]
            merged = {"upstreams": parsed[0]["upstreams"] if parsed else {}, "workers": parsed}
            return 200, "application/json", msgspec.json.encode(merged)
        return 404, "application/json", b'{"error":"not_found"}'

    admin = None
    if config.admin.port >= 0:
        admin = await serve_admin(config.admin.host, config.admin.port, handle)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = _read(path)
        except ConfigError as exc:
            _log.error("ambassador.reload_rejected", error=str(exc))
            return
        state["config"] = new
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGHUP)
        _log.info("ambassador.reload_forwarded", workers=n)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    watcher = None
    if watch_interval > 0:
        watcher = asyncio.ensure_future(_watch(path, watch_interval, reload))

    async def keep(w: _Worker) -> None:
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if stop.is_set():
                return
            _log.error("ambassador.worker_died", worker=w.index, code=code)
            await asyncio.sleep(0.2)
            await _spawn(path, w)

    keepers = [asyncio.ensure_future(keep(w)) for w in workers]
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for k in keepers:
        k.cancel()
    for w in workers:
        if w.proc is not None and w.proc.returncode is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        if w.proc is not None:
            try:
                await asyncio.wait_for(w.proc.wait(), 10.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
    if admin is not None:
        admin.close()
    return 0
