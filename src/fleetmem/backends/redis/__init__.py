"""The Redis backend: :class:`RedisStore` on :class:`RedisKV` on :class:`RedisConnector`,
Redis 7 standalone or Cluster."""

from __future__ import annotations

from fleetmem.backends.redis.connector import RedisConnector, pack_command
from fleetmem.backends.redis.kv import RedisKV
from fleetmem.backends.redis.store import RedisStore

__all__ = ["RedisConnector", "RedisKV", "RedisStore", "pack_command"]
