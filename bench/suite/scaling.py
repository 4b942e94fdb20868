"""The big namespaces: Redis memory per entry, ``keys(prefix)`` and ``search`` at 10k and 1M."""

from __future__ import annotations

from typing import Any

from .redis import redis_memory
from .results import Measurement
from .timing import sequential_latency
from .workloads import Bench


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
                await redis_memory(bench, raw, redis_store)
                await _prefix_scaling(bench, "redis", redis_store)
        finally:
            await raw.aclose()


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
