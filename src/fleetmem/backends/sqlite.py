"""``SQLiteStore``: a file-backed store for one host, safe for several processes on one file.

Every SQLite call runs on one worker thread owned by the store (and shared by its
``with_namespace`` views), so blocking I/O never runs on the event loop and the connection is
only ever used by one thread. Each hook is one function run on that thread: a write is one
``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock up front, so read-modify-write
operations (``incr``, ``compare_and_set``, ``set_if_absent``) stay exact across processes. The
database runs in WAL mode (readers never wait for the writer) with a busy timeout; a lock still
held when it runs out raises :class:`~fleetmem.errors.BackendUnavailableError`.

There is no server, so expiry is measured on this process's wall clock, in milliseconds.
The SQL lives in ``sqlite.sql`` as named blocks.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import orjson

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES, decode_value, encode_value
from fleetmem._urls import redact_url
from fleetmem._validate import INT64_MAX, INT64_MIN, GlobPattern
from fleetmem.backends.base import MISSING, BaseStore, EntryMeta
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
    NotANumberError,
    SchemaVersionError,
    StoreClosedError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

#: The version of the table layout this module reads and writes (kept in ``fleetmem_meta``).
SCHEMA_VERSION = 1

#: RETURNING (3.35) and UPSERT are needed; so is the JSON1 extension (built in since 3.38).
_MIN_SQLITE = (3, 35, 0)

_T = TypeVar("_T")


def _load_sql() -> dict[str, str]:
    """The named blocks of ``sqlite.sql`` (``-- name: x`` starts block ``x``)."""
    text = resources.files("fleetmem.backends").joinpath("sqlite.sql").read_text("utf-8")
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*text.splitlines(), "-- name: "]:
        if line.startswith("-- name: "):
            if name is not None:
                body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("--"))
                blocks[name] = body.strip().rstrip(";").strip()
            name = line[len("-- name: ") :].strip() or None
            lines = []
        elif name is not None:
            lines.append(line)
    return blocks


SQL = _load_sql()
_UPSERT_RETURNING = SQL["upsert"] + "\n" + SQL["returning_meta"]
_SYNCHRONOUS = {"normal": SQL["synchronous_normal"], "full": SQL["synchronous_full"]}

#: Greater than every valid key (a key holds at most 1024 UTF-8 bytes; this is 1028 bytes).
_KEY_CEILING = "\U0010ffff" * 257


def _prefix_end(prefix: str) -> str:
    """The smallest string above every string that starts with ``prefix`` (code-point order)."""
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return _KEY_CEILING
    code = ord(stripped[-1]) + 1
    if 0xD800 <= code <= 0xDFFF:  # surrogates are not text: the next code point is U+E000
        code = 0xE000
    return stripped[:-1] + chr(code)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, timezone.utc)


def _dt_or_none(ms: int | None) -> datetime | None:
    return None if ms is None else _dt(ms)


def _meta(row: tuple[Any, ...]) -> EntryMeta:
    partition, version, created, updated, expires = row
    return EntryMeta(partition, version, _dt(created), _dt(updated), _dt_or_none(expires))


def _live(expires_at: int | None, now: int) -> bool:
    return expires_at is None or expires_at > now


def _json_keys(keys: list[str]) -> str:
    return orjson.dumps(keys).decode("utf-8")


class _Database:
    """The connection and worker thread shared by a store and its views.

    Every method but :meth:`call` and :meth:`shutdown` runs on the worker thread only.
    """

    def __init__(self, path: str, busy_timeout: float, synchronous: str) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.journal_mode = ""
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetmem-sqlite")

    # ------------------------------------------------------------ event-loop side

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` on the worker thread; translate sqlite3 errors (one place)."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._with_connection, fn)
        except RuntimeError as exc:  # the executor was shut down by close()
            raise StoreClosedError(f"SQLite store for {self.path!r} is closed") from exc
        try:
            return await future
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    async def shutdown(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)

    def _translate(self, exc: sqlite3.Error) -> FleetmemError:
        message = str(exc)
        if isinstance(exc, sqlite3.OperationalError):
            if "locked" in message or "busy" in message:
                return BackendUnavailableError(
                    f"SQLite database {self.path!r} is locked: still busy after the busy "
                    f"timeout of {self.busy_timeout:g} s ({message})"
                )
            return BackendUnavailableError(f"SQLite database {self.path!r}: {message}")
        return FleetmemError(f"SQLite error on {self.path!r}: {type(exc).__name__}: {message}")

    # ------------------------------------------------------------ worker-thread side

    def _with_connection(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None:
            if self._closed:
                raise StoreClosedError(f"SQLite store for {self.path!r} is closed")
            conn = self._open()
            self._conn = conn
        return fn(conn)

    def _open(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise ConfigurationError(
                f"SQLiteStore needs SQLite 3.35 or newer; this Python has {sqlite3.sqlite_version}"
            )
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit: transactions are explicit
            check_same_thread=False,  # only the worker thread ever uses it
        )
        try:
            try:
                conn.execute(SQL["check_json"]).fetchone()
            except sqlite3.OperationalError as exc:
                raise ConfigurationError(
                    "SQLiteStore needs SQLite's JSON functions (JSON1), missing from this build"
                ) from exc
            if self.path != ":memory:":
                self._retry_busy(lambda: conn.execute(SQL["journal_mode_wal"]).fetchone())
            self.journal_mode = str(conn.execute(SQL["journal_mode"]).fetchone()[0])
            conn.execute(_SYNCHRONOUS[self.synchronous])
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _retry_busy(self, fn: Callable[[], object]) -> None:
        # Switching to WAL needs an exclusive lock and may report SQLITE_BUSY without waiting
        # on the busy handler, e.g. when several processes open a new file at once.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                fn()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute(SQL["meta_table_exists"]).fetchone() is not None:
            row = conn.execute(SQL["read_schema_version"]).fetchone()
            if row is not None:
                self._check_version(row[0])
                return
        with _Transaction(conn):
            conn.execute(SQL["create_meta"])
            row = conn.execute(SQL["read_schema_version"]).fetchone()
            if row is not None:  # another process created it meanwhile
                self._check_version(row[0])
                return
            conn.execute(SQL["create_entries"])
            conn.execute(SQL["create_partition_index"])
            conn.execute(SQL["create_expiry_index"])
            conn.execute(SQL["write_schema_version"], (str(SCHEMA_VERSION),))

    def _check_version(self, stored: object) -> None:
        try:
            version = int(str(stored))
        except ValueError:
            version = -1
        if version == SCHEMA_VERSION:
            return
        relation = "newer" if version > SCHEMA_VERSION else "older"
        raise SchemaVersionError(
            f"SQLite database {self.path!r} has schema version {stored!s}, {relation} than the "
            f"version {SCHEMA_VERSION} this fleetmem uses"
        )

    def _close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception."""

    __slots__ = ("_conn", "_mode")

    def __init__(self, conn: sqlite3.Connection, *, write: bool = True) -> None:
        self._conn = conn
        self._mode = SQL["begin_immediate"] if write else SQL["begin"]

    def __enter__(self) -> None:
        self._conn.execute(self._mode)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute(SQL["commit"])
                return
            except BaseException:
                # A failed COMMIT (e.g. busy in rollback-journal mode) leaves the transaction
                # open: end it, so that the connection stays usable, then report the error.
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute(SQL["rollback"])


