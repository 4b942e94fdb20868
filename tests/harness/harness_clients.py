"""Small real-driver helpers shared by the harness tests."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


async def pg_fetchval(dsn: str, sql: str, *args: Any, timeout: float = 10.0) -> Any:
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        return await conn.fetchval(sql, *args, timeout=timeout)
    finally:
        await conn.close()


async def pg_execute(dsn: str, sql: str, *args: Any, timeout: float = 10.0) -> None:
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        await conn.execute(sql, *args, timeout=timeout)
    finally:
        await conn.close()


def redis_client(host: str, port: int, *, timeout: float = 5.0) -> aioredis.Redis:
    """A client that never retries, so a fault shows on the first call."""
    return aioredis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
