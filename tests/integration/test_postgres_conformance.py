"""The conformance suite on ``PostgresStore`` built from an injected asyncpg pool.

(The URL-built store runs the same suite through the ``store`` fixture of tests/conftest.py.)
The pool is created by the test, so the store must leave it open after ``close()``. The fenced
writes run once more on a table the planner knows to be empty, where it scans sequentially.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetmem.testing import connected_store
from fleetmem.testing.conformance import FencedWritesConformance, StoreConformance

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")


@pytest.fixture
async def store(fleetmem_postgres_server: Any, fleetmem_namespace: str) -> AsyncIterator[Any]:
    from fleetmem.backends.postgres import PostgresStore, init_connection

    pool = await asyncpg.create_pool(
        fleetmem_postgres_server.dsn, min_size=1, max_size=10, init=init_connection
    )
    try:
        async with connected_store(PostgresStore(pool=pool, namespace=fleetmem_namespace)) as s:
            yield s
        # The store never closes a pool it did not create.
        assert not pool._closed
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


class TestPostgresStoreOnInjectedPool(StoreConformance):
    pass


@pytest.mark.hybrid
@pytest.mark.redis
class TestHybridStoreOnInjectedTiers(StoreConformance):
    """``HybridStore(PostgresStore(pool=...), RedisStore(client=...))``: tiers the caller made
    and keeps (closing the hybrid store closes neither the pool nor the client)."""

    @pytest.fixture
    async def store(
        self, fleetmem_postgres_server: Any, fleetmem_redis_server: Any, fleetmem_namespace: str
    ) -> AsyncIterator[Any]:
        import redis.asyncio as aioredis

        from fleetmem.backends.hybrid import HybridStore
        from fleetmem.backends.postgres import PostgresStore, init_connection
        from fleetmem.backends.redis import RedisStore

        pool = await asyncpg.create_pool(
            fleetmem_postgres_server.dsn, min_size=1, max_size=10, init=init_connection
        )
        # A timeout a busy host meets: the check below that nothing fell back is about the
        # injected tiers, not speed.
        client = aioredis.Redis.from_url(fleetmem_redis_server.url, socket_timeout=2.0)
        try:
            durable = PostgresStore(pool=pool, namespace=fleetmem_namespace)
            cache = RedisStore(client=client, namespace=fleetmem_namespace)
            async with connected_store(HybridStore(durable, cache)) as created:
                yield created
            metrics = created.metrics
            assert metrics.cache_errors == 0 and metrics.fallbacks == 0, metrics
            assert await pool.fetchval("SELECT 1") == 1
            assert await client.ping() is True
        finally:
            await client.aclose()
            await pool.close()


class TestPostgresFencesOnAnEmptyTable(FencedWritesConformance):
    """Fenced writes on a table whose statistics say it is empty (a new deployment, or one
    that ``clear()`` and autovacuum emptied): the planner then scans it sequentially, and the
    fence must still be checked when no row reaches the write's own conditions (a fenced
    ``delete_many`` of absent keys, a ``compare_and_set`` that would conflict)."""

    @pytest.fixture
    async def store(
        self, fleetmem_postgres_database: str, fleetmem_namespace: str
    ) -> AsyncIterator[Any]:
        from fleetmem.backends.postgres import PostgresStore

        dsn = fleetmem_postgres_database  # a database of this test's own
        async with connected_store(PostgresStore.from_url(dsn, namespace=fleetmem_namespace)) as s:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("VACUUM ANALYZE fleetmem.entries")
            finally:
                await conn.close()
            yield s
