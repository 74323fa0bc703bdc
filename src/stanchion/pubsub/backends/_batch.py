"""Group commit: concurrent publishes share one round trip / transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from stanchion.pubsub._backend import OutboundMessage

__all__ = ["GroupCommit"]

Flush = Callable[[list[OutboundMessage]], Awaitable[None]]


class GroupCommit:
    """Queue messages of concurrent callers; one ``flush`` call per batch.

    Each caller's ``submit`` returns when the batch holding its messages was
    flushed, or raises the flush's exception. ``max_batch`` caps a batch.
    """

    def __init__(self, flush: Flush, max_batch: int = 1000) -> None:
        self._flush = flush
        self._max = max_batch
        self._queue: list[tuple[Sequence[OutboundMessage], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._busy = False

    async def submit(self, messages: Sequence[OutboundMessage]) -> None:
        if not self._busy:
            # Fast path: nobody is flushing, so flush inline (no task hop);
            # callers arriving meanwhile queue up and go in the next batch.
            self._busy = True
            try:
                await self._flush(list(messages))
            finally:
                if self._queue:
                    self._task = asyncio.get_running_loop().create_task(self._run())
                else:
                    self._busy = False
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, fut))
        await fut

    async def _run(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[Sequence[OutboundMessage], asyncio.Future[None]]] = []
                size = 0
                while self._queue and (not batch or size + len(self._queue[0][0]) <= self._max):
                    item = self._queue.pop(0)
                    batch.append(item)
                    size += len(item[0])
                rows = [m for msgs, _ in batch for m in msgs]
                try:
                    await self._flush(rows)
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._busy = False

    async def drain(self) -> None:
        """Wait for queued batches."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
