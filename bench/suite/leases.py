"""``--only leases``: leases with fencing tokens and fenced writes, on every backend.

Three workloads per backend (memory, SQLite, PostgreSQL, Redis, hybrid), each measured in one
run against its reference, interleaved:

* ``<backend> lease acquire+release``: one uncontended ``acquire`` then ``release`` of a lease
  name nobody else uses, one pair at a time, interleaved call by call with the raw driver
  sending the backend's own two statements or scripts (subject ``raw``), and on Redis with
  redis-py's asyncio ``Lock`` (``acquire`` + ``release``, the peer a user would pick otherwise)
  in a second pass. Target: fleetmem ≤ 1.2x raw (p50).
* ``<backend> set fenced``: ``store.set(key, value, fence=lease)`` (subject ``fleetmem``)
  interleaved with the same ``store.set(key, value)`` without a fence (subject ``unfenced``),
  same keys and value, the lease held throughout. Target: ≤ 1.15x (p50).
* ``<backend> lease 64 coroutines 8 names``: 64 coroutines, worker ``w`` taking lease
  ``c{w % 8}`` with ``acquire(wait=...)``, holding it for one event-loop turn, releasing it;
  acquisitions per second. Targets: Redis ≥ 5,000/s, PostgreSQL ≥ 1,500/s; memory, SQLite
  and the hybrid for reference. Subject ``raw``: the same statements or scripts with the
  waiters queued in this process (an ``asyncio.Lock`` per name, so one try per grant), the
  ceiling of those statements on this machine at that moment. On Redis, redis-py's ``Lock``
  on the same load, with its default polling (``sleep=0.1``) and with ``sleep=0.001``.

The targets are not in the report's target table (they are absolute figures or ratios to
subjects the other sections do not have): the section adds a ``note`` per target with its
figure and verdict. A backend whose leases are not in this build is skipped with a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import Measurement
from .timing import (
    alternate,
    concurrent_load,
    interleaved_latency,
    load_average,
    sequential_latency,
)
from .workloads import VALUE, Bench, Op1, Op2

#: The namespace fleetmem's side uses; the raw side uses LEASE_RAW_NAMESPACE.
LEASE_NAMESPACE = "bench-leases"
LEASE_RAW_NAMESPACE = "bench-leases-raw"
#: The contended load: WORKERS coroutines over NAMES lease names.
WORKERS = 64
NAMES = 8
#: Keys the fenced and unfenced sets write (the same for both subjects).
FENCED_KEYS = [f"fenced-{i:04d}" for i in range(1000)]
#: Lease TTL of every workload: far longer than any hold, so no lease expires mid-run.
TTL = 30.0
#: How long a contended acquire may wait before the run counts it as a failure.
WAIT = 30.0

#: (workload suffix, subject, reference, "le"/"ge", bound, description).
_TARGETS: list[tuple[str, str, str, str, float, str]] = [
    ("lease acquire+release p50", "fleetmem", "raw", "le", 1.2, "≤ 1.2x the raw two round trips"),
    ("set fenced p50", "fleetmem", "unfenced", "le", 1.15, "≤ 1.15x an unfenced set"),
]
_CONTENDED_TARGETS = {"redis": 5000.0, "postgres": 1500.0}

#: Workloads (progress steps) per backend.
STEPS_PER_BACKEND = 3
BACKENDS = ("memory", "sqlite", "postgres", "redis", "hybrid")


def lease_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs))


@dataclass
class _Target:
    """One backend's subjects for the three workloads, and what to close after them."""

    name: str
    store: Any
    raw: Op1 | None = None  # the raw driver's acquire + release
    raw_contended: Op2 | None = None  # the same, 64 coroutines queued per name in-process
    peers_pair: dict[str, Op1] = field(default_factory=dict)
    peers_contended: dict[str, Op2] = field(default_factory=dict)
    on_close: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


