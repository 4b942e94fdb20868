"""The hybrid opened from one URL (``hybrid+postgresql://...?cache=redis://...``), wherever a
URL is taken: ``open_store(url)`` and ``FLEETMEM_URL``. Real PostgreSQL and Redis."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import redis.asyncio as aioredis

from fleetmem import HybridStore, open_store
from fleetmem.testing.servers import RedisServer

pytestmark = [pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis]


def _hybrid_url(postgres_dsn: str, cache_url: str, *, encode: bool = False) -> str:
    cache = quote(cache_url, safe="") if encode else cache_url
    return f"hybrid+{postgres_dsn}?cache={cache}"


async def _cache_keys(server: RedisServer, namespace: str) -> list[bytes]:
    client = aioredis.Redis.from_url(server.url)
    try:
        return [key async for key in client.scan_iter(match=f"*{namespace}*")]
    finally:
        await client.aclose()


@pytest.mark.parametrize("encode", [False, True], ids=["as-is", "percent-encoded"])
async def test_open_store_takes_a_hybrid_url(
    fleetmem_postgres_database: str,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    encode: bool,
) -> None:
    url = _hybrid_url(fleetmem_postgres_database, fleetmem_redis_server.url, encode=encode)
    async with open_store(url + "&cache_ttl=30", namespace=fleetmem_namespace) as store:
        assert isinstance(store, HybridStore)
        assert store.backend == "hybrid"
        await store.set("plan", {"step": 1})
        assert await store.get("plan") == {"step": 1}
        assert await store.get("plan") == {"step": 1}
        # Both tiers are the URL's: the durable copy in PostgreSQL, the cached one in Redis.
        assert await store.durable.get("plan") == {"step": 1}
        assert store.metrics.fills + store.metrics.hits >= 1
        assert await _cache_keys(fleetmem_redis_server, fleetmem_namespace)


async def test_fleetmem_url_takes_a_hybrid_url(
    fleetmem_postgres_database: str,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "FLEETMEM_URL", _hybrid_url(fleetmem_postgres_database, fleetmem_redis_server.url)
    )
    monkeypatch.setenv("FLEETMEM_NAMESPACE", fleetmem_namespace)
    monkeypatch.delenv("FLEETMEM_BACKEND", raising=False)
    async with open_store() as store:
        assert store.backend == "hybrid"
        assert store.namespace == fleetmem_namespace
        await store.set("k", [1, 2])
        assert await store.get("k") == [1, 2]
