"""fleetmem: the shared memory for fleets of AI agents.

One async :class:`MemoryStore` contract with identical behaviour on PostgreSQL, Redis, a
coherent Redis-over-PostgreSQL hybrid, SQLite and memory. Start with :func:`open_store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetmem.backends.memory import InMemoryStore
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
    KeyNotFoundError,
    MissingDependencyError,
    NotANumberError,
    OutcomeUnknownError,
    SchemaVersionError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
    VersionConflictError,
)
from fleetmem.factory import open_store
from fleetmem.protocol import Entry, Health, MemoryStore, StoreStats
from fleetmem.settings import FleetmemSettings

if TYPE_CHECKING:
    from fleetmem.backends.sqlite import SQLiteStore

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConfigurationError",
    "Entry",
    "FleetmemError",
    "FleetmemSettings",
    "Health",
    "HybridStore",
    "InMemoryStore",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidPatternError",
    "KeyNotFoundError",
    "MemoryStore",
    "MissingDependencyError",
    "NotANumberError",
    "OutcomeUnknownError",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "SchemaVersionError",
    "SerializationError",
    "StoreClosedError",
    "StoreStats",
    "ValueTooLargeError",
    "VersionConflictError",
    "__version__",
    "open_store",
]

# Backends with optional drivers are imported on first use, so that ``import fleetmem`` never
# imports asyncpg or redis.
_LAZY = {
    "SQLiteStore": "fleetmem.backends.sqlite",
    "PostgresStore": "fleetmem.backends.postgres",
    "RedisStore": "fleetmem.backends.redis",
    "HybridStore": "fleetmem.backends.hybrid",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetmem' has no attribute {name!r}")
    from fleetmem.factory import SCHEMES, _load

    del SCHEMES  # the table is used through _load
    return _load((module, name, _driver_of(name), _extra_of(name)))


def _driver_of(name: str) -> str | None:
    return {"PostgresStore": "asyncpg", "RedisStore": "redis"}.get(name)


def _extra_of(name: str) -> str | None:
    return {"PostgresStore": "postgres", "RedisStore": "redis"}.get(name)
