"""``PostgresSnapshots``: the named, incremental snapshots of a namespace in ``<table>_snapshots``
(the catalog) and ``<table>_snapshot_records`` (the records), migration 0006.

The record model and the create/delete algorithm are those of
:class:`~fleetmem.backends.seam.SnapshotBackend`; the statements are in ``sql/snapshots.sql``.

* :meth:`~PostgresSnapshots.create` is one ``READ COMMITTED`` transaction: the namespace's
  transaction advisory lock (``pg_advisory_xact_lock``, a lock space of its own), which
  serialises the creates and deletes of the namespace across processes; then, in a statement
  that starts after the lock was granted (so it sees what the previous holder committed), the
  newest seq and whether the name is taken; then ONE statement whose data-modifying CTEs read
  the live entries, close the open records that differ, insert the new records and write the
  catalog row. One statement is one MVCC snapshot: the snapshot is the namespace at one
  instant whatever writers do meanwhile, and nobody waits for it -- it reads the entries
  without locking them. Either all of it commits or nothing does (a lost connection rolls it
  back), so there is nothing to repair afterwards.
* :meth:`~PostgresSnapshots.delete` is one such transaction too: lock, the snapshot's
  neighbours, one statement.
* :meth:`~PostgresSnapshots.pages` reads in one ``REPEATABLE READ READ ONLY`` transaction, as
  :meth:`PostgresKV.export_pages <fleetmem.backends.postgres.kv.PostgresKV.export_pages>`
  does: the catalog row first (:class:`~fleetmem.errors.SnapshotNotFoundError` when there is
  none), then keyset pages by the records' primary key. Values are decoded by the
  connections' ``jsonb`` codec, as every read of the entries (integers of any size exact).

Record bytes (:func:`~fleetmem.backends.seam.record_bytes`) are computed by the server from the
value as ``jsonb`` returns it, without the blank ``jsonb`` writes after each ``:`` and ``,``:
the compact JSON of the value as PostgreSQL holds it. That is the payload the other backends
count, up to ``jsonb``'s normal form (object keys sorted and deduplicated, numbers as
``numeric`` prints them: ``1e16`` as ``10000000000000000``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator
from datetime import timezone
from typing import Any

import asyncpg

from fleetmem._validate import prefix_upper_bound
from fleetmem.backends.postgres import migrate
from fleetmem.backends.postgres.connector import FETCH, FETCHROW, PostgresConnector, statements
from fleetmem.backends.postgres.kv import KEY_ORDER_PLANS, key_pages
from fleetmem.backends.seam import (
    SnapshotBackend,
    SnapshotRow,
    snapshot_exists,
    snapshot_not_found,
)
from fleetmem.errors import BackendUnavailableError
from fleetmem.protocol import Entry

__all__ = ["PostgresSnapshots"]

#: A page of a snapshot reads at most this many records per statement (as an export does).
_PAGE_ROWS = 1000


@functools.lru_cache(maxsize=32)
def _statements(schema: str, table: str) -> dict[str, str]:
    """``sql/snapshots.sql`` as the connector prepares it (``{table}``), with ``{snapshots}``
    and ``{snapshot_records}`` replaced by the quoted tables of migration 0006 that belong to
    ``schema.table``."""
    quoted = migrate.quote_ident(schema)
    catalog, records = migrate.snapshot_names(table)
    # Derived names, quoted whole (they may pass the 40 characters of a checked identifier).
    names = {"{snapshots}": f'{quoted}."{catalog}"', "{snapshot_records}": f'{quoted}."{records}"'}
    out: dict[str, str] = {}
    for name, sql in statements("snapshots.sql", schema, table).items():
        for placeholder, qualified in names.items():
            sql = sql.replace(placeholder, qualified)
        out[name] = sql
    return out


def _row(record: Any) -> SnapshotRow:
    return SnapshotRow(
        record[0],
        int(record[1]),
        record[2].astimezone(timezone.utc),
        int(record[3]),
        int(record[4]),
    )


class PostgresSnapshots(SnapshotBackend):
    """The snapshots of one namespace, on the connector of the store's table."""

    def __init__(self, connector: PostgresConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._connector = connector
        self._run = connector.run
        self._q = _statements(connector.schema, connector.table)

    async def _lock(self, conn: Any) -> None:
        """Take the namespace's snapshot lock in ``conn``'s transaction, waiting behind another
        create or delete for up to :attr:`lock_wait` seconds (the server's ``lock_timeout``,
        then ``BackendUnavailableError``) rather than the command_timeout: a create of a large
        namespace may hold the lock longer than one statement of another kind may run."""
        connector = self._connector
        await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_wait * 1000)}")
        connector.disarm_command_timeout(conn)
        try:
            await conn.execute(self._q["lock"], self._namespace)
        except asyncpg.LockNotAvailableError:
            raise BackendUnavailableError(
                f"another create or delete of namespace {self._namespace!r}'s snapshots held "
                f"their lock for more than {self.lock_wait:g} s"
            ) from None

    #: Seconds a create or delete waits for another one of the namespace to finish.
    lock_wait = 600.0

    async def create(self, name: str) -> SnapshotRow:
        """One transaction at READ COMMITTED: the lock (:meth:`_lock`), the name check, then
        the whole snapshot in one statement. That statement runs without the command_timeout
        -- it reads the whole namespace, about a second per 100,000 entries -- so a namespace
        of any size can be snapshotted; the lock and the statement wait on the server, which
        ends them if the connection is lost."""
        connector = self._connector
        ns = self._namespace
        q = self._q
        # READ COMMITTED whatever the server's default: each statement after the lock takes a
        # snapshot of its own, later than the commit of the lock's previous holder.
        async with connector.transaction(isolation="read_committed") as conn:
            await self._lock(conn)
            connector.arm_command_timeout(conn)
            head = await conn.fetchrow(q["head"], ns, name)
            if head[1]:
                raise snapshot_exists(ns, name)
            connector.disarm_command_timeout(conn)
            row = await conn.fetchrow(q["create"], ns, int(head[0]) + 1, name)
            connector.arm_command_timeout(conn)  # the COMMIT
        return _row(row)

    async def delete(self, name: str) -> bool:
        connector = self._connector
        ns = self._namespace
        q = self._q
        async with connector.transaction(isolation="read_committed") as conn:
            await self._lock(conn)
            connector.arm_command_timeout(conn)
            bounds = await conn.fetchrow(q["bounds"], ns, name)
            if bounds is None:
                return False
            seq, below, above = int(bounds[0]), int(bounds[1]), bounds[2]
            # Like a create's, the one statement may touch every record of the namespace: no
            # command_timeout.
            connector.disarm_command_timeout(conn)
            if above is None:
                await conn.execute(q["delete_newest"], ns, seq, below)
            else:
                await conn.execute(q["delete_between"], ns, seq, below, int(above))
            connector.arm_command_timeout(conn)  # the COMMIT
        return True

    async def pages(
        self, name: str, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """Keyset pages in one ``REPEATABLE READ READ ONLY`` transaction on a connection held
        for the whole iteration (see ``PostgresKV.export_pages``): the catalog row, then pages
        of at most ``page_size`` and :data:`_PAGE_ROWS` records by the primary key. The
        connection waits for the caller between pages without a command_timeout clock;
        closing the iterator early (or cancelling it) rolls the transaction back and gives the
        connection back to the pool. A snapshot deleted meanwhile is still read whole."""
        connector = self._connector
        ns = self._namespace
        upper = prefix_upper_bound(prefix)
        extra: tuple[str, ...] = ()
        if partition is None:
            query = self._q["page"]
        else:
            query, extra = self._q["page_partition"], (partition,)
        limit = max(1, min(page_size, _PAGE_ROWS))
        async with connector.transaction(isolation="repeatable_read", readonly=True) as conn:
            await conn.execute(KEY_ORDER_PLANS)  # pages walk the primary key, as an export's
            seq = await conn.fetchval(self._q["seq"], ns, name)
            if seq is None:
                raise snapshot_not_found(ns, name)
            pages = key_pages(connector, conn, query, (ns, prefix, upper), limit, (seq, *extra))
            async with contextlib.aclosing(pages):
                async for page in pages:
                    yield page
            connector.arm_command_timeout(conn)  # the COMMIT that ends the snapshot

    async def usage(self) -> tuple[int, int]:
        row = await self._run(FETCHROW, self._q["usage"], (self._namespace,), write=False)
        return int(row[0]), int(row[1])

    # Declared last: the name ``list`` is this method from here on in the class body.

    async def list(self) -> list[SnapshotRow]:
        rows = await self._run(FETCH, self._q["list"], (self._namespace,), write=False)
        return [_row(row) for row in rows]

    async def get(self, name: str) -> SnapshotRow | None:
        row = await self._run(FETCHROW, self._q["get"], (self._namespace, name), write=False)
        return None if row is None else _row(row)
