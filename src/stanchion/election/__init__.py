"""Leader election: leases with fencing tokens.

Candidates of one *group* campaign through a backend that grants one lease
at a time, with a **fencing token** that strictly increases with every term:
``sqlite:///path.db`` and ``file:///dir`` on one host, ``postgresql://``,
``redis://`` and ``etcd://`` across hosts, ``memory://`` in one process.

Example::

    from stanchion.election import LeaderElector

    elector = LeaderElector.from_url("sqlite:///election.db", "billing", "node-1", ttl=10)
    async with elector.leadership() as lease:
        while lease.is_valid():
            await do_work(fencing_token=lease.token)

The leader renews every ``renew_every`` (``ttl / 3``) and trusts its lease
only until ``last successful renewal + ttl - safety margin`` by its own
monotonic clock, so it stops acting before anyone else can be elected, even
if the backend is unreachable. Writes that matter carry ``lease.token``
through a :class:`Fence`, which rejects a paused, deposed leader's writes.

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.election._api import LeaderElector, LeaderInfo, Lease
from stanchion.election._backend import Capabilities, Grant, Holder, LeaseBackend
from stanchion.election._core import LeaseMachine, LeaseOptions
from stanchion.election._fence import Fence
from stanchion.errors import BackendUnavailable, LeadershipLost, StaleFencingToken

__all__ = [
    "BackendUnavailable",
    "Capabilities",
    "Fence",
    "Grant",
    "Holder",
    "LeaderElector",
    "LeaderInfo",
    "LeadershipLost",
    "Lease",
    "LeaseBackend",
    "LeaseMachine",
    "LeaseOptions",
    "StaleFencingToken",
]
