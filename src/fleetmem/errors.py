"""The fleetmem error hierarchy: one root, each class's docstring is its default message.

Every exception a store raises on purpose is a :class:`FleetmemError`. Driver exceptions
(asyncpg, redis-py, sqlite3) are translated at one choke point per backend and chained with
``raise ... from exc``; they never reach a caller unwrapped. Messages never contain a password.
"""

from __future__ import annotations

__all__ = [
    "AgentGoneError",
    "BackendUnavailableError",
    "ChangesExpiredError",
    "ChangesNotEnabledError",
    "ConfigurationError",
    "FleetmemError",
    "InvalidArgumentError",
    "InvalidExportError",
    "InvalidKeyError",
    "InvalidPatternError",
    "KeyNotFoundError",
    "LeaseLostError",
    "LeaseUnavailableError",
    "MissingDependencyError",
    "NotANumberError",
    "OutcomeUnknownError",
    "SchemaVersionError",
    "SerializationError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "StoreClosedError",
    "ValueTooLargeError",
    "VerificationError",
    "VersionConflictError",
]


class FleetmemError(Exception):
    """A fleetmem operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else (self.__doc__ or "").strip())

    def __str__(self) -> str:
        # KeyError quotes its argument; every fleetmem error prints its message as written.
        return str(self.args[0]) if self.args else ""


class InvalidKeyError(FleetmemError, ValueError):
    """The namespace, key or partition is not valid."""


class InvalidPatternError(FleetmemError, ValueError):
    """The glob pattern is malformed or too expensive."""


class InvalidArgumentError(FleetmemError, ValueError):
    """An argument is out of range (ttl, limit, amount)."""


class SerializationError(FleetmemError, TypeError):
    """The value cannot be stored as JSON."""


class ValueTooLargeError(SerializationError):
    """The serialized value is larger than the store's max_value_bytes."""


class NotANumberError(FleetmemError, TypeError):
    """The stored value is not a number, so it cannot be incremented."""


class KeyNotFoundError(FleetmemError, KeyError):
    """The key does not exist (or has expired)."""


class VersionConflictError(FleetmemError):
    """The entry's version is not the one expected."""

    def __init__(self, key: str, expected: int, current_version: int) -> None:
        super().__init__(
            f"version conflict on key {key!r}: expected version {expected}, "
            f"current version is {current_version}"
        )
        self.key = key
        self.expected = expected
        self.current_version = current_version

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key, self.expected, self.current_version))


class LeaseLostError(FleetmemError):
    """The lease is no longer held with that token: it expired, was released, or another
    holder took it. Nothing was changed."""


class LeaseUnavailableError(FleetmemError):
    """The lease is held by another holder (and ``wait`` ran out)."""


class AgentGoneError(KeyNotFoundError):
    """The agent is not registered (never registered, deregistered, or expired): a dead agent
    registers again, a late heartbeat never revives it."""


class BackendUnavailableError(FleetmemError, ConnectionError):
    """The backend is unreachable, timed out, or its pool is exhausted."""


class OutcomeUnknownError(BackendUnavailableError):
    """The connection died while a write was in flight: it may or may not have been applied."""


class ChangesNotEnabledError(FleetmemError):
    """The namespace's change feed is not enabled: call ``store.changes.enable()`` first."""


class ChangesExpiredError(FleetmemError):
    """The changes after this cursor were trimmed (past the feed's retention, or the feed was
    disabled since): reading on would skip them. ``oldest`` is the oldest cursor still readable
    (read or watch from it, after deciding what to do about the gap)."""

    def __init__(self, oldest: str, message: str | None = None) -> None:
        super().__init__(
            message
            if message is not None
            else "the changes after this cursor were trimmed or the feed was disabled since; "
            f"the oldest readable cursor is {oldest!r}"
        )
        self.oldest = oldest

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.oldest, str(self)))


class InvalidExportError(FleetmemError, ValueError):
    """The input is not a valid fleetmem export: nothing was written.

    Raised by ``import_from`` (and ``copy_namespace``) after checking the whole input and before
    the first write. ``line`` is the number (from 1) of the line at fault -- for a count or
    checksum mismatch the trailer's line, for an input that ends early ("no trailer",
    "truncated") the line where it ended -- and the message begins with ``line N:``. ``line``
    is ``None`` only for a problem that belongs to no line."""

    def __init__(self, message: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.line))


class VerificationError(FleetmemError):
    """The destination of a copy does not hold what the source exported.

    ``keys`` lists the first keys that differ (at most 10, ascending): missing from the
    destination, holding another value, partition or expiry, or -- for a ``"replace"`` copy --
    present in the destination but not in the source."""

    def __init__(self, message: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.keys: list[str] = list(keys or ())[:10]

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.keys))


class StoreClosedError(FleetmemError):
    """The store is closed."""


class ConfigurationError(FleetmemError):
    """The store configuration is not valid."""


class MissingDependencyError(FleetmemError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed: install it with  pip install 'fleetmem[{extra}]'"
        )
        self.package = package
        self.extra = extra

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.package, self.extra))


class SchemaVersionError(FleetmemError):
    """The database schema is newer or older than this version of fleetmem can use."""


class SnapshotExistsError(FleetmemError):
    """``snapshots.create`` was given the name of a snapshot the namespace already holds."""


class SnapshotNotFoundError(KeyNotFoundError):
    """The namespace holds no snapshot of that name (``restore``, ``diff``, or ``export_to``
    with ``snapshot=``)."""
