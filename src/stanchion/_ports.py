"""Free TCP ports that an outgoing connection will not take a moment later.

``bind(0)`` hands out a port from the kernel's ephemeral range, the same range
outgoing connections draw their source ports from: on a busy host a port
picked that way and bound a second later by a child process is often gone.
Ports just below the ephemeral range are never used as source ports, so we
pick a free one there.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and outside the ephemeral range."""
    low = _ephemeral_low()
    start = max(1024, low - 12000)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(start, low)
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
