"""``PostgresLeases``: leases with fencing tokens in the table ``<table>_leases`` (migration 0003).

Every operation is one statement of ``sql/leases.sql`` judged by the server's ``now()``:

* ``acquire`` locks a free row ``FOR UPDATE SKIP LOCKED`` and updates it (or inserts a first
  one): the row of a name outlives its lease, so a grant is ``token + 1`` of a durable row and
  tokens only grow, across releases, expiries and server restarts. Of two acquirers of a free
  lease exactly one gets it; an acquire never waits for the row's lock (fenced writes of the old
  holder may keep it past the expiry): it is refused and a waiter tries again soon. Grants and
  renewals are stamped with ``clock_timestamp()`` read once the row is locked.
* ``release`` sets ``expires_at`` to ``now()`` and sends ``pg_notify`` in the same statement;
  the notification goes out at commit.
* fenced key-value writes call the fence function in their own statement (see ``kv.py``).

No advisory lock anywhere: they are session state, which a transaction-mode pooler (PgBouncer)
hands to another client.

Wake-ups: a waiting ``acquire`` is woken by this process's releases directly, and by other
processes' through :class:`Listener`, one dedicated connection per connector that ``LISTEN``\\ s
on the table's channel. When it cannot listen (a transaction-mode pooler that does not deliver
notifications, a connection that died) waiters fall back to polling every
:attr:`~fleetmem.backends.seam.LeaseBackend.poll_interval` (1 s) and to the expiry of the lease
they wait for; after a reconnect every waiter is woken once (it may have missed a release).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from fleetmem._notify import Watch
from fleetmem.backends.postgres.connector import FETCH, FETCHROW, PostgresConnector
from fleetmem.backends.seam import LeaseBackend, lease_lost
from fleetmem.protocol import Lease

__all__ = ["Listener", "PostgresLeases"]

_log = logging.getLogger("fleetmem.postgres")

#: Seconds between two checks that the listening connection is still alive.
_PING_INTERVAL = 15.0
#: Seconds a fresh ``LISTEN`` has to deliver its own probe notification; past it notifications
#: are taken not to work on this connection (a transaction-mode pooler) and waiters poll.
_PROBE_TIMEOUT = 5.0
#: The longest a first waiting acquire waits for LISTEN before its first try (one poll).
_FIRST_LISTEN_WAIT = 1.0
#: Backoff between reconnects of the listener: from 0.1 s doubling to 5 s.
_RECONNECT_MIN = 0.1
_RECONNECT_MAX = 5.0


class Listener:
    """The ``LISTEN`` connection of one connector: releases, puts and awaited acks of other
    processes, as notifications on the connector's channel, wake the waiters of
    ``connector.notifier``:

    * ``namespace:name`` -- a lease released: the longest waiter of ``(namespace, name)``;
    * ``>count:namespace:queue`` -- ``count`` jobs became claimable: that many claim waiters of
      ``("queue", namespace, queue)`` (``QueueBackend.claim_key``);
    * ``!namespace:job_id`` -- an awaited job finished: every waiter of ``("result", namespace,
      job_id)`` (``QueueBackend.result_key``);
    * ``~namespace`` -- changes were recorded while a watcher slept: every watcher of
      ``("changes", namespace)`` (``ChangeBackend.wake_key``).

    Opened on the first waiting acquire, claim or result (:meth:`start`), on the pool's DSN,
    TLS and server settings but outside the pool, and held for as long as the store is open
    (closed by the connector). With an injected pool there is no DSN: one of the pool's
    connections is borrowed while at least one call waits and given back when the last one
    stops waiting, so the caller's pool can always be closed once no call is running.
    """

    def __init__(self, connector: PostgresConnector) -> None:
        self._connector = connector
        self._notifier = connector.notifier
        self._channel = connector.channel
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # the first attempt ended (listening or not)
        self._stopping: asyncio.Task[None] | None = None
        #: Whether the connection is borrowed from an injected pool (held only while waiting).
        self.borrowed = connector.dsn is None
        #: Calls waiting right now (see ``PostgresLeases.watch``, ``PostgresQueues.watch``).
        self.users = 0
        #: Set for good when a LISTEN did not deliver its probe: waiters poll from then on.
        self.undelivered = False
        self._probe = ""
        self._probed = asyncio.Event()
        self._complained = False
        #: Whether the connection listens right now (set once ``LISTEN`` is done; cleared
        #: when it is lost or its probe notification never came back).
        self.listening = False
        #: Why not, when not.
        self.problem: str | None = None

    async def start(self) -> None:
        """Start listening (once); the first call waits until the first attempt has settled
        (``LISTEN`` done or failed), so a waiter that then tries has its releases covered --
        but at most one poll interval: a slow connection must not delay a waiter more than
        polling would, and once ``LISTEN`` is in place every waiter is woken to try again.
        Never raises: not listening means polling."""
        stopping = self._stopping
        if stopping is not None:
            await asyncio.wait([stopping])
        if self._task is None and not self.undelivered:
            self._settled = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="fleetmem-pg-listener"
            )
        if not self._settled.is_set():
            timeout = min(self._connector.acquire_timeout + 2.0, _FIRST_LISTEN_WAIT)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._settled.wait()), timeout)

    def stop_soon(self) -> None:
        """Stop listening in the background (a borrowed connection goes back to its pool)."""
        if self._task is not None and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            self._stopping = None
            self.listening = False

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # A namespace is [A-Za-z0-9_.-]: the first character tells the kinds apart.
        head = payload[:1]
        if head == ">":
            # ">count:namespace:queue": jobs became claimable (see sql/queues.sql).
            count, _, rest = payload[1:].partition(":")
            namespace, _, queue = rest.partition(":")
            with contextlib.suppress(ValueError):
                self._notifier.notify(("queue", namespace, queue), int(count))
            return
        if head == "!":
            # "!namespace:job id": an awaited job finished.
            namespace, _, job_id = payload[1:].partition(":")
            self._notifier.notify_every(("result", namespace, job_id))
            return
        if head == "~":
            # "~namespace": changes were recorded (see sql/kv.sql).
            self._notifier.notify_every(("changes", payload[1:]))
            return
        namespace, colon, name = payload.partition(":")
        if colon:
            self._notifier.notify((namespace, name))
        elif payload == self._probe:
            self._probed.set()

    def _lost(self, why: str) -> None:
        self.listening = False
        self.problem = why
        if not self._complained:
            self._complained = True
            _log.warning(
                "PostgreSQL LISTEN unavailable (%s): waiting lease acquires, claims and "
                "results poll every %g s until it is back",
                why,
                LeaseBackend.poll_interval,
            )

    async def _open(self) -> tuple[Any, Any]:
        """A connection and the function that gives it back."""
        connector = self._connector
        if connector.dsn is not None:
            conn = await asyncpg.connect(
                connector.dsn,
                ssl=connector.ssl,
                server_settings=connector.server_settings,
                timeout=connector.acquire_timeout,
            )

            async def close() -> None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1.0)
                conn.terminate()

            return conn, close
        pool = connector._pool
        conn = await pool.acquire(timeout=connector.acquire_timeout)

        async def give_back() -> None:
            with contextlib.suppress(Exception):
                await conn.remove_listener(self._channel, self._on_notify)
            with contextlib.suppress(Exception):
                await pool.release(conn)

        return conn, give_back

    async def _run(self) -> None:
        backoff = _RECONNECT_MIN
        while True:
            give_back = None
            try:
                conn, give_back = await self._open()
                gone = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_on_close, gone))
                await conn.add_listener(self._channel, self._on_notify)
                # Listening from here on: the first waiter may try now (the probe below only
                # confirms that notifications arrive).
                self.listening, self.problem = True, None
                self._settled.set()
                if self._complained:
                    self._complained = False
                    _log.info("PostgreSQL LISTEN is back: waiting calls wake at once")
                # Releases may have gone by before LISTEN was in place (a reconnect, or a
                # waiter that stopped waiting for a slow first LISTEN): every waiter tries again.
                self._notifier.notify_all()
                # A pooler may accept LISTEN and never deliver: see that one comes back.
                self._probe = "probe-" + secrets.token_hex(8)
                self._probed.clear()
                await conn.execute(f"NOTIFY {_quote(self._channel)}, '{self._probe}'")
                try:
                    await asyncio.wait_for(self._probed.wait(), _PROBE_TIMEOUT)
                except asyncio.TimeoutError:
                    self.undelivered = True
                    self._lost("notifications are not delivered on this connection")
                    return  # not a failure that a reconnect mends: poll from now on
                backoff = _RECONNECT_MIN
                while not gone.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(gone.wait(), _PING_INTERVAL)
                    if not gone.is_set():
                        await asyncio.wait_for(
                            conn.fetchval("SELECT 1"), self._connector.acquire_timeout
                        )
                self._lost("the listening connection was closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            finally:
                if give_back is not None:
                    with contextlib.suppress(Exception):
                        await give_back()
            self._settled.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_MAX)


def _set_on_close(event: asyncio.Event, _conn: Any) -> None:
    event.set()


def _quote(channel: str) -> str:
    return '"' + channel.replace('"', '""') + '"'


def shared_listener(connector: PostgresConnector) -> Listener:
    """The connector's ``LISTEN`` connection, shared by its leases, queues and change feeds
    (made here, not started)."""
    listener: Listener | None = connector.listener
    if listener is None:
        listener = connector.listener = Listener(connector)
    return listener


async def start_listener(connector: PostgresConnector) -> Listener:
    """Connect the store if it is not yet (raising what connecting raises), then start the
    shared ``LISTEN`` connection once. Once connected it never raises: a ``LISTEN`` that
    cannot be opened or delivers nothing leaves the waiters to poll."""
    if not connector.ready:
        await connector.connect()
    listener = shared_listener(connector)
    await listener.start()
    return listener


@contextlib.contextmanager
def counted_user(listener: Listener | None) -> Iterator[None]:
    """Count a waiter of ``listener`` while inside: a connection borrowed from an injected pool
    for ``LISTEN`` goes back with the last one."""
    if listener is not None:
        listener.users += 1
    try:
        yield
    finally:
        if listener is not None:
            listener.users -= 1
            if listener.users == 0 and listener.borrowed:
                listener.stop_soon()


class PostgresLeases(LeaseBackend):
    """The leases of one namespace, on the connector of the store's table."""

    def __init__(self, connector: PostgresConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._run = connector.run
        self._q = connector.statements("leases.sql")

    def _lease(self, name: str, owner: str, token: int, acquired: Any, expires: Any) -> Lease:
        return Lease(name, owner, token, acquired, expires, self._namespace)

    async def acquire(self, name: str, owner: str, ttl_ms: int) -> tuple[Lease | None, int | None]:
        row = await self._run(
            FETCHROW, self._q["acquire"], (self._namespace, name, owner, ttl_ms), write=True
        )
        if row is None:
            # A first grant this statement's snapshot did not see yet: try again at once.
            return None, 0
        if row[0] is None:
            # The live lease's remaining life, or a short pause when the row was free but
            # locked (fenced writes of the old holder still in flight) or granted meanwhile.
            return None, int(row[3])
        return self._lease(name, owner, row[0], row[1], row[2]), None

    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        row = await self._run(
            FETCHROW, self._q["renew"], (self._namespace, name, token, ttl_ms), write=True
        )
        if row is None:
            raise lease_lost(name, token)
        return self._lease(name, row[0], token, row[1], row[2])

    async def release(self, name: str, token: int) -> bool:
        connector = self._connector
        rows = await self._run(
            FETCH,
            self._q["release"],
            (self._namespace, name, token, connector.channel),
            write=True,
        )
        if not rows:
            return False
        self._notifier.notify((self._namespace, name))  # this process's waiters, at once
        return True

    async def holder(self, name: str) -> Lease | None:
        row = await self._run(FETCHROW, self._q["holder"], (self._namespace, name), write=False)
        if row is None:
            return None
        return self._lease(name, row[0], row[1], row[2], row[3])

    async def listen(self) -> None:
        await self._listener()

    async def _listener(self) -> Listener:
        return await start_listener(self._connector)

    @contextlib.asynccontextmanager
    async def watch(self, name: str) -> AsyncIterator[Watch]:
        """Watch ``name`` for releases (entered before trying, so none is missed); counts the
        waiters so that a connection borrowed from an injected pool goes back with the last."""
        listener = await self._listener()
        with counted_user(listener), self._notifier.watch((self._namespace, name)) as w:
            yield w
