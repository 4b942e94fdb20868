"""How calls are timed, and the raw drivers' merged-per-tick baseline."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def sequential_latency(op: Callable[[int], Awaitable[Any]], n: int) -> tuple[float, float]:
    """Run ``op(i)`` ``n`` times one at a time; return (p50 in µs, ops/s)."""
    lat = []
    clock = time.perf_counter_ns
    start = clock()
    for i in range(n):
        t0 = clock()
        await op(i)
        lat.append(clock() - t0)
    total = (clock() - start) / 1e9
    lat.sort()
    return lat[len(lat) // 2] / 1000.0, n / total


async def interleaved_latency(
    subjects: dict[str, Callable[[int], Awaitable[Any]]], n: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Run ``op(i)`` of every subject for i in ``range(n)``, one call at a time, the subjects
    taking turns call by call in a fresh random order each turn (seeded), so that the machine's
    drift over seconds weighs on every subject alike, and so does the call before: a call that
    follows a slow peer's may run slower, and a fixed rotation of three or more subjects would
    make one subject follow it more often than another. Returns {subject: (p50 in µs, ops/s)},
    ops/s being calls per second of that subject's own time."""
    names = list(subjects)
    order = random.Random(seed)
    lat: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for i in range(n):
        order.shuffle(names)
        for name in names:
            t0 = clock()
            await subjects[name](i)
            lat[name].append(clock() - t0)
    out: dict[str, tuple[float, float]] = {}
    for name, values in lat.items():
        values.sort()
        out[name] = (values[len(values) // 2] / 1000.0, n * 1e9 / sum(values))
    return out


async def concurrent_load(
    op: Callable[[int, int], Awaitable[Any]], workers: int, per_worker: int
) -> tuple[float, float, float]:
    """``workers`` coroutines each run ``op(worker, i)`` ``per_worker`` times.

    Returns (ops/s, p50 µs, p99 µs).
    """
    lat: list[int] = []
    clock = time.perf_counter_ns

    async def worker(w: int) -> None:
        for i in range(per_worker):
            t0 = clock()
            await op(w, i)
            lat.append(clock() - t0)

    start = clock()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    total = (clock() - start) / 1e9
    lat.sort()
    return (
        workers * per_worker / total,
        lat[len(lat) // 2] / 1000.0,
        lat[int(len(lat) * 0.99)] / 1000.0,
    )


async def alternate(
    repetitions: int, subjects: dict[str, Callable[[], Awaitable[float]]]
) -> dict[str, list[float]]:
    """Run each subject once per repetition, rotating which goes first."""
    names = list(subjects)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            gc.collect()
            out[name].append(await subjects[name]())
    return out


# --------------------------------------------------------------------------- raw merged clients


class TickMerger:
    """Raw-driver baseline for merged calls: calls issued in one event-loop tick share a batch."""

    def __init__(self, flush: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, item: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._go)
        return fut

    def _go(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)


def load_average() -> str:
    """The 1-minute load average, formatted; empty where the system has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return ""
