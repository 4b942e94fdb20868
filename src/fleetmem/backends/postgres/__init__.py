"""The PostgreSQL backend: :class:`PostgresStore` and its alembic-owned schema (``migrate``)."""

from __future__ import annotations

from fleetmem.backends.postgres.store import PostgresStore, init_connection

__all__ = ["PostgresStore", "init_connection"]
