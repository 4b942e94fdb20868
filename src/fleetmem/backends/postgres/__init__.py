"""The PostgreSQL backend: :class:`PostgresStore` on :class:`PostgresKV`, and its alembic-owned
schema (``migrate``)."""

from __future__ import annotations

from fleetmem.backends.postgres.kv import PostgresKV, init_connection
from fleetmem.backends.postgres.store import PostgresStore

__all__ = ["PostgresKV", "PostgresStore", "init_connection"]
