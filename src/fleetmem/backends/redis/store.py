"""``RedisStore``: the fast store, a :class:`~fleetmem.store.Store` on Redis 7 or Redis Cluster."""

from __future__ import annotations

from typing import Any

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES
from fleetmem.backends.redis.connector import DEFAULT_RETRIES, DEFAULT_TIMEOUT, RedisConnector
from fleetmem.backends.redis.kv import RedisKV
from fleetmem.store import Store, user_namespace

__all__ = ["RedisStore"]


class RedisStore(Store[RedisKV]):
    """A ``MemoryStore`` on Redis 7 without modules, standalone or Redis Cluster.

    Build it with :meth:`from_url` (``redis://``, ``rediss://``, ``unix://``) or from an
    injected ``redis.asyncio.Redis`` / ``RedisCluster`` client (created with
    ``decode_responses=False``), which the store then never closes.
    """

    backend_name = "redis"

    def __init__(
        self,
        *,
        client: Any = None,
        namespace: str = "default",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        allow_eviction: bool = False,
    ) -> None:
        ns = user_namespace(namespace)
        connector = RedisConnector(
            client=client, timeout=timeout, retries=retries, allow_eviction=allow_eviction
        )
        super().__init__(RedisKV(connector, namespace=ns), max_value_bytes=max_value_bytes)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "default",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        **options: Any,
    ) -> RedisStore:
        """A store for ``url`` (no I/O; ``connect()`` opens it); the options are those of
        :meth:`RedisConnector.from_url
        <fleetmem.backends.redis.connector.RedisConnector.from_url>`."""
        kv = RedisKV.from_url(url, namespace=user_namespace(namespace), **options)
        return cls.from_backend(kv, max_value_bytes=max_value_bytes)

    @property
    def client(self) -> Any:
        """The ``redis.asyncio`` client (a standalone one is made now if ``connect()`` has not
        decided yet)."""
        self._check_open()
        return self._kv.connector.client
