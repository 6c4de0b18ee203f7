"""Requests that arrive together on an asyncio loop become one batched call to the rollout engine.

The rollout engine is one Ray actor: a call per request would serialise them, one short generation at a
time. Coroutines (the gateway's HTTP requests, concurrent agent episodes) instead put their request
here; a batch stays open for `wait_s` after its first request, then everything queued goes out as one
call (one call per distinct `key` of the requests, for calls that take one set of settings).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Hashable, Optional

BATCH_WAIT_S = 0.005  # how long a batch stays open for requests arriving together


class Batcher:
    def __init__(self, call: Callable[[Hashable, list], concurrent.futures.Future], timeout_s: float,
                 wait_s: float = BATCH_WAIT_S):
        """`call(key, requests)`: starts one batched call and returns a future of the results, in order."""
        self.call, self.timeout_s, self.wait_s = call, timeout_s, wait_s
        self.queue: Optional[asyncio.Queue] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.batches = 0  # calls made, for tests and metrics

    async def submit(self, request: Any, key: Hashable = None) -> Any:
        """The result of `request`, batched with the others that arrive within the window."""
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # first use on this loop
            self.queue, self.loop = asyncio.Queue(), loop
            loop.create_task(self._collect(self.queue))
        future = loop.create_future()
        await self.queue.put((key, request, future))
        return await asyncio.wait_for(future, self.timeout_s)

    async def _collect(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            await asyncio.sleep(self.wait_s)
            while not queue.empty():
                batch.append(queue.get_nowait())
            groups: dict[Hashable, list] = {}
            for key, request, future in batch:
                groups.setdefault(key, []).append((request, future))
            for key, items in groups.items():
                asyncio.get_running_loop().create_task(self._run(key, items))

    async def _run(self, key: Hashable, items: list) -> None:
        self.batches += 1
        try:
            results = await asyncio.wrap_future(self.call(key, [request for request, _ in items]))
            for (_, future), result in zip(items, results):
                if not future.done():
                    future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every request of the batch fails with it
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
