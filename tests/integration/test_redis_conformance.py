"""The conformance suite on ``RedisStore`` from an injected client and on a Redis Cluster.

(The URL-built store on a standalone server runs the same suite through the ``store`` fixture
of tests/conftest.py.) An injected client is created by the test, so the store must leave it
open after ``close()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetmem.testing import connected_store
from fleetmem.testing.conformance import StoreConformance

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")


@pytest.fixture
async def store(fleetmem_redis_server: Any, fleetmem_namespace: str) -> AsyncIterator[Any]:
    from fleetmem.backends.redis import RedisStore

    client = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        async with connected_store(RedisStore(client=client, namespace=fleetmem_namespace)) as s:
            yield s
        # The store never closes a client it did not create.
        assert await client.ping() is True
    finally:
        await client.aclose()


class TestRedisStoreOnInjectedClient(StoreConformance):
    pass


@pytest.mark.cluster
class TestRedisStoreOnCluster(StoreConformance):
    @pytest.fixture
    async def store(
        self, fleetmem_redis_cluster: Any, fleetmem_namespace: str
    ) -> AsyncIterator[Any]:
        from fleetmem.backends.redis import RedisStore

        store = RedisStore.from_url(fleetmem_redis_cluster.url, namespace=fleetmem_namespace)
        async with connected_store(store) as created:
            yield created


@pytest.mark.cluster
@pytest.mark.hybrid
@pytest.mark.postgres
class TestHybridStoreOnRedisCluster(StoreConformance):
    """The hybrid tier's scripts and epochs on a 3-master cluster (one slot per namespace)."""

    @pytest.fixture
    async def store(
        self,
        fleetmem_redis_cluster: Any,
        fleetmem_postgres_server: Any,
        fleetmem_namespace: str,
    ) -> AsyncIterator[Any]:
        from fleetmem.backends.hybrid import HybridStore

        # A deadline a busy host meets (the default 0.25 s is not, with both vCPUs busy): the
        # fixture checks below that no call fell back, which is about the cluster, not speed.
        store = HybridStore.from_urls(
            fleetmem_postgres_server.dsn,
            fleetmem_redis_cluster.url,
            namespace=fleetmem_namespace,
            cache_deadline=2.0,
        )
        async with connected_store(store) as created:
            yield created
        # Every read above went through the cluster (no silent fallback to PostgreSQL).
        metrics = created.metrics
        assert metrics.cache_errors == 0 and metrics.fallbacks == 0, metrics


@pytest.mark.cluster
class TestRedisStoreOnInjectedClusterClient(StoreConformance):
    """``RedisStore(client=RedisCluster(...))``: the kind of client decides the call path."""

    @pytest.fixture
    async def store(
        self, fleetmem_redis_cluster: Any, fleetmem_namespace: str
    ) -> AsyncIterator[Any]:
        from redis.asyncio.cluster import RedisCluster

        from fleetmem.backends.redis import RedisStore

        client = RedisCluster.from_url(fleetmem_redis_cluster.url)
        try:
            async with connected_store(
                RedisStore(client=client, namespace=fleetmem_namespace)
            ) as s:
                yield s
            assert await client.ping() is True
        finally:
            await client.aclose()