async def bench_leases(bench: Bench, dsn: str | None, url: str | None) -> None:
    """Run the three lease workloads on memory and SQLite, and on PostgreSQL, Redis and the
    hybrid when their servers are given."""
    # The contended figures are absolute, not ratios: say how busy the machine was.
    before = load_average()
    for name in BACKENDS:
        if name in ("postgres", "hybrid") and dsn is None:
            continue
        if name in ("redis", "hybrid") and url is None:
            continue
        try:
            async with _open(bench, name, dsn, url) as target:
                if target is None:
                    continue
                await _bench_backend(bench, target)
        except ImportError as exc:
            bench.report.notes.append(f"{name} leases skipped: {exc}")
    if before:
        bench.report.notes.append(
            f"leases: 1-minute load average {before} before the section, {load_average()} after"
        )
    _verdicts(bench)


@contextlib.asynccontextmanager
async def _open(
    bench: Bench, name: str, dsn: str | None, url: str | None
) -> AsyncIterator[_Target | None]:
    """The store (and raw side, and peers) of backend ``name``; ``None`` (with a note) when its
    leases are not in this build. Its entries are cleared on exit; the lease records stay, as
    a name's last token is kept for good by design."""
    with contextlib.ExitStack() as stack:
        if name == "memory":
            from fleetmem.backends.memory import InMemoryStore

            store: Any = InMemoryStore(namespace=LEASE_NAMESPACE)
        elif name == "sqlite":
            from fleetmem.backends.sqlite import SQLiteStore

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetmem-bench-"))
            path = Path(folder) / "leases.db"
            store = SQLiteStore(path, namespace=LEASE_NAMESPACE)
        elif name == "postgres":
            from fleetmem.backends.postgres import PostgresStore

            assert dsn is not None
            store = PostgresStore.from_url(dsn, namespace=LEASE_NAMESPACE)
        elif name == "redis":
            from fleetmem.backends.redis import RedisStore

            assert url is not None
            store = RedisStore.from_url(url, namespace=LEASE_NAMESPACE)
        else:
            from fleetmem.factory import open_store

            assert dsn is not None and url is not None
            store = await open_store(hybrid=(dsn, url), namespace=LEASE_NAMESPACE)
        target = _Target(name, store)
        try:
            await store.connect()
            try:
                store.leases.backend  # noqa: B018 - raises when the backend has no leases
            except NotImplementedError as exc:
                bench.report.notes.append(f"{name} leases skipped: {exc}")
                yield None
                return
            if name == "sqlite":
                await _raw_sqlite(target)
            elif name in ("postgres", "hybrid"):
                await _raw_postgres(target)
            elif name == "redis":
                await _raw_redis(target, url or "")
                if bench.peers:
                    await _redis_lock_peers(target, url or "")
            yield target
        finally:
            for close in reversed(target.on_close):
                with contextlib.suppress(Exception):
                    await close()
            with contextlib.suppress(Exception):
                await store.clear()
            await store.close()


# --------------------------------------------------------------------------- the raw sides

#: A raw side's grant (name -> token, or None when the lease is live) and release.
RawAcquire = Callable[[str], Awaitable["int | None"]]
RawRelease = Callable[[str, int], Awaitable[bool]]


def _raw_subjects(target: _Target, acquire: RawAcquire, release: RawRelease) -> None:
    """The raw subjects of the pair and the contended load, from a raw grant and release.

    In the contended load the raw side queues its waiters in this process (an
    ``asyncio.Lock`` per name), so each grant is one try: the ceiling of the backend's own
    statements or scripts on this machine, not a lease between processes."""

    async def pair(i: int) -> None:
        token = await acquire("solo")
        assert token is not None
        assert await release("solo", token)

    queues = [asyncio.Lock() for _ in range(NAMES)]

    async def contended(w: int, i: int) -> None:
        name = f"c{w % NAMES}"
        async with queues[w % NAMES]:
            token = await acquire(name)
            assert token is not None
            await asyncio.sleep(0)
            assert await release(name, token)

    target.raw = pair
    target.raw_contended = contended


