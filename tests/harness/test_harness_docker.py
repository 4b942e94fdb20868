"""The container providers (run only where a Docker engine answers)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
from harness_clients import pg_execute, pg_fetchval, redis_client

from fleetmem.testing.servers import (
    PostgresServer,
    RedisServer,
    docker_available,
    start_postgres_container,
    start_redis_container,
)

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not docker_available(), reason="no Docker engine answers"),
]


@pytest.fixture(scope="module")
def pg_container() -> Iterator[PostgresServer]:
    server = start_postgres_container()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_container() -> Iterator[RedisServer]:
    server = start_redis_container(appendonly=True)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.postgres
async def test_postgres_container_survives_kill_and_pause(pg_container: PostgresServer) -> None:
    assert pg_container.owned
    token = secrets.token_hex(8)
    await pg_execute(pg_container.dsn, "CREATE TABLE IF NOT EXISTS kept (token text)")
    await pg_execute(pg_container.dsn, "INSERT INTO kept VALUES ($1)", token)
    port = pg_container.port
    pg_container.kill()
    pg_container.start()
    assert pg_container.port == port
    found = "SELECT count(*) FROM kept WHERE token = $1"
    assert await pg_fetchval(pg_container.dsn, found, token) == 1
    pg_container.restart("immediate")
    assert await pg_fetchval(pg_container.dsn, found, token) == 1
    pg_container.pause()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await pg_fetchval(pg_container.dsn, "SELECT 1", timeout=0.5)
    finally:
        pg_container.resume()
    assert await pg_fetchval(pg_container.dsn, "SELECT 1") == 1


@pytest.mark.redis
async def test_redis_container_keeps_aof_data_across_kill(redis_container: RedisServer) -> None:
    assert redis_container.owned
    key = f"harness:{secrets.token_hex(6)}"
    client = redis_client(redis_container.host, redis_container.port)
    try:
        await client.set(key, "kept")
    finally:
        await client.aclose()
    redis_container.kill()
    redis_container.start()
    client = redis_client(redis_container.host, redis_container.port)
    try:
        assert await client.get(key) == b"kept"
    finally:
        await client.aclose()
