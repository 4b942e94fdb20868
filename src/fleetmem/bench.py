"""``fleetmem bench``: fleetmem against the raw drivers (and peers), measured in one run.

Every workload runs the raw driver and fleetmem doing the same work in the same process,
alternating which goes first, for several repetitions; the report gives min/median/max per
subject and the ratio of medians. Peers (LangGraph's ``AsyncPostgresStore``, aiocache, cashews)
run too when the ``bench`` extra is installed. Servers come from ``FLEETMEM_BENCH_POSTGRES_URL``
/ ``FLEETMEM_BENCH_REDIS_URL`` or are started from the local binaries by the test harness.

Benchmarks are not tests: nothing here fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Measurement", "main", "run"]

VALUE = {
    "agent": "agent-0042",
    "state": "running",
    "step": 17,
    "score": 0.8734,
    "tags": ["plan", "search", "tool-call"],
    "note": "x" * 96,
}  # about 200 bytes of JSON
VALUE_BYTES = orjson.dumps(VALUE)


# --------------------------------------------------------------------------- results


@dataclass
class Measurement:
    """One figure for one subject over several repetitions."""

    workload: str
    subject: str  # "fleetmem", "raw", "raw-merged", "langgraph", ...
    unit: str  # "us" (lower is better) or "ops/s" / "keys/s" (higher is better) or "bytes"
    values: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lower_is_better(self) -> bool:
        return self.unit in ("us", "bytes", "ms")


@dataclass
class Report:
    started: str
    machine: str
    command: str
    rows: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, workload: str, subject: str) -> Measurement | None:
        for row in self.rows:
            if row.workload == workload and row.subject == subject:
                return row
        return None

    def add(self, row: Measurement) -> Measurement:
        self.rows.append(row)
        return row


class Progress:
    """A one-line progress display on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def step(self, text: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------- timing helpers


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


class _TickMerger:
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


# --------------------------------------------------------------------------- servers


@contextlib.asynccontextmanager
async def _servers(need_pg: bool, need_redis: bool) -> AsyncIterator[tuple[str | None, str | None]]:
    """Find the servers (``FLEETMEM_BENCH_*_URL``) or start them from the local binaries."""
    pg_url = os.environ.get("FLEETMEM_BENCH_POSTGRES_URL")
    redis_url = os.environ.get("FLEETMEM_BENCH_REDIS_URL")
    started: list[Any] = []
    try:
        if (need_pg and not pg_url) or (need_redis and not redis_url):
            from fleetmem.testing import servers

            if need_pg and not pg_url:
                # fsync stays on: the durable upsert figures must pay for durability.
                pg = servers.start_local_postgres(durable=True)
                started.append(pg)
                pg_url = pg.dsn
            if need_redis and not redis_url:
                rs = servers.start_local_redis()
                started.append(rs)
                redis_url = rs.url
        yield (pg_url if need_pg else None, redis_url if need_redis else None)
    finally:
        for server in started:
            server.close()


# --------------------------------------------------------------------------- workloads


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
    ) -> None:
        """Single awaited calls, interleaved. fleetmem and the raw driver are measured as a pair
        (the target's ratio); with peers, a second pass interleaves every subject and is
        recorded as ``<workload> (with peers)``. A peer's calls make the calls after them run
        colder (its Python code and its server process ran meanwhile), which costs the side
        with more code on its path more: fleetmem vs raw reads ~0.05 higher in that pass."""
        self.progress.step(workload)
        pair = {name: subjects[name] for name in ("raw", "fleetmem")}
        passes = [(workload, pair)]
        if len(subjects) > len(pair):
            passes.append((f"{workload} (with peers)", subjects))
        for name in subjects:  # warm up (prepared statements, connections, scripts)
            await sequential_latency(subjects[name], self.sizes.warm_single)
        for label, group in passes:
            lat: dict[str, list[float]] = {s: [] for s in group}
            rate: dict[str, list[float]] = {s: [] for s in group}
            for rep in range(self.reps):
                gc.collect()
                figures = await interleaved_latency(group, self.n_single, seed=rep)
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


# --------------------------------------------------------------------------- postgres


