"""The one table of backends that drives every cross-backend test.

``store`` yields a fresh, empty store in a namespace of its own, once per backend. A backend
joins the conformance suite by adding one entry to ``BACKENDS``. The real-server fixtures
(``fleetmem_postgres_server``, ``fleetmem_redis_server``, ``fleetmem_namespace``) come from the
``fleetmem.testing`` pytest plugin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetmem import InMemoryStore, MemoryStore
from fleetmem.testing import connected_store

StoreFactory = Callable[[pytest.FixtureRequest, str], Awaitable[Any]]


async def _memory(request: pytest.FixtureRequest, namespace: str) -> MemoryStore:
    return InMemoryStore(namespace=namespace)


async def _sqlite(request: pytest.FixtureRequest, namespace: str) -> MemoryStore:
    from fleetmem.backends.sqlite import SQLiteStore

    tmp_path: Path = request.getfixturevalue("tmp_path")
    store = SQLiteStore(tmp_path / "fleetmem.db", namespace=namespace)
    return await store.connect()


async def _postgres(request: pytest.FixtureRequest, namespace: str) -> MemoryStore:
    from fleetmem.backends.postgres import PostgresStore

    server = request.getfixturevalue("fleetmem_postgres_server")
    store = PostgresStore.from_url(server.dsn, namespace=namespace)
    return await store.connect()


async def _redis(request: pytest.FixtureRequest, namespace: str) -> MemoryStore:
    from fleetmem.backends.redis import RedisStore

    server = request.getfixturevalue("fleetmem_redis_server")
    store = RedisStore.from_url(server.url, namespace=namespace)
    return await store.connect()


async def _hybrid(request: pytest.FixtureRequest, namespace: str) -> MemoryStore:
    from fleetmem.backends.hybrid import HybridStore

    pg = request.getfixturevalue("fleetmem_postgres_server")
    rs = request.getfixturevalue("fleetmem_redis_server")
    store = HybridStore.from_urls(pg.dsn, rs.url, namespace=namespace)
    return await store.connect()


#: name -> (factory, pytest marks). Order is the order tests run in.
BACKENDS: dict[str, tuple[StoreFactory, tuple[pytest.MarkDecorator, ...]]] = {
    "memory": (_memory, (pytest.mark.memory,)),
    "sqlite": (_sqlite, (pytest.mark.sqlite,)),
    "redis": (_redis, (pytest.mark.redis,)),
    "postgres": (_postgres, (pytest.mark.postgres,)),
    "hybrid": (_hybrid, (pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis)),
}


def backend_params(names: list[str] | None = None) -> list[Any]:
    """``pytest.param`` objects for ``names`` (default: every backend), marked per backend."""
    return [
        pytest.param(name, marks=BACKENDS[name][1], id=name)
        for name in (names if names is not None else list(BACKENDS))
    ]


async def _fresh_store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Any]:
    factory = BACKENDS[request.param][0]
    async with connected_store(await factory(request, namespace)) as created:
        yield created


@pytest.fixture(params=backend_params())
async def store(request: pytest.FixtureRequest, fleetmem_namespace: str) -> AsyncIterator[Any]:
    """A fresh, empty store on each backend, in a namespace no other test uses."""
    async for created in _fresh_store(request, fleetmem_namespace):
        yield created


@pytest.fixture(params=backend_params(["sqlite", "redis", "postgres", "hybrid"]))
async def out_of_process_store(
    request: pytest.FixtureRequest, fleetmem_namespace: str
) -> AsyncIterator[Any]:
    """``store`` on the backends that keep their data outside the Python process."""
    async for created in _fresh_store(request, fleetmem_namespace):
        yield created
