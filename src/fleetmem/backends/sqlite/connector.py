"""``SQLiteConnector``: one SQLite file, its one connection and the worker thread that uses it.

Every SQLite call runs on one worker thread owned by the connector (and shared by a store's
``with_namespace`` views), so blocking I/O never runs on the event loop and the connection is
only ever used by one thread. The connector opens the file on first use, switches it to WAL,
creates or checks the schema, and translates ``sqlite3`` errors at one place (:meth:`call`).
A primitive's module (``kv.py``, ``leases.py``, ``agents.py``, ``queues.py``, ``changes.py``,
``snapshots.py``) runs each operation as one function on that thread; a write is one ``BEGIN
IMMEDIATE`` transaction (:class:`Transaction`), which takes SQLite's write lock up front, so
read-modify-write operations stay exact across processes.

A transaction that must span awaits (an export's read snapshot, an atomic import's write
transaction) runs in a :class:`Session` (:meth:`SQLiteConnector.reader`,
:meth:`SQLiteConnector.writer`): a connection and thread of its own, so the store's connection
keeps serving every other call meanwhile, as another process's would. A session opens the
very file the store's connection opened -- its absolute path as that connection reports it,
taken once when the store opens -- never the path as given (a relative path would follow the
process's working directory), and opens it ``mode=rw``: it never creates a file.

The SQL lives in ``sql/*.sql`` as named blocks. The schema carries a version in
``fleetmem_meta``; a file of an older version is upgraded in place when it is opened (one
transaction), a file of a newer one is refused.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from fleetmem._notify import Notifier
from fleetmem.backends._files import sql_blocks
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    SchemaVersionError,
    StoreClosedError,
)

__all__ = [
    "SCHEMA_VERSION",
    "SQL",
    "SYNCHRONOUS_MODES",
    "SQLiteConnector",
    "Session",
    "Transaction",
    "now_ms",
]

#: The version of the table layout this module reads and writes (kept in ``fleetmem_meta``).
#: 1: entries. 2: + leases and agents. 3: + work queues. 4: + change feeds. 5: + snapshots. A
#: file of an older version is upgraded in place when it is opened.
SCHEMA_VERSION = 5

#: RETURNING (3.35) and UPSERT are needed; so is the JSON1 extension (built in since 3.38).
_MIN_SQLITE = (3, 35, 0)

_T = TypeVar("_T")


def _load_sql(*files: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for file in files:
        more = sql_blocks(__package__ or "fleetmem.backends.sqlite", "sql", file)
        clash = blocks.keys() & more.keys()
        if clash:  # pragma: no cover - a mistake in the shipped files
            raise RuntimeError(f"statement names defined twice in sql/{file}: {sorted(clash)}")
        blocks.update(more)
    return blocks


#: Every named statement of ``sql/kv.sql``, ``sql/leases.sql``, ``sql/agents.sql``,
#: ``sql/queues.sql``, ``sql/changes.sql`` and ``sql/snapshots.sql``.
SQL = _load_sql("kv.sql", "leases.sql", "agents.sql", "queues.sql", "changes.sql", "snapshots.sql")
_SYNCHRONOUS = {"normal": SQL["synchronous_normal"], "full": SQL["synchronous_full"]}
#: The values ``synchronous=`` accepts.
SYNCHRONOUS_MODES = tuple(_SYNCHRONOUS)
#: The file of a connection's main database as SQLite resolved it when opening it (absolute;
#: empty for an in-memory database).
_MAIN_FILE = "SELECT file FROM pragma_database_list WHERE name = 'main'"


def now_ms() -> int:
    """The store's clock: this process's wall clock in whole milliseconds since the epoch.

    There is no server; every primitive of the file (entries, leases, agents) measures time
    with it, and processes sharing a file share the host's clock.
    """
    return time.time_ns() // 1_000_000


class SQLiteConnector:
    """The connection and worker thread shared by a store and its views.

    Every method but :meth:`call` and :meth:`shutdown` runs on the worker thread only.
    """

    def __init__(self, path: str, busy_timeout: float, synchronous: str) -> None:
        #: The path as given (what messages show).
        self.path = path
        #: The file the store's connection opened, as SQLite reports it (absolute), set once
        #: that connection is open; ``""`` for an in-memory database. Sessions open this file.
        self.file: str | None = None
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.journal_mode = ""
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetmem-sqlite")
        #: Waiters of this file, keyed ``(namespace, name)`` for a lease, by
        #: ``QueueBackend.claim_key`` / ``result_key`` for a queue and by
        #: ``ChangeBackend.wake_key`` for a change feed: a release, put, ack or KV write made
        #: through this connector (any view) wakes them at once; other processes are polled.
        self.notifier = Notifier()
        #: ``time.monotonic()`` of this process's last trim of each namespace's change log by a
        #: write (see ``changes.record``): a pacing of the trims only, never the feed's state,
        #: which every write reads from the file.
        self.feed_trims: dict[str, float] = {}
        #: Set while a :class:`_HeldConnection` holds the connection (an in-memory database's
        #: atomic import): every other call waits for it on the event loop.
        self._gate: asyncio.Event | None = None
        #: The open sessions, closed with the store.
        self._sessions: set[Session] = set()

    # ------------------------------------------------------------ event-loop side

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` on the worker thread; translate sqlite3 errors (one place)."""
        while self._gate is not None:
            await self._gate.wait()
        return await self._call_now(fn)

    async def reader(self) -> Session:
        """A session for one read transaction spanning awaits: a connection of its own
        (``query_only``) on a thread of its own. In WAL mode its first ``SELECT`` after
        ``BEGIN`` fixes a snapshot that writers -- this store's, other processes' -- never
        wait for (without WAL, i.e. on a file system that refused it, they would wait for its
        end). A private in-memory database has no second connection: the session reads a
        copy of it (SQLite's backup, taken in one call on the store's thread, so at one
        instant), which costs its size in memory for as long as the session is open."""
        await self.call(_noop)  # opened, in WAL, with the current schema
        if self._in_memory():
            copy = await self.call(_copy_database)
            return self._track(SideConnection(self, lambda: copy))
        return self._track(SideConnection(self, lambda: self._connect_side(read_only=True)))

    async def writer(self) -> Session:
        """A session for one write transaction spanning awaits (the caller begins it with
        ``BEGIN IMMEDIATE``): a connection of its own on a thread of its own, so this store's
        other calls go on meanwhile as another process's would -- readers see the last commit,
        writers wait for the lock (up to the busy timeout). A private in-memory database has
        no second connection: the session holds the store's own, and every other call of the
        store waits on the event loop until the session is closed."""
        await self.call(_noop)
        if self._in_memory():
            while self._gate is not None:
                await self._gate.wait()
            self._gate = asyncio.Event()
            return self._track(_HeldConnection(self))
        return self._track(SideConnection(self, lambda: self._connect_side(read_only=False)))

    def _in_memory(self) -> bool:
        """Whether the store's database has no file (``:memory:``, or a URI naming an
        in-memory database): a second connection could not reach it."""
        return not self.file

    def _track(self, session: Session) -> Session:
        self._sessions.add(session)
        return session

    def _release_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    async def _call_now(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
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
        for session in list(self._sessions):
            session.close()
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

    @contextlib.contextmanager
    def synced(self, conn: sqlite3.Connection) -> Iterator[None]:
        """Commit the transactions inside with ``synchronous=FULL`` (the WAL synced to disk
        before ``COMMIT`` returns), whatever the store's mode.

        A lease grant uses it: with ``normal`` a power failure may lose the last commits, a
        grant among them, and its fencing token would then be granted again. So does a queue
        ``put``: a job is durable once ``put`` returns. WAL frames are appended in order, so
        syncing a commit also keeps every commit before it.
        """
        if self.synchronous == "full":
            yield
            return
        conn.execute(SQL["synchronous_full"])
        try:
            yield
        finally:
            conn.execute(_SYNCHRONOUS[self.synchronous])

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
        conn = self._connect()
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
            row = conn.execute(_MAIN_FILE).fetchone()
            self.file = str(row[0]) if row is not None and row[0] else ""
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit: transactions are explicit
            check_same_thread=False,  # only one thread at a time ever uses it
        )

    def _connect_side(self, *, read_only: bool) -> sqlite3.Connection:
        """A session's connection to the file (opened, in WAL and with its schema already).

        It opens :attr:`file`, the absolute path the store's connection reported when it
        opened, so a change of the working directory since then cannot lead it to another
        file; and it opens it as a ``mode=rw`` URI (the path percent-quoted), so a file that
        is gone is an error, never a new empty database.
        """
        if not self.file:  # pragma: no cover - reader()/writer() open the store first
            raise RuntimeError("the SQLite store's file is not known before it is opened")
        conn = sqlite3.connect(
            Path(self.file).as_uri() + "?mode=rw",
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=True,
        )
        try:
            conn.execute(_SYNCHRONOUS[self.synchronous])
            if read_only:
                conn.execute(SQL["query_only"])
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
            if row is not None and self._check_version(row[0]) == SCHEMA_VERSION:
                return
        with Transaction(conn):  # the write lock: one process creates or upgrades
            conn.execute(SQL["create_meta"])
            row = conn.execute(SQL["read_schema_version"]).fetchone()
            if row is None:
                conn.execute(SQL["create_entries"])
                conn.execute(SQL["create_partition_index"])
                conn.execute(SQL["create_expiry_index"])
                self._create_coordination(conn)
                self._create_queues(conn)
                self._create_changes(conn)
                self._create_snapshots(conn)
                conn.execute(SQL["write_schema_version"], (str(SCHEMA_VERSION),))
                return
            version = self._check_version(row[0])  # another process may have upgraded it
            if version == SCHEMA_VERSION:
                return
            if version < 2:
                self._create_coordination(conn)
            if version < 3:
                self._create_queues(conn)
            if version < 4:
                self._create_changes(conn)
            self._create_snapshots(conn)
            conn.execute(SQL["update_schema_version"], (str(SCHEMA_VERSION),))

    @staticmethod
    def _create_coordination(conn: sqlite3.Connection) -> None:
        """Version 2: the tables of leases and agents (new tables only, entries untouched)."""
        conn.execute(SQL["create_leases"])
        conn.execute(SQL["create_agents"])

    @staticmethod
    def _create_queues(conn: sqlite3.Connection) -> None:
        """Version 3: the jobs of the work queues and their indexes (new objects only)."""
        conn.execute(SQL["create_jobs"])
        conn.execute(SQL["create_jobs_claim_index"])
        conn.execute(SQL["create_jobs_state_index"])
        conn.execute(SQL["create_jobs_dedupe_index"])

    @staticmethod
    def _create_changes(conn: sqlite3.Connection) -> None:
        """Version 4: the change feeds' flags and their log (new objects only). No namespace
        has a feed until ``enable()``, so an upgraded file records nothing until then."""
        conn.execute(SQL["create_feeds"])
        conn.execute(SQL["create_changes"])
        conn.execute(SQL["create_changes_index"])

    @staticmethod
    def _create_snapshots(conn: sqlite3.Connection) -> None:
        """Version 5: the snapshots' catalog and records (new objects only, entries
        untouched). An upgraded file has no snapshot until one is created."""
        conn.execute(SQL["create_snapshots"])
        conn.execute(SQL["create_snapshot_records"])
        conn.execute(SQL["create_snapshot_records_index"])

    def _check_version(self, stored: object) -> int:
        """The stored version if this module reads it (the current one, or an older one to
        upgrade)."""
        version = -1
        with contextlib.suppress(ValueError):
            version = int(str(stored))
        if 1 <= version <= SCHEMA_VERSION:
            return version
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


