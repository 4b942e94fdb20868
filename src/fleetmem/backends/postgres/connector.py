"""``PostgresConnector``: the asyncpg connections of a PostgreSQL table, shared by every primitive.

One table (default ``fleetmem.entries``) and its alembic migrations (``migrate``) belong to a
connector: :meth:`PostgresConnector.connect` checks the schema revision and migrates a fresh or
older database when ``auto_migrate``. Each primitive loads its statements once from its own
``sql/<primitive>.sql`` file (:meth:`PostgresConnector.statements`), with ``{table}`` replaced
by the quoted, validated table name (``{leases}``, ``{agents}`` and ``{fence}`` by the lease
table, agent table and fence function of migration 0003, ``{jobs}`` by the job table of
migration 0004, ``{feeds}``, ``{changes}``, ``{changes_read}`` and ``{clear}`` by the change-feed
objects of migration 0005), and runs them through
:meth:`PostgresConnector.run` (one statement, retried where safe),
:meth:`PostgresConnector.with_conn` or :meth:`PostgresConnector.transaction`.

Connections: the connector's own lean pool of asyncpg connections, opened by
:meth:`PostgresConnector.connect`, each with an orjson codec for ``jsonb`` (the store hands
asyncpg the already-encoded payload); or an injected asyncpg pool (then never closed). A FIFO
gate sits in front of either, and every acquire is bounded by ``acquire_timeout``; taking an
idle connection of the own pool while the gate is free costs no await. ``command_timeout`` on
the own pool is a deadline watched by one task (see ``_watch``), not asyncpg's per-statement
timer. Driver exceptions are translated in :func:`_translate`, the one choke point: no asyncpg
exception reaches a caller (the fence function's SQLSTATE ``FL001`` becomes
``LeaseLostError``). The connector also holds the :class:`~fleetmem._notify.Notifier` that lease,
claim and result waiters of every view share, and the ``LISTEN`` connection that feeds it
(``leases.Listener``), closed by :meth:`PostgresConnector.close`.

A connection that could not be opened is not one that was lost: :func:`_cannot_connect` says why
("cannot connect to PostgreSQL at <url without password>: connection refused", "host not found",
"timed out", "authentication failed", "database does not exist"), as a
:class:`~fleetmem.errors.BackendUnavailableError` when the server could not be reached and a
:class:`~fleetmem.errors.ConfigurationError` when it answered no.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from fleetmem._codec import decode_value_after_byte
from fleetmem._notify import Notifier
from fleetmem._urls import hide_passwords, redact_url, url_scheme
from fleetmem._validate import check_non_negative_int, check_positive_number
from fleetmem.backends._files import sql_blocks
from fleetmem.backends.postgres import migrate
from fleetmem.backends.seam import lease_lost
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    OutcomeUnknownError,
    SchemaVersionError,
    StoreClosedError,
)

__all__ = [
    "FETCH",
    "FETCHROW",
    "FETCHVAL",
    "FETCH_PLANNED",
    "LEASE_LOST_SQLSTATE",
    "PostgresConnector",
    "init_connection",
    "sqlstate",
    "statements",
]

_log = logging.getLogger("fleetmem.postgres")

_T = TypeVar("_T")

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


@functools.lru_cache(maxsize=32)
def _blocks(block_file: str) -> dict[str, str]:
    """The named blocks of ``sql/<block_file>``, read once."""
    return sql_blocks(__package__ or "fleetmem.backends.postgres", "sql", block_file)


@functools.lru_cache(maxsize=32)
def statements(block_file: str, schema: str, table: str) -> dict[str, str]:
    """The named statements of ``sql/<block_file>`` with ``{table}`` replaced by the quoted,
    validated table name, and ``{leases}``, ``{agents}``, ``{fence}`` and ``{jobs}`` by the
    lease table, agent table, fence function and job table that belong to it, ``{feeds}``,
    ``{changes}``, ``{changes_read}`` and ``{clear}`` by the feed table, change table, read
    function and clear function (migration 0005), and ``{channel}`` by the table's ``NOTIFY``
    channel (computed once per file and table)."""
    quoted = migrate.quote_ident(schema)
    leases, agents, fence = migrate.coordination_names(table)
    feeds, changes, changes_read, clear = migrate.feed_names(table)
    names = {
        "{table}": f"{quoted}.{migrate.quote_ident(table)}",
        "{leases}": f"{quoted}.{migrate.quote_ident(leases)}",
        "{agents}": f"{quoted}.{migrate.quote_ident(agents)}",
        "{fence}": f"{quoted}.{migrate.quote_ident(fence)}",
        "{jobs}": f"{quoted}.{migrate.quote_ident(migrate.queue_table(table))}",
        # Derived names of migration 0005, quoted whole (they may pass 40 characters).
        "{feeds}": f'{quoted}."{feeds}"',
        "{changes}": f'{quoted}."{changes}"',
        "{changes_read}": f'{quoted}."{changes_read}"',
        "{clear}": f'{quoted}."{clear}"',
        # The table's NOTIFY channel, as a string literal's contents ([a-z0-9_] only).
        "{channel}": migrate.notify_channel(schema, table),
    }
    out: dict[str, str] = {}
    for name, sql in _blocks(block_file).items():
        for placeholder, qualified in names.items():
            sql = sql.replace(placeholder, qualified)
        out[name] = sql
    return out


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


#: The SQLSTATE the fence function (migration 0003) raises when a fenced write's lease is not
#: live with its token: :func:`_translate` makes it ``LeaseLostError``.
LEASE_LOST_SQLSTATE = "FL001"


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
    if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate == LEASE_LOST_SQLSTATE:
        # The fence function refused a fenced write (the statement, hence the write, was rolled
        # back): the lease name is its detail, the token its hint.
        return lease_lost(getattr(exc, "detail", None) or "", int(getattr(exc, "hint", 0) or 0))
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


#: getaddrinfo's answers that mean "no such host" (as opposed to a lookup that failed).
_NO_SUCH_HOST = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
    if hasattr(socket, name)
)


def _cannot_connect(
    exc: BaseException, where: str, dsn: str | None, timeout: float
) -> FleetmemError:
    """Opening a connection failed: say why, for a connection that never existed.

    Only for errors of *opening* a connection (``asyncpg.connect``, or an injected pool opening
    one); a connection lost while in use goes through :func:`_translate`. The message names the
    target as ``where`` (a URL without its password) and never a password:

    * the server could not be reached -- connection refused, host not found, no answer within
      ``timeout`` seconds, another network error, the server starting up or shutting down:
      :class:`BackendUnavailableError` (it may come back: trying again later can help);
    * the server answered no -- authentication failed, an unknown role or database, a
      ``pg_hba.conf`` rule, TLS asked for and refused or a certificate not trusted, an invalid
      connection option: :class:`ConfigurationError` (the same call fails again until the URL
      or the server's configuration changes);
    * too many clients (SQLSTATE 53300): the refusal the pool waits out (see ``_refused``).
    """
    if isinstance(exc, FleetmemError):
        return exc
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return _refused(exc)
    lead = f"cannot connect to PostgreSQL at {where}: "
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        said = f" (server: {hide_passwords(str(exc), dsn)})" if str(exc) else ""
        if state.startswith("28"):
            return ConfigurationError(f"{lead}authentication failed{said}")
        if state == "3D000":
            return ConfigurationError(f"{lead}database does not exist{said}")
        if state == "57P03":
            return BackendUnavailableError(
                f"{lead}the server is starting up, shutting down or in recovery{said}"
            )
        if state.startswith(("08", "53", "57", "58")):
            return BackendUnavailableError(f"{lead}the server refused the connection{said}")
        return ConfigurationError(f"{lead}the server refused the connection{said}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return BackendUnavailableError(f"{lead}timed out: no answer within {timeout:g} s")
    if isinstance(exc, socket.gaierror):
        if exc.errno in _NO_SUCH_HOST:
            return BackendUnavailableError(f"{lead}host not found")
        return BackendUnavailableError(f"{lead}host name lookup failed ({exc.strerror})")
    if isinstance(exc, ConnectionRefusedError):
        return BackendUnavailableError(f"{lead}connection refused")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        return ConfigurationError(f"{lead}the server's TLS certificate is not trusted ({reason})")
    detail = hide_passwords(str(exc), dsn)
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in detail:
        return ConfigurationError(
            f"{lead}the server does not accept TLS, which the URL's sslmode requires"
        )
    if isinstance(exc, (asyncpg.ClientConfigurationError, ValueError)):
        return ConfigurationError(f"{lead}invalid connection option ({detail})")
    if isinstance(exc, OSError) and exc.strerror:
        return BackendUnavailableError(f"{lead}{exc.strerror.lower()}")
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return BackendUnavailableError(f"{lead}{reason}")


def _terminate(conn: Any) -> None:
    """Drop a connection that cannot be trusted (it may already be closed and released)."""
    with contextlib.suppress(Exception):
        conn.terminate()


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a server error (such as the ``__cause__`` of a translated error), or None
    for anything else: a primitive can tell server errors apart without the driver's types."""
    return exc.sqlstate if isinstance(exc, asyncpg.PostgresError) else None


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
        """A new connection (counted in ``size`` while it opens). The open runs as a task of
        its own that a cancelled caller does not cancel: asyncpg leaves a future with an
        exception nobody retrieves when its SSL negotiation is cancelled ("Future exception
        was never retrieved: ConnectionError('unexpected connection_lost() call')"). The
        connection a cancelled caller leaves behind joins the idle ones once open (or is
        closed, when the pool is closing); a failure to open is retrieved and dropped."""
        self.size += 1
        task = asyncio.ensure_future(self._connect(timeout))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.add_done_callback(self._adopt)
            else:
                self.size -= 1
            raise
        except BaseException:
            self.size -= 1
            raise

    async def _connect(self, timeout: float) -> Any:
        conn = await asyncpg.connect(self.dsn, timeout=timeout, **self.connect_kwargs)
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _adopt(self, task: asyncio.Future[Any]) -> None:
        """The outcome of an open whose caller was cancelled (see :meth:`open`)."""
        if task.cancelled() or task.exception() is not None:
            self.size -= 1
            self.wake_one()
            return
        self.put(task.result())

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
                except (asyncio.TimeoutError, TimeoutError):
                    if not refusing:
                        raise
                    # A retry against a refusing server got only what was left of the
                    # caller's time, and a busy host did not answer it by then: the refusal
                    # is still the last word, not "no connection".
                    if time.monotonic() >= deadline:
                        raise self._refused_error() from None
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
            _terminate_after_cancels(conn, self.timeout)
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


def _terminate_after_cancels(conn: Any, grace: float) -> None:
    """Terminate ``conn`` once asyncpg's cancel requests for it are done (at most ``grace``
    seconds): terminating cancels them, and a cancel request cancelled during its SSL
    negotiation leaves a future with an exception nobody retrieves (asyncpg's, logged as
    "Future exception was never retrieved"). Those tasks are asyncpg's ``_cancellations``;
    without that attribute the connection is terminated at once."""
    pending = [task for task in getattr(conn, "_cancellations", ()) if not task.done()]
    if not pending:
        _terminate(conn)
        return
    handle = asyncio.get_running_loop().call_later(grace, _terminate, conn)
    left = len(pending)

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            handle.cancel()
            _terminate(conn)

    for task in pending:
        task.add_done_callback(one_done)


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


async def _watch(connector: PostgresConnector, interval: float) -> None:
    """Terminate every connection whose statement has run past its deadline."""
    while True:
        await asyncio.sleep(interval)
        deadlines = connector._deadlines
        if not deadlines:
            continue
        now = time.monotonic()
        pids: list[int] = []
        for conn, deadline in list(deadlines.items()):
            if deadline <= now:
                del deadlines[conn]
                connector._timed_out.add(conn)
                _log.warning("a PostgreSQL statement ran past command_timeout: connection dropped")
                with contextlib.suppress(Exception):
                    pids.append(conn.get_server_pid())
                _terminate(conn)
        own = connector._own
        if pids and own is not None:
            # As asyncpg does on a timeout: ask the server to cancel the statement too.
            task = asyncio.get_running_loop().create_task(own.cancel_backends(pids))
            connector._cancels.add(task)
            task.add_done_callback(connector._cancels.discard)


#: What :meth:`PostgresConnector.run` returns: every row, the first row (or None), the first
#: column of the first row (or None), or every row of a statement prepared (hence planned) for
#: the call's arguments.
FETCH, FETCHROW, FETCHVAL, FETCH_PLANNED = 0, 1, 2, 3


class PostgresConnector:
    """The connections of one PostgreSQL table, shared by a store, its views and every primitive
    on the same pool: one FIFO gate, one command_timeout watchdog, one set of retry rules, one
    migration chain. Views never open connections of their own.

    Built from a ``dsn`` (the connector opens and closes its own pool) or an injected asyncpg
    ``pool`` made with ``init=fleetmem.backends.postgres.init_connection`` (never closed here).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        schema: str = migrate.DEFAULT_SCHEMA,
        table: str = migrate.DEFAULT_TABLE,
        auto_migrate: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 5.0,
        command_timeout: float | None = 30.0,
        ssl: Any = None,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ConfigurationError("PostgresStore needs exactly one of a dsn or a pool")
        if dsn is not None and url_scheme(dsn) not in ("postgres", "postgresql"):
            raise ConfigurationError(
                f"expected a postgresql:// or postgres:// URL, not {redact_url(dsn)!r}"
            )
        for name, number in (("min_size", min_size), ("max_size", max_size)):
            check_non_negative_int(name, number)
        if max_size < 1 or min_size > max_size:
            raise ConfigurationError("need 0 <= min_size <= max_size and max_size >= 1")
        check_positive_number("acquire_timeout", acquire_timeout)
        self.schema = migrate.validate_identifier(schema, "schema name")
        self.table = migrate.validate_identifier(table, "table name")
        self.dsn = dsn
        self.auto_migrate = bool(auto_migrate)
        self.min_size = min_size
        self.max_size = max_size
        self.acquire_timeout = float(acquire_timeout)
        self.command_timeout = command_timeout
        self.ssl = ssl
        self.server_settings = server_settings
        self._pool = pool  # an injected asyncpg pool, never closed here
        self._own: _ConnectionPool | None = None
        self._ready = False
        self._closed = False
        self._lock = asyncio.Lock()
        self._gate = _Gate(max_size)
        # command_timeout on the own connections: a deadline per connection in use, enforced
        # by the watchdog task (asyncpg's own per-statement timer costs more than a tenth of a
        # primary-key lookup). None when there is no timeout.
        self._deadlines: dict[Any, float] | None = None
        self._timed_out: set[Any] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._cancels: set[asyncio.Task[None]] = set()
        # Background work of the primitives (the key-value sweeper): started by connect().
        self._background: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Waiters for lease releases, queued jobs and job results, shared by every view; fed
        #: by this process's releases, puts and acks and by :attr:`listener`.
        self.notifier = Notifier()
        #: The ``NOTIFY`` channel of this table's leases and queues (channels are per database).
        self.channel = migrate.notify_channel(self.schema, self.table)
        #: The ``LISTEN`` connection (``leases.Listener``), opened by the first waiting acquire,
        #: claim or result.
        self.listener: Any = None

    @property
    def ready(self) -> bool:
        """Whether :meth:`connect` has succeeded (and :meth:`close` not been called since)."""
        return self._ready

    def describe(self) -> str:
        where = redact_url(self.dsn) if self.dsn is not None else "injected pool"
        return f" table={self.schema}.{self.table} url={where!r}"

    def _cannot_connect(self, exc: BaseException) -> FleetmemError:
        """``exc``, raised while opening a connection, as a fleetmem error (see
        :func:`_cannot_connect`)."""
        where = redact_url(self.dsn) if self.dsn is not None else "(the injected pool)"
        return _cannot_connect(exc, where, self.dsn, self.acquire_timeout)

    def statements(self, block_file: str) -> dict[str, str]:
        """The named statements of ``sql/<block_file>`` for this connector's table (loaded
        once; see :func:`statements`)."""
        return statements(block_file, self.schema, self.table)

    def pool_usage(self) -> tuple[int, int]:
        """The connections open (idle or in use) and idle, of the own or the injected pool."""
        own = self._own
        if own is not None:
            return own.size, len(own.idle)
        return self._pool.get_size(), self._pool.get_idle_size()

    def keep_running(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` as a task named ``name`` while connected: started by
        :meth:`connect` (once), cancelled first thing by :meth:`close`."""
        self._background[name] = factory

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Create the pool (unless injected) and check the schema version (migrating a fresh or
        older database when ``auto_migrate``). Idempotent; after :meth:`close`,
        ``StoreClosedError``."""
        async with self._lock:
            if self._ready:
                return
            if self._closed:
                raise StoreClosedError("the store is closed")
            try:
                if self._pool is not None:
                    await self._check_injected_codec()
                elif self._own is None:
                    assert self.dsn is not None
                    self._own = _ConnectionPool(
                        self.dsn,
                        self.min_size,
                        self.max_size,
                        timeout=self.acquire_timeout,
                        ssl=self.ssl,
                        server_settings=self.server_settings,
                    )
                    try:
                        await self._own.start()
                    except Exception as exc:
                        refused = self._cannot_connect(exc)
                        if refused is exc:
                            raise
                        raise refused from exc
                    timeout = self.command_timeout
                    if timeout is not None and self._watchdog is None:
                        self._deadlines = {}
                        self._watchdog = asyncio.get_running_loop().create_task(
                            _watch(self, min(max(timeout / 4, 0.005), 1.0)),
                            name="fleetmem-pg-watchdog",
                        )
                await self._check_schema()
            except Exception as exc:
                err = _translate(exc, write=False, sent=True, can_retry=False)
                if err is exc:
                    raise
                raise err from exc
            for name, factory in self._background.items():
                if name not in self._tasks:
                    self._tasks[name] = asyncio.get_running_loop().create_task(factory(), name=name)
            self._ready = True

    async def _check_injected_codec(self) -> None:
        value = await self.run(FETCHVAL, "SELECT '[1]'::jsonb", (), write=False, auto=False)
        if value != [1]:
            raise ConfigurationError(
                "the injected pool has no fleetmem jsonb codec: create it with "
                "asyncpg.create_pool(..., init=fleetmem.backends.postgres.init_connection)"
            )

    async def _check_schema(self) -> None:
        version = await self.with_conn(self._read_version, write=False)
        if version == migrate.HEAD_REVISION:
            return
        where = f"{self.schema}.{self.table}"
        if version is not None and version not in migrate.REVISIONS:
            raise SchemaVersionError(
                f"{where} is at schema revision {version!r}, newer than this fleetmem knows "
                f"(head {migrate.HEAD_REVISION!r}): upgrade fleetmem"
            )
        if not self.auto_migrate:
            state = "absent" if version is None else f"at revision {version!r}"
            raise SchemaVersionError(
                f"{where} is {state}, this fleetmem needs {migrate.HEAD_REVISION!r}: run  "
                "fleetmem db upgrade  (or pass auto_migrate=True)"
            )
        await self._migrate()
        version = await self.with_conn(self._read_version, write=False)
        if version != migrate.HEAD_REVISION:  # pragma: no cover - alembic would have raised
            raise SchemaVersionError(f"{where} is at {version!r} after migrating")

    async def _read_version(self, conn: Any) -> str | None:
        return await migrate.read_version(conn, schema=self.schema, table=self.table)

    async def _migrate(self) -> None:
        if self.dsn is not None:
            dsn, ssl, settings = self.dsn, self.ssl, self.server_settings

            async def connect() -> Any:
                return await asyncpg.connect(
                    dsn, ssl=ssl, server_settings=settings, timeout=self.acquire_timeout
                )
        else:
            pool = self._pool

            async def connect() -> Any:
                # SQLAlchemy closes this connection when done; the pool then replaces it.
                return await pool.acquire(timeout=self.acquire_timeout)

        _log.info("migrating %s.%s to %s", self.schema, self.table, migrate.HEAD_REVISION)
        await migrate.upgrade_on(connect, schema=self.schema, table=self.table)

    async def close(self) -> None:
        """Stop the background tasks and the watchdog, and close the own pool (an injected
        pool stays open). Final: nothing opens it again."""
        self._closed = True
        listener, self.listener = self.listener, None
        if listener is not None:
            await listener.close()
        tasks, self._tasks = self._tasks, {}
        for task in tasks.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
            self._watchdog = None
        if self._own is not None:
            own, self._own = self._own, None
            await own.close(self.acquire_timeout)
        # Waiters (a watch between two polls, a lease or a claim waiting) see the store closed
        # now rather than at their next poll.
        self.notifier.notify_all()

    # ---------------------------------------------------------------- the choke point

    def lone_connection(self) -> Any:
        """The connection the next lone call will take (the top of the own pool's idle stack),
        left in place; None with an injected pool. For ``fleetmem bench``: its raw side runs on
        this very connection, hence on the same server process as the store's calls."""
        own = self._own
        return own.idle[-1] if own is not None and own.idle else None

    def _take(self) -> Any:
        """An idle connection of the own pool if one is free right now, else None."""
        own = self._own
        if own is not None and own.idle and self._gate.try_enter():
            conn = own.idle.pop()
            if not conn.is_closed():
                return conn
            own.size -= 1
            self._gate.leave()
        return None

    async def _acquire(self) -> Any:
        """A connection within ``acquire_timeout``: a gate slot (FIFO), then an idle connection
        or a new one. A server refusing new connections (too many clients) does not fail the
        caller while a connection may still come free in time (see ``_ConnectionPool.get``)."""
        gate = self._gate
        deadline = time.monotonic() + self.acquire_timeout
        if not await gate.enter(self.acquire_timeout):
            raise BackendUnavailableError(
                f"no PostgreSQL connection free within {self.acquire_timeout} s "
                f"(max_size={self.max_size})"
            )
        try:
            own = self._own
            if own is not None:
                return await own.get(deadline)
            if self._pool is None:
                raise StoreClosedError("the store is closed")
            return await self._acquire_injected(deadline)
        except BaseException as exc:
            gate.leave()
            if isinstance(exc, (asyncio.CancelledError, FleetmemError)):
                raise
            if self._own is None and isinstance(exc, asyncio.TimeoutError):
                # The injected pool's own wait: for a free connection or for a new one.
                raise BackendUnavailableError(
                    f"no PostgreSQL connection within {self.acquire_timeout} s"
                ) from exc
            # Opening a connection failed: nothing was sent, so nothing was lost.
            raise self._cannot_connect(exc) from exc

    async def _acquire_injected(self, deadline: float) -> Any:
        """A connection of the injected asyncpg pool; while the server refuses new connections
        (too many clients), tried again with backoff until ``deadline``."""
        backoff = _OPEN_BACKOFF_MIN
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await self._pool.acquire(timeout=max(remaining, 0.001))
            except asyncpg.TooManyConnectionsError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _refused(
                        exc,
                        f", and no connection of the pool came free within "
                        f"{self.acquire_timeout} s",
                    ) from exc
                await asyncio.sleep(min(remaining, _jittered(backoff)))
                backoff = min(backoff * 2, _OPEN_BACKOFF_MAX)

    def arm_command_timeout(self, conn: Any) -> None:
        """Start the command_timeout clock of the statement about to run on ``conn`` (inside
        :meth:`transaction` or :meth:`with_conn`, before each statement)."""
        deadlines = self._deadlines
        if deadlines is not None and self.command_timeout is not None:
            deadlines[conn] = time.monotonic() + self.command_timeout

    def _failure(self, conn: Any, exc: Exception) -> Exception:
        """``exc``, or a TimeoutError when the watchdog dropped ``conn`` (past its deadline)."""
        timed_out = self._timed_out
        if conn in timed_out:
            timed_out.discard(conn)
            return asyncio.TimeoutError()
        return exc

    def _give_back(self, conn: Any) -> None:
        """Return a connection of the own pool (dropped if the pool has closed)."""
        if self._deadlines:
            self._deadlines.pop(conn, None)
        if self._timed_out:
            self._timed_out.discard(conn)
        own = self._own
        if own is not None:
            own.put(conn)
        else:
            _terminate(conn)
        self._gate.leave()

    async def _release(self, conn: Any) -> None:
        if self.dsn is not None:
            self._give_back(conn)
            return
        try:
            await self._pool.release(conn)
        except Exception:  # a broken connection is dropped by the pool; the caller has its result
            _log.debug("releasing a PostgreSQL connection failed", exc_info=True)
        finally:
            self._gate.leave()

    async def run(
        self, kind: int, query: str, args: tuple[Any, ...], *, write: bool, auto: bool = True
    ) -> Any:
        """Run one statement (``kind``: :data:`FETCH`, :data:`FETCHROW`, :data:`FETCHVAL` or
        :data:`FETCH_PLANNED`), connecting first unless ``auto`` is false; retry where that is
        safe (see :func:`_translate`): once after a read lost its connection, and as many times
        as the pool has connections while the connection at hand turns out dead before the
        statement started (after a restart every idle connection may be; each is terminated on
        the way)."""
        if auto and not self._ready:
            await self.connect()
        own_pool = self.dsn is not None
        for attempt in range(self._gate.size + 1):
            # Fast path: an idle connection is at hand, taken and given back without an await.
            conn = self._take()
            if conn is None:
                conn = await self._acquire()
            deadlines = self._deadlines
            if deadlines is not None and own_pool:
                deadlines[conn] = time.monotonic() + self.command_timeout  # type: ignore[operator]
            try:
                if kind == FETCHROW:
                    return await conn.fetchrow(query, *args)
                if kind == FETCHVAL:
                    return await conn.fetchval(query, *args)
                if kind == FETCH_PLANNED:
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

    async def with_conn(self, fn: Callable[[Any], Coroutine[Any, Any, Any]], *, write: bool) -> Any:
        """``await fn(connection)`` on one connection, never retried and without connecting
        first (:meth:`connect` itself reads the schema revision this way); ``write`` says
        whether ``fn`` may have changed data when its connection is lost. Errors are
        translated; a statement past command_timeout fails as a timeout."""
        conn = await self._acquire()
        try:
            self.arm_command_timeout(conn)
            try:
                return await fn(conn)
            except Exception as exc:
                err = _translate(self._failure(conn, exc), write=write, sent=True, can_retry=False)
                if err is exc:
                    raise
                raise err from exc
        finally:
            await self._release(conn)

    @contextlib.asynccontextmanager
    async def transaction(
        self, *, isolation: str | None = None, readonly: bool = False
    ) -> AsyncIterator[Any]:
        """A connection in a transaction, for multi-statement work (never retried); call
        :meth:`arm_command_timeout` before each statement after the first, and
        :meth:`disarm_command_timeout` after a statement when the connection will wait for the
        caller (an export handing out a page) longer than a statement may run.

        ``isolation`` (asyncpg's names: ``"read_committed"``, ``"repeatable_read"``,
        ``"serializable"``; ``None``: the server's default) and ``readonly`` are those of the
        transaction. Errors are translated; a lost connection or a timeout before the COMMIT
        was sent rolled the transaction back (nothing was applied:
        :class:`~fleetmem.errors.BackendUnavailableError`); only one while the COMMIT of a
        writing transaction is in flight is an :class:`~fleetmem.errors.OutcomeUnknownError`.
        An exception of the caller's own work awaited through :meth:`untranslated` rolls the
        transaction back and leaves as it was raised."""
        if not self._ready:
            await self.connect()
        conn = await self._acquire()
        committing = False
        own: BaseException | None = None
        try:
            try:
                self.arm_command_timeout(conn)
                async with conn.transaction(isolation=isolation, readonly=readonly):
                    yield conn
                    committing = True
                    self.arm_command_timeout(conn)  # COMMIT
            except _CallerError as wrapped:
                own = wrapped.error
            except Exception as exc:
                if isinstance(exc, _LOST):
                    _terminate(conn)
                err = _translate(
                    self._failure(conn, exc),
                    write=committing and not readonly,
                    sent=True,
                    can_retry=False,
                )
                if err is exc:
                    raise
                raise err from exc
        finally:
            await self._release(conn)
        if own is not None:
            # Raised here, out of the handler, the error keeps the context it was raised with.
            context = own.__context__
            try:
                raise own
            finally:
                own.__context__ = context

    def disarm_command_timeout(self, conn: Any) -> None:
        """Stop the command_timeout clock of ``conn`` (inside :meth:`transaction`), which then
        waits for its holder: the next statement arms it again."""
        deadlines = self._deadlines
        if deadlines is not None:
            deadlines.pop(conn, None)

    @staticmethod
    async def untranslated(work: Awaitable[_T]) -> _T:
        """``await work`` -- the caller's own work inside :meth:`transaction`, not the
        driver's (reading the next page of an import): an exception it raises rolls the
        transaction back and leaves :meth:`transaction` untranslated, as it was raised."""
        try:
            return await work
        except Exception as exc:
            raise _CallerError(exc) from None


class _CallerError(Exception):
    """Carries an exception of the caller's own work out of :meth:`PostgresConnector.transaction`
    past the translation of driver errors (see :meth:`PostgresConnector.untranslated`)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error
