"""The Redis providers: shared server, dedicated servers, the cluster, and fault handles."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from harness_clients import redis_client

from fleetmem.testing.servers import HarnessError, RedisCluster, RedisServer, redis_command

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def aof_server(fleetmem_redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """One dedicated AOF server for this module's fault tests (never the shared one)."""
    return fleetmem_redis_factory(appendonly=True)


@pytest.fixture
def redis_victim(aof_server: RedisServer) -> Iterator[RedisServer]:
    """The dedicated server, running again after each test whatever the test did to it."""
    yield aof_server
    aof_server.resume()
    aof_server.start()


async def _set_token(server: RedisServer) -> tuple[str, str]:
    key, value = f"harness:{secrets.token_hex(6)}", secrets.token_hex(8)
    client = redis_client(server.host, server.port)
    try:
        assert await client.set(key, value)
    finally:
        await client.aclose()
    return key, value


async def _get(server: RedisServer, key: str) -> bytes | None:
    client = redis_client(server.host, server.port)
    try:
        value = await client.get(key)
    finally:
        await client.aclose()
    assert value is None or isinstance(value, bytes)
    return value


async def test_shared_server_answers(fleetmem_redis_server: RedisServer) -> None:
    server = fleetmem_redis_server
    client = aioredis.Redis.from_url(server.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    if server.owned:
        assert server.port not in (6379, 6380)
        assert server.url == f"redis://{server.host}:{server.port}/0"


async def test_factory_servers_are_new_and_owned(
    fleetmem_redis_server: RedisServer, aof_server: RedisServer
) -> None:
    assert aof_server.owned
    assert aof_server.port != fleetmem_redis_server.port
    client = redis_client(aof_server.host, aof_server.port)
    try:
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        await client.aclose()


async def test_kill_then_start_keeps_aof_data(redis_victim: RedisServer) -> None:
    key, value = await _set_token(redis_victim)
    redis_victim.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await _get(redis_victim, key)
    redis_victim.start()
    assert await _get(redis_victim, key) == value.encode()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_stop_then_start(redis_victim: RedisServer, mode: str) -> None:
    port = redis_victim.port
    key, value = await _set_token(redis_victim)
    redis_victim.stop(mode)
    with pytest.raises(redis.exceptions.ConnectionError):
        await _get(redis_victim, key)
    redis_victim.start()
    assert redis_victim.port == port
    assert await _get(redis_victim, key) == value.encode()


async def test_restart_keeps_data(redis_victim: RedisServer) -> None:
    key, value = await _set_token(redis_victim)
    redis_victim.restart()
    assert await _get(redis_victim, key) == value.encode()


async def test_pause_times_out_clients_until_resume(redis_victim: RedisServer) -> None:
    key, value = await _set_token(redis_victim)
    client = redis_client(redis_victim.host, redis_victim.port, timeout=0.5)
    try:
        assert await client.ping()
        redis_victim.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.get(key)
    finally:
        await client.aclose()
        redis_victim.resume()
    assert await _get(redis_victim, key) == value.encode()


async def test_server_without_aof_loses_data_on_kill(
    fleetmem_redis_factory: Callable[..., RedisServer],
) -> None:
    # The counterpart of the AOF test: it shows that test can fail.
    server = fleetmem_redis_factory()
    key, _ = await _set_token(server)
    server.kill()
    server.start()
    assert await _get(server, key) is None


def test_unknown_stop_mode_is_refused(redis_victim: RedisServer) -> None:
    with pytest.raises(HarnessError, match="unknown stop mode"):
        redis_victim.stop("gentle")


@pytest.mark.cluster
async def test_cluster_serves_keys_from_every_master(fleetmem_redis_cluster: RedisCluster) -> None:
    cluster = fleetmem_redis_cluster
    assert cluster.owned
    assert len(cluster.nodes) == 3
    assert len({port for _, port in cluster.nodes}) == 3
    host, port = cluster.nodes[0]
    assert cluster.url == f"redis://{host}:{port}"
    client = aioredis.RedisCluster.from_url(cluster.url)
    prefix = secrets.token_hex(4)
    try:
        keys = [f"{prefix}:{i}" for i in range(60)]
        for key in keys:
            await client.set(key, key)
        assert [await client.get(key) for key in keys] == [key.encode() for key in keys]
        sizes = []
        for node_host, node_port in cluster.nodes:
            node = redis_client(node_host, node_port)
            try:
                info = redis_command(node_host, node_port, "CLUSTER", "INFO")
                assert b"cluster_state:ok" in info
                sizes.append(await node.dbsize())
            finally:
                await node.aclose()
        assert sum(sizes) >= len(keys)
        assert all(size > 0 for size in sizes)
    finally:
        await client.aclose()
        await asyncio.sleep(0)


def test_a_port_taken_before_start_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from fleetmem.testing import servers

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real = servers.find_free_port
        calls: list[int] = []

        def first_taken(host: str = "127.0.0.1", *, cluster_bus: bool = False) -> int:
            calls.append(1)
            return next(picks, None) or real(host, cluster_bus=cluster_bus)

        monkeypatch.setattr(servers._process, "find_free_port", first_taken)
        server = servers.start_local_redis()
        try:
            assert server.port != taken
            assert len(calls) == 2  # the first start failed on the taken port, the second worked
            assert servers.redis_command(server.host, server.port, "PING") == b"PONG"
        finally:
            server.close()
