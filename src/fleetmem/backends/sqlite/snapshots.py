"""``SQLiteSnapshots``: the named snapshots of a namespace, in two tables of the file.

``fleetmem_snapshots`` is the catalog, ``fleetmem_snapshot_records`` the records of the
incremental model of :class:`~fleetmem.backends.seam.SnapshotBackend` (``sql/snapshots.sql``).
Nothing else reads these tables, so no ``keys``, ``search``, ``stats``, ``namespaces``, export or
``clear`` sees a snapshot, and no change is recorded in the change feed; they live in the file,
so snapshots survive closing and reopening it.

A create is **one** ``BEGIN IMMEDIATE`` transaction on the connector's worker thread, of a few
set-based statements: it holds SQLite's write lock while it runs, as a replace does -- other
writers of the file (this store's, other processes') wait for it, up to their busy timeout,
while readers go on -- and the lock is what makes its reading of the live entries one instant.
A delete is one such transaction too. The lock also serialises the creates and deletes of a
namespace across processes, and a process killed midway leaves nothing: SQLite rolls back the
unfinished transaction, so there is no repair to make. Expiry is judged as the KV judges it:
on this process's wall clock, in milliseconds, one ``now`` for the whole create.

:meth:`SQLiteSnapshots.pages` reads in one read transaction of a session of its own
(:meth:`SQLiteConnector.reader`, as ``SQLiteKV.export_pages`` does): the catalog row and every
page come from one snapshot of the file, which no writer waits for in WAL mode.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, Iterable
from functools import partial
from typing import Any

from fleetmem._codec import decode_value, utc_from_ms
from fleetmem._validate import prefix_upper_bound
from fleetmem.backends.seam import SnapshotBackend, SnapshotRow, snapshot_exists, snapshot_not_found
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms
from fleetmem.protocol import Entry

__all__ = ["SQLiteSnapshots"]


def _row(row: tuple[Any, ...]) -> SnapshotRow:
    name, seq, created_at, keys, size = row
    return SnapshotRow(name, seq, utc_from_ms(created_at), keys, size)


def _entries(rows: Iterable[tuple[Any, ...]]) -> list[Entry]:
    """Entries from rows of (key, value, partition, version, created, updated, expires),
    decoded as the KV decodes its own (integers beyond 64 bits exactly)."""
    return [
        Entry(
            key,
            decode_value(value),
            partition,
            version,
            utc_from_ms(created),
            utc_from_ms(updated),
            None if expires is None else utc_from_ms(expires),
        )
        for key, value, partition, version, created, updated, expires in rows
    ]


class SQLiteSnapshots(SnapshotBackend):
    """The snapshots of one namespace of a SQLite file (see the module)."""

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._db = connector

    async def create(self, name: str) -> SnapshotRow:
        """One ``BEGIN IMMEDIATE`` transaction, holding the write lock while it runs (as a
        replace does): the name's check, ``seq`` = newest + 1, the closing of the open records
        that no live entry equals, the records of the live entries without an open record,
        then the catalog row. ``SnapshotExistsError`` changes nothing."""
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> SnapshotRow:
            with Transaction(conn):
                if conn.execute(SQL["snapshot_row"], (ns, name)).fetchone() is not None:
                    raise snapshot_exists(ns, name)
                now = now_ms()
                seq = int(conn.execute(SQL["snapshot_next_seq"], (ns,)).fetchone()[0])
                conn.execute(SQL["snapshot_close_records"], (ns, seq, now))
                conn.execute(SQL["snapshot_add_records"], (ns, seq, now))
                row = conn.execute(SQL["snapshot_insert"], (ns, name, seq, now)).fetchone()
            return _row(row)

        return await self._db.call(run)

    async def get(self, name: str) -> SnapshotRow | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> SnapshotRow | None:
            row = conn.execute(SQL["snapshot_row"], (ns, name)).fetchone()
            return None if row is None else _row(row)

        return await self._db.call(run)

    async def delete(self, name: str) -> bool:
        """One ``BEGIN IMMEDIATE`` transaction: free the records only this snapshot holds,
        remove its catalog row, and when it was the newest reopen the records closed after
        the snapshot that is now the newest (all of them held by it)."""
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                found = conn.execute(SQL["snapshot_neighbours"], (ns, name)).fetchone()
                if found is None:
                    return False
                seq, previous, following = found
                conn.execute(SQL["snapshot_free_records"], (ns, seq, previous, following))
                conn.execute(SQL["snapshot_delete"], (ns, name))
                if following is None:
                    conn.execute(SQL["snapshot_reopen_records"], (ns, previous))
            return True

        return await self._db.call(run)

    async def pages(
        self, name: str, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """Keyset pages ascending by key, read in **one** read transaction of a session of
        its own (as ``SQLiteKV.export_pages`` reads): the catalog row and every page come from
        the snapshot of the file its first ``SELECT`` fixed, so a delete of the snapshot
        meanwhile does not cut it short. Closing the generator early ends the transaction."""
        ns = self._namespace
        high = prefix_upper_bound(prefix)
        session = await self._db.reader()
        try:
            seq = await session.call(partial(_begin_pages, ns, name))
            if seq is None:
                raise snapshot_not_found(ns, name)
            low = prefix
            while True:
                page = await session.call(partial(_page, ns, low, high, seq, page_size, partition))
                if page:
                    yield page
                if len(page) < page_size:
                    return
                low = page[-1].key + "\x00"  # the smallest string above it (no key holds U+0000)
        finally:
            session.close()

    async def usage(self) -> tuple[int, int]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            records, size = conn.execute(SQL["snapshot_usage"], (ns,)).fetchone()
            return int(records), int(size)

        return await self._db.call(run)

    # Last: below, ``list`` names this method (the annotations above mean the builtin).
    async def list(self) -> list[SnapshotRow]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> list[SnapshotRow]:
            return [_row(row) for row in conn.execute(SQL["snapshot_list"], (ns,))]

        return await self._db.call(run)


# ---------------------------------------------------------------------- pages
# Run on a session's thread, inside its read transaction.


def _begin_pages(ns: str, name: str, conn: sqlite3.Connection) -> int | None:
    """Begin the read transaction; the snapshot's seq (its first ``SELECT`` fixes the file's
    snapshot every page reads), ``None`` when there is no such snapshot."""
    conn.execute(SQL["begin"])
    row = conn.execute(SQL["snapshot_row"], (ns, name)).fetchone()
    return None if row is None else int(row[1])


def _page(
    ns: str,
    low: str,
    high: str,
    seq: int,
    limit: int,
    partition: str | None,
    conn: sqlite3.Connection,
) -> list[Entry]:
    if partition is None:
        rows = conn.execute(SQL["snapshot_page"], (ns, low, high, seq, limit))
    else:
        rows = conn.execute(
            SQL["snapshot_page_in_partition"], (ns, low, high, seq, limit, partition)
        )
    return _entries(rows)
