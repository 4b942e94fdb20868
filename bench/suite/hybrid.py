"""The hybrid: a cache hit against a raw Redis GET."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

from .workloads import VALUE, VALUE_BYTES, Bench, chunked


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
        for chunk in chunked([f"rawh:{k}" for k in keys], 1000):
            await raw.delete(*chunk)
        await raw.aclose()
