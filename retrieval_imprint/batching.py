"""Micro-batching: concurrent requests answered by one call, then each given its own answer.

One query costs a search of the whole index and, for a text, a pass of the embedding model;
64 queries in one matrix cost little more than one (a GEMM instead of 64 GEMVs, a few padded
batches through the model). So a server gathers the requests that arrive together: while a batch
runs, the requests arriving meanwhile make up the next one, up to ``max_rows`` queries. An idle
server answers a request at once, or waits ``window`` seconds for others to join it (default 0:
on 2 cores a 1 ms window halved one client's rate, 772 -> 382 vector requests/s, and moved 8 and
64 clients' by -11% to +8%: docs/serving-benchmark.md). All batches run one at a time on one thread of their own (``executor``): the
engine below already uses every core, and nothing else in the process touches the collection,
so no lock is needed anywhere below.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from .errors import RequestError

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class MicroBatcher(Generic[Item, Answer]):
    """``await submit(item, rows)`` returns ``handle(batch)``'s answer for ``item``; ``handle``
    gets a list of items and returns one answer or exception per item, in order. ``on_batch``
    (queries, requests) is told each batch's size as it starts."""

    def __init__(
        self,
        handle: Callable[[list[Item]], Sequence[Answer | BaseException]],
        *,
        window: float = 0.0,
        max_rows: int = 256,
        max_waiting: int = 16384,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.handle, self.window, self.max_rows, self.max_waiting = handle, window, max_rows, max_waiting
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imprint-engine")
        self.waiting_rows = 0
        self._queue: collections.deque[tuple[Item, int, asyncio.Future]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the engine thread, between batches (a refresh, ``info``...)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, item: Item, rows: int = 1) -> Answer:
        """Queue ``item`` (``rows`` queries) for the next batch and wait for its answer; a
        ``RequestError`` (503) when more than ``max_waiting`` queries are already waiting."""
        if self.waiting_rows + rows > self.max_waiting:
            raise RequestError(
                f"the server is overloaded: {self.waiting_rows} queries are waiting "
                f"(limit {self.max_waiting}); retry shortly",
                503,
                "overloaded",
            )
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._dispatch())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, rows, future))
        self.waiting_rows += rows
        assert self._wakeup is not None  # made with the task above
        self._wakeup.set()
        return await future

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        assert wakeup is not None  # made before this task
        while True:
            await wakeup.wait()
            wakeup.clear()
            if not self._queue:
                continue
            if self.window > 0 and self.waiting_rows < self.max_rows:
                await asyncio.sleep(self.window)  # idle until now: let the requests sent with this one arrive
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                if self.on_batch is not None:
                    self.on_batch(sum(rows for _, rows, _ in batch), len(batch))
                try:
                    answers = await loop.run_in_executor(self.executor, self.handle, [item for item, _, _ in batch])
                except BaseException as exc:  # a bug in handle: every request of the batch gets it
                    answers = [exc] * len(batch)
                for (_, _, future), answer in zip(batch, answers):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)

    def _take(self) -> list[tuple[Item, int, asyncio.Future]]:
        """The next batch: waiting requests in arrival order up to ``max_rows`` queries (at least one)."""
        batch: list[tuple[Item, int, asyncio.Future]] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0][1] <= self.max_rows):
            entry = self._queue.popleft()
            self.waiting_rows -= entry[1]
            if not entry[2].done():  # else its client went away while it waited
                batch.append(entry)
                rows += entry[1]
        return batch

    async def close(self) -> None:
        """Stop gathering; waits for the batch running now, if any."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:  # none after a graceful shutdown, which waits for every request
            _item, _rows, future = self._queue.popleft()
            if not future.done():
                future.set_exception(RequestError("the server is shutting down", 503, "shutting_down"))
        self.executor.shutdown(wait=True, cancel_futures=True)
