"""``PostgresStore``: the durable backend, on asyncpg.

One table (default ``fleetmem.entries``, owned by the alembic migrations in ``migrate``) holds every
namespace; each operation is one SQL statement from ``queries.sql`` (``set_many`` is a COPY into a
temporary table and one upsert, in one transaction). Expiry is judged by ``now()`` on the server.

Connections: the store's own lean pool of asyncpg connections, opened by
:meth:`PostgresStore.connect`, each with an orjson codec for ``jsonb`` (the store hands asyncpg the
already-encoded payload); or an injected asyncpg pool (then never closed). A FIFO gate sits in
front of either, and every acquire is bounded by ``acquire_timeout``; taking an idle connection of
the own pool while the gate is free costs no await. ``command_timeout`` on the own pool is a
deadline watched by one task (see ``_watch``), not asyncpg's per-statement timer. Concurrent
single-key calls are merged into one statement per batch (the ``_*_batch`` hooks). Driver
exceptions are translated in :func:`_translate`, the one choke point.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from fleetmem._codec import decode_value_after_byte, incremented
from fleetmem._urls import redact_url, url_scheme
from fleetmem._validate import (
    GlobPattern,
    check_non_negative_int,
    prefix_upper_bound,
)
from fleetmem.backends._files import sql_blocks
from fleetmem.backends.postgres import migrate
from fleetmem.backends.seam import MISSING, EntryMeta, KVBackend, SetOp
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
    OutcomeUnknownError,
    SchemaVersionError,
    StoreClosedError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["PostgresKV"]

_log = logging.getLogger("fleetmem.postgres")

#: Backoff between tries to open a connection while the server refuses new ones (too many
#: clients): from 10 ms, doubling (with jitter) up to 250 ms.
_OPEN_BACKOFF_MIN = 0.01
_OPEN_BACKOFF_MAX = 0.25


def _jittered(backoff: float) -> float:
    """A backoff interval with jitter (0.5x to 1.5x), so that waiting openers spread out."""
    return backoff * (0.5 + random.random())


def _refused(exc: BaseException | None, waited: str = "") -> BackendUnavailableError:
    """The server refused a new connection (SQLSTATE 53300); ``waited`` says for what."""
    reason = f": {exc}" if exc is not None else ""
    return BackendUnavailableError(
        f"PostgreSQL refused a new connection: too many clients (SQLSTATE 53300{reason}){waited}"
    )


_BLOCKS = sql_blocks(__package__ or "fleetmem.backends.postgres", "sql", "kv.sql")


@functools.lru_cache(maxsize=32)
def _queries(schema: str, table: str) -> dict[str, str]:
    """The named statements with ``{table}`` replaced by the quoted, validated table name."""
    qualified = f"{migrate.quote_ident(schema)}.{migrate.quote_ident(table)}"
    return {name: sql.replace("{table}", qualified) for name, sql in _BLOCKS.items()}


# ------------------------------------------------------------------------------ the codec


def _encode_jsonb(payload: bytes) -> bytes:
    # jsonb's binary format: a version byte (1) then the JSON text.
    return b"\x01" + payload


async def init_connection(conn: Any) -> None:
    """Register fleetmem's ``jsonb`` codec on ``conn`` (use as a pool's ``init=``)."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=decode_value_after_byte,
        format="binary",
    )


# ------------------------------------------------------------------------------ errors

# Errors after which the connection cannot be trusted (it is terminated, never reused).
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncio.TimeoutError,
)
_LOST = (*_CONNECTION_ERRORS, asyncpg.PostgresConnectionError)


# SQLSTATEs of a server ending or refusing the session: a statement answered with one of these
# was rolled back (admin/crash shutdown, cannot connect now, too many connections).
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "53300"})


# Deadlock detected / serialization failure: the statement was rolled back as a whole.
_ROLLED_BACK = frozenset({"40P01", "40001"})


def _ended_by_server(exc: BaseException) -> bool:
    """Whether the server answered with a session-ending error (directly or as the cause)."""
    for err in (exc, exc.__cause__):
        if isinstance(err, asyncpg.PostgresError) and err.sqlstate in _SESSION_ENDED:
            return True
    return False


def _never_sent(exc: BaseException) -> bool:
    """True if the statement provably never ran: the server ended the session instead (and
    rolled it back), the connection was known closed (InterfaceError "connection is closed"),
    or the protocol refused to start it (InternalClientError "cannot switch to state": the
    connection was still taking in the server's goodbye after a restart)."""
    return (
        _ended_by_server(exc)
        or (isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))
        or (
            isinstance(exc, asyncpg.InternalClientError)
            and str(exc).startswith("cannot switch to state")
        )
    )


