"""Merging of concurrent single-key calls into batched round trips.

A :class:`Coalescer` lets a caller run on its own, exactly as if it were not there, whenever
nothing else is in flight: a lone caller pays one counter increment. Otherwise calls queue. A
batch (one ``MGET``, one ``= ANY($1)`` query...) leaves at the end of the event-loop tick in
which one of the ``max_inflight`` slots is free, so the callers woken together by a finished
batch share the next one instead of the first of them taking a slot for itself. So batches form
by themselves under load and never delay a caller that has the backend to itself.

Guarantees: each call's result or error reaches its own caller; with a ``key`` function (writes)
a batch never holds two calls on the same key (the later one waits for the next batch, so calls
on a key keep their order); without one (reads) any calls may share a batch; a
batch runs in a task of its own, so a cancelled caller never cancels the others, and a caller
cancelled while still queued is dropped before its batch is sent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Run ``single(item)`` directly while slots are free, else batch through ``batch(items)``.

    ``batch`` returns one result per item, in order; an item's result may be an exception
    instance, which is raised to that item's caller only.
    """

    __slots__ = (
        "_batch",
        "_inflight",
        "_key",
        "_max_batch",
        "_max_inflight",
        "_queue",
        "_scheduled",
        "_settling",
        "_single",
        "_tasks",
        "batched_calls",
        "batches",
    )

    def __init__(
        self,
        single: Callable[[T], Awaitable[R]],
        batch: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        key: Callable[[T], Hashable] | None,
        max_inflight: int,
        max_batch: int = 1000,
    ) -> None:
        self._single = single
        self._batch = batch
        self._key = key
        self._max_inflight = max(1, max_inflight)
        self._max_batch = max(1, max_batch)
        self._inflight = 0
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._scheduled = False
        self._settling = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Counters: how many batches were sent and how many calls they carried.
        self.batches = 0
        self.batched_calls = 0

    async def call(self, item: T) -> R:
        if self._inflight == 0 and not self._queue and not self._settling:
            # Nothing in flight: the caller has the backend to itself.
            self._inflight += 1
            try:
                return await self._single(item)
            finally:
                self._inflight -= 1
                if self._queue:
                    self._launch()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._inflight < self._max_inflight and not self._scheduled:
            # A slot is free: the batch leaves at the end of this event-loop tick, so that the
            # callers woken together (by the batch that just finished) share it.
            self._scheduled = True
            loop.call_soon(self._launch_soon)
        return await future

    def _settled(self) -> None:
        # A call queued meanwhile found a free slot and scheduled its own launch.
        self._settling = False

    def _launch_soon(self) -> None:
        self._scheduled = False
        if self._queue:
            self._launch()

    def _launch(self) -> None:
        if self._key is None:
            self._launch_any()
            return
        while self._queue and self._inflight < self._max_inflight:
            items: list[T] = []
            futures: list[asyncio.Future[R]] = []
            seen: set[Hashable] = set()
            deferred: list[tuple[T, asyncio.Future[R]]] = []
            while self._queue and len(items) < self._max_batch:
                item, future = self._queue.popleft()
                if future.done():  # cancelled while queued: never sent
                    continue
                key = self._key(item)
                if key in seen:
                    deferred.append((item, future))  # same key: next batch, in order
                    continue
                seen.add(key)
                items.append(item)
                futures.append(future)
            self._queue.extendleft(reversed(deferred))
            if not items:
                return
            self._start(items, futures)
            if deferred:
                return  # a later call on a key of this batch waits until the batch is done

    def _launch_any(self) -> None:
        """Reads: any calls may share a batch (the same key twice is harmless)."""
        queue = self._queue
        while queue and self._inflight < self._max_inflight:
            items: list[T] = []
            futures: list[asyncio.Future[R]] = []
            for _ in range(min(len(queue), self._max_batch)):
                item, future = queue.popleft()
                if not future.done():  # cancelled while queued: never sent
                    items.append(item)
                    futures.append(future)
            if not items:
                return
            self._start(items, futures)

    def _start(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        self._inflight += 1
        self.batches += 1
        self.batched_calls += len(items)
        task = asyncio.ensure_future(self._run(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        try:
            results = await self._batch(items)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for future, result in zip(futures, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._inflight -= 1
            if self._queue:
                self._launch()
            elif self._inflight == 0 and not self._settling:
                # Until the callers this batch woke have run, none of them goes alone: their
                # next calls leave together.
                self._settling = True
                asyncio.get_running_loop().call_soon(self._settled)
