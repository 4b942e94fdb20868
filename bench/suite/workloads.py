"""The workloads' shared parts: the value stored, how many calls, and how each kind is run."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from .results import Measurement, Progress, Report
from .timing import alternate, concurrent_load, interleaved_latency, sequential_latency

VALUE = {
    "agent": "agent-0042",
    "state": "running",
    "step": 17,
    "score": 0.8734,
    "tags": ["plan", "search", "tool-call"],
    "note": "x" * 96,
}  # about 200 bytes of JSON
VALUE_BYTES = orjson.dumps(VALUE)


@dataclass(frozen=True)
class Sizes:
    """How many calls each workload makes. The batch sizes (10k), the key spaces and the
    namespace sizes of the prefix scaling (10k and 100k or 1M) are in the workloads' names and
    the targets', so every run keeps them."""

    single: int  # interleaved calls per subject and repetition
    warm_single: int  # calls per subject before the single-call passes
    per_worker: int  # calls per coroutine of the 64-coroutine loads, per repetition
    warm_per_worker: int
    scaling_calls: int  # keys(prefix) / search calls per namespace size and repetition
    hybrid_keys: int  # entries cached for the hybrid's hit path
    large_namespace: int  # the prefix scaling's second namespace size

    @property
    def namespaces_calls(self) -> int:
        """``namespaces(limit=100)`` calls per subject and repetition: the raw Redis side
        ``SCAN``s the whole keyspace (~50k keys) per call, so a tenth of the single calls."""
        return max(10, self.scaling_calls // 3)


FULL = Sizes(3000, 200, 300, 20, 300, 2000, 1_000_000)
QUICK = Sizes(1000, 200, 100, 20, 300, 2000, 100_000)
#: The command's own tests: every workload, subject and target of a quick run with a tenth of
#: its calls (the fixed costs stay: loading 10k keys, the 10k batches, the 100k namespaces). A
#: quick run is CPU-bound on the machine that also runs both servers: on this 2-vCPU VM 40 s
#: idle, 58-91 s with one core busy, 102 s with both; a smoke run 17-20 s idle, 40 s with both
#: cores busy (its test, with the chart). The smoke run's figures mean nothing.
SMOKE = Sizes(100, 20, 10, 2, 30, 200, 100_000)


class Bench:
    def __init__(
        self,
        report: Report,
        progress: Progress,
        repetitions: int,
        quick: bool,
        peers: bool,
        sizes: Sizes | None = None,
    ) -> None:
        self.report = report
        self.progress = progress
        self.reps = repetitions
        self.quick = quick
        self.peers = peers
        self.sizes = sizes if sizes is not None else QUICK if quick else FULL
        self.n_single = self.sizes.single

    def record(self, workload: str, unit: str, results: dict[str, list[float]]) -> None:
        for subject, values in results.items():
            self.report.add(Measurement(workload, subject, unit, values))

    # ----- single calls

    async def single(
        self,
        workload: str,
        subjects: dict[str, Callable[[int], Awaitable[Any]]],
        calls: int | None = None,
        paired: bool = True,
    ) -> None:
        """Single awaited calls, interleaved. fleetmem and the raw driver are measured as a pair
        (the target's ratio); with peers, a second pass interleaves every subject and is
        recorded as ``<workload> (with peers)``. A peer's calls make the calls after them run
        colder (its Python code and its server process ran meanwhile), which costs the side
        with more code on its path more: fleetmem vs raw reads ~0.05 higher in that pass.

        ``calls`` (default: the run's single-call count) is for slow calls (a keyspace
        ``SCAN``); ``paired=False`` makes one pass of every subject, under ``workload``."""
        self.progress.step(workload)
        n = self.n_single if calls is None else calls
        passes = [(workload, subjects)]
        if paired:
            pair = {name: subjects[name] for name in ("raw", "fleetmem")}
            passes = [(workload, pair)]
            if len(subjects) > len(pair):
                passes.append((f"{workload} (with peers)", subjects))
        for name in subjects:  # warm up (prepared statements, connections, scripts)
            await sequential_latency(subjects[name], min(n, self.sizes.warm_single))
        for label, group in passes:
            lat: dict[str, list[float]] = {s: [] for s in group}
            rate: dict[str, list[float]] = {s: [] for s in group}
            for rep in range(self.reps):
                gc.collect()
                figures = await interleaved_latency(group, n, seed=rep)
                for name, (p50, ops) in figures.items():
                    lat[name].append(p50)
                    rate[name].append(ops)
            self.record(label + " p50", "us", lat)
            self.record(label, "ops/s", rate)

    async def batch(
        self, workload: str, subjects: dict[str, Callable[[], Awaitable[Any]]], size: int
    ) -> None:
        self.progress.step(workload)

        def runner(name: str) -> Callable[[], Awaitable[float]]:
            async def go() -> float:
                t0 = time.perf_counter()
                await subjects[name]()
                return size / (time.perf_counter() - t0)

            return go

        for name in subjects:
            await subjects[name]()
        self.record(
            workload, "keys/s", await alternate(self.reps, {n: runner(n) for n in subjects})
        )

    async def concurrent(
        self,
        workload: str,
        subjects: dict[str, Callable[[int, int], Awaitable[Any]]],
        workers: int = 64,
    ) -> None:
        self.progress.step(workload)
        per = self.sizes.per_worker
        p50s: dict[str, list[float]] = {s: [] for s in subjects}
        p99s: dict[str, list[float]] = {s: [] for s in subjects}

        def runner(name: str) -> Callable[[], Awaitable[float]]:
            async def go() -> float:
                ops, p50, p99 = await concurrent_load(subjects[name], workers, per)
                p50s[name].append(p50)
                p99s[name].append(p99)
                return ops

            return go

        for name in subjects:
            await concurrent_load(subjects[name], workers, self.sizes.warm_per_worker)
        self.record(workload, "ops/s", await alternate(self.reps, {n: runner(n) for n in subjects}))
        self.record(workload + " p50", "us", p50s)
        self.record(workload + " p99", "us", p99s)

    async def loads(self, backend: str, subjects: dict[str, tuple[Op1, Op1]]) -> None:
        """The 64-coroutine get, set and mixed loads of one backend: each subject's ``(get,
        set)`` takes a key index; worker ``w``'s call ``i`` uses key :func:`load_key`."""
        gets = {name: _on_load_keys(get) for name, (get, _) in subjects.items()}
        sets = {name: _on_load_keys(put) for name, (_, put) in subjects.items()}
        await self.concurrent(f"{backend} 64 coroutines get", gets)
        await self.concurrent(f"{backend} 64 coroutines set", sets)
        await self.concurrent(
            f"{backend} 64 coroutines mixed",
            {name: mixed(gets[name], sets[name]) for name in gets},
        )


#: A workload's call: batch (no argument), single (call number), concurrent (worker, number).
Op0 = Callable[[], Awaitable[Any]]
Op1 = Callable[[int], Awaitable[Any]]
Op2 = Callable[[int, int], Awaitable[Any]]

#: The 64-coroutine mixed load: one call in MIXED_WRITE_EVERY is a set, the others are gets.
MIXED_WRITE_EVERY = 5


def load_key(w: int, i: int) -> int:
    """The key index of worker ``w``'s call ``i`` in the 64-coroutine loads (10,000 keys)."""
    return (w * 131 + i) % 10000


def _on_load_keys(op: Op1) -> Op2:
    return lambda w, i: op(load_key(w, i))


def mixed(get: Op2, put: Op2) -> Op2:
    """The mixed load's call ``i`` of worker ``w``: 80% ``get``, 20% ``put``, on the same keys
    the get and set loads use, the same calls for every subject."""

    def op(w: int, i: int) -> Awaitable[Any]:
        return put(w, i) if load_key(w, i) % MIXED_WRITE_EVERY == 0 else get(w, i)

    return op


def chunked(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


#: The namespaces of the ``namespaces()`` workloads: NAMESPACES of NAMESPACE_ENTRIES entries.
NAMESPACES = 1000
NAMESPACE_ENTRIES = 3


def namespace_names() -> list[str]:
    """``bench-ns-0000`` ... ``bench-ns-0999``: the namespaces listed by ``namespaces()``."""
    return [f"bench-ns-{i:04d}" for i in range(NAMESPACES)]


async def fill_namespaces(store: Any) -> None:
    """Write NAMESPACE_ENTRIES entries into each of the NAMESPACES namespaces, 50 at a time."""
    names = namespace_names()
    items = {f"item-{j}": VALUE for j in range(NAMESPACE_ENTRIES)}
    for i in range(0, len(names), 50):
        await asyncio.gather(*(store.with_namespace(n).set_many(items) for n in names[i : i + 50]))


async def clear_namespaces(store: Any) -> None:
    """Clear the namespaces :func:`fill_namespaces` wrote."""
    names = namespace_names()
    for i in range(0, len(names), 50):
        await asyncio.gather(*(store.with_namespace(n).clear() for n in names[i : i + 50]))