async def bench_postgres(bench: Bench, dsn: str) -> None:
    import asyncpg

    from fleetmem.backends.postgres import PostgresStore

    async def init(conn: Any) -> None:
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda v: b"\x01" + orjson.dumps(v),
            decoder=lambda b: orjson.loads(b[1:]),
            schema="pg_catalog",
            format="binary",
        )

    async def no_reset(conn: Any) -> None:
        """The baseline leaves no session state: skip asyncpg's reset round trip on release."""

    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10, init=init, reset=no_reset)
    store = await PostgresStore.from_url(dsn, namespace="bench").connect()
    lg = await _langgraph(bench, dsn) if bench.peers else None
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                'CREATE TABLE IF NOT EXISTS bench_raw (key text COLLATE "C" PRIMARY KEY, '
                "value jsonb NOT NULL)"
            )
            await conn.execute("TRUNCATE bench_raw")
        await store.clear()
        keys = [f"k{i:06d}" for i in range(10_000)]
        await store.set_many(dict.fromkeys(keys, VALUE))
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO bench_raw(key, value) VALUES($1, $2)", [(k, VALUE) for k in keys]
            )
        if lg is not None:
            await lg.put_many(keys)
        upsert = (
            "INSERT INTO bench_raw(key, value) VALUES($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        )
        # Single awaited calls: the raw side runs on the connection the store's lone calls use
        # (no pool bookkeeping), so both talk to the same server process. On a 2-vCPU VM two
        # connections' round trips differ by up to 2x, by where their backends get scheduled.
        await store.get(keys[0])
        conn1 = store._next_lone_connection()
        if conn1 is None:  # pragma: no cover - a store from a URL has its own pool
            raise RuntimeError("the store has no connection of its own to share")
        # It carries the store's jsonb codec: the raw side encodes with orjson itself, and its
        # reads decode with the store's decoder (~0.3 us a row more than a bare orjson.loads).

        async def raw_get(i: int) -> Any:
            return await conn1.fetchval(
                "SELECT value FROM bench_raw WHERE key = $1", keys[i % 10000]
            )

        async def fm_get(i: int) -> Any:
            return await store.get(keys[i % 10000])

        async def raw_set(i: int) -> Any:
            return await conn1.execute(upsert, keys[i % 10000], orjson.dumps(VALUE))

        async def fm_set(i: int) -> Any:
            return await store.set(keys[i % 10000], VALUE)

        gets: dict[str, Op1] = {"raw": raw_get, "fleetmem": fm_get}
        sets: dict[str, Op1] = {"raw": raw_set, "fleetmem": fm_set}
        if lg is not None:
            gets["langgraph"] = lambda i: lg.get(keys[i % 10000])
            sets["langgraph"] = lambda i: lg.put(keys[i % 10000])
        await bench.single("postgres get", gets)
        await bench.single("postgres set", sets)

        # Batches of 10,000: the best raw methods (COPY + upsert; = ANY).
        batch_keys = [f"b{i:06d}" for i in range(10_000)]
        items = dict.fromkeys(batch_keys, VALUE)

        async def raw_set_many() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    'CREATE TEMP TABLE IF NOT EXISTS bench_in (key text COLLATE "C", '
                    "value jsonb) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table(
                    "bench_in", records=[(k, VALUE) for k in batch_keys]
                )
                await conn.execute(
                    "INSERT INTO bench_raw SELECT key, value FROM bench_in "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                )

        async def fm_set_many() -> None:
            await store.set_many(items)

        async def raw_get_many() -> None:
            rows = await pool.fetch(
                "SELECT key, value FROM bench_raw WHERE key = ANY($1::text[])", batch_keys
            )
            assert len(rows) == len(batch_keys)

        async def fm_get_many() -> None:
            got = await store.get_many(batch_keys)
            assert len(got) == len(batch_keys)

        set_manys: dict[str, Op0] = {
            "raw": raw_set_many,
            "fleetmem": fm_set_many,
        }
        get_manys: dict[str, Op0] = {
            "raw": raw_get_many,
            "fleetmem": fm_get_many,
        }
        if lg is not None:

            async def lg_get_many() -> None:
                assert await lg.get_many(batch_keys) == len(batch_keys)

            set_manys["langgraph"] = lambda: lg.put_many(batch_keys)
            get_manys["langgraph"] = lg_get_many
        await bench.batch("postgres set_many 10k", set_manys, 10_000)
        await bench.batch("postgres get_many 10k", get_manys, 10_000)

        # 64 coroutines: raw one-call-per-op, raw merged per tick, fleetmem.
        async def flush_get(batch: list[str]) -> list[Any]:
            rows = await pool.fetch(
                "SELECT key, value FROM bench_raw WHERE key = ANY($1::text[])", list(set(batch))
            )
            found = {r["key"]: r["value"] for r in rows}
            return [found.get(k) for k in batch]

        merged_get = _TickMerger(flush_get)

        async def flush_set(batch: list[tuple[str, Any]]) -> list[Any]:
            # Each call's own value, serialized per call, as fleetmem does.
            latest = dict(batch)
            await pool.execute(
                "INSERT INTO bench_raw(key, value) SELECT k, v "
                "FROM unnest($1::text[], $2::jsonb[]) AS t(k, v) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                list(latest),
                list(latest.values()),
            )
            return [None] * len(batch)

        merged_set = _TickMerger(flush_set)
        loads: dict[str, tuple[Op1, Op1]] = {
            "raw": (
                lambda k: pool.fetchval("SELECT value FROM bench_raw WHERE key = $1", keys[k]),
                lambda k: pool.execute(upsert, keys[k], VALUE),
            ),
            "raw-merged": (
                lambda k: merged_get.submit(keys[k]),
                lambda k: merged_set.submit((keys[k], VALUE)),
            ),
            "fleetmem": (lambda k: store.get(keys[k]), lambda k: store.set(keys[k], VALUE)),
        }
        if lg is not None:
            loads["langgraph"] = (lambda k: lg.get(keys[k]), lambda k: lg.put(keys[k]))
        await bench.loads("postgres", loads)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        if lg is not None:
            await lg.close()
        await store.close()
        await pool.close()