def _translate(exc: BaseException, *, write: bool, sent: bool, can_retry: bool) -> Exception:
    """The one choke point: a driver/OS exception as a fleetmem error.

    Returns ``_RETRY`` when the operation may run again on another connection: a read whose
    connection failed, or any statement that provably did not run -- the connection was known
    closed before sending, or the server answered with a session-ending error (it then rolled
    the statement back). A write whose connection died with the statement in flight becomes
    :class:`OutcomeUnknownError`.
    """
    if isinstance(exc, FleetmemError):
        return exc
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        # Only ever an answer to opening a connection: nothing ran, nothing was lost.
        return _refused(exc)
    lost = isinstance(exc, _LOST)
    if lost or _ended_by_server(exc):
        timed_out = isinstance(exc, asyncio.TimeoutError)
        never_sent = not sent or _never_sent(exc)
        if can_retry and not timed_out and (never_sent or not write):
            return _RETRY
        what = "timed out" if timed_out else "lost its connection"
        if write and not never_sent:
            return OutcomeUnknownError(
                f"PostgreSQL {what} while a write was in flight: it may or may not have been "
                f"applied ({type(exc).__name__})"
            )
        return BackendUnavailableError(f"PostgreSQL {what} ({type(exc).__name__})")
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state in _ROLLED_BACK and can_retry:
            return _RETRY  # the server rolled the statement back: running it again is safe
        if isinstance(
            exc,
            (
                asyncpg.UndefinedTableError,
                asyncpg.InvalidSchemaNameError,
                asyncpg.UndefinedColumnError,
            ),
        ):
            return SchemaVersionError(
                f"fleetmem's table is missing or outdated ({state}): run  fleetmem db upgrade"
            )
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return ConfigurationError(f"PostgreSQL refused the statement: {exc}")
        if state.startswith(("53", "57", "58")) or isinstance(exc, asyncpg.QueryCanceledError):
            return BackendUnavailableError(f"PostgreSQL is unavailable ({state}): {exc}")
        if state.startswith("22"):
            # A data exception: an argument PostgreSQL cannot take. Validation refuses every
            # known one before any I/O (alike on every backend); this is the safety net.
            return InvalidArgumentError(f"PostgreSQL refused an argument ({state}): {exc}")
        return FleetmemError(f"PostgreSQL error {state}: {exc}")
    return FleetmemError(f"unexpected driver error: {type(exc).__name__}: {exc}")


def _terminate(conn: Any) -> None:
    """Drop a connection that cannot be trusted (it may already be closed and released)."""
    with contextlib.suppress(Exception):
        conn.terminate()


class _Retry(Exception):
    pass


_RETRY = _Retry()


# ------------------------------------------------------------------------------ shared state


