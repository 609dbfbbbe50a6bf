"""Group commit for async calls: what is submitted while a call is in flight goes together in the next one.

Used where each request would otherwise pay a round trip of its own: the ledger's writes (one PUT or one fsync for
the records finished meanwhile) and the calls to the cluster's rate-limiter actor."""

from __future__ import annotations

import asyncio
from typing import Any


class Coalesced:
    """Group commit for calls: `submit` an item; the items submitted while a `send` is in flight go together in
    the next one. `send(items)` returns an awaitable of one result per item, in order."""

    def __init__(self, send):
        self.send = send
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self.send([item for item, _ in batch])
            except BaseException as err:  # noqa: BLE001 — every waiter learns its call failed
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err if isinstance(err, Exception) else RuntimeError(str(err)))
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
