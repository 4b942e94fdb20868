"""fleetmem: the shared memory for fleets of AI agents.

One async :class:`MemoryStore` contract with identical behaviour on PostgreSQL, Redis, a
coherent Redis-over-PostgreSQL hybrid, SQLite and memory. Start with :func:`open_store`.

``import fleetmem`` imports only the contract, the errors and :func:`open_store`: the store
classes (``InMemoryStore`` too) and :class:`FleetmemSettings` (pydantic) are imported on first
use (PEP 562), so a CLI call or a script pays only for the backend it opens. ``from fleetmem
import PostgresStore`` works as usual; a missing driver raises
:class:`MissingDependencyError` naming the extra to install. The three classes whose drivers
are extras are not in ``__all__``: ``from fleetmem import *`` imports no driver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetmem.errors import (
    AgentGoneError,
    BackendUnavailableError,
    ChangesExpiredError,
    ChangesNotEnabledError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    InvalidExportError,
    InvalidKeyError,
    InvalidPatternError,
    KeyNotFoundError,
    LeaseLostError,
    LeaseUnavailableError,
    MissingDependencyError,
    NotANumberError,
    OutcomeUnknownError,
    SchemaVersionError,
    SerializationError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreClosedError,
    ValueTooLargeError,
    VerificationError,
    VersionConflictError,
)
from fleetmem.factory import open_store
from fleetmem.protocol import (
    Agent,
    Change,
    ChangeBatch,
    Entry,
    Health,
    Job,
    JobResult,
    Lease,
    MemoryStore,
    QueueStats,
    Snapshot,
    SnapshotDiff,
    StoreStats,
)

if TYPE_CHECKING:
    from fleetmem.backends.hybrid import HybridStore as HybridStore
    from fleetmem.backends.memory import InMemoryStore
    from fleetmem.backends.postgres import PostgresStore as PostgresStore
    from fleetmem.backends.redis import RedisStore as RedisStore
    from fleetmem.backends.sqlite import SQLiteStore
    from fleetmem.changes import Changes
    from fleetmem.leases import HeldLease
    from fleetmem.portability import CopyReport, ExportReport, ImportReport, copy_namespace
    from fleetmem.queues import Queue
    from fleetmem.settings import FleetmemSettings
    from fleetmem.snapshots import Snapshots

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentGoneError",
    "BackendUnavailableError",
    "Change",
    "ChangeBatch",
    "Changes",
    "ChangesExpiredError",
    "ChangesNotEnabledError",
    "ConfigurationError",
    "CopyReport",
    "Entry",
    "ExportReport",
    "FleetmemError",
    "FleetmemSettings",
    "Health",
    "HeldLease",
    "ImportReport",
    "InMemoryStore",
    "InvalidArgumentError",
    "InvalidExportError",
    "InvalidKeyError",
    "InvalidPatternError",
    "Job",
    "JobResult",
    "KeyNotFoundError",
    "Lease",
    "LeaseLostError",
    "LeaseUnavailableError",
    "MemoryStore",
    "MissingDependencyError",
    "NotANumberError",
    "OutcomeUnknownError",
    "Queue",
    "QueueStats",
    "SQLiteStore",
    "SchemaVersionError",
    "SerializationError",
    "Snapshot",
    "SnapshotDiff",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "Snapshots",
    "StoreClosedError",
    "StoreStats",
    "ValueTooLargeError",
    "VerificationError",
    "VersionConflictError",
    "__version__",
    "copy_namespace",
    "open_store",
]

#: Names imported on first use: name -> (module, the driver it needs, the extra installing it).
_LAZY: dict[str, tuple[str, str | None, str | None]] = {
    "FleetmemSettings": ("fleetmem.settings", None, None),
    "HeldLease": ("fleetmem.leases", None, None),
    "Queue": ("fleetmem.queues", None, None),
    "Changes": ("fleetmem.changes", None, None),
    "Snapshots": ("fleetmem.snapshots", None, None),
    "ExportReport": ("fleetmem.portability", None, None),
    "ImportReport": ("fleetmem.portability", None, None),
    "CopyReport": ("fleetmem.portability", None, None),
    "copy_namespace": ("fleetmem.portability", None, None),
    "InMemoryStore": ("fleetmem.backends.memory", None, None),
    "SQLiteStore": ("fleetmem.backends.sqlite", None, None),
    "PostgresStore": ("fleetmem.backends.postgres", "asyncpg", "postgres"),
    "RedisStore": ("fleetmem.backends.redis", "redis", "redis"),
    "HybridStore": ("fleetmem.backends.hybrid", None, "postgres,redis"),
}


def __getattr__(name: str) -> Any:
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module 'fleetmem' has no attribute {name!r}")
    from fleetmem.factory import _load

    module, driver, extra = entry
    value = _load((module, name, driver, extra))
    globals()[name] = value  # imported once: later look-ups skip __getattr__
    return value


#: Store classes whose drivers are optional extras: importable by name (``from fleetmem import
#: PostgresStore``) but left out of ``__all__``, so that ``from fleetmem import *`` works on a
#: base install and imports no driver.
_OPTIONAL = ("HybridStore", "PostgresStore", "RedisStore")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_OPTIONAL))
