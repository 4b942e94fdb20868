"""The PostgreSQL backend: :class:`PostgresStore` on :class:`PostgresKV` on a
:class:`PostgresConnector` (the pool, retry rules and error translation every primitive on the
table shares), and its alembic-owned schema (``migrate``)."""

from __future__ import annotations

from fleetmem.backends.postgres.connector import PostgresConnector, init_connection
from fleetmem.backends.postgres.kv import PostgresKV
from fleetmem.backends.postgres.store import PostgresStore

__all__ = ["PostgresConnector", "PostgresKV", "PostgresStore", "init_connection"]
