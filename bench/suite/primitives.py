"""``--only namespaces,sync``: the ``namespaces()`` and ``fleetmem.sync`` workloads alone.

The same workloads the postgres and redis sections end with, on the same data: the namespace
``bench`` holding 20,000 entries (the sections' 10,000 single-call keys and 10,000 batch keys)
beside the 1,000 small namespaces ``namespaces()`` lists, and, for the sync facade, the raw
side's 10,000 ``raw:<key>`` strings. Measured without the minutes the other workloads take.
"""

from __future__ import annotations

import contextlib

from .postgres import bench_namespaces as postgres_namespaces
from .postgres import langgraph_peer
from .redis import bench_namespaces as redis_namespaces
from .redis import bench_sync_get, raw_namespace_keys
from .workloads import VALUE, VALUE_BYTES, Bench, chunked, clear_namespaces

#: The keys of the namespace ``bench`` in the postgres and redis sections.
BENCH_KEYS = [f"k{i:06d}" for i in range(10_000)] + [f"b{i:06d}" for i in range(10_000)]


async def bench_primitives(bench: Bench, dsn: str | None, url: str | None, which: set[str]) -> None:
    """Run the ``namespaces`` (PostgreSQL and Redis) and ``sync`` (Redis) workloads named in
    ``which``, on the servers given."""
    if dsn is not None and "namespaces" in which:
        await _postgres(bench, dsn)
    if url is not None and which & {"namespaces", "sync"}:
        await _redis(bench, url, which)


async def _postgres(bench: Bench, dsn: str) -> None:
    from fleetmem.backends.postgres import PostgresStore

    store = await PostgresStore.from_url(dsn, namespace="bench").connect()
    lg = await langgraph_peer(bench, dsn) if bench.peers else None
    try:
        await store.clear()
        await store.set_many(dict.fromkeys(BENCH_KEYS, VALUE))
        if lg is not None:
            for chunk in chunked(BENCH_KEYS, 10_000):  # a statement takes 65,535 parameters
                await lg.put_many(chunk)
        await store.get(BENCH_KEYS[0])
        conn = store.kv.connector.lone_connection()
        if conn is None:  # pragma: no cover - a store from a URL has its own pool
            raise RuntimeError("the store has no connection of its own to share")
        await postgres_namespaces(bench, store, conn, lg)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        with contextlib.suppress(Exception):
            await clear_namespaces(store)
        if lg is not None:
            await lg.close()
        await store.close()


async def _redis(bench: Bench, url: str, which: set[str]) -> None:
    import redis.asyncio as aioredis

    from fleetmem.backends.redis import RedisStore

    raw = aioredis.from_url(url)
    store = await RedisStore.from_url(url, namespace="bench").connect()
    raw_keys = [f"raw:{k}" for k in BENCH_KEYS]
    try:
        await store.clear()
        await store.set_many(dict.fromkeys(BENCH_KEYS, VALUE))
        await raw.mset(dict.fromkeys(raw_keys, VALUE_BYTES))
        if "namespaces" in which:
            await redis_namespaces(bench, raw, store)
        if "sync" in which:
            await bench_sync_get(bench, url, raw, store, BENCH_KEYS[:10_000])
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        with contextlib.suppress(Exception):
            await clear_namespaces(store)
        with contextlib.suppress(Exception):
            for chunk in chunked(raw_keys + raw_namespace_keys(), 5000):
                await raw.delete(*chunk)
        await store.close()
        await raw.aclose()
