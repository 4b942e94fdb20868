"""The SQLite backend: :class:`SQLiteStore` on one file, through :class:`SQLiteConnector`."""

from __future__ import annotations

from fleetmem.backends.sqlite.connector import SCHEMA_VERSION, SQLiteConnector
from fleetmem.backends.sqlite.kv import SQLiteKV
from fleetmem.backends.sqlite.store import SQLiteStore

__all__ = ["SCHEMA_VERSION", "SQLiteConnector", "SQLiteKV", "SQLiteStore"]
