"""The Redis backend: :class:`RedisStore` on :class:`RedisKV`, Redis 7 standalone or Cluster."""

from __future__ import annotations

from fleetmem.backends.redis.kv import RedisKV, pack_command
from fleetmem.backends.redis.store import RedisStore

__all__ = ["RedisKV", "RedisStore", "pack_command"]