class _ConnectionPool:
    """The store's own pool: idle asyncpg connections on a stack, nothing more.

    asyncpg's ``Pool`` costs an extra event-loop task per release (``asyncio.shield``) and a
    scan of its holders per acquire; a store call is one statement, so that bookkeeping is a
    large share of its latency. The store's FIFO semaphore bounds the connections in use to
    ``max_size``; this pool hands out an idle connection, replaces closed ones, and opens new
    ones (each with the jsonb codec) on demand.

    When the server refuses a new connection because it has too many clients (SQLSTATE 53300,
    ``max_connections`` or a role's or database's connection limit), the caller is not failed:
    it queues (FIFO) for a connection another caller gives back, while one open is tried again
    per backoff interval (10 ms doubling to 250 ms), until the caller's deadline (see
    :meth:`get`); only then does it fail, saying that the server refused a new connection.
    """

    def __init__(
        self, dsn: str, min_size: int, max_size: int, timeout: float, **connect_kwargs: Any
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout  # acquire_timeout: bounds each open, and get()
        self.connect_kwargs = connect_kwargs
        self.idle: list[Any] = []
        self.size = 0  # connections open or opening, idle or in use
        self.closing = False
        # Callers holding a gate slot but no connection (the server refused a new one). A
        # future's result is a connection handed over by put(), or None: "try opening now".
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.retry_at = 0.0  # no open is tried before this (monotonic) after a refusal
        self.backoff = _OPEN_BACKOFF_MIN
        self.refusal: BaseException | None = None  # the last too-many-clients error

    async def start(self) -> None:
        """Open ``min_size`` connections: the first one waits out refusals until the acquire
        timeout; past it, a refusal (too many clients) ends the warm-up without an error."""
        for i in range(self.min_size):
            if i == 0:
                conn = await self.get(time.monotonic() + self.timeout)
            else:
                try:
                    conn = await self.open(self.timeout)
                except asyncpg.TooManyConnectionsError:
                    return
            self.idle.append(conn)

    async def open(self, timeout: float) -> Any:
        self.size += 1
        try:
            conn = await asyncpg.connect(self.dsn, timeout=timeout, **self.connect_kwargs)
            try:
                await init_connection(conn)
            except BaseException:
                conn.terminate()
                raise
        except BaseException:
            self.size -= 1
            raise
        return conn

    async def get(self, deadline: float) -> Any:
        """An idle connection, else a new one; if the server refuses it (too many clients),
        one given back by another caller or opened on a later try, waiting until ``deadline``.

        Raises ``BackendUnavailableError`` saying the server refused a new connection when
        ``deadline`` passes; other failures to open propagate (translated by the caller).
        """
        while True:
            # (Again after each refusal: a connection given back meanwhile went to the idle
            # stack if no caller was waiting yet.)
            conn = self.take_idle()
            if conn is not None:
                return conn
            now = time.monotonic()
            refusing = self.refusal is not None
            if refusing and now >= deadline:
                raise self._refused_error()
            if now >= self.retry_at:
                if refusing:
                    # While the server refuses, one try per backoff interval, not one per
                    # waiter: the others wait for its outcome or for a connection.
                    self.retry_at = now + _jittered(self.backoff)
                # Until the server is known to refuse, an open gets acquire_timeout of its own
                # (the caller may have spent the deadline in the gate's queue): a caller is
                # never failed without one attempt to connect.
                timeout = min(self.timeout, deadline - now) if refusing else self.timeout
                try:
                    conn = await self.open(timeout)
                except asyncpg.TooManyConnectionsError as exc:
                    if self.refusal is None:
                        self.retry_at = time.monotonic() + _jittered(self.backoff)
                    self.refusal = exc
                    self.backoff = min(self.backoff * 2, _OPEN_BACKOFF_MAX)
                else:
                    if self.refusal is not None:
                        # The server took a connection again: let the next waiter try too.
                        self.refusal = None
                        self.backoff = _OPEN_BACKOFF_MIN
                        self.retry_at = 0.0
                        self.wake_one()
                    return conn
            conn = await self._wait(min(deadline, max(self.retry_at, time.monotonic())))
            if conn is not None:
                return conn

    async def _wait(self, until: float) -> Any:
        """A connection handed over by :meth:`put`, or None at ``until`` or when woken."""
        if self.closing:
            raise StoreClosedError("the store is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_at(loop.time() + max(0.0, until - time.monotonic()), _wake_waiter, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                conn = waiter.result()
                if conn is not None:
                    self.put(conn)  # handed over together with the cancellation: pass it on
                else:
                    self.wake_one()
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def _refused_error(self) -> BackendUnavailableError:
        return _refused(
            self.refusal,
            f", and none of the store's {self.size} connection(s) came free within "
            f"{self.timeout} s; raise the server's max_connections or lower max_size x processes",
        )

    def wake_one(self) -> None:
        """Let the oldest waiter try to open a connection now."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    async def cancel_backends(self, pids: list[int]) -> None:
        """Cancel the statements of the server processes ``pids`` (best effort)."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.timeout, **self.connect_kwargs)
        except Exception:
            return
        try:
            for pid in pids:
                await conn.execute("SELECT pg_cancel_backend($1)", pid)
        except Exception:
            _log.debug("cancelling a timed-out statement failed", exc_info=True)
        finally:
            _terminate(conn)

    def take_idle(self) -> Any:
        """A live idle connection, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                return conn
            self.size -= 1
        return None

    def put(self, conn: Any) -> None:
        if conn.is_closed():
            self.size -= 1
        elif self.closing or conn.is_in_transaction():
            conn.terminate()
            self.size -= 1
        else:
            waiters = self.waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)  # the connection moves to the oldest waiter
                    return
            self.idle.append(conn)
            return
        if self.waiters:
            # A connection fewer: the server has a free slot for a waiter now, most likely.
            self.retry_at = 0.0
            self.wake_one()

    async def close(self, timeout: float) -> None:
        self.closing = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(StoreClosedError("the store is closed"))
        idle, self.idle = self.idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.close(), timeout)
            except (Exception, asyncio.TimeoutError):
                conn.terminate()
            self.size -= 1


def _wake_waiter(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Gate:
    """A FIFO semaphore whose uncontended entry is a plain method call (no await).

    ``leave`` hands the slot straight to the oldest waiter, so a caller arriving later can
    never overtake one already queued.
    """

    __slots__ = ("free", "size", "waiters")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def enter(self, timeout: float) -> bool:
        """Wait for a slot: True once held, False after ``timeout`` seconds."""
        if self.try_enter():
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_later(timeout, _expire_waiter, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the slot arrived together with the cancellation: pass it on
            raise
        except asyncio.TimeoutError:
            return False
        finally:
            timer.cancel()
        return True

    def leave(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter
                return
        self.free += 1


def _expire_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class _PgState:
    """State shared by a store and its ``with_namespace`` views."""

    def __init__(self, pool: Any, max_size: int) -> None:
        self.pool = pool  # an injected asyncpg pool, never closed here
        self.own: _ConnectionPool | None = None
        self.ready = False
        self.lock = asyncio.Lock()
        self.gate = _Gate(max_size)
        self.sweeper: asyncio.Task[None] | None = None
        # command_timeout on the store's own connections: a deadline per connection in use,
        # enforced by the watchdog task (asyncpg's own per-statement timer costs more than a
        # tenth of a primary-key lookup). None when there is no timeout.
        self.deadlines: dict[Any, float] | None = None
        self.timed_out: set[Any] = set()
        self.watchdog: asyncio.Task[None] | None = None
        self.cancels: set[asyncio.Task[None]] = set()


async def _watch(pg: _PgState, interval: float) -> None:
    """Terminate every connection whose statement has run past its deadline."""
    while True:
        await asyncio.sleep(interval)
        deadlines = pg.deadlines
        if not deadlines:
            continue
        now = time.monotonic()
        pids: list[int] = []
        for conn, deadline in list(deadlines.items()):
            if deadline <= now:
                del deadlines[conn]
                pg.timed_out.add(conn)
                _log.warning("a PostgreSQL statement ran past command_timeout: connection dropped")
                with contextlib.suppress(Exception):
                    pids.append(conn.get_server_pid())
                _terminate(conn)
        own = pg.own
        if pids and own is not None:
            # As asyncpg does on a timeout: ask the server to cancel the statement too.
            task = asyncio.get_running_loop().create_task(own.cancel_backends(pids))
            pg.cancels.add(task)
            task.add_done_callback(pg.cancels.discard)


_FETCH, _FETCHROW, _FETCHVAL, _FETCH_PLANNED = 0, 1, 2, 3
#: From this many keys, a read by key array runs as a statement prepared for the call, which
#: PostgreSQL plans for the array it is given. asyncpg's cached statements get a generic plan
#: after five runs, made for an array of unknown size: on 10,000 keys it ran 25 ms against 18
#: ms for the planned one (which costs one more round trip, ~0.1 ms).
_PLANNED_MIN_KEYS = 500


class PostgresKV(KVBackend):
    """Entries in a PostgreSQL table (see ``docs/backends/postgres.md``)."""

    backend_name = "postgres"
    # Past this many single-key calls in flight, concurrent get/get_entry/exists calls are
    # merged: one `= ANY` statement per batch (see fleetmem._coalesce). Two batches in flight
    # keep the server busy while the client decodes the other: 64 coroutines reading got 107k
    # reads/s against 89k with one (and 105k with three), on a server of its own.
    coalesce_max_inflight = 2
    #: The same for set/delete: each batch is a commit, and commits in flight together share
    #: the WAL flush, so writes keep a few batches going at once.
    coalesce_max_inflight_writes = 2

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        namespace: str,
        schema: str = migrate.DEFAULT_SCHEMA,
        table: str = migrate.DEFAULT_TABLE,
        auto_migrate: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        command_timeout: float | None = 30.0,
        sweeper_interval: float | None = None,
        sweeper_batch: int = 1000,
        ssl: Any = None,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(namespace=namespace)
        if (dsn is None) == (pool is None):
            raise ConfigurationError("PostgresStore needs exactly one of a dsn or a pool")
        if dsn is not None and url_scheme(dsn) not in ("postgres", "postgresql"):
            raise ConfigurationError(
                f"expected a postgresql:// or postgres:// URL, not {redact_url(dsn)!r}"
            )
        for name, number in (
            ("min_size", min_size),
            ("max_size", max_size),
            ("sweeper_batch", sweeper_batch),
        ):
            check_non_negative_int(name, number)
        if max_size < 1 or min_size > max_size:
            raise ConfigurationError("need 0 <= min_size <= max_size and max_size >= 1")
        if not acquire_timeout or acquire_timeout <= 0:
            raise ConfigurationError("acquire_timeout must be > 0 seconds")
        if sweeper_interval is not None and sweeper_interval <= 0:
            raise ConfigurationError("sweeper_interval must be > 0 seconds or None")
        self._schema = migrate.validate_identifier(schema, "schema name")
        self._table = migrate.validate_identifier(table, "table name")
        self._dsn = dsn
        self._auto_migrate = bool(auto_migrate)
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout = float(acquire_timeout)
        self._command_timeout = command_timeout
        self._sweeper_interval = sweeper_interval
        self._sweeper_batch = max(1, sweeper_batch)
        self._ssl = ssl
        self._server_settings = server_settings
        self._q = _queries(self._schema, self._table)
        self._pg = _PgState(pool, max_size)

    def describe(self) -> str:
        where = redact_url(self._dsn) if self._dsn is not None else "injected pool"
        return f" table={self._schema}.{self._table} url={where!r}"

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Create the pool (unless injected) and check the schema version (migrating a fresh or
        older database when ``auto_migrate``). Idempotent."""
        pg = self._pg
        async with pg.lock:
            if pg.ready:
                return
            try:
                if pg.pool is not None:
                    await self._check_injected_codec()
                elif pg.own is None:
                    assert self._dsn is not None
                    pg.own = _ConnectionPool(
                        self._dsn,
                        self._min_size,
                        self._max_size,
                        timeout=self._acquire_timeout,
                        ssl=self._ssl,
                        server_settings=self._server_settings,
                    )
                    await pg.own.start()
                    timeout = self._command_timeout
                    if timeout is not None and pg.watchdog is None:
                        pg.deadlines = {}
                        pg.watchdog = asyncio.get_running_loop().create_task(
                            _watch(pg, min(max(timeout / 4, 0.005), 1.0)),
                            name="fleetmem-pg-watchdog",
                        )
                await self._check_schema()
            except Exception as exc:
                err = _translate(exc, write=False, sent=True, can_retry=False)
                if err is exc:
                    raise
                raise err from exc
            if self._sweeper_interval is not None and pg.sweeper is None:
                pg.sweeper = asyncio.get_running_loop().create_task(
                    self._sweep_forever(self._sweeper_interval), name="fleetmem-pg-sweeper"
                )
            pg.ready = True

    async def _check_injected_codec(self) -> None:
        value = await self._run(_FETCHVAL, "SELECT '[1]'::jsonb", (), write=False, auto=False)
        if value != [1]:
            raise ConfigurationError(
                "the injected pool has no fleetmem jsonb codec: create it with "
                "asyncpg.create_pool(..., init=fleetmem.backends.postgres.init_connection)"
            )

    async def _check_schema(self) -> None:
        version = await self._with_conn(self._read_version)
        if version == migrate.HEAD_REVISION:
            return
        where = f"{self._schema}.{self._table}"
        if version is not None and version not in migrate.REVISIONS:
            raise SchemaVersionError(
                f"{where} is at schema revision {version!r}, newer than this fleetmem knows "
                f"(head {migrate.HEAD_REVISION!r}): upgrade fleetmem"
            )
        if not self._auto_migrate:
            state = "absent" if version is None else f"at revision {version!r}"
            raise SchemaVersionError(
                f"{where} is {state}, this fleetmem needs {migrate.HEAD_REVISION!r}: run  "
                "fleetmem db upgrade  (or pass auto_migrate=True)"
            )
        await self._migrate()
        version = await self._with_conn(self._read_version)
        if version != migrate.HEAD_REVISION:  # pragma: no cover - alembic would have raised
            raise SchemaVersionError(f"{where} is at {version!r} after migrating")

    async def _read_version(self, conn: Any) -> str | None:
        return await migrate.read_version(conn, schema=self._schema, table=self._table)

    async def _migrate(self) -> None:
        pg = self._pg
        if self._dsn is not None:
            dsn, ssl, settings = self._dsn, self._ssl, self._server_settings

            async def connect() -> Any:
                return await asyncpg.connect(
                    dsn, ssl=ssl, server_settings=settings, timeout=self._acquire_timeout
                )
        else:

            async def connect() -> Any:
                # SQLAlchemy closes this connection when done; the pool then replaces it.
                return await pg.pool.acquire(timeout=self._acquire_timeout)

        _log.info("migrating %s.%s to %s", self._schema, self._table, migrate.HEAD_REVISION)
        await migrate.upgrade_on(connect, schema=self._schema, table=self._table)

    async def aclose(self) -> None:
        pg = self._pg
        if pg.sweeper is not None:
            pg.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pg.sweeper
            pg.sweeper = None
        pg.ready = False
        if pg.watchdog is not None:
            pg.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pg.watchdog
            pg.watchdog = None
        if pg.own is not None:
            own, pg.own = pg.own, None
            await own.close(self._acquire_timeout)

    # ---------------------------------------------------------------- the choke point

    def next_lone_connection(self) -> Any:
        """The connection the next lone call will take (the top of the own pool's idle stack),
        left in place; None with an injected pool. For ``fleetmem bench``: its raw side runs on
        this very connection, hence on the same server process as the store's calls."""
        own = self._pg.own
        return own.idle[-1] if own is not None and own.idle else None

    def _take(self) -> Any:
        """An idle connection of the store's own pool if one is free right now, else None."""
        pg = self._pg
        own = pg.own
        if own is not None and own.idle and pg.gate.try_enter():
            conn = own.idle.pop()
            if not conn.is_closed():
                return conn
            own.size -= 1
            pg.gate.leave()
        return None

    async def _acquire(self) -> Any:
        """A connection within ``acquire_timeout``: a gate slot (FIFO), then an idle connection
        or a new one. A server refusing new connections (too many clients) does not fail the
        caller while a connection may still come free in time (see ``_ConnectionPool.get``)."""
        pg = self._pg
        gate = pg.gate
        deadline = time.monotonic() + self._acquire_timeout
        if not await gate.enter(self._acquire_timeout):
            raise BackendUnavailableError(
                f"no PostgreSQL connection free within {self._acquire_timeout} s "
                f"(max_size={self._max_size})"
            )
        try:
            own = pg.own
            if own is not None:
                return await own.get(deadline)
            if pg.pool is None:
                raise StoreClosedError("the store is closed")
            return await self._acquire_injected(deadline)
        except BaseException as exc:
            gate.leave()
            if isinstance(exc, (asyncio.CancelledError, FleetmemError)):
                raise
            if isinstance(exc, asyncio.TimeoutError):
                raise BackendUnavailableError(
                    f"no PostgreSQL connection within {self._acquire_timeout} s"
                ) from exc
            if isinstance(exc, _LOST) or _ended_by_server(exc):
                # Opening failed: nothing was lost, the server could not be reached.
                raise BackendUnavailableError(
                    f"could not open a connection to PostgreSQL ({type(exc).__name__})"
                ) from exc
            err = _translate(exc, write=False, sent=False, can_retry=False)
            raise err from exc

    async def _acquire_injected(self, deadline: float) -> Any:
        """A connection of the injected asyncpg pool; while the server refuses new connections
        (too many clients), tried again with backoff until ``deadline``."""
        backoff = _OPEN_BACKOFF_MIN
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self._pg.pool.acquire(timeout=max(remaining, 0.001))
            except asyncpg.TooManyConnectionsError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _refused(
                        exc,
                        f", and no connection of the pool came free within "
                        f"{self._acquire_timeout} s",
                    ) from exc
                await asyncio.sleep(min(remaining, _jittered(backoff)))
                backoff = min(backoff * 2, _OPEN_BACKOFF_MAX)

    def _arm(self, conn: Any) -> None:
        """Start the command_timeout clock of the statement about to run on ``conn``."""
        deadlines = self._pg.deadlines
        if deadlines is not None and self._command_timeout is not None:
            deadlines[conn] = time.monotonic() + self._command_timeout

    def _failure(self, conn: Any, exc: Exception) -> Exception:
        """``exc``, or a TimeoutError when the watchdog dropped ``conn`` (past its deadline)."""
        timed_out = self._pg.timed_out
        if conn in timed_out:
            timed_out.discard(conn)
            return asyncio.TimeoutError()
        return exc

    def _give_back(self, conn: Any) -> None:
        """Return a connection of the store's own pool (dropped if the pool has closed)."""
        pg = self._pg
        if pg.deadlines:
            pg.deadlines.pop(conn, None)
        if pg.timed_out:
            pg.timed_out.discard(conn)
        own = pg.own
        if own is not None:
            own.put(conn)
        else:
            _terminate(conn)
        pg.gate.leave()

    async def _release(self, conn: Any) -> None:
        pg = self._pg
        if self._dsn is not None:
            self._give_back(conn)
            return
        try:
            await pg.pool.release(conn)
        except Exception:  # a broken connection is dropped by the pool; the caller has its result
            _log.debug("releasing a PostgreSQL connection failed", exc_info=True)
        finally:
            pg.gate.leave()

    async def _run(
        self, kind: int, query: str, args: tuple[Any, ...], *, write: bool, auto: bool = True
    ) -> Any:
        """Run one statement; retry where that is safe (see :func:`_translate`): once after a
        read lost its connection, and as many times as the pool has connections while the
        connection at hand turns out dead before the statement started (after a restart every
        idle connection may be; each is terminated on the way)."""
        if auto and not self._pg.ready:
            await self.connect()
        own_pool = self._dsn is not None
        pg = self._pg
        for attempt in range(pg.gate.size + 1):
            # Fast path: an idle connection is at hand, taken and given back without an await.
            conn = self._take()
            if conn is None:
                conn = await self._acquire()
            deadlines = pg.deadlines
            if deadlines is not None and own_pool:
                deadlines[conn] = time.monotonic() + self._command_timeout  # type: ignore[operator]
            try:
                if kind == _FETCHROW:
                    return await conn.fetchrow(query, *args)
                if kind == _FETCHVAL:
                    return await conn.fetchval(query, *args)
                if kind == _FETCH_PLANNED:
                    return await (await conn.prepare(query)).fetch(*args)
                return await conn.fetch(query, *args)
            except Exception as exc:
                if isinstance(exc, _LOST):
                    _terminate(conn)
                failure = self._failure(conn, exc)
                err = _translate(
                    failure,
                    write=write,
                    sent=True,
                    can_retry=attempt == 0 or (isinstance(exc, _LOST) and _never_sent(failure)),
                )
                if err is _RETRY:
                    _log.debug("retrying after %s", type(exc).__name__)
                    continue
                if err is exc:
                    raise
                raise err from exc
            finally:
                if own_pool:
                    self._give_back(conn)
                else:
                    await self._release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _with_conn(self, fn: Any) -> Any:
        conn = await self._acquire()
        try:
            self._arm(conn)
            try:
                return await fn(conn)
            except Exception as exc:
                failure = self._failure(conn, exc)
                if failure is exc:
                    raise
                raise failure from exc
        finally:
            await self._release(conn)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """A connection in a transaction, for multi-statement writes (never retried)."""
        if not self._pg.ready:
            await self.connect()
        conn = await self._acquire()
        try:
            try:
                self._arm(conn)
                async with conn.transaction():
                    yield conn
                    self._arm(conn)  # COMMIT
            except Exception as exc:
                if isinstance(exc, _LOST):
                    _terminate(conn)
                err = _translate(self._failure(conn, exc), write=True, sent=True, can_retry=False)
                if err is exc:
                    raise
                raise err from exc
        finally:
            await self._release(conn)

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Any:
        row = await self._run(_FETCHROW, self._q["get"], (self._namespace, key), write=False)
        return MISSING if row is None else row[0]

    async def get_entry(self, key: str) -> Entry | None:
        row = await self._run(_FETCHROW, self._q["get_entry"], (self._namespace, key), write=False)
        if row is None:
            return None
        return Entry(key, row[0], row[1], row[2], row[3], row[4], row[5])

    async def _read_by_keys(self, name: str, keys: list[str]) -> Any:
        """The rows of read ``name`` for a key array (planned for it from _PLANNED_MIN_KEYS)."""
        kind = _FETCH_PLANNED if len(keys) >= _PLANNED_MIN_KEYS else _FETCH
        return await self._run(kind, self._q[name], (self._namespace, keys), write=False)

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        return dict(await self._read_by_keys("get_many", keys))  # (key, value) records

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        rows = await self._read_by_keys("get_entries", keys)
        return {
            row[0]: Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6]) for row in rows
        }

    async def get_entries_ttl(self, keys: list[str]) -> dict[str, tuple[Entry, int | None]]:
        """Live entries with their remaining life in ms, computed by PostgreSQL with ``now()``
        (the clock expiry is judged by) in the statement that reads them: the application's
        clock is never consulted. One key is a primary-key lookup, more one ``= ANY``."""
        if len(keys) == 1:
            key = keys[0]
            row = await self._run(
                _FETCHROW, self._q["get_entry_ttl"], (self._namespace, key), write=False
            )
            if row is None:
                return {}
            entry = Entry(key, row[0], row[1], row[2], row[3], row[4], row[5])
            return {key: (entry, row[6])}
        rows = await self._read_by_keys("get_entries_ttl", keys)
        return {
            row[0]: (Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6]), row[7])
            for row in rows
        }

    async def exists_batch(self, keys: list[str]) -> list[bool]:
        rows = await self._run(_FETCH, self._q["exists_many"], (self._namespace, keys), write=False)
        found = {row[0] for row in rows}
        return [key in found for key in keys]

    async def exists(self, key: str) -> bool:
        value = await self._run(_FETCHVAL, self._q["exists"], (self._namespace, key), write=False)
        return value is not None

    async def ttl(self, key: str) -> float | None:
        row = await self._run(_FETCHROW, self._q["ttl"], (self._namespace, key), write=False)
        if row is None:
            raise KeyNotFoundError(f"key {key!r} does not exist")
        return None if row[0] is None else float(row[0])

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        upper = prefix_upper_bound(prefix)
        args: tuple[Any, ...] = (self._namespace, prefix, upper, after or "", limit)
        if partition is None:
            rows = await self._run(_FETCH, self._q["keys"], args, write=False)
        else:
            rows = await self._run(
                _FETCH, self._q["keys_partition"], (*args, partition), write=False
            )
        return [row[0] for row in rows]

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        prefix = pattern.prefix
        regex = pattern.regex if pattern.has_class else None
        args: tuple[Any, ...] = (
            self._namespace,
            prefix,
            prefix_upper_bound(prefix),
            pattern.like,
            regex,
            limit,
        )
        if partition is None:
            rows = await self._run(_FETCH, self._q["search"], args, write=False)
        else:
            rows = await self._run(
                _FETCH, self._q["search_partition"], (*args, partition), write=False
            )
        # The SQL filter is exact; .matches guards against any engine difference.
        return {row[0]: row[1] for row in rows if pattern.matches(row[0])}

    async def partitions(self) -> list[str]:
        rows = await self._run(_FETCH, self._q["partitions"], (self._namespace,), write=False)
        return [row[0] for row in rows]

    async def stats(self) -> StoreStats:
        rows = await self._run(_FETCH, self._q["stats"], (self._namespace,), write=False)
        partitions = {row[0]: row[1] for row in rows if row[1] > 0}
        return StoreStats(
            namespace=self._namespace,
            keys=sum(partitions.values()),
            partitions=partitions,
            expired_pending=sum(row[2] for row in rows),
            bytes=sum(row[3] for row in rows),
            backend=self.backend_name,
        )

    async def health(self) -> dict[str, Any]:
        await self._run(_FETCHVAL, self._q["ping"], (), write=False)
        pg = self._pg
        if pg.own is not None:
            size, idle = pg.own.size, len(pg.own.idle)
        else:
            size, idle = pg.pool.get_size(), pg.pool.get_idle_size()
        return {
            "table": f"{self._schema}.{self._table}",
            "schema_revision": migrate.HEAD_REVISION,
            "pool_size": size,
            "pool_idle": idle,
            "pool_max": self._max_size,
        }

    # ---------------------------------------------------------------- writes

    async def set(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None, keep_ttl: bool
    ) -> EntryMeta:
        row = await self._run(
            _FETCHROW,
            self._q["set"],
            (self._namespace, key, payload, partition, ttl_ms, keep_ttl),
            write=True,
        )
        return EntryMeta(row[0], row[1], row[2], row[3], row[4])

    async def set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        keys: list[str] = []
        payloads: list[bytes] = []
        partitions: list[str | None] = []
        ttls: list[int | None] = []
        moved: list[str] = []
        kept: list[str] = []
        timed = False
        for op in ops:
            keys.append(op.key)
            payloads.append(op.payload)
            partitions.append(op.partition)
            ttls.append(op.ttl_ms)
            if op.partition is not None:
                moved.append(op.key)
            if op.keep_ttl:
                kept.append(op.key)
            if op.ttl_ms is not None:
                timed = True
        args: tuple[Any, ...]
        if timed or moved or kept:
            query, args = (
                self._q["set_batch"],
                (self._namespace, keys, payloads, partitions, ttls, moved, kept),
            )
        else:
            query, args = self._q["set_batch_plain"], (self._namespace, keys, payloads)
        rows = await self._run(_FETCH, query, args, write=True)
        metas = {row[0]: EntryMeta(row[1], row[2], row[3], row[4], row[5]) for row in rows}
        return [metas[key] for key in keys]

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
    ) -> int:
        count = 0

        def records() -> Iterator[tuple[str, bytes]]:
            nonlocal count
            for chunk in chunks:
                count += len(chunk)
                yield from chunk

        async with self._transaction() as conn:
            await conn.execute(self._q["stage_create"])
            # One COPY streams every chunk; only the chunk being sent is held encoded.
            self._arm(conn)
            await conn.copy_records_to_table(
                "fleetmem_stage_1", records=records(), columns=("key", "value")
            )
            self._arm(conn)
            await conn.execute(self._q["set_many"], self._namespace, partition, ttl_ms)
        return count

    async def set_if_absent(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None
    ) -> bool:
        row = await self._run(
            _FETCHROW,
            self._q["set_if_absent"],
            (self._namespace, key, payload, partition, ttl_ms),
            write=True,
        )
        return row is not None

    async def compare_and_set(
        self, key: str, payload: bytes, version: int, ttl_ms: int | None, partition: str | None
    ) -> EntryMeta:
        ns = self._namespace
        for _ in range(5):
            if version == 0:
                row = await self._run(
                    _FETCHROW,
                    self._q["set_if_absent"],
                    (ns, key, payload, partition, ttl_ms),
                    write=True,
                )
            else:
                row = await self._run(
                    _FETCHROW,
                    self._q["compare_and_set"],
                    (ns, key, payload, partition, ttl_ms, version),
                    write=True,
                )
            if row is not None:
                return EntryMeta(row[0], row[1], row[2], row[3], row[4])
            current = await self._run(_FETCHVAL, self._q["current_version"], (ns, key), write=False)
            current = 0 if current is None else int(current)
            if current != version:
                raise VersionConflictError(key, version, current)
            # The entry changed between the two statements and came back to `version`: retry.
        raise VersionConflictError(key, version, version)  # pragma: no cover - constant churn

    async def incr(
        self, key: str, amount: int | float, ttl_ms: int | None, partition: str | None
    ) -> int | float:
        ns = self._namespace
        is_float = isinstance(amount, float)
        text = repr(amount) if is_float else str(amount)
        for _ in range(5):
            try:
                row = await self._run(
                    _FETCHROW,
                    self._q["incr"],
                    (ns, key, text, partition, ttl_ms, is_float),
                    write=True,
                )
            except FleetmemError as exc:
                cause = exc.__cause__
                if isinstance(cause, asyncpg.NumericValueOutOfRangeError):
                    raise InvalidArgumentError(
                        f"incr of key {key!r} would overflow a float"
                    ) from cause
                raise
            if row is not None:
                value, float_result = row[0], row[1]
                return float(value) if float_result else int(value)
            # Nothing changed: say why from the current value.
            current = await self._run(_FETCHROW, self._q["get"], (ns, key), write=False)
            if current is None:
                continue  # deleted in between: try again
            incremented(key, current[0], amount)  # raises what made the statement refuse
        raise BackendUnavailableError(f"incr of key {key!r} kept racing; try again")

    async def delete(self, key: str) -> bool:
        value = await self._run(_FETCHVAL, self._q["delete"], (self._namespace, key), write=True)
        return bool(value)

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        rows = await self._run(_FETCH, self._q["delete_batch"], (self._namespace, keys), write=True)
        live = {row[0]: bool(row[1]) for row in rows}
        return [live.get(key, False) for key in keys]

    async def delete_many(self, keys: list[str]) -> int:
        value = await self._run(
            _FETCHVAL, self._q["delete_many"], (self._namespace, keys), write=True
        )
        return int(value)

    async def expire(self, key: str, ttl_ms: int | None) -> bool:
        value = await self._run(
            _FETCHVAL, self._q["expire"], (self._namespace, key, ttl_ms), write=True
        )
        return value is not None

    async def clear(self, partition: str | None) -> int:
        if partition is None:
            value = await self._run(_FETCHVAL, self._q["clear"], (self._namespace,), write=True)
        else:
            value = await self._run(
                _FETCHVAL, self._q["clear_partition"], (self._namespace, partition), write=True
            )
        return int(value)

    async def cleanup_expired(self) -> int:
        value = await self._run(
            _FETCHVAL, self._q["cleanup_expired"], (self._namespace,), write=True
        )
        return int(value)

    async def sweep_expired(self, max_batches: int = 100) -> int:
        """Delete expired rows of every namespace in this table, in bounded batches."""
        total = 0
        for _ in range(max_batches):
            removed = int(
                await self._run(_FETCHVAL, self._q["sweep"], (self._sweeper_batch,), write=True)
            )
            total += removed
            if removed < self._sweeper_batch:
                break
        return total

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.sweep_expired()
                if removed:
                    _log.debug("sweeper removed %d expired entries", removed)
            except FleetmemError as exc:
                _log.warning("expiry sweep failed: %s", exc)