async def _raw_sqlite(target: _Target) -> None:
    """sqlite3 on a connection of its own to the store's file (WAL, the store's
    ``synchronous``), on a worker thread of its own: the store's thread model, one thread hop
    per statement. The lease backend's grant and release statements, each in a ``BEGIN
    IMMEDIATE`` transaction as the store runs them, the grant synced to disk like the store's
    (the connector's ``synced``); the store's ``acquire`` also reads the row first without the
    write lock (so that waiters do not queue behind writers), which the raw side does not."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    from fleetmem.backends.sqlite.connector import SQL, now_ms

    store = target.store
    await store.get("warm")  # the store creates the file and its tables
    connector = store.kv.connector
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-raw-sqlite")
    conns: list[sqlite3.Connection] = []

    def connect() -> None:
        conn = sqlite3.connect(connector.path, timeout=connector.busy_timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute(f"PRAGMA synchronous = {connector.synchronous.upper()}")
        conns.append(conn)

    await loop.run_in_executor(executor, connect)
    conn = conns[0]
    ns, ttl_ms = LEASE_RAW_NAMESPACE, int(TTL * 1000)

    def in_transaction(sql: str, args: tuple[Any, ...]) -> tuple[Any, int]:
        """Run ``sql`` in ``BEGIN IMMEDIATE`` ... ``COMMIT``: (its first row, rows changed)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(sql, args)
            row = cursor.fetchone()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return row, cursor.rowcount

    def grant(name: str) -> int | None:
        # Synced to disk as the store's grant is (synchronous=FULL around its commit).
        with connector.synced(conn):
            row, _ = in_transaction(SQL["lease_grant"], (ns, name, "bench", now_ms(), ttl_ms))
        return None if row is None else int(row[0])

    def free(name: str, token: int) -> bool:
        return in_transaction(SQL["lease_release"], (ns, name, token, now_ms()))[1] == 1

    async def acquire(name: str) -> int | None:
        return await loop.run_in_executor(executor, grant, name)

    async def release(name: str, token: int) -> bool:
        return await loop.run_in_executor(executor, free, name, token)

    async def close() -> None:
        await loop.run_in_executor(executor, conn.close)
        executor.shutdown(wait=False)

    _raw_subjects(target, acquire, release)
    target.on_close.append(close)


async def _raw_postgres(target: _Target) -> None:
    """asyncpg sending the lease backend's own two statements of ``sql/leases.sql`` with the
    store's arguments (the release's ``pg_notify`` channel included). One pair at a time: on
    the connection the store's lone calls use (so both sides talk to the same server process;
    see :mod:`.postgres`), prepared. The contended load: on a pool of its own of as many
    connections as the store's (10), prepared by asyncpg's statement cache."""
    import asyncpg

    store = target.store
    await store.get("warm")  # opens the pool: the lone connection exists from now on
    connector = _postgres_connector(store)
    conn = connector.lone_connection()
    if conn is None:  # pragma: no cover - a store from a URL has its own pool
        raise RuntimeError("the store has no connection of its own to share")
    q = connector.statements("leases.sql")
    acquire_1, release_1 = await conn.prepare(q["acquire"]), await conn.prepare(q["release"])
    ttl_ms, channel, ns = int(TTL * 1000), connector.channel, LEASE_RAW_NAMESPACE

    async def acquire(name: str) -> int | None:
        row = await acquire_1.fetchrow(ns, name, "bench", ttl_ms)
        return None if row is None or row[0] is None else int(row[0])

    async def release(name: str, token: int) -> bool:
        return bool(await release_1.fetch(ns, name, token, channel))

    _raw_subjects(target, acquire, release)
    pool: Any = await asyncpg.create_pool(connector.dsn, min_size=10, max_size=10)
    target.on_close.append(pool.close)

    async def pool_acquire(name: str) -> int | None:
        row = await pool.fetchrow(q["acquire"], ns, name, "bench", ttl_ms)
        return None if row is None or row[0] is None else int(row[0])

    async def pool_release(name: str, token: int) -> bool:
        return bool(await pool.fetch(q["release"], ns, name, token, channel))

    pair = target.raw
    _raw_subjects(target, pool_acquire, pool_release)
    target.raw = pair


def _postgres_connector(store: Any) -> Any:
    """The PostgreSQL connector of a PostgresStore, or of a hybrid's durable tier (whose
    leases and fence checks are PostgreSQL's)."""
    kv = store.kv
    return getattr(kv, "durable", kv).connector


