"""``SQLiteStore``: a file-backed store for one host, safe for several processes on one file.

See ``connector.py`` for the threading and transactions, ``kv.py`` for the operations.
"""

from __future__ import annotations

import os
from typing import Any

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES
from fleetmem._urls import redact_url, sqlite_url_parts
from fleetmem._validate import check_non_negative_number
from fleetmem.backends.sqlite.connector import SYNCHRONOUS_MODES, SQLiteConnector
from fleetmem.backends.sqlite.kv import SQLiteKV
from fleetmem.errors import ConfigurationError
from fleetmem.store import Store, user_namespace

__all__ = ["SQLiteStore"]


class SQLiteStore(Store[SQLiteKV]):
    """A ``MemoryStore`` in a SQLite file (``":memory:"`` for a private in-memory database).

    ``busy_timeout`` (seconds) bounds how long an operation waits for another connection's
    write lock before raising ``BackendUnavailableError``. ``synchronous`` is ``"normal"``
    (the default: with WAL, a commit survives a crash of the process; the last commits may be
    lost on power failure) or ``"full"`` (fsync at every commit).
    """

    backend_name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str] = "./fleetmem.db",
        *,
        namespace: str = "default",
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        busy_timeout: float = 5.0,
        synchronous: str = "normal",
    ) -> None:
        ns = user_namespace(namespace)
        try:
            db_path = os.fspath(path)
        except TypeError:
            raise ConfigurationError(
                f"path must be a str or os.PathLike, not {type(path).__name__}"
            ) from None
        if not isinstance(db_path, str) or not db_path:
            raise ConfigurationError("path must be a non-empty str or os.PathLike[str]")
        check_non_negative_number("busy_timeout", busy_timeout)
        mode = synchronous.lower() if isinstance(synchronous, str) else ""
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigurationError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        connector = SQLiteConnector(db_path, float(busy_timeout), mode)
        super().__init__(SQLiteKV(connector, namespace=ns), max_value_bytes=max_value_bytes)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``; ``sqlite://`` alone
        (or ``sqlite:///:memory:``) is an in-memory database. Query options ``busy_timeout``
        (seconds) and ``synchronous`` are accepted; keyword options win over them."""
        path, query = sqlite_url_parts(url)
        unknown = set(query) - {"busy_timeout", "synchronous"}
        if unknown:
            raise ConfigurationError(
                f"unknown SQLite URL option(s) {sorted(unknown)} in {redact_url(url)!r}"
            )
        if "busy_timeout" in query and "busy_timeout" not in options:
            try:
                options["busy_timeout"] = float(query["busy_timeout"])
            except ValueError:
                raise ConfigurationError(
                    f"busy_timeout must be a number of seconds in {redact_url(url)!r}"
                ) from None
        if "synchronous" in query:
            options.setdefault("synchronous", query["synchronous"])
        return cls(path, **options)

    @property
    def path(self) -> str:
        """The database file (``":memory:"`` for an in-memory database)."""
        return self._kv.connector.path
