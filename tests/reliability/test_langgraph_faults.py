"""The LangGraph adapter when its servers fail: a PostgreSQL restarted or stopped under it, and
the hybrid's Redis killed. LangGraph code sees fleetmem's errors (``BackendUnavailableError``,
a ``ConnectionError``), never a hang, loses no acknowledged write and works again once the
server is back -- whatever the adapter adds on top of the store must not change that."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from fleetmem import BackendUnavailableError

pytest.importorskip("langgraph")
pytest.importorskip("asyncpg")

from fleetmem.backends.hybrid import HybridStore
from fleetmem.backends.postgres import PostgresStore
from fleetmem.integrations.langgraph import FleetmemStore
from fleetmem.testing.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.slow]

NS = ("memories", "u1")


@pytest.fixture
def pg_victim(fleetmem_postgres_factory: Callable[..., Any]) -> Iterator[Any]:
    """A PostgreSQL of this test's own (the shared one is never stopped)."""
    server = fleetmem_postgres_factory()
    try:
        yield server
    finally:
        server.start()


async def _write_and_read(adapter: FleetmemStore, start: int, count: int) -> None:
    for i in range(start, start + count):
        await adapter.aput(NS, f"k{i}", {"i": i})
        item = await adapter.aget(NS, f"k{i}")
        assert item is not None and item.value == {"i": i}


@pytest.mark.postgres
async def test_postgres_restarted_under_the_adapter(
    pg_victim: Any, fleetmem_namespace: str
) -> None:
    """A restart between calls costs no call: the pool reconnects underneath."""
    async with PostgresStore.from_url(
        pg_victim.dsn, namespace=fleetmem_namespace, min_size=2, max_size=2
    ) as store:
        adapter = FleetmemStore(store)
        await _write_and_read(adapter, 0, 10)
        await asyncio.to_thread(pg_victim.restart)
        await _write_and_read(adapter, 10, 10)
        found = await adapter.asearch(NS, limit=100)
        assert sorted(item.value["i"] for item in found) == list(range(20))
        assert await adapter.alist_namespaces() == [NS]
        await store.clear()


@pytest.mark.postgres
async def test_postgres_stopped_then_started(pg_victim: Any, fleetmem_namespace: str) -> None:
    """While the server is down every call -- async, sync from a thread, search, listing --
    raises BackendUnavailableError within the store's timeouts; the writes acknowledged
    before are all there once it is back, and the adapter works again."""
    async with PostgresStore.from_url(
        pg_victim.dsn,
        namespace=fleetmem_namespace,
        max_size=2,
        acquire_timeout=1.0,
        command_timeout=2.0,
    ) as store:
        adapter = FleetmemStore(store)
        await _write_and_read(adapter, 0, 5)
        await asyncio.to_thread(pg_victim.stop)
        calls: list[Callable[[], Any]] = [
            lambda: adapter.aput(NS, "down", {"v": 1}),
            lambda: adapter.aget(NS, "k0"),
            lambda: adapter.asearch(NS),
            lambda: adapter.alist_namespaces(),
            lambda: asyncio.to_thread(adapter.get, NS, "k1"),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailableError):
                await asyncio.wait_for(call(), timeout=60)
        await asyncio.to_thread(pg_victim.start)
        found = await adapter.asearch(NS, limit=100)
        assert sorted(item.value["i"] for item in found) == list(range(5))
        await _write_and_read(adapter, 5, 5)
        await store.clear()


@pytest.fixture
async def redis_victim(
    fleetmem_redis_factory: Callable[..., RedisServer],
) -> AsyncIterator[RedisServer]:
    server = fleetmem_redis_factory()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
async def test_hybrid_keeps_serving_the_adapter_with_redis_killed(
    fleetmem_postgres_server: PostgresServer,
    redis_victim: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """The hybrid's promise through the adapter: with its cache dead, gets, puts, searches
    and listings go on against PostgreSQL and read every acknowledged write."""
    async with HybridStore.from_urls(
        fleetmem_postgres_server.dsn, redis_victim.url, namespace=fleetmem_namespace
    ) as store:
        adapter = FleetmemStore(store)
        await _write_and_read(adapter, 0, 10)
        redis_victim.kill()
        await _write_and_read(adapter, 10, 10)
        found = await adapter.asearch(NS, limit=100)
        assert sorted(item.value["i"] for item in found) == list(range(20))
        assert await adapter.alist_namespaces(prefix=("memories",)) == [NS]
        await store.clear()
