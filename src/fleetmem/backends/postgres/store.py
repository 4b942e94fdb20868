"""``PostgresStore``: the durable store, a :class:`~fleetmem.store.Store` on PostgreSQL."""

from __future__ import annotations

from typing import Any

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES
from fleetmem.backends.postgres import migrate
from fleetmem.backends.postgres.connector import PostgresConnector
from fleetmem.backends.postgres.kv import PostgresKV
from fleetmem.store import Store, user_namespace

__all__ = ["PostgresStore"]


class PostgresStore(Store[PostgresKV]):
    """A ``MemoryStore`` in a PostgreSQL table (see ``docs/backends/postgres.md``).

    Built from a ``dsn`` (the store opens and closes its own pool) or an injected asyncpg
    ``pool`` made with ``init=fleetmem.backends.postgres.init_connection`` (never closed here).
    """

    backend_name = "postgres"

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        namespace: str = "default",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        schema: str = migrate.DEFAULT_SCHEMA,
        table: str = migrate.DEFAULT_TABLE,
        auto_migrate: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        command_timeout: float | None = 30.0,
        sweeper_interval: float | None = None,
        sweeper_batch: int = 1000,
        ssl: Any = None,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        connector = PostgresConnector(
            dsn,
            pool=pool,
            schema=schema,
            table=table,
            auto_migrate=auto_migrate,
            min_size=min_size,
            max_size=max_size,
            acquire_timeout=acquire_timeout,
            command_timeout=command_timeout,
            ssl=ssl,
            server_settings=server_settings,
        )
        kv = PostgresKV(
            connector,
            namespace=user_namespace(namespace),
            sweeper_interval=sweeper_interval,
            sweeper_batch=sweeper_batch,
        )
        super().__init__(kv, max_value_bytes=max_value_bytes)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """``postgresql://user:pass@host:5432/db?sslmode=verify-full`` (or ``postgres://``)."""
        return cls(url, **options)

    async def sweep_expired(self, max_batches: int = 100) -> int:
        """Delete expired rows of every namespace in this table, in bounded batches."""
        self._check_open()
        return await self._kv.sweep_expired(max_batches)
