"""``SQLiteLeases``: leases with fencing tokens in the ``fleetmem_leases`` table of a file.

Each operation is one function on the connector's worker thread. A grant is one ``UPSERT``
statement inside a ``BEGIN IMMEDIATE`` transaction, so two processes sharing the file never
both get a live lease; it commits with the WAL synced to disk whatever ``synchronous`` says, so
not even a power failure hands a token out twice. A refused ``acquire`` only reads the row,
without the write lock, so waiters polling a held lease do not queue behind writers. Times are
milliseconds on this process's wall clock, the clock the entries' expiry uses (processes
sharing a file share the host's clock). A row outlives its lease, keeping the last token of
its name in the file.

Wake-ups: a release made through this store (or a view of it) notifies the connector's
:class:`~fleetmem._notify.Notifier` at once. SQLite has no notifications between processes, so
a waiter polls the file every :attr:`SQLiteLeases.poll_interval` seconds for theirs.
"""

from __future__ import annotations

import sqlite3
from typing import ClassVar

from fleetmem._codec import utc_from_ms
from fleetmem.backends.seam import Fence, LeaseBackend, lease_lost
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms
from fleetmem.protocol import Lease

__all__ = ["SQLiteLeases", "check_fence"]


def check_fence(conn: sqlite3.Connection, namespace: str, fence: Fence, now: int) -> None:
    """Raise ``LeaseLostError`` unless ``fence`` is a live lease of ``namespace`` at ``now``.

    Called first inside a write's ``BEGIN IMMEDIATE`` transaction: the write lock is held from
    the check to the commit, so no other process can release, renew or take the lease between
    them, and an exception rolls the (still empty) transaction back.
    """
    row = conn.execute(SQL["fence_check"], (namespace, fence.name, fence.token, now)).fetchone()
    if row is None:
        raise lease_lost(fence.name, fence.token)


class SQLiteLeases(LeaseBackend):
    """Leases of one namespace of a SQLite file."""

    #: SQLite cannot notify another process: a waiter polls the file this often (seconds).
    poll_interval: ClassVar[float] = 0.05

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._db = connector

    def _lease(self, name: str, owner: str, token: int, acquired: int, expires: int) -> Lease:
        return Lease(
            name, owner, token, utc_from_ms(acquired), utc_from_ms(expires), self._namespace
        )

    async def acquire(self, name: str, owner: str, ttl_ms: int) -> tuple[Lease | None, int | None]:
        ns = self._namespace

        db = self._db

        def run(conn: sqlite3.Connection) -> tuple[Lease | None, int | None]:
            # A live lease is refused from a plain read (no write lock) ...
            now = now_ms()
            row = conn.execute(SQL["lease_expiry"], (ns, name, now)).fetchone()
            if row is not None:
                return None, max(0, row[0] - now)
            # ... a free one is granted by one statement under the write lock; another
            # process may have taken it since the read, then the statement returns no row.
            # The grant is synced to disk even in normal mode, so that no power failure can
            # hand its token out twice.
            with db.synced(conn), Transaction(conn):
                now = now_ms()
                granted = conn.execute(SQL["lease_grant"], (ns, name, owner, now, ttl_ms))
                got = granted.fetchone()
                if got is None:
                    row = conn.execute(SQL["lease_expiry"], (ns, name, now)).fetchone()
                    return None, None if row is None else max(0, row[0] - now)
            token, acquired, expires = got
            return self._lease(name, owner, token, acquired, expires), None

        return await db.call(run)

    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Lease:
            with Transaction(conn):
                now = now_ms()
                row = conn.execute(SQL["lease_renew"], (ns, name, token, now, ttl_ms)).fetchone()
            if row is None:
                raise lease_lost(name, token)
            owner, acquired, expires = row
            return self._lease(name, owner, token, acquired, expires)

        return await self._db.call(run)

    async def release(self, name: str, token: int) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                cursor = conn.execute(SQL["lease_release"], (ns, name, token, now_ms()))
                return cursor.rowcount == 1

        released = await self._db.call(run)
        if released:
            self._notifier.notify((ns, name))
        return released

    async def holder(self, name: str) -> Lease | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Lease | None:
            row = conn.execute(SQL["lease_holder"], (ns, name, now_ms())).fetchone()
            return None if row is None else self._lease(name, *row)

        return await self._db.call(run)
