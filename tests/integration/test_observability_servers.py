"""``fleetmem.observability`` on PostgreSQL, Redis and the hybrid: span attributes naming the
server, the pool gauge, and the hybrid's cache hits and misses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from fleetmem import open_store
from fleetmem.observability import instrument, instrumentation_of

SECRET_KEY = "k-narwhal-4410"
SECRET_VALUE = "v-axolotl-9032"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest_asyncio.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("hybrid", marks=(pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis)),
    ]
)
async def served(
    request: pytest.FixtureRequest, fleetmem_namespace: str
) -> AsyncIterator[tuple[Any, str, int]]:
    """(a connected store, the server host and port its spans must name)."""
    kind = request.param
    if kind == "redis":
        rs = request.getfixturevalue("fleetmem_redis_server")
        store = await open_store(rs.url, namespace=fleetmem_namespace)
        host, port = rs.host, rs.port
    else:
        pg = request.getfixturevalue("fleetmem_postgres_server")
        host, port = pg.host, pg.port
        if kind == "postgres":
            store = await open_store(pg.dsn, namespace=fleetmem_namespace)
        else:
            rs = request.getfixturevalue("fleetmem_redis_server")
            store = await open_store(hybrid=(pg.dsn, rs.url), namespace=fleetmem_namespace)
    try:
        yield store, host, port
    finally:
        inst = instrumentation_of(store)
        if inst is not None:
            inst.uninstrument()
        await store.clear()
        await store.close()


async def test_spans_name_the_server(
    served: tuple[Any, str, int], spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    store, host, port = served
    provider, exporter = spans
    registry = CollectorRegistry()
    instrument(store, registry=registry, tracer_provider=provider)
    await store.set(SECRET_KEY, {"v": SECRET_VALUE})
    assert await store.get(SECRET_KEY) == {"v": SECRET_VALUE}
    await store.queue("jobs").put({"v": SECRET_VALUE})
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == [
        f"set {store.namespace}",
        f"get {store.namespace}",
        f"queue.put {store.namespace}",
    ]
    system = "redis" if store.backend == "redis" else "postgresql"
    for span in finished:
        attrs = dict(span.attributes or {})
        assert attrs["db.system.name"] == system
        assert attrs["server.address"] == host
        assert attrs["server.port"] == port
        assert attrs["db.namespace"] == store.namespace
        assert attrs["fleetmem.backend"] == store.backend
        assert SECRET_KEY not in repr(attrs) and SECRET_VALUE not in repr(attrs)
    text = generate_latest(registry).decode()
    assert SECRET_KEY not in text and SECRET_VALUE not in text
    get = registry.get_sample_value(
        "fleetmem_operations_total",
        {"backend": store.backend, "operation": "get", "outcome": "ok"},
    )
    assert get == 1


async def test_pool_connections_are_read_on_scrape(served: tuple[Any, str, int]) -> None:
    store, _, _ = served
    registry = CollectorRegistry()
    instrument(store, registry=registry)
    await store.set("p", 1)
    await store.get("p")
    techs = {"postgres": ["postgres"], "redis": ["redis"], "hybrid": ["postgres", "redis"]}
    for tech in techs[store.backend]:
        idle = registry.get_sample_value(
            "fleetmem_pool_connections", {"backend": tech, "state": "idle"}
        )
        busy = registry.get_sample_value(
            "fleetmem_pool_connections", {"backend": tech, "state": "busy"}
        )
        assert idle is not None and busy is not None, tech
        assert idle + busy >= 1, tech  # a connection was opened and is back in the pool
        assert busy == 0, tech  # nothing is running now


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
async def test_hybrid_cache_hits_and_misses(
    fleetmem_postgres_server: Any, fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    store = await open_store(
        hybrid=(fleetmem_postgres_server.dsn, fleetmem_redis_server.url),
        namespace=fleetmem_namespace,
    )
    registry = CollectorRegistry()
    try:
        instrument(store, registry=registry)

        def cache(result: str) -> float:
            value = registry.get_sample_value("fleetmem_cache_requests_total", {"result": result})
            return value or 0.0

        hits, misses = cache("hit"), cache("miss")
        await store.set("c", 1)
        assert await store.get("c") == 1  # the first read fills the cache
        assert await store.get("c") == 1
        assert await store.get("c") == 1
        assert cache("miss") - misses >= 1
        assert cache("hit") - hits >= 2
        ops = registry.get_sample_value(
            "fleetmem_operations_total", {"backend": "hybrid", "operation": "get", "outcome": "ok"}
        )
        assert ops == 3
    finally:
        inst = instrumentation_of(store)
        if inst is not None:
            inst.uninstrument()
        await store.clear()
        await store.close()
