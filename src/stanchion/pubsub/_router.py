"""Router: bind many handlers to one broker (FastStream / Watermill style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stanchion.errors import ConfigError
from stanchion.pubsub._api import Broker, Handler, Middleware, Subscription
from stanchion.pubsub._core import Message, validate_topic

__all__ = ["Router"]


@dataclass(slots=True)
class _Route:
    topic: str
    handler: Handler
    group: str
    publish_to: str | None
    options: dict[str, Any] = field(default_factory=dict)


class Router:
    """Handlers declared with decorators, subscribed together.

    Example::

        router = Router(prefix="iot.", group="analytics")

        @router.subscriber("readings", publish_to="iot.alerts")
        async def check(msg: Message) -> dict | None:
            r = msg.json()
            return {"alert": r} if r["celsius"] > 30 else None

        await router.start(broker)   # or broker.include_router(router); await broker.start()

    A handler's non-None return value is published to ``publish_to``.

    Args:
        prefix: prepended to every topic of this router.
        group: the default group of its handlers.
        middleware: wraps every handler of this router (inside the broker's).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        prefix: str = "",
        group: str | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.prefix = prefix
        self.group = group
        self.middleware = tuple(middleware)
        self._routes: list[_Route] = []
        self._subs: list[Subscription] = []

    def subscriber(
        self,
        topic: str,
        *,
        group: str | None = None,
        publish_to: str | None = None,
        **options: Any,
    ) -> Callable[[Handler], Handler]:
        """Decorator: subscribe the handler to ``prefix + topic`` (options as in subscribe)."""

        def deco(fn: Handler) -> Handler:
            self.add(topic, fn, group=group, publish_to=publish_to, **options)
            return fn

        return deco

    def publisher(self, topic: str) -> Callable[[Handler], Handler]:
        """Decorator: publish the handler's non-None return value to ``topic``.

        Stack it under (or over) :meth:`subscriber`, as in FastStream::

            @router.subscriber("readings", group="alerting")
            @router.publisher("alerts")
            async def check(msg: Message) -> dict | None: ...
        """
        validate_topic(topic)

        def deco(fn: Handler) -> Handler:
            for r in self._routes:
                if r.handler is fn:
                    r.publish_to = topic
            fn.__dict__["_stanchion_publish_to"] = topic
            return fn

        return deco

    def add(
        self,
        topic: str,
        handler: Handler,
        *,
        group: str | None = None,
        publish_to: str | None = None,
        **options: Any,
    ) -> None:
        """Register ``handler`` (what :meth:`subscriber` does)."""
        g = group or self.group
        if not g:
            raise ConfigError(f"route {topic!r}: no group given and the router has none")
        if publish_to is None:
            publish_to = getattr(handler, "_stanchion_publish_to", None)
        if publish_to is not None:
            validate_topic(publish_to)
        self._routes.append(_Route(self.prefix + topic, handler, g, publish_to, options))

    def include_router(self, other: Router) -> None:
        """Take over another router's routes (with this router's prefix and middleware)."""
        for r in other._routes:
            mws = (*self.middleware, *other.middleware, *r.options.get("middleware", ()))
            opts = {**r.options, "middleware": mws}
            self._routes.append(
                _Route(self.prefix + r.topic, r.handler, r.group, r.publish_to, opts)
            )

    @property
    def routes(self) -> list[tuple[str, str]]:
        """``(topic, group)`` of every route."""
        return [(r.topic, r.group) for r in self._routes]

    async def start(self, broker: Broker) -> list[Subscription]:
        """Subscribe every route on ``broker``; return the subscriptions."""
        subs: list[Subscription] = []
        for r in self._routes:
            handler = r.handler
            if r.publish_to is not None:
                handler = _publishing(broker, handler, r.publish_to)
            opts = dict(r.options)
            mws = (*self.middleware, *opts.pop("middleware", ()))
            subs.append(
                await broker.subscribe(r.topic, handler, group=r.group, middleware=mws, **opts)
            )
        self._subs.extend(subs)
        return subs

    async def stop(self) -> None:
        """Stop (drain) every subscription this router started."""
        subs, self._subs = self._subs, []
        for s in subs:
            await s.stop()


def _publishing(broker: Broker, handler: Handler, topic: str) -> Handler:
    async def wrapped(msg: Message) -> Any:
        result = await handler(msg)
        if result is not None:
            await broker.publish(topic, result, key=msg.key)
        return result

    return wrapped