async def _raw_redis(target: _Target, url: str) -> None:
    """redis-py (a client of its own) calling the lease backend's own two scripts, ``acquire``
    and ``release`` of ``lua/leases/``, the way the store sends them: ``FCALL`` of the
    function library on a standalone server (``EVALSHA`` where the store uses plain scripts),
    on the namespace's key prefix ``fm:{<namespace>}:``, with the store's arguments (the
    release's connector id, published with it, one of its own)."""
    import redis.asyncio as aioredis

    from fleetmem.backends.redis.connector import FCALL
    from fleetmem.backends.redis.scripts import LEASE_SCRIPTS

    store = target.store
    # One grant and release through the store first: it loads the function library.
    lease = await store.leases.acquire("warm", owner="bench", ttl=TTL)
    assert lease is not None and await store.leases.release(lease)
    connector = store.kv.connector
    client: Any = aioredis.from_url(url)
    target.on_close.append(client.aclose)
    scripts = LEASE_SCRIPTS["acquire"], LEASE_SCRIPTS["release"]
    if connector.form == FCALL:
        command, (acquire_id, release_id) = "FCALL", (s.function for s in scripts)
    else:
        command, (acquire_id, release_id) = "EVALSHA", (s.sha for s in scripts)
    key = f"fm:{{{LEASE_RAW_NAMESPACE}}}:".encode()
    ttl_ms = int(TTL * 1000)

    async def acquire(name: str) -> int | None:
        res = await client.execute_command(command, acquire_id, 1, key, name, "bench", ttl_ms)
        return int(res[1]) if res[0] == 1 else None

    origin = os.urandom(8).hex()  # a connector id of its own in the release's message

    async def release(name: str, token: int) -> bool:
        res = await client.execute_command(command, release_id, 1, key, name, token, origin)
        return bool(res == 1)

    _raw_subjects(target, acquire, release)