def _parse_path(url: str) -> tuple[str, dict[str, str]]:
    """The database path and query options of a ``sqlite://`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {redact_url(url)!r}")
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    if rest == "":
        return ":memory:", dict(parse_qsl(query))
    if not rest.startswith("/"):
        raise ConfigurationError(
            f"a SQLite URL has no host: use sqlite:///relative.db or sqlite:////absolute.db, "
            f"not {redact_url(url)!r}"
        )
    path = unquote(rest[1:])
    return (path or ":memory:"), dict(parse_qsl(query))


class SQLiteStore(BaseStore):
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
        super().__init__(namespace=namespace, max_value_bytes=max_value_bytes)
        try:
            db_path = os.fspath(path)
        except TypeError:
            raise ConfigurationError(
                f"path must be a str or os.PathLike, not {type(path).__name__}"
            ) from None
        if not isinstance(db_path, str) or not db_path:
            raise ConfigurationError("path must be a non-empty str or os.PathLike[str]")
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, (int, float))
            or not math.isfinite(busy_timeout)
            or busy_timeout < 0
        ):
            raise ConfigurationError(
                f"busy_timeout must be a finite number of seconds >= 0, not {busy_timeout!r}"
            )
        mode = synchronous.lower() if isinstance(synchronous, str) else ""
        if mode not in _SYNCHRONOUS:
            raise ConfigurationError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        self._db = _Database(db_path, float(busy_timeout), mode)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``; ``sqlite://`` alone
        (or ``sqlite:///:memory:``) is an in-memory database. Query options ``busy_timeout``
        (seconds) and ``synchronous`` are accepted; keyword options win over them."""
        path, query = _parse_path(url)
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
        return self._db.path

    def _repr_details(self) -> str:
        return f" path={self._db.path!r}"

    async def connect(self) -> SQLiteStore:
        """Open the database, switch it to WAL and create or check the schema. Idempotent.

        Any operation opens the database on first use too; ``connect()`` reports problems early.
        """
        self._check_open()
        await self._db.call(_noop)
        return self

    async def _aclose(self) -> None:
        await self._db.shutdown()

    # ------------------------------------------------------------------ reads

    async def _get(self, key: str) -> Any:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Any:
            row = conn.execute(SQL["get_value"], (ns, key, _now_ms())).fetchone()
            return MISSING if row is None else decode_value(row[0])

        return await self._db.call(run)

    async def _get_entry(self, key: str) -> Entry | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(SQL["get_entry"], (ns, key, _now_ms())).fetchone()
            if row is None:
                return None
            return Entry(key, decode_value(row[0]), *_meta(row[1:]))

        return await self._db.call(run)

    async def _get_many(self, keys: list[str]) -> dict[str, Any]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            rows = conn.execute(SQL["get_many"], (ns, _json_keys(keys), _now_ms()))
            return {k: decode_value(v) for k, v in rows}

        return await self._db.call(run)

    async def _exists(self, key: str) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL["get_version"], (ns, key, _now_ms())).fetchone() is not None

        return await self._db.call(run)

    async def _ttl(self, key: str) -> float | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> float | None:
            now = time.time() * 1000.0
            row = conn.execute(SQL["get_expiry"], (ns, key, math.floor(now))).fetchone()
            if row is None:
                raise KeyNotFoundError(f"key {key!r} does not exist")
            expires: int | None = row[0]
            return None if expires is None else max(0.0, (expires - now) / 1000.0)

        return await self._db.call(run)

    async def _keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        ns = self._namespace

        # Half-open range [low, high) over the primary key: low is the prefix, or the smallest
        # string above ``after`` (``after`` + U+0000, as no key holds U+0000).
        low = after + "\x00" if after is not None and after >= prefix else prefix
        high = _prefix_end(prefix)
        lim = -1 if limit is None else limit

        def run(conn: sqlite3.Connection) -> list[str]:
            now = _now_ms()
            if partition is None:
                rows = conn.execute(SQL["keys"], (ns, low, high, now, lim))
            else:
                rows = conn.execute(SQL["keys_in_partition"], (ns, low, high, now, lim, partition))
            return [row[0] for row in rows]

        return await self._db.call(run)

    async def _search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        ns = self._namespace

        # The literal prefix becomes a key range; the exact glob matcher filters in Python
        # (SQLite's LIKE ignores ASCII case and its GLOB has no escapes).
        low, high = pattern.prefix, _prefix_end(pattern.prefix)

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            now = _now_ms()
            if partition is None:
                rows = conn.execute(SQL["scan"], (ns, low, high, now))
            else:
                rows = conn.execute(SQL["scan_partition"], (ns, low, high, now, partition))
            out: dict[str, Any] = {}
            matches = pattern.matches
            for key, value in rows:
                if matches(key):
                    out[key] = decode_value(value)
                    if limit is not None and len(out) >= limit:
                        break
            return out

        return await self._db.call(run)

    async def _partitions(self) -> list[str]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(SQL["partitions"], (ns, _now_ms()))]

        return await self._db.call(run)

    async def _stats(self) -> StoreStats:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> StoreStats:
            with _Transaction(conn, write=False):  # one snapshot for both counts
                now = _now_ms()
                live = conn.execute(SQL["stats_live"], (ns, now)).fetchall()
                expired = conn.execute(SQL["stats_expired"], (ns, now)).fetchone()[0]
            return StoreStats(
                namespace=ns,
                keys=sum(row[1] for row in live),
                partitions={row[0]: row[1] for row in live},
                expired_pending=expired,
                bytes=sum(row[2] for row in live),
                backend=self.backend_name,
            )

        return await self._db.call(run)

    async def _health(self) -> dict[str, Any]:
        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute(SQL["select_one"]).fetchone()
            return {
                "path": db.path,
                "journal_mode": db.journal_mode,
                "sqlite_version": sqlite3.sqlite_version,
            }

        db = self._db
        return await db.call(run)

    # ------------------------------------------------------------------ writes

    async def _set(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None, keep_ttl: bool
    ) -> EntryMeta:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> EntryMeta:
            with _Transaction(conn):
                now = _now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                row = conn.execute(
                    _UPSERT_RETURNING, (ns, key, partition, payload, now, expires, keep_ttl)
                ).fetchone()
            return _meta(row)

        return await self._db.call(run)

    async def _set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
    ) -> int:
        ns = self._namespace

        # One transaction for the whole call: all or nothing, and one commit.
        def run(conn: sqlite3.Connection) -> int:
            count = 0
            with _Transaction(conn):
                now = _now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                for chunk in chunks:
                    conn.executemany(
                        SQL["upsert"],
                        [(ns, k, partition, p, now, expires, False) for k, p in chunk],
                    )
                    count += len(chunk)
            return count

        return await self._db.call(run)

    async def _set_if_absent(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None
    ) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with _Transaction(conn):
                now = _now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                cursor = conn.execute(
                    SQL["insert_if_absent"], (ns, key, partition, payload, now, expires)
                )
                return cursor.rowcount == 1

        return await self._db.call(run)

    async def _compare_and_set(
        self, key: str, payload: bytes, version: int, ttl_ms: int | None, partition: str | None
    ) -> EntryMeta:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> EntryMeta:
            with _Transaction(conn):
                now = _now_ms()
                row = conn.execute(SQL["get_version"], (ns, key, now)).fetchone()
                current = 0 if row is None else int(row[0])
                if current != version:
                    raise VersionConflictError(key, version, current)
                expires = None if ttl_ms is None else now + ttl_ms
                meta = conn.execute(
                    _UPSERT_RETURNING,
                    (ns, key, partition, payload, now, expires, ttl_ms is None),
                ).fetchone()
            return _meta(meta)

        return await self._db.call(run)

    async def _incr(
        self, key: str, amount: int | float, ttl_ms: int | None, partition: str | None
    ) -> int | float:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int | float:
            with _Transaction(conn):
                now = _now_ms()
                row = conn.execute(SQL["get_value"], (ns, key, now)).fetchone()
                result = _add(key, 0 if row is None else decode_value(row[0]), amount)
                expires = None if ttl_ms is None else now + ttl_ms
                conn.execute(
                    SQL["upsert"],
                    (ns, key, partition, encode_value(result), now, expires, ttl_ms is None),
                )
            return result

        return await self._db.call(run)

    async def _delete(self, key: str) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with _Transaction(conn):
                now = _now_ms()
                row = conn.execute(SQL["delete"], (ns, key)).fetchone()
            return row is not None and _live(row[0], now)

        return await self._db.call(run)

    async def _delete_many(self, keys: list[str]) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                now = _now_ms()
                rows = conn.execute(SQL["delete_many"], (ns, _json_keys(keys))).fetchall()
            return sum(1 for row in rows if _live(row[0], now))

        return await self._db.call(run)

    async def _expire(self, key: str, ttl_ms: int | None) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with _Transaction(conn):
                now = _now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                cursor = conn.execute(SQL["set_expiry"], (ns, key, expires, now))
                return cursor.rowcount == 1

        return await self._db.call(run)

    async def _clear(self, partition: str | None) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                now = _now_ms()
                if partition is None:
                    live = conn.execute(SQL["count_live"], (ns, now)).fetchone()[0]
                    conn.execute(SQL["delete_namespace"], (ns,))
                else:
                    live = conn.execute(
                        SQL["count_live_in_partition"], (ns, now, partition)
                    ).fetchone()[0]
                    conn.execute(SQL["delete_partition"], (ns, partition))
            return int(live)

        return await self._db.call(run)

    async def _cleanup_expired(self) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            with _Transaction(conn):
                return conn.execute(SQL["delete_expired"], (ns, _now_ms())).rowcount

        return await self._db.call(run)


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _add(key: str, base: Any, amount: int | float) -> int | float:
    """``base + amount`` for ``incr``: exact in signed 64 bits, float if either is a float."""
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise NotANumberError(f"key {key!r} holds a {type(base).__name__}, not a number")
    if isinstance(base, int) and isinstance(amount, int):
        result = base + amount
        if not INT64_MIN <= result <= INT64_MAX:
            raise InvalidArgumentError(f"incr of key {key!r} would leave the signed 64-bit range")
        return result
    try:
        total = float(base) + float(amount)
    except OverflowError:  # a stored integer too large for a float
        total = math.inf
    if not math.isfinite(total):
        raise InvalidArgumentError(f"incr of key {key!r} would overflow a float")
    return total
