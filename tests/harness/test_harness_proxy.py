"""The fault proxy: every fault is seen by a real client talking to a real server."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
import redis.exceptions
from harness_clients import redis_client

from fleetmem.testing.proxy import TcpProxy
from fleetmem.testing.servers import PostgresServer, RedisServer

ProxyFactory = Callable[[str, int], Awaitable[TcpProxy]]

pytestmark = pytest.mark.redis


async def _raw_command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"PING\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), timeout=5)


async def test_forwards_traffic(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    assert proxy.address == (proxy.host, proxy.port)
    assert proxy.host == "127.0.0.1"
    assert proxy.port not in (0, fleetmem_redis_server.port)
    client = redis_client(*proxy.address)
    try:
        key = f"proxy:{secrets.token_hex(6)}"
        await client.set(key, "through", px=60_000)
        assert await client.get(key) == b"through"
    finally:
        await client.aclose()


async def test_latency_delays_each_round_trip(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    client = redis_client(*proxy.address)
    try:
        assert await client.ping()  # connected before the fault
        proxy.set_latency(0.15)
        started = time.monotonic()
        assert await client.ping()
        delayed = time.monotonic() - started
        # 0.15 s on the request and 0.15 s on the reply.
        assert delayed >= 0.3
        proxy.heal()
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started < delayed
    finally:
        await client.aclose()


async def test_blackhole_times_out_clients_until_healed(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    open_client = redis_client(*proxy.address, timeout=0.5)
    new_client = redis_client(*proxy.address, timeout=0.5)
    try:
        assert await open_client.ping()
        proxy.blackhole(True)
        with pytest.raises(redis.exceptions.TimeoutError):
            await open_client.ping()
        with pytest.raises(redis.exceptions.TimeoutError):
            await new_client.ping()  # accepted, but nothing ever comes back
        proxy.blackhole(False)
        healed = redis_client(*proxy.address, timeout=5)
        try:
            assert await healed.ping()
        finally:
            await healed.aclose()
    finally:
        await open_client.aclose()
        await new_client.aclose()


async def test_reset_connections_sends_rst(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        assert await _raw_command(reader, writer) == b"+PONG\r\n"
        proxy.reset_connections()
        # An RST, not an orderly close (which would read as b"").
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), timeout=5)
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    # New connections still work.
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        assert await _raw_command(reader, writer) == b"+PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_reset_is_seen_by_a_redis_client(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    client = redis_client(*proxy.address)
    try:
        first = await client.client_id()
        proxy.reset_connections()
        await asyncio.sleep(0.05)
        try:
            second = await client.client_id()
        except redis.exceptions.ConnectionError:
            return  # redis-py before 8.2 reports the reset on the next call
        # redis-py 8.2 notices the closed socket and connects again before sending: the
        # reset shows as a new server connection.
        assert second != first
    finally:
        await client.aclose()


async def test_cut_replies_after_truncates_the_reply(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    key = f"proxy:{secrets.token_hex(6)}"
    direct = redis_client(fleetmem_redis_server.host, fleetmem_redis_server.port)
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    try:
        await direct.set(key, "x" * 1000, px=60_000)
        proxy.cut_replies_after(100)
        reader, writer = await asyncio.open_connection(*proxy.address)
        try:
            name = key.encode()
            writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name))
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), timeout=5)  # until EOF
        finally:
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
        assert reply == (b"$1000\r\n" + b"x" * 1000)[:100]
        client = redis_client(*proxy.address)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await client.get(key)
        finally:
            await client.aclose()
        proxy.heal()
        client = redis_client(*proxy.address)
        try:
            assert await client.get(key) == b"x" * 1000
        finally:
            await client.aclose()
    finally:
        await direct.delete(key)
        await direct.aclose()


async def test_close_stops_listening(
    fleetmem_redis_server: RedisServer, fleetmem_proxy: ProxyFactory
) -> None:
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    reader, writer = await asyncio.open_connection(*proxy.address)
    assert await _raw_command(reader, writer) == b"+PONG\r\n"
    await proxy.close()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    with pytest.raises(OSError):
        await asyncio.open_connection(*proxy.address)


@pytest.mark.postgres
async def test_asyncpg_through_the_proxy_sees_each_fault(
    fleetmem_postgres_server: PostgresServer, fleetmem_proxy: ProxyFactory
) -> None:
    server = fleetmem_postgres_server
    proxy = await fleetmem_proxy(server.host, server.port)
    dsn = server.dsn.replace(f"@{server.host}:{server.port}/", f"@{proxy.host}:{proxy.port}/")
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        proxy.reset_connections()
        with pytest.raises((OSError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await conn.fetchval("SELECT 1", timeout=5)
    finally:
        conn.terminate()
    proxy.blackhole(True)
    with pytest.raises(asyncio.TimeoutError):
        await asyncpg.connect(dsn, timeout=0.5)
    proxy.heal()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