async def _redis_lock_peers(target: _Target, url: str) -> None:
    """redis-py's asyncio ``Lock`` (``SET NX PX`` to take, a token-checking script to give
    back; a blocked ``acquire`` polls every ``sleep`` seconds) on keys ``rawlock:*``."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)

    async def pair(i: int) -> None:
        lock = client.lock("rawlock:solo", timeout=TTL)
        assert await lock.acquire(blocking=False)
        await lock.release()

    def contended(sleep: float) -> Op2:
        async def op(w: int, i: int) -> None:
            lock = client.lock(f"rawlock:c{w % NAMES}", timeout=TTL, sleep=sleep)
            assert await lock.acquire(blocking=True, blocking_timeout=WAIT)
            await asyncio.sleep(0)
            await lock.release()

        return op

    target.peers_pair["redis-py Lock"] = pair
    target.peers_contended["redis-py Lock"] = contended(0.1)
    target.peers_contended["redis-py Lock 1ms"] = contended(0.001)
    target.on_close.append(client.aclose)


async def _bench_backend(bench: Bench, target: _Target) -> None:
    store, b = target.store, target.name
    leases = store.leases

    async def fm_pair(i: int) -> None:
        lease = await leases.acquire("solo", owner="bench", ttl=TTL)
        assert lease is not None
        assert await leases.release(lease)

    pair: dict[str, Op1] = {"fleetmem": fm_pair}
    if target.raw is not None:
        pair["raw"] = target.raw
    await single(bench, f"{b} lease acquire+release", pair, target.peers_pair)

    held = await leases.acquire("fence", owner="bench", ttl=3600)
    assert held is not None

    async def fenced(i: int) -> Any:
        return await store.set(FENCED_KEYS[i % len(FENCED_KEYS)], VALUE, fence=held)

    async def unfenced(i: int) -> Any:
        return await store.set(FENCED_KEYS[i % len(FENCED_KEYS)], VALUE)

    await single(bench, f"{b} set fenced", {"fleetmem": fenced, "unfenced": unfenced})
    await leases.release(held)

    async def fm_contended(w: int, i: int) -> None:
        lease = await leases.acquire(f"c{w % NAMES}", owner=f"w{w}", ttl=TTL, wait=WAIT)
        assert lease is not None, "a contended acquire waited in vain"
        await asyncio.sleep(0)
        await leases.release(lease)

    subjects: dict[str, Op2] = {"fleetmem": fm_contended}
    if target.raw_contended is not None:
        subjects["raw"] = target.raw_contended
    subjects.update(target.peers_contended)
    await contended(bench, f"{b} lease 64 coroutines 8 names", subjects)


async def single(
    bench: Bench, workload: str, subjects: dict[str, Op1], peers: dict[str, Op1] | None = None
) -> None:
    """Like :meth:`Bench.single`, for any set of subjects: ``subjects`` interleaved call by
    call (the target's pair), then, with ``peers``, a second pass of all of them recorded as
    ``<workload> (with peers)``."""
    bench.progress.step(workload)
    # A third of the other single-call workloads' calls (1,000 in a full run): a lease pair is
    # two durable commits on PostgreSQL and SQLite.
    n = max(10, bench.n_single // 3)
    everyone = {**subjects, **(peers or {})}
    passes = [(workload, subjects)]
    if peers:
        passes.append((f"{workload} (with peers)", everyone))
    for op in everyone.values():  # warm up (prepared statements, connections, scripts)
        await sequential_latency(op, min(n, bench.sizes.warm_single))
    for label, group in passes:
        lat: dict[str, list[float]] = {s: [] for s in group}
        rate: dict[str, list[float]] = {s: [] for s in group}
        for rep in range(bench.reps):
            gc.collect()
            figures = await interleaved_latency(group, n, seed=rep)
            for name, (p50, ops) in figures.items():
                lat[name].append(p50)
                rate[name].append(ops)
        bench.record(label + " p50", "us", lat)
        bench.record(label, "ops/s", rate)


def contended_per_worker(bench: Bench) -> int:
    """Acquisitions per coroutine and repetition of the contended load: a tenth of the other
    64-coroutine loads' calls (30 in a full run: 1,920 acquisitions a repetition), as each is
    a durable commit or two plus the waiters' tries."""
    return max(2, bench.sizes.per_worker // 10)


async def contended(bench: Bench, workload: str, subjects: dict[str, Op2]) -> None:
    """Like :meth:`Bench.concurrent`, with :func:`contended_per_worker` calls per coroutine:
    acquisitions/s (``ops/s``) and the p50/p99 of one acquire-hold-release."""
    bench.progress.step(workload)
    per = contended_per_worker(bench)
    p50s: dict[str, list[float]] = {s: [] for s in subjects}
    p99s: dict[str, list[float]] = {s: [] for s in subjects}

    def runner(name: str) -> Callable[[], Awaitable[float]]:
        async def go() -> float:
            ops, p50, p99 = await concurrent_load(subjects[name], WORKERS, per)
            p50s[name].append(p50)
            p99s[name].append(p99)
            return ops

        return go

    for name in subjects:  # warm up
        await concurrent_load(subjects[name], WORKERS, 1)
    gc.collect()
    bench.record(workload, "ops/s", await alternate(bench.reps, {n: runner(n) for n in subjects}))
    bench.record(workload + " p50", "us", p50s)
    bench.record(workload + " p99", "us", p99s)


def _verdicts(bench: Bench) -> None:
    """A note per lease target measured: its figure and whether it was met."""
    report = bench.report
    for b in BACKENDS:
        for suffix, subject, ref, kind, bound, text in _TARGETS:
            mine, theirs = report.get(f"{b} {suffix}", subject), report.get(f"{b} {suffix}", ref)
            if mine is None or theirs is None or not mine.values or not theirs.values:
                continue
            value = mine.median / theirs.median
            ok = value <= bound if kind == "le" else value >= bound
            report.notes.append(
                f"lease target {b} {suffix.removesuffix(' p50')} {text}: {value:.2f} "
                f"({'met' if ok else 'NOT met'})"
            )
        floor = _CONTENDED_TARGETS.get(b)
        row: Measurement | None = report.get(f"{b} lease 64 coroutines 8 names", "fleetmem")
        if floor is not None and row is not None and row.values:
            ok = row.median >= floor
            report.notes.append(
                f"lease target {b} 64 coroutines on 8 names ≥ {floor:,.0f} acquisitions/s: "
                f"{row.median:,.0f} ({'met' if ok else 'NOT met'})"
            )