class Session(abc.ABC):
    """A connection used by one task for a transaction that spans awaits (see
    :meth:`SQLiteConnector.reader` and :meth:`SQLiteConnector.writer`).

    :meth:`call` runs a function on the session's connection (errors translated as by
    :meth:`SQLiteConnector.call`); the caller begins and commits the transaction itself.
    :meth:`close` ends it: whatever was not committed is rolled back. It never blocks, so a
    generator closed early or a cancelled task can call it from a ``finally``: the rollback
    is queued behind a call still running on the connection (a cancelled caller's), and
    releases SQLite's locks as soon as that call ends.
    """

    @abc.abstractmethod
    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` on the session's connection."""

    @abc.abstractmethod
    def close(self) -> Future[None]:
        """Roll back what was not committed and give the connection up (idempotent, never
        blocks); the future is done once that has happened."""

    async def aclose(self) -> None:
        """:meth:`close`, then wait until it has happened (the locks are released)."""
        await asyncio.shield(asyncio.wrap_future(self.close()))


class SideConnection(Session):
    """A connection of its own to the connector's file, used through a thread of its own."""

    def __init__(
        self, connector: SQLiteConnector, opener: Callable[[], sqlite3.Connection]
    ) -> None:
        self._connector = connector
        self._opener = opener
        self._conn: sqlite3.Connection | None = None
        self._closing: Future[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetmem-sqlite")

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._connector
        if self._closing is not None:
            raise StoreClosedError(f"this SQLite session on {db.path!r} is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, fn)
        try:
            return await future
        except sqlite3.Error as exc:
            raise db._translate(exc) from exc

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closing is not None:  # closed while this call waited for the thread
            raise StoreClosedError(f"this SQLite session on {self._connector.path!r} is closed")
        conn = self._conn
        if conn is None:
            conn = self._conn = self._opener()
        return fn(conn)

    def close(self) -> Future[None]:
        if self._closing is None:
            self._connector._sessions.discard(self)
            self._closing = self._executor.submit(self._release)
            self._executor.shutdown(wait=False)
        return self._closing

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                with contextlib.suppress(sqlite3.Error):  # closing rolls back anyway
                    _rollback_open(conn)
            finally:
                conn.close()


class _HeldConnection(Session):
    """The store's own connection, held by one task while the connector's gate is closed (a
    private in-memory database, which has no second connection)."""

    def __init__(self, connector: SQLiteConnector) -> None:
        self._connector = connector
        self._closing: Future[None] | None = None

    async def call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._connector
        if self._closing is not None:
            raise StoreClosedError(f"this SQLite session on {db.path!r} is closed")
        return await db._call_now(fn)

    def close(self) -> Future[None]:
        if self._closing is None:
            db = self._connector
            db._sessions.discard(self)
            # Queued before the gate opens: the store's thread runs jobs in order, so the
            # rollback runs before any call that was waiting for the gate.
            try:
                self._closing = db._executor.submit(db._with_connection, _rollback_open)
            except RuntimeError:  # the store is closed: closing its connection rolled back
                self._closing = Future()
                self._closing.set_result(None)
            db._release_gate()
        return self._closing


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _rollback_open(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute(SQL["rollback"])


def _copy_database(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A private in-memory copy of the database of ``conn`` (in one step: one instant)."""
    copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    try:
        conn.backup(copy)
        copy.execute(SQL["query_only"])
    except BaseException:
        copy.close()
        raise
    return copy


class Transaction:
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
