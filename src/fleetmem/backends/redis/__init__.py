"""``RedisStore``: fleetmem on Redis 7 (standalone or Redis Cluster) through redis.asyncio."""

from __future__ import annotations

from fleetmem.backends.redis.store import RedisStore

__all__ = ["RedisStore"]
