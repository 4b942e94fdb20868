"""``fleetmem_namespace`` on servers given by URL: what a test wrote there is gone afterwards.

An inner pytest run (``pytester``, in a subprocess) gets this run's harness servers through
``FLEETMEM_TEST_REDIS_URL`` / ``FLEETMEM_TEST_POSTGRES_URL``, so for it they are not owned and
never flushed. Its tests write to their ``fleetmem_namespace`` with the stores a user's tests
would open, and close them without clearing; this test then looks at the servers directly.
"""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as redis

from fleetmem.testing.servers import RedisServer

pytest_plugins = ["pytester"]

INNER = """
import os
from pathlib import Path

import pytest

WRITERS = os.environ["INNER_WRITERS"].split(",")


def _stores(namespace):
    postgres_url = os.environ.get("FLEETMEM_TEST_POSTGRES_URL")
    redis_url = os.environ.get("FLEETMEM_TEST_REDIS_URL")
    if "redis" in WRITERS:
        from fleetmem.backends.redis import RedisStore

        yield RedisStore.from_url(redis_url, namespace=namespace)
    if "postgres" in WRITERS:
        from fleetmem.backends.postgres import PostgresStore

        yield PostgresStore.from_url(postgres_url, namespace=namespace)
    if "hybrid" in WRITERS:
        from fleetmem.backends.hybrid import HybridStore

        yield HybridStore.from_urls(postgres_url, redis_url, namespace=namespace)


@pytest.mark.asyncio
@pytest.mark.parametrize("n", [1, 2])
async def test_write_and_leave(fleetmem_namespace, n):
    with Path(os.environ["INNER_NAMESPACES"]).open("a") as out:
        out.write(fleetmem_namespace + "\\n")
    for store in _stores(fleetmem_namespace):
        await store.connect()
        await store.set(f"k{n}", {"n": n})
        await store.set("other", n, partition="p", ttl=600)
        assert await store.get(f"k{n}") == {"n": n}
        await store.close()  # closed, not cleared: the plugin's teardown clears
"""


def _inner_run(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    writers: str,
    *,
    postgres_url: str | None,
    redis_url: str | None,
) -> list[str]:
    """Run the inner tests with these servers given; the namespaces they used."""
    namespaces = pytester.path / "namespaces.txt"
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "FLEETMEM_TEST_POSTGRES_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FLEETMEM_TEST_REDIS_URL", raising=False)
    if postgres_url is not None:
        monkeypatch.setenv("FLEETMEM_TEST_POSTGRES_URL", postgres_url)
    if redis_url is not None:
        monkeypatch.setenv("FLEETMEM_TEST_REDIS_URL", redis_url)
    monkeypatch.setenv("INNER_WRITERS", writers)
    monkeypatch.setenv("INNER_NAMESPACES", str(namespaces))
    # Only the plugins this needs: the others would just slow the run down.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "pytest_asyncio.plugin", "-p", "fleetmem.testing.plugin", "-p", "no:cacheprovider"
    )
    assert result.parseoutcomes() == {"passed": 2}, result.stdout.str()
    used = namespaces.read_text().split()
    assert len(set(used)) == 2
    return used


async def _redis_keys_of(url: str, namespace: str) -> list[bytes]:
    """Every key naming ``namespace``: its data (``fm:{ns}:...``) and the hybrid's copies and
    epochs (``fmh:{ns}:...``)."""
    client = redis.Redis.from_url(url)
    try:
        return [key async for key in client.scan_iter(match=f"*{{{namespace}}}*")]
    finally:
        await client.aclose()


async def _postgres_rows_of(dsn: str, namespace: str) -> int:
    """Rows of ``namespace``, and rows of fleetmem's own naming it, except the hybrid's epoch
    row: the namespace's coherence high-water mark, which outlives its data by design."""
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM fleetmem.entries WHERE (namespace = $1 OR strpos(key, $1) > 0)"
            " AND NOT (namespace = '_fleetmem.hybrid' AND key = 'epoch/' || $1)",
            namespace,
        )
        return count
    finally:
        await conn.close()


async def test_redis_and_postgres_given_keep_nothing_of_the_namespaces(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    fleetmem_redis_server: RedisServer,
    fleetmem_postgres_database: str,
) -> None:
    used = _inner_run(
        pytester,
        monkeypatch,
        "redis,postgres,hybrid",
        postgres_url=fleetmem_postgres_database,
        redis_url=fleetmem_redis_server.url,
    )
    for namespace in used:
        assert await _redis_keys_of(fleetmem_redis_server.url, namespace) == []
        assert await _postgres_rows_of(fleetmem_postgres_database, namespace) == 0

    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.backends.redis import RedisStore

    for store in (
        RedisStore.from_url(fleetmem_redis_server.url),
        PostgresStore.from_url(fleetmem_postgres_database),
    ):
        async with store:
            assert not set(used) & set(await store.namespaces())


async def test_postgres_alone_given_keeps_nothing_of_the_namespaces(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    fleetmem_postgres_database: str,
) -> None:
    used = _inner_run(
        pytester, monkeypatch, "postgres", postgres_url=fleetmem_postgres_database, redis_url=None
    )
    for namespace in used:
        assert await _postgres_rows_of(fleetmem_postgres_database, namespace) == 0


async def test_a_database_without_fleetmem_schema_is_left_without_it(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    fleetmem_redis_server: RedisServer,
    fleetmem_postgres_empty_database: str,
) -> None:
    used = _inner_run(
        pytester,
        monkeypatch,
        "redis",
        postgres_url=fleetmem_postgres_empty_database,
        redis_url=fleetmem_redis_server.url,
    )
    for namespace in used:
        assert await _redis_keys_of(fleetmem_redis_server.url, namespace) == []
    conn = await asyncpg.connect(fleetmem_postgres_empty_database)
    try:
        assert await conn.fetchval("SELECT to_regnamespace('fleetmem')") is None
    finally:
        await conn.close()
