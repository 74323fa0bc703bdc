"""The application object: store, projections, read models (what the CLI loads)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from stanchion.cqrs._backend import ReadModel
from stanchion.cqrs._core import Checkpoint
from stanchion.cqrs._outbox import Outbox
from stanchion.cqrs._projection import Projection
from stanchion.cqrs._runner import ProjectionRunner, ProjectionStatus
from stanchion.errors import ConfigError

__all__ = ["App"]


class App:
    """Lists an application's event store, projections and read models.

    ``stanchion projections status|rebuild|run --app module:attr`` loads one
    (the attribute may also be a function returning it). Each projection's
    view lives in ``read_models[name]`` or else in ``read_model``.

    Example::

        app = App(
            store="sqlite:///shop.db",
            projections=[Catalog, OrderHistory],
            read_model="sqlite:///views.db",
            election="sqlite:///election.db",   # replicas: one projects
        )

    Args:
        store: the event store URL or an open ``EventStore``.
        projections: :class:`Projection` classes or instances.
        read_model: the default read model (URL or :class:`ReadModel`).
        read_models: per projection name, its read model.
        election: an election URL; each projection then campaigns in group
            ``projections.<name>``, so exactly one replica projects it.
        identity: this replica's identity (default ``host:pid``).
        ttl: lease length for ``election``, seconds.
        elector: instead of ``election``: a function of the projection name
            returning a ``LeaderElector``.
        outboxes: :class:`Outbox` relays to run with the projections.
        batch_size: the runners' catch-up batch size.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: Any,
        projections: Sequence[Projection | type[Projection]],
        read_model: str | ReadModel | None = None,
        *,
        read_models: Mapping[str, str | ReadModel] | None = None,
        election: str | None = None,
        identity: str | None = None,
        ttl: float = 5.0,
        elector: Callable[[str], Any] | None = None,
        outboxes: Sequence[Outbox] = (),
        batch_size: int = 500,
    ) -> None:
        self._store_arg = store
        self._store: Any = None if isinstance(store, str) else store
        self.projections: dict[str, Projection] = {}
        for p in projections:
            inst = p() if isinstance(p, type) else p
            if not isinstance(inst, Projection):
                raise ConfigError(f"{p!r} is not a Projection")
            if inst.name in self.projections:
                raise ConfigError(f"two projections are named {inst.name!r}")
            self.projections[inst.name] = inst
        self.read_model = read_model
        self.read_models = dict(read_models or {})
        for name in self.read_models:
            self.projection(name)
        if read_model is None and set(self.read_models) != set(self.projections):
            missing = sorted(set(self.projections) - set(self.read_models))
            raise ConfigError(f"no read model for projection(s) {missing}: pass read_model=")
        if election is not None and elector is not None:
            raise ConfigError("pass election= or elector=, not both")
        self.election = election
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl = ttl
        self._elector = elector
        self.outboxes = list(outboxes)
        self.batch_size = batch_size
        self._runners: dict[str, ProjectionRunner] = {}
        self._models: dict[str, ReadModel] = {}

    async def event_store(self) -> Any:
        """The event store (connected on first use when given as a URL)."""
        if self._store is None:
            from stanchion.eventsourcing import EventStore

            self._store = await EventStore.connect(self._store_arg)
        return self._store

    def projection(self, name: str) -> Projection:
        """The projection called ``name``.

        Raises:
            ConfigError: no such projection (the message lists the names).
        """
        try:
            return self.projections[name]
        except KeyError:
            known = ", ".join(sorted(self.projections)) or "none"
            raise ConfigError(f"no projection named {name!r} (projections: {known})") from None

    async def _model(self, name: str) -> ReadModel:
        arg = self.read_models.get(name, self.read_model)
        if isinstance(arg, ReadModel):
            return arg
        assert isinstance(arg, str)
        model = self._models.get(arg)
        if model is None:
            model = await ReadModel.connect(arg)
            self._models[arg] = model
        return model

    def _make_elector(self, name: str) -> Any:
        if self._elector is not None:
            return self._elector(name)
        if self.election is None:
            return None
        from stanchion.election import LeaderElector

        return LeaderElector.from_url(
            self.election, f"projections.{name}", self.identity, ttl=self.ttl
        )

    async def runner(self, name: str, *, elected: bool = True) -> ProjectionRunner:
        """The runner of projection ``name`` (one per name, reused)."""
        runner = self._runners.get(name)
        if runner is None:
            runner = ProjectionRunner(
                await self.event_store(),
                self.projection(name),
                await self._model(name),
                elector=self._make_elector(name) if elected else None,
                batch_size=self.batch_size,
            )
            self._runners[name] = runner
        return runner

    async def read_model_of(self, name: str) -> ReadModel:
        """The open read model holding projection ``name``'s view."""
        self.projection(name)
        return await self._model(name)

    async def status(self) -> list[ProjectionStatus]:
        """Every projection's checkpoint, head, lag and parked count."""
        out = []
        for name in sorted(self.projections):
            runner = await self.runner(name)
            out.append(await runner.status())
        return out

    async def rebuild(self, name: str) -> Checkpoint:
        """Rebuild ``name``'s view into a shadow and swap it in atomically."""
        runner = ProjectionRunner(
            await self.event_store(),
            self.projection(name),
            await self._model(name),
            batch_size=self.batch_size,
        )
        return await runner.rebuild()

    async def run(self) -> None:
        """Run every projection (and outbox) until cancelled or one fails."""
        tasks = [asyncio.ensure_future((await self.runner(n)).run()) for n in self.projections]
        tasks += [asyncio.ensure_future(o.run()) for o in self.outboxes]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def aclose(self) -> None:
        """Close what the app opened (read models, electors, the store if given as a URL)."""
        for runner in self._runners.values():
            if runner.elector is not None:
                with contextlib.suppress(Exception):
                    await runner.elector.aclose()
        for model in self._models.values():
            await model.close()
        self._models.clear()
        self._runners.clear()
        if isinstance(self._store_arg, str) and self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