@dataclass
class _LangGraph:
    """LangGraph's ``AsyncPostgresStore`` on the bench's workloads (namespace ``("bench",)``)."""

    store: Any
    pool: Any

    async def get(self, key: str) -> Any:
        return await self.store.aget(("bench",), key)

    async def put(self, key: str) -> None:
        await self.store.aput(("bench",), key, VALUE)

    async def put_many(self, keys: list[str]) -> None:
        from langgraph.store.base import PutOp

        await self.store.abatch([PutOp(("bench",), key, VALUE) for key in keys])

    async def get_many(self, keys: list[str]) -> int:
        from langgraph.store.base import GetOp

        items = await self.store.abatch([GetOp(("bench",), key) for key in keys])
        return sum(item is not None for item in items)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with self.pool.connection() as conn:
                await conn.execute("DELETE FROM store WHERE prefix = 'bench'")
        await self.pool.close()


async def _langgraph(bench: Bench, dsn: str) -> _LangGraph | None:
    try:
        from langgraph.store.postgres import AsyncPostgresStore
        from psycopg_pool import AsyncConnectionPool
    except ImportError:
        bench.report.notes.append("LangGraph store not installed: pip install 'fleetmem[bench]'")
        return None
    from psycopg.rows import dict_row

    pool: Any = AsyncConnectionPool(
        dsn,
        min_size=10,
        max_size=10,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open()
    store = AsyncPostgresStore(pool)
    await store.setup()
    return _LangGraph(store, pool)


async def _prefix_scaling(bench: Bench, name: str, store: Any) -> None:
    """keys(prefix) and a prefix search at 10k and at 1M keys in the namespace.

    Keys come in groups of exactly 100 (``g00042/item-0004217``), so a query returns the same
    rows at every namespace size: only the namespace grows, which is what the target is about.
    """
    sizes = [10_000, bench.sizes.large_namespace]
    ns = store.with_namespace(f"bench-prefix-{name}")
    try:
        await ns.clear()
        have = 0
        for size in sizes:
            bench.progress.step(f"{name} keys(prefix)/search at {size:,} keys (loading)")
            while have < size:
                chunk = min(50_000, size - have)
                await ns.set_many(
                    {f"g{j // 100:05d}/item-{j:07d}": {"i": j} for j in range(have, have + chunk)}
                )
                have += chunk
            groups = size // 100

            async def keys_op(i: int, groups: int = groups) -> Any:
                found = await ns.keys(f"g{(i * 7919) % groups:05d}/", limit=100)
                assert len(found) == 100

            async def search_op(i: int, groups: int = groups) -> Any:
                found = await ns.search(f"g{(i * 7919) % groups:05d}/item-*5", limit=100)
                assert len(found) == 10

            for op, label in ((keys_op, "keys(prefix)"), (search_op, "search(prefix*)")):
                values = []
                for _ in range(bench.reps):
                    p50, _ops = await sequential_latency(op, bench.sizes.scaling_calls)
                    values.append(p50)
                bench.report.add(
                    Measurement(f"{name} {label} p50 @{size:,}", "fleetmem", "us", values)
                )
    finally:
        await ns.clear()


# --------------------------------------------------------------------------- redis


async def bench_redis(bench: Bench, url: str) -> None:
    import redis.asyncio as aioredis

    from fleetmem.backends.redis import RedisStore

    raw = aioredis.from_url(url)
    store = await RedisStore.from_url(url, namespace="bench").connect()
    peers = await _redis_peers(bench, url) if bench.peers else {}
    try:
        await store.clear()
        keys = [f"k{i:06d}" for i in range(10_000)]
        await store.set_many(dict.fromkeys(keys, VALUE))
        await raw.mset({f"raw:{k}": VALUE_BYTES for k in keys})
        for peer in peers.values():
            await peer.set_many(dict.fromkeys(keys, VALUE))

        async def raw_get(i: int) -> Any:
            data = await raw.get(f"raw:{keys[i % 10000]}")
            assert data is not None
            return orjson.loads(data)

        async def fm_get(i: int) -> Any:
            return await store.get(keys[i % 10000])

        async def raw_set(i: int) -> Any:
            return await raw.set(f"raw:{keys[i % 10000]}", orjson.dumps(VALUE))

        async def fm_set(i: int) -> Any:
            return await store.set(keys[i % 10000], VALUE)

        gets: dict[str, Op1] = {"raw": raw_get, "fleetmem": fm_get}
        sets: dict[str, Op1] = {"raw": raw_set, "fleetmem": fm_set}

        def peer_single(peer: _RedisPeer) -> tuple[Op1, Op1]:
            return (lambda i: peer.get(keys[i % 10000]), lambda i: peer.put(keys[i % 10000], VALUE))

        for name, peer in peers.items():
            gets[name], sets[name] = peer_single(peer)
        await bench.single("redis get", gets)
        await bench.single("redis set", sets)

        batch_keys = [f"b{i:06d}" for i in range(10_000)]
        items = dict.fromkeys(batch_keys, VALUE)
        raw_keys = [f"raw:{k}" for k in batch_keys]

        async def raw_mset() -> None:
            await raw.mset({k: orjson.dumps(VALUE) for k in raw_keys})

        async def fm_set_many() -> None:
            await store.set_many(items)

        async def raw_mget() -> None:
            values = await raw.mget(raw_keys)
            out = [orjson.loads(v) for v in values if v is not None]
            assert len(out) == len(raw_keys)

        async def fm_get_many() -> None:
            got = await store.get_many(batch_keys)
            assert len(got) == len(batch_keys)

        set_manys: dict[str, Op0] = {
            "raw": raw_mset,
            "fleetmem": fm_set_many,
        }
        get_manys: dict[str, Op0] = {
            "raw": raw_mget,
            "fleetmem": fm_get_many,
        }

        def peer_batch(peer: _RedisPeer) -> tuple[Op0, Op0]:
            async def get_many() -> None:
                assert await peer.get_many(batch_keys) == len(batch_keys)

            return (lambda: peer.set_many(items)), get_many

        for name, peer in peers.items():
            set_manys[name], get_manys[name] = peer_batch(peer)
        await bench.batch("redis set_many 10k", set_manys, 10_000)
        await bench.batch("redis get_many 10k", get_manys, 10_000)

        async def flush_get(batch: list[str]) -> list[Any]:
            values = await raw.mget(batch)
            return [None if v is None else orjson.loads(v) for v in values]

        merged = _TickMerger(flush_get)

        async def flush_set(batch: list[tuple[str, Any]]) -> list[Any]:
            # Each call's own value, serialized per call, as fleetmem does.
            await raw.mset({k: orjson.dumps(v) for k, v in batch})
            return [None] * len(batch)

        merged_set = _TickMerger(flush_set)
        loads: dict[str, tuple[Op1, Op1]] = {
            "raw": (
                lambda k: raw.get(f"raw:{keys[k]}"),
                lambda k: raw.set(f"raw:{keys[k]}", orjson.dumps(VALUE)),
            ),
            "raw-merged": (
                lambda k: merged.submit(f"raw:{keys[k]}"),
                lambda k: merged_set.submit((f"raw:{keys[k]}", VALUE)),
            ),
            "fleetmem": (lambda k: store.get(keys[k]), lambda k: store.set(keys[k], VALUE)),
        }

        def peer_load(peer: _RedisPeer) -> tuple[Op1, Op1]:
            return (lambda k: peer.get(keys[k]), lambda k: peer.put(keys[k], VALUE))

        for name, peer in peers.items():
            loads[name] = peer_load(peer)
        await bench.loads("redis", loads)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        for peer in peers.values():
            with contextlib.suppress(Exception):
                await peer.close()
        with contextlib.suppress(Exception):
            for chunk in _chunked(
                [f"raw:k{i:06d}" for i in range(10_000)] + [f"raw:b{i:06d}" for i in range(10_000)],
                5000,
            ):
                await raw.delete(*chunk)
        await store.close()
        await raw.aclose()


def _chunked(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def _redis_memory(bench: Bench, raw: Any, store: Any) -> None:
    """Bytes per entry: fleetmem's whole footprint vs a plain ``SET key json``.

    Measured as the change of ``used_memory`` over 20,000 entries, alternating the two,
    ``repetitions`` times (allocator size classes make single figures drift a few percent).
    """
    bench.progress.step("redis bytes per entry")
    n = 20_000
    ns = store.with_namespace("bench-memory")
    values = [{**VALUE, "step": i} for i in range(n)]
    plain_keys = [f"plain:{i:06d}" for i in range(n)]

    async def used() -> int:
        info = await raw.info("memory")
        return int(info["used_memory"])

    async def plain() -> float:
        before = await used()
        await raw.mset({k: orjson.dumps(v) for k, v in zip(plain_keys, values, strict=True)})
        per_entry = (await used() - before) / n
        for chunk in _chunked(plain_keys, 5000):
            await raw.delete(*chunk)
        return per_entry

    async def fleet() -> float:
        await ns.clear()
        before = await used()
        await ns.set_many({f"{i:06d}": v for i, v in enumerate(values)})
        per_entry = (await used() - before) / n
        await ns.clear()
        return per_entry

    results = await alternate(bench.reps, {"raw": plain, "fleetmem": fleet})
    for subject, figures in results.items():
        bench.report.add(Measurement("redis bytes per entry", subject, "bytes", figures))


@contextlib.contextmanager
def _peer_deprecations() -> Iterator[None]:
    """The peers close their clients through redis-py's deprecated ``close()``; a warning
    turned into an error (``-W error``) would stop them half way, connections left open."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@dataclass
class _RedisPeer:
    """A peer cache on the bench's Redis workloads: single get/set and its batch calls."""

    get: Callable[[str], Awaitable[Any]]
    put: Callable[[str, Any], Awaitable[Any]]
    get_many: Callable[[list[str]], Awaitable[int]]  # how many keys were found
    set_many: Callable[[dict[str, Any]], Awaitable[Any]]
    close: Callable[[], Awaitable[None]]


async def _redis_peers(bench: Bench, url: str) -> dict[str, _RedisPeer]:
    peers: dict[str, _RedisPeer] = {}
    try:
        from aiocache import RedisCache
        from aiocache.serializers import JsonSerializer
    except ImportError:
        bench.report.notes.append("aiocache not installed: pip install 'fleetmem[bench]'")
    else:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        cache = RedisCache(
            endpoint=parts.hostname,
            port=parts.port or 6379,
            namespace="aio",
            serializer=JsonSerializer(),
        )

        async def aio_get_many(keys: list[str]) -> int:
            return sum(v is not None for v in await cache.multi_get(keys))

        async def aio_close() -> None:
            with contextlib.suppress(Exception):
                await cache.clear(namespace="aio")
            with _peer_deprecations():
                await cache.close()

        peers["aiocache"] = _RedisPeer(
            cache.get,
            lambda k, v: cache.set(k, v),
            aio_get_many,
            lambda items: cache.multi_set(list(items.items())),
            aio_close,
        )
    try:
        from cashews import Cache
    except ImportError:
        bench.report.notes.append("cashews not installed: pip install 'fleetmem[bench]'")
    else:
        cashews = Cache()
        cashews.setup(url, client_side=False)

        async def cw_get_many(keys: list[str]) -> int:
            found = await cashews.get_many(*[f"cw:{k}" for k in keys])
            return sum(v is not None for v in found)

        async def cashews_close() -> None:
            with contextlib.suppress(Exception):
                await cashews.delete_match("cw:*")
            with _peer_deprecations():
                await cashews.close()

        peers["cashews"] = _RedisPeer(
            lambda k: cashews.get(f"cw:{k}"),
            lambda k, v: cashews.set(f"cw:{k}", v),
            cw_get_many,
            lambda items: cashews.set_many({f"cw:{k}": v for k, v in items.items()}),
            cashews_close,
        )
    return peers


# --------------------------------------------------------------------------- hybrid


async def bench_hybrid(bench: Bench, dsn: str, url: str) -> None:
    import redis.asyncio as aioredis

    from fleetmem.factory import open_store

    n = bench.sizes.hybrid_keys
    keys = [f"h{i:05d}" for i in range(n)]
    raw = aioredis.from_url(url)
    store = await open_store(hybrid=(dsn, url), namespace="bench-hybrid")
    try:
        await store.set_many(dict.fromkeys(keys, VALUE))
        for k in keys:  # fill the cache
            await store.get(k)
        await raw.mset({f"rawh:{k}": VALUE_BYTES for k in keys})

        async def raw_get(i: int) -> Any:
            data = await raw.get(f"rawh:{keys[i % n]}")
            assert data is not None
            return orjson.loads(data)

        async def fm_get(i: int) -> Any:
            return await store.get(keys[i % n])

        await bench.single("hybrid get (cache hit)", {"raw": raw_get, "fleetmem": fm_get})
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        await store.close()
        for chunk in _chunked([f"rawh:{k}" for k in keys], 1000):
            await raw.delete(*chunk)
        await raw.aclose()


# --------------------------------------------------------------------------- the big namespaces


async def bench_scaling(bench: Bench, dsn: str | None, url: str | None) -> None:
    """Redis memory per entry, then ``keys(prefix)`` and ``search`` at 10k and 1M keys.

    Last in a run: loading and dropping a million keys leaves the servers busy for a while
    (autovacuum, freeing memory), which would weigh on the latency figures measured after.
    """
    if dsn is not None:
        from fleetmem.backends.postgres import PostgresStore

        async with PostgresStore.from_url(dsn, namespace="bench") as pg_store:
            await _prefix_scaling(bench, "postgres", pg_store)
    if url is not None:
        import redis.asyncio as aioredis

        from fleetmem.backends.redis import RedisStore

        raw = aioredis.from_url(url)
        try:
            async with RedisStore.from_url(url, namespace="bench") as redis_store:
                await _redis_memory(bench, raw, redis_store)
                await _prefix_scaling(bench, "redis", redis_store)
        finally:
            await raw.aclose()


# --------------------------------------------------------------------------- report


TARGETS: list[tuple[str, str, str, str, float]] = [
    # (workload, reference subject, "le"/"ge", description, bound) -- PERFORMANCE.md
    ("postgres get p50", "raw", "le", "latency ≤ 1.10x raw", 1.10),
    ("postgres set p50", "raw", "le", "latency ≤ 1.10x raw", 1.10),
    ("redis get p50", "raw", "le", "latency ≤ 1.10x raw", 1.10),
    ("redis set p50", "raw", "le", "latency ≤ 1.10x raw", 1.10),
    ("hybrid get (cache hit) p50", "raw", "le", "latency ≤ 1.15x raw Redis GET", 1.15),
    ("postgres set_many 10k", "raw", "ge", "≥ 0.8x COPY + upsert", 0.8),
    ("postgres get_many 10k", "raw", "ge", "≥ 0.8x = ANY", 0.8),
    ("redis set_many 10k", "raw", "ge", "≥ 0.8x MSET", 0.8),
    ("redis get_many 10k", "raw", "ge", "≥ 0.8x MGET", 0.8),
    ("redis bytes per entry", "raw", "le", "≤ 1.5x a plain SET", 1.5),
] + [
    (f"{backend} 64 coroutines {op}", ref, "ge", text, bound)
    for backend in ("postgres", "redis")
    for op in ("get", "set", "mixed")
    for ref, text, bound in (
        ("raw-merged", "≥ 0.7x the merged-per-tick raw figure", 0.7),
        ("langgraph", "≥ 2x LangGraph's store", 2.0),
    )
    if ref != "langgraph" or backend == "postgres"
]


def format_report(report: Report) -> str:
    lines = [f"fleetmem bench — {report.started} — {report.machine}", ""]
    header = f"{'workload':44} {'subject':11} {'unit':6} {'min':>10} {'median':>10} {'max':>10}"
    lines += [header, "-" * len(header)]
    for row in report.rows:
        vals = row.values or [float("nan")]
        lines.append(
            f"{row.workload:44} {row.subject:11} {row.unit:6} {min(vals):10.1f} "
            f"{row.median:10.1f} {max(vals):10.1f}"
        )
    lines += ["", "ratios (fleetmem / reference, medians):"]
    for workload, subject, text, value in ratios(report):
        lines.append(f"  {workload:44} vs {subject:11} {value:6.2f}  {text}")
    lines += ["", "targets (PERFORMANCE.md):"]
    for text, value, ok in targets(report):
        lines.append(f"  {'met    ' if ok else 'NOT met'}  {value:7.2f}  {text}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def ratios(report: Report) -> list[tuple[str, str, str, float]]:
    """fleetmem's median over every other subject's, per workload."""
    out = []
    for row in report.rows:
        if row.subject != "fleetmem":
            continue
        for ref in report.rows:
            if ref.workload != row.workload or ref.subject == "fleetmem" or not ref.values:
                continue
            ratio = row.median / ref.median if ref.median else float("nan")
            target = next(
                (t for t in TARGETS if t[0] == row.workload and t[1] == ref.subject), None
            )
            text = ""
            if target is not None:
                ok = ratio <= target[4] if target[2] == "le" else ratio >= target[4]
                text = f"target {target[3]}: {'met' if ok else 'NOT met'}"
            out.append((row.workload, ref.subject, text, ratio))
    return out


def targets(report: Report) -> list[tuple[str, float, bool]]:
    """Every target of PERFORMANCE.md this run measured: (what, figure, met)."""
    out = []
    for workload, ref, kind, text, bound in TARGETS:
        mine, theirs = report.get(workload, "fleetmem"), report.get(workload, ref)
        if mine is None or theirs is None or not theirs.values:
            continue
        value = mine.median / theirs.median
        out.append(
            (
                f"{workload} vs {ref}: {text}",
                value,
                value <= bound if kind == "le" else value >= bound,
            )
        )
    for backend in ("postgres", "redis"):
        for op in ("get", "set", "mixed"):
            p50 = report.get(f"{backend} 64 coroutines {op} p50", "fleetmem")
            p99 = report.get(f"{backend} 64 coroutines {op} p99", "fleetmem")
            if p50 is not None and p99 is not None:
                value = p99.median / p50.median
                out.append((f"{backend} 64 coroutines {op}: p99 ≤ 5x p50", value, value <= 5))
        for label in ("keys(prefix)", "search(prefix*)"):
            rows = [
                r
                for r in report.rows
                if r.workload.startswith(f"{backend} {label} p50 @") and r.subject == "fleetmem"
            ]
            if len(rows) >= 2:
                small, large = rows[0], rows[-1]
                value = large.median / small.median
                text = (
                    f"{backend} {label}: p50 at {large.workload.split('@')[1]} keys / at "
                    f"{small.workload.split('@')[1]} keys < 2"
                )
                out.append((text, value, value < 2))
    return out


_COLORS = {
    "raw": "#4c72b0",
    "raw-merged": "#8172b2",
    "langgraph": "#dd8452",
    "aiocache": "#55a868",
    "cashews": "#c44e52",
}


def _chart(report: Report, path: Path) -> None:
    """One axis for every row: fleetmem's speed relative to the reference (> 1: faster).

    Latency rows are inverted (reference latency / fleetmem latency), throughput rows are
    fleetmem / reference; the p50/p99 rows of the concurrent loads, the throughput of single
    calls and the peers pass's raw rows are left to the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows: list[tuple[str, str, float]] = []
    for workload, subject, _text, ratio in ratios(report):
        concurrent = " 64 coroutines " in workload
        if concurrent and workload.endswith(("p50", "p99")):
            continue
        if not concurrent and report.get(workload + " p50", "fleetmem") is not None:
            continue  # single calls: their latency row says it
        if "(with peers)" in workload and subject == "raw":
            continue  # the pair measured alone says it
        mine = report.get(workload, "fleetmem")
        if mine is None or ratio != ratio or ratio == 0:
            continue
        if workload.endswith(" p50") or mine.unit == "bytes":
            label = workload.removesuffix(" p50") + (
                " (memory)" if mine.unit == "bytes" else " (latency)"
            )
            rows.append((label, subject, 1 / ratio))
        else:
            rows.append((workload + " (throughput)", subject, ratio))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    ax.barh(
        range(len(rows)),
        [v for _, _, v in rows],
        color=[_COLORS.get(subject, "#999999") for _, subject, _ in rows],
    )
    ax.set_yticks(range(len(rows)), [f"{w}  vs {s}" for w, s, _ in rows], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, (_, _, v) in enumerate(rows):
        ax.text(v + 0.02, i, f"{v:.2f}", va="center", fontsize=6)
    ax.set_xlabel("fleetmem relative to the reference (> 1: fleetmem is faster or smaller)")
    ax.set_title(f"fleetmem vs raw drivers and peers, one run, {report.started[:10]}")
    handles = [
        Patch(color=c) for s, c in _COLORS.items() if any(subject == s for _, subject, _ in rows)
    ]
    names = [s for s in _COLORS if any(subject == s for _, subject, _ in rows)]
    ax.legend(handles, [f"vs {n}" for n in names], loc="lower right", fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_report(path: Path) -> Report:
    data = json.loads(path.read_text())
    report = Report(started=data["started"], machine=data["machine"], command=data["command"])
    for row in data["rows"]:
        report.add(Measurement(row["workload"], row["subject"], row["unit"], row["values"]))
    report.notes.extend(data.get("notes", []))
    return report


async def run(args: argparse.Namespace) -> Report:
    """Run the selected workloads and return the report."""
    only = set(args.only.split(",")) if args.only else {"postgres", "redis", "hybrid"}
    report = Report(
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, Python "
        f"{platform.python_version()}",
        command="fleetmem bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []),
    )
    # Workloads of each section; each prefix-scaling section also has two loading steps.
    steps = (
        (9 if "postgres" in only else 0)
        + (10 if "redis" in only else 0)
        + (1 if "hybrid" in only else 0)
    )
    progress = Progress(steps)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.smoke:
        report.notes.append("smoke run (--smoke): too few calls for the figures to mean anything")
    bench = Bench(report, progress, args.repetitions, args.quick, not args.no_peers, sizes)
    # SIGTERM (a CI timeout, `kill`) cancels the run like Ctrl-C: the servers it started stop.
    task = asyncio.current_task()
    if task is not None:
        # Event loops without signal handlers (Windows: NotImplementedError) or a run outside the
        # main thread (RuntimeError) keep the default SIGTERM; Ctrl-C still stops the servers.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with _servers(
        "postgres" in only or "hybrid" in only, "redis" in only or "hybrid" in only
    ) as (pg, rs):
        if "postgres" in only and pg:
            await bench_postgres(bench, pg)
        if "redis" in only and rs:
            await bench_redis(bench, rs)
        if "hybrid" in only and pg and rs:
            try:
                await bench_hybrid(bench, pg, rs)
            except ImportError as exc:
                report.notes.append(f"hybrid skipped: {exc}")
        await bench_scaling(
            bench, pg if "postgres" in only else None, rs if "redis" in only else None
        )
    progress.finish()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetmem bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated: postgres,redis,hybrid")
    parser.add_argument("--repetitions", "-r", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer calls; 100k instead of 1M")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tenth of --quick's calls, every workload still measured: checks the command "
        "end to end (its tests); the figures mean nothing",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip LangGraph/aiocache/cashews")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart of the ratios here")
    parser.add_argument(
        "--from-json", type=Path, help="do not measure: report (and chart) a saved --json file"
    )
    args = parser.parse_args(argv)
    try:
        report = _load_report(args.from_json) if args.from_json else asyncio.run(run(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("\nfleetmem bench: interrupted; the servers it started are stopped", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": report.started,
                    "machine": report.machine,
                    "command": report.command,
                    "rows": [
                        {
                            "workload": r.workload,
                            "subject": r.subject,
                            "unit": r.unit,
                            "values": r.values,
                        }
                        for r in report.rows
                    ],
                    "targets": [
                        {"target": text, "figure": value, "met": ok}
                        for text, value, ok in targets(report)
                    ],
                    "notes": report.notes,
                },
                indent=2,
            )
        )
    if args.chart:
        _chart(report, args.chart)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
