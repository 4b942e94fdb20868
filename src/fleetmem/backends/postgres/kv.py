"""``PostgresKV``: the key-value primitive on a PostgreSQL table, over a :class:`PostgresConnector`.

One table (default ``fleetmem.entries``, owned by the alembic migrations in ``migrate``) holds every
namespace; each operation is one SQL statement from ``sql/kv.sql`` (``set_many`` is a COPY into a
temporary table and one upsert, in one transaction). Expiry is judged by ``now()`` on the server;
an optional sweeper deletes expired rows in bounded batches. Concurrent single-key calls are
merged into one statement per batch (``get_batch``, ``set_batch``, ``delete_batch``,
``exists_batch``). A write with ``fence=`` runs the fenced twin of its statement, which checks
the lease in the same statement (:func:`fenced_statement`); fenced calls are never merged.
Every write also records its changes in the namespace's change feed, when it has one, in the
same statement (see the top of ``sql/kv.sql`` and ``changes.py``), and wakes this process's
watchers once it returned. An export reads one snapshot (a ``REPEATABLE READ READ ONLY``
transaction); an import writes a batch per statement, and a replace is one transaction.
Connections, retries, timeouts, error translation and migrations belong to the connector (see
``connector.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any

from fleetmem._codec import incremented
from fleetmem._validate import (
    GlobPattern,
    check_non_negative_int,
    check_positive_number,
    prefix_upper_bound,
)
from fleetmem.backends.postgres import migrate
from fleetmem.backends.postgres.connector import (
    FETCH,
    FETCH_PLANNED,
    FETCHROW,
    FETCHVAL,
    PostgresConnector,
    init_connection,
    sqlstate,
)
from fleetmem.backends.seam import (
    MISSING,
    RESERVED_NAMESPACE_PREFIX,
    AgentBackend,
    ChangeBackend,
    EntryMeta,
    Fence,
    ImportOp,
    ImportTally,
    KVBackend,
    LeaseBackend,
    QueueBackend,
    SetOp,
    SnapshotBackend,
    lease_lost,
)
from fleetmem.errors import (
    BackendUnavailableError,
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["KEY_ORDER_PLANS", "PostgresKV", "init_connection", "key_pages"]

#: Set at the start of a transaction that reads keyset pages (an export, a snapshot): the
#: planner may then only walk the primary key, in key order. asyncpg prepares each page's
#: statement, and after five executions PostgreSQL may switch to a generic plan costed on the
#: table's statistics; when they lag (a table just emptied and reloaded, before autoanalyze)
#: that plan was a bitmap scan of the whole namespace and a top-N sort per page, reading every
#: remaining row to return a page: an export quadratic in the namespace's size (a million
#: entries took 300 s instead of 9).
KEY_ORDER_PLANS = "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off"

_log = logging.getLogger("fleetmem.postgres")

#: numeric_value_out_of_range: an ``incr`` whose float result would overflow.
_NUMERIC_OUT_OF_RANGE = "22003"

#: From this many keys, a read by key array runs as a statement prepared for the call, which
#: PostgreSQL plans for the array it is given. asyncpg's cached statements get a generic plan
#: after five runs, made for an array of unknown size: on 10,000 keys it ran 25 ms against 18
#: ms for the planned one (which costs one more round trip, ~0.1 ms).
_PLANNED_MIN_KEYS = 500

#: From this many rows in its first chunk, a fenced ``set_many`` checks its lease before the
#: COPY too, so that a lost lease does not stream every row first. The check is one more round
#: trip (measured ~0.25 ms): 15% of a fenced set_many of 10 rows (~1.7 ms), under 2% of one of
#: 1,000 rows (12-25 ms).
_FENCE_FIRST_MIN_ROWS = 1000

#: An export reads at most this many rows per statement (each a page of its own; pages may be
#: smaller than asked): per row, larger results cost more -- 100,000 entries read as Entry
#: objects took 0.70 s in pages of 1,000 and 0.93 s in pages of 10,000 on one connection.
_EXPORT_ROWS = 1000

#: An import statement carries at most this many bytes of values (and keys), and at most
#: its page's 1,000 ops: a page of large values is written as several consecutive statements
#: (an op larger than this, up to max_value_bytes, alone). The server refuses a message past
#: 1 GiB ("invalid message length"): 140 values of 7.6 MiB in one statement were refused,
#: while 16 MiB per statement writes them at the speed of ``set_many``.
_IMPORT_STATEMENT_BYTES = 16 * 1024 * 1024

#: The writes that take ``fence=``: each has a fenced twin (see :func:`fenced_statement`).
_FENCED = (
    "set",
    "set_if_absent",
    "compare_and_set",
    "incr",
    "delete",
    "delete_many",
    "set_many",
)

_PARAM_RE = re.compile(r"\$(\d+)")
_NAMESPACE_PARAM_RE = re.compile(r"\$1(?!\d)")
#: Where the write of a statement begins: before it, only the feed lookup (``f``) reads.
_WRITE_RE = re.compile(r"\b(?:INSERT INTO|UPDATE|DELETE FROM)\b")
_WHERE_NAMESPACE = "WHERE namespace = "


async def key_pages(
    connector: PostgresConnector,
    conn: Any,
    query: str,
    head: tuple[Any, ...],
    limit: int,
    tail: tuple[Any, ...],
) -> AsyncGenerator[list[Entry], None]:
    """Keyset pages of ``query`` on ``conn`` (inside ``connector.transaction``): each run as
    ``query(*head, after, limit, *tail)`` from the previous page's last key ('' first) until
    a page comes back short; the statement's columns are Entry's fields, in order. The
    connection waits for the caller between pages without a command_timeout clock."""
    after = ""
    while True:
        connector.arm_command_timeout(conn)
        rows = await conn.fetch(query, *head, after, limit, *tail)
        connector.disarm_command_timeout(conn)
        if rows:
            yield [Entry(*row) for row in rows]
        if len(rows) < limit:
            return
        after = rows[-1][0]


def fenced_statement(sql: str, fence_function: str) -> str:
    """The fenced twin of write ``sql``: it calls ``fence($1, $n, $n+1)`` (the namespace, then
    the lease name and token as two new last parameters) once, before it writes anything.

    The fence function (migration 0003) returns the namespace when the lease is live with that
    token -- locking its row ``FOR SHARE`` until the write commits -- and raises SQLSTATE
    ``FL001`` (``LeaseLostError``) otherwise. It is called as an uncorrelated scalar subquery,
    which PostgreSQL runs once, as an InitPlan, where the statement first needs it. It takes the
    place of the first namespace parameter ``$1`` of the write itself -- the first ``INSERT
    INTO``, ``UPDATE`` or ``DELETE FROM`` of the text; the feed lookup before it (see
    ``sql/kv.sql``) keeps its ``$1``:

    * an ``UPDATE`` or ``DELETE`` (``WHERE namespace = $1 ...``) gets the condition
      ``(SELECT fence(...)) IS NOT NULL``: it names no column, so it is a *one-time filter*,
      checked before the scan starts -- also when no row matches (an absent key, an empty
      table, a plan that never evaluates the scan's keys) -- while ``namespace = $1`` stays a
      plain key of the primary-key scan;
    * an ``INSERT`` takes the namespace it writes from the subquery (the first column of its
      ``SELECT``), computed before the row is inserted or its conflict looked at.

    So a lost lease fails the statement before a version conflict or a non-number is decided,
    and the check and the write are one statement: one round trip, like the unfenced write.
    Holding the lease row ``FOR SHARE`` matters under READ COMMITTED: a fenced write that waits
    for an entry's row lock keeps the lease from being taken over (an ``UPDATE`` of its row)
    until it commits, so a new holder can never write a key before an old holder's write to it
    lands.
    """
    after = max(int(n) for n in _PARAM_RE.findall(sql)) + 1
    call = f"(SELECT {fence_function}($1, ${after}::text, ${after + 1}::bigint))"
    write = _WRITE_RE.search(sql)
    found = None if write is None else _NAMESPACE_PARAM_RE.search(sql, write.end())
    if found is None:
        raise ValueError("a fenced statement must write, with the namespace parameter $1")
    start, end = found.span()
    if sql.endswith(_WHERE_NAMESPACE, 0, start):
        head = sql[: start - len(_WHERE_NAMESPACE)]
        return f"{head}WHERE {call} IS NOT NULL AND namespace = $1{sql[end:]}"
    return f"{sql[:start]}{call}{sql[end:]}"


class PostgresKV(KVBackend):
    """Entries in a PostgreSQL table (see ``docs/backends/postgres.md``), on a connector shared
    with the ``view`` copies (which never open connections of their own)."""

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
        connector: PostgresConnector,
        *,
        namespace: str,
        sweeper_interval: float | None = None,
        sweeper_batch: int = 1000,
    ) -> None:
        super().__init__(namespace=namespace)
        check_non_negative_int("sweeper_batch", sweeper_batch)
        if sweeper_interval is not None:
            check_positive_number("sweeper_interval", sweeper_interval)
        self._connector = connector
        # The connector's bound method, looked up once (the hot path of every call).
        self._run = connector.run
        self._sweeper_batch = max(1, sweeper_batch)
        self._q = connector.statements("kv.sql")
        fence_function = ".".join(
            migrate.quote_ident(name)
            for name in (connector.schema, migrate.coordination_names(connector.table)[2])
        )
        self._qf = {name: fenced_statement(self._q[name], fence_function) for name in _FENCED}
        self._fence_check = connector.statements("leases.sql")["fence"]
        # After a write that may have recorded a change, this process's watchers of the
        # namespace's feed are woken directly (other processes' through NOTIFY, changes.py):
        # a dict lookup when nobody watches.
        self._notify_every = connector.notifier.notify_every
        self._wake = ("changes", namespace)
        if sweeper_interval is not None:
            connector.keep_running(
                "fleetmem-pg-sweeper", lambda: self._sweep_forever(sweeper_interval)
            )

    def _bind_namespace(self) -> None:
        self._wake = ("changes", self._namespace)

    @property
    def connector(self) -> PostgresConnector:
        """The connections, retry rules and migrations this primitive runs on."""
        return self._connector

    def describe(self) -> str:
        return self._connector.describe()

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Create the pool (unless injected) and check the schema version (migrating a fresh or
        older database when ``auto_migrate``). Idempotent."""
        await self._connector.connect()

    async def aclose(self) -> None:
        await self._connector.close()

    # ---------------------------------------------------------------- coordination

    def leases(self) -> LeaseBackend:
        from fleetmem.backends.postgres.leases import PostgresLeases

        return PostgresLeases(self._connector, namespace=self._namespace)

    def agents(self) -> AgentBackend:
        from fleetmem.backends.postgres.agents import PostgresAgents

        return PostgresAgents(self._connector, namespace=self._namespace)

    def queues(self) -> QueueBackend:
        from fleetmem.backends.postgres.queues import PostgresQueues

        return PostgresQueues(self._connector, namespace=self._namespace)

    def changes(self) -> ChangeBackend:
        from fleetmem.backends.postgres.changes import PostgresChanges

        return PostgresChanges(self._connector, namespace=self._namespace)

    def snapshots(self) -> SnapshotBackend:
        """The namespace's snapshots, in the tables of migration 0006 (``snapshots.py``)."""
        from fleetmem.backends.postgres.snapshots import PostgresSnapshots

        return PostgresSnapshots(self._connector, namespace=self._namespace)

    def _write(self, name: str, args: tuple[Any, ...], fence: Fence | None) -> tuple[str, Any]:
        """Statement ``name`` and its arguments, fenced when ``fence`` is given."""
        if fence is None:
            return self._q[name], args
        return self._qf[name], (*args, fence.name, fence.token)

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Any:
        row = await self._run(FETCHROW, self._q["get"], (self._namespace, key), write=False)
        return MISSING if row is None else row[0]

    async def get_entry(self, key: str) -> Entry | None:
        row = await self._run(FETCHROW, self._q["get_entry"], (self._namespace, key), write=False)
        if row is None:
            return None
        return Entry(key, row[0], row[1], row[2], row[3], row[4], row[5])

    async def _read_by_keys(self, name: str, keys: list[str]) -> Any:
        """The rows of read ``name`` for a key array (planned for it from _PLANNED_MIN_KEYS)."""
        kind = FETCH_PLANNED if len(keys) >= _PLANNED_MIN_KEYS else FETCH
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
                FETCHROW, self._q["get_entry_ttl"], (self._namespace, key), write=False
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
        rows = await self._run(FETCH, self._q["exists_many"], (self._namespace, keys), write=False)
        found = {row[0] for row in rows}
        return [key in found for key in keys]

    async def exists(self, key: str) -> bool:
        value = await self._run(FETCHVAL, self._q["exists"], (self._namespace, key), write=False)
        return value is not None

    async def ttl(self, key: str) -> float | None:
        row = await self._run(FETCHROW, self._q["ttl"], (self._namespace, key), write=False)
        if row is None:
            raise KeyNotFoundError(f"key {key!r} does not exist")
        return None if row[0] is None else float(row[0])

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        upper = prefix_upper_bound(prefix)
        args: tuple[Any, ...] = (self._namespace, prefix, upper, after or "", limit)
        if partition is None:
            rows = await self._run(FETCH, self._q["keys"], args, write=False)
        else:
            rows = await self._run(
                FETCH, self._q["keys_partition"], (*args, partition), write=False
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
            rows = await self._run(FETCH, self._q["search"], args, write=False)
        else:
            rows = await self._run(
                FETCH, self._q["search_partition"], (*args, partition), write=False
            )
        # The SQL filter is exact; .matches guards against any engine difference.
        return {row[0]: row[1] for row in rows if pattern.matches(row[0])}

    async def partitions(self) -> list[str]:
        rows = await self._run(FETCH, self._q["partitions"], (self._namespace,), write=False)
        return [row[0] for row in rows]

    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        # A loose index scan of the primary key (see the statement in sql/kv.sql).
        args = (
            prefix,
            prefix_upper_bound(prefix),
            "" if after is None else after,
            limit,
            RESERVED_NAMESPACE_PREFIX,
        )
        rows = await self._run(FETCH, self._q["namespaces"], args, write=False)
        return [row[0] for row in rows]

    async def stats(self) -> StoreStats:
        rows = await self._run(FETCH, self._q["stats"], (self._namespace,), write=False)
        partitions = {row[0]: row[1] for row in rows if row[1] > 0}
        return StoreStats(
            namespace=self._namespace,
            keys=sum(partitions.values()),
            partitions=partitions,
            expired_pending=sum(row[2] for row in rows),
            bytes=sum(row[3] for row in rows),
            backend=self.backend_name,
        )

    async def server_time(self) -> datetime:
        """The server's clock (``clock_timestamp()``, tz-aware UTC), the one that judges
        expiry here: one statement of its own, one round trip, errors translated as for every
        call (a read: retried when the connection was lost before it ran)."""
        value: datetime = await self._run(FETCHVAL, self._q["server_time"], (), write=False)
        return value.astimezone(timezone.utc)

    async def health(self) -> dict[str, Any]:
        await self._run(FETCHVAL, self._q["ping"], (), write=False)
        connector = self._connector
        size, idle = connector.pool_usage()
        return {
            "table": f"{connector.schema}.{connector.table}",
            "schema_revision": migrate.HEAD_REVISION,
            "pool_size": size,
            "pool_idle": idle,
            "pool_max": connector.max_size,
        }

    # ---------------------------------------------------------------- portability

    #: One ``REPEATABLE READ`` snapshot for the whole export (see :meth:`export_pages`).
    export_consistency = "snapshot"
    #: A replace is one transaction (see :meth:`import_replace`).
    replace_is_atomic = True

    async def entries_page(self, prefix: str, after: str | None, limit: int) -> list[Entry]:
        """One statement (``sql/kv.sql`` ``export_page``, outside any transaction): a walk
        of the primary key from ``after``, expiry judged by the statement's ``now()``."""
        rows = await self._run(
            FETCH,
            self._q["export_page"],
            (self._namespace, prefix, prefix_upper_bound(prefix), after or "", limit),
            write=False,
        )
        return [Entry(*row) for row in rows]

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """Keyset pages read in one ``REPEATABLE READ READ ONLY`` transaction on a connection
        held for the whole iteration: every page reads the same snapshot and judges expiry by
        the same ``now()`` (the transaction's start), so the export is one point in time
        whatever is written meanwhile. Each page is one statement (``sql/kv.sql``
        ``export_page``), by the primary key from the last key of the page before, of at most
        ``page_size`` and at most :data:`_EXPORT_ROWS` entries. The connection waits for the
        caller between pages without a command_timeout clock; closing the iterator early (or
        cancelling it) rolls the transaction back and gives the connection back to the pool.
        The export holds that connection of the pool while it runs and, as any long
        transaction, holds back VACUUM's horizon until it ends.

        The transaction first sets :data:`KEY_ORDER_PLANS`: each page must be a walk of the
        primary key from the previous page's last key, whatever the table's statistics say."""
        connector = self._connector
        upper = prefix_upper_bound(prefix)
        ns = self._namespace
        extra: tuple[str, ...] = ()
        if partition is None:
            query = self._q["export_page"]
        else:
            query, extra = self._q["export_page_partition"], (partition,)
        limit = min(page_size, _EXPORT_ROWS)
        async with connector.transaction(isolation="repeatable_read", readonly=True) as conn:
            await conn.execute(KEY_ORDER_PLANS)
            pages = key_pages(connector, conn, query, (ns, prefix, upper), limit, extra)
            async with contextlib.aclosing(pages):
                async for page in pages:
                    yield page
            connector.arm_command_timeout(conn)  # the COMMIT that ends the snapshot

    @staticmethod
    def _import_columns(
        ops: list[ImportOp],
    ) -> tuple[list[str], list[bytes], list[str], list[Any]]:
        keys: list[str] = []
        payloads: list[bytes] = []
        partitions: list[str] = []
        expiries: list[Any] = []
        for op in ops:
            keys.append(op.key)
            payloads.append(op.payload)
            partitions.append(op.partition)
            expiries.append(op.expires_at)
        return keys, payloads, partitions, expiries

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """One statement (``sql/kv.sql`` ``import_batch``) per at most
        :data:`_IMPORT_STATEMENT_BYTES` of the batch (see :func:`_statement_pages`; usually
        the whole batch): absolute expiries are judged by the server's ``now()``, the writes
        follow ``set``'s version and timestamp rules and record their changes as
        ``set_batch`` does. A batch split in several statements is not atomic (an error after
        the first leaves it written), as the batches of one merge never are."""
        written = expired = existing = 0
        try:
            for part in _statement_pages(ops):
                keys, payloads, partitions, expiries = self._import_columns(part)
                row = await self._run(
                    FETCHROW,
                    self._q["import_batch"],
                    (self._namespace, keys, payloads, partitions, expiries, missing_only),
                    write=True,
                )
                done, skipped = int(row[0]), int(row[1])
                written += done
                expired += skipped
                existing += len(part) - done - skipped
        finally:
            if written:
                self._notify_every(self._wake)
        return ImportTally(written, expired, existing)

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """One transaction on one connection: per page one statement (``sql/kv.sql``
        ``import_replace_page``) writes the page and deletes the keys between the previous
        page's last key and this page's last key that it did not write; after the last page
        one more deletes every key above it; then COMMIT. A page of more than
        :data:`_IMPORT_STATEMENT_BYTES` is written as consecutive smaller pages, one
        statement each (the same rule holds for each, so the result is the same). Nobody
        sees a half-replaced namespace, and a failure -- of the server, of the connection, or
        raised by ``pages`` (which leaves as it was raised) -- changes nothing. Writers of the
        namespace's feed hold its advisory lock shared, so a ``clear()`` waits for the
        commit.

        Every statement of the transaction has the same ``now()``, its start: expiry is judged
        and timestamps are written at that instant throughout. Keys must ascend strictly
        within and across pages (``InvalidArgumentError`` otherwise, before the page is
        written, and nothing is changed): the deletes rely on it."""
        connector = self._connector
        ns = self._namespace
        page_query = self._q["import_replace_page"]
        written = expired = 0
        previous = ""  # keys are never empty: '' is below every key
        async with connector.transaction() as conn:
            while True:
                connector.disarm_command_timeout(conn)
                page = await connector.untranslated(_next_page(pages))
                if page is None:
                    break
                if not page:
                    continue
                _check_ascending(page, previous)
                for part in _statement_pages(page):
                    keys, payloads, partitions, expiries = self._import_columns(part)
                    connector.arm_command_timeout(conn)
                    row = await conn.fetchrow(
                        page_query, ns, keys, payloads, partitions, expiries, previous, keys[-1]
                    )
                    written += int(row[0])
                    expired += int(row[1])
                    previous = keys[-1]
            connector.arm_command_timeout(conn)
            await conn.fetchval(self._q["import_replace_rest"], ns, previous)
        self._notify_every(self._wake)
        return ImportTally(written, expired, 0)

    # ---------------------------------------------------------------- writes

    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        query, args = self._write(
            "set", (self._namespace, key, payload, partition, ttl_ms, keep_ttl), fence
        )
        row = await self._run(FETCHROW, query, args, write=True)
        self._notify_every(self._wake)
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
        rows = await self._run(FETCH, query, args, write=True)
        self._notify_every(self._wake)
        metas = {row[0]: EntryMeta(row[1], row[2], row[3], row[4], row[5]) for row in rows}
        return [metas[key] for key in keys]

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        # Every chunk streams into one COPY and one upsert in one transaction: a fenced call
        # checks its lease in that upsert, so all of it is written under the fence or nothing.
        # A large one also asks first (without a lock, see sql/leases.sql "fence"), so that a
        # lost lease fails before the COPY; for a small one the extra round trip would cost
        # more than streaming its rows.
        first = next(chunks, [])
        count = 0

        def records() -> Iterator[tuple[str, bytes]]:
            nonlocal count
            for chunk in itertools.chain((first,), chunks):
                count += len(chunk)
                yield from chunk

        connector = self._connector
        async with connector.transaction() as conn:
            if (
                fence is not None
                and len(first) >= _FENCE_FIRST_MIN_ROWS
                and not await conn.fetchval(
                    self._fence_check, self._namespace, fence.name, fence.token
                )
            ):
                raise lease_lost(fence.name, fence.token)
            connector.arm_command_timeout(conn)
            await conn.execute(self._q["stage_create"])
            # One COPY streams every chunk; only the chunk being sent is held encoded.
            connector.arm_command_timeout(conn)
            await conn.copy_records_to_table(
                "fleetmem_stage_1", records=records(), columns=("key", "value")
            )
            connector.arm_command_timeout(conn)
            query, args = self._write("set_many", (self._namespace, partition, ttl_ms), fence)
            await conn.execute(query, *args)
        self._notify_every(self._wake)
        return count

    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool:
        query, args = self._write(
            "set_if_absent", (self._namespace, key, payload, partition, ttl_ms), fence
        )
        row = await self._run(FETCHROW, query, args, write=True)
        if row is None:
            return False
        self._notify_every(self._wake)
        return True

    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        # A fenced statement checks the lease before it looks at the version: a lost lease
        # raises LeaseLostError, never a VersionConflictError.
        ns = self._namespace
        for _ in range(5):
            if version == 0:
                query, args = self._write(
                    "set_if_absent", (ns, key, payload, partition, ttl_ms), fence
                )
            else:
                query, args = self._write(
                    "compare_and_set", (ns, key, payload, partition, ttl_ms, version), fence
                )
            row = await self._run(FETCHROW, query, args, write=True)
            if row is not None:
                self._notify_every(self._wake)
                return EntryMeta(row[0], row[1], row[2], row[3], row[4])
            current = await self._run(FETCHVAL, self._q["current_version"], (ns, key), write=False)
            current = 0 if current is None else int(current)
            if current != version:
                raise VersionConflictError(key, version, current)
            # The entry changed between the two statements and came back to `version`: retry.
        raise VersionConflictError(key, version, version)  # pragma: no cover - constant churn

    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float:
        ns = self._namespace
        is_float = isinstance(amount, float)
        text = repr(amount) if is_float else str(amount)
        for _ in range(5):
            try:
                query, args = self._write(
                    "incr", (ns, key, text, partition, ttl_ms, is_float), fence
                )
                row = await self._run(FETCHROW, query, args, write=True)
            except FleetmemError as exc:
                cause = exc.__cause__
                if sqlstate(cause) == _NUMERIC_OUT_OF_RANGE:
                    raise InvalidArgumentError(
                        f"incr of key {key!r} would overflow a float"
                    ) from cause
                raise
            if row is not None:
                self._notify_every(self._wake)
                value, float_result = row[0], row[1]
                return float(value) if float_result else int(value)
            # Nothing changed: say why from the current value.
            current = await self._run(FETCHROW, self._q["get"], (ns, key), write=False)
            if current is None:
                continue  # deleted in between: try again
            incremented(key, current[0], amount)  # raises what made the statement refuse
        raise BackendUnavailableError(f"incr of key {key!r} kept racing; try again")

    async def delete(self, key: str, fence: Fence | None = None) -> bool:
        query, args = self._write("delete", (self._namespace, key), fence)
        value = await self._run(FETCHVAL, query, args, write=True)
        if not value:
            return False
        self._notify_every(self._wake)
        return True

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        rows = await self._run(FETCH, self._q["delete_batch"], (self._namespace, keys), write=True)
        live = {row[0]: bool(row[1]) for row in rows}
        if rows:
            self._notify_every(self._wake)
        return [live.get(key, False) for key in keys]

    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int:
        query, args = self._write("delete_many", (self._namespace, keys), fence)
        count = int(await self._run(FETCHVAL, query, args, write=True))
        if count:
            self._notify_every(self._wake)
        return count

    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        value = await self._run(
            FETCHVAL, self._q["expire"], (self._namespace, key, ttl_ms, version), write=True
        )
        if value is None:
            return False
        self._notify_every(self._wake)
        return True

    async def clear(self, partition: str | None) -> int:
        # The clear function of migration 0005 (one round trip): with a feed it waits for the
        # recording writes in flight before it deletes, so that its change follows theirs.
        if partition is None:
            value = await self._run(FETCHVAL, self._q["clear"], (self._namespace,), write=True)
        else:
            value = await self._run(
                FETCHVAL, self._q["clear_partition"], (self._namespace, partition), write=True
            )
        count = int(value)
        if count:
            self._notify_every(self._wake)
        return count

    async def cleanup_expired(self) -> int:
        value = await self._run(
            FETCHVAL, self._q["cleanup_expired"], (self._namespace,), write=True
        )
        return int(value)

    async def sweep_expired(self, max_batches: int = 100) -> int:
        """Delete expired rows of every namespace in this table, in bounded batches: expired
        entries, and the work queues' done jobs whose result expired (a queue nobody acks in
        any more keeps them otherwise; they are invisible to every call either way)."""
        total = 0
        for statement in ("sweep", "sweep_results"):
            for _ in range(max_batches):
                removed = int(
                    await self._run(
                        FETCHVAL, self._q[statement], (self._sweeper_batch,), write=True
                    )
                )
                total += removed
                if removed < self._sweeper_batch:
                    break
        return total

    async def sweep_changes(self) -> int:
        """Trim every change feed of this table past its retention, and delete the pending
        changes of stale epochs (writes that raced a ``disable``): how many of those went."""
        from fleetmem.backends.postgres.changes import sweep_changes

        return await sweep_changes(self._connector, self._sweeper_batch)

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.sweep_expired()
                if removed:
                    _log.debug("sweeper removed %d expired entries", removed)
            except FleetmemError as exc:
                _log.warning("expiry sweep failed: %s", exc)
            try:
                await self.sweep_changes()
            except FleetmemError as exc:
                _log.warning("change feed sweep failed: %s", exc)


async def _next_page(pages: AsyncIterator[list[ImportOp]]) -> list[ImportOp] | None:
    """The next page of ``pages``, or None at its end."""
    try:
        return await anext(pages)
    except StopAsyncIteration:
        return None


def _statement_pages(ops: list[ImportOp]) -> Iterator[list[ImportOp]]:
    """``ops`` in consecutive runs of at most :data:`_IMPORT_STATEMENT_BYTES` of keys and
    values (an op larger than that alone): the ops of one import statement. One run -- ``ops``
    itself -- in the usual case; none when ``ops`` is empty."""
    start = size = 0
    for i, op in enumerate(ops):
        weight = len(op.payload) + len(op.key) + len(op.partition)
        if size and size + weight > _IMPORT_STATEMENT_BYTES:
            yield ops[start:i]
            start, size = i, 0
        size += weight
    if start == 0:
        if ops:
            yield ops
    else:
        yield ops[start:]


def _check_ascending(page: list[ImportOp], previous: str) -> None:
    """Refuse a page whose keys do not ascend strictly after ``previous`` (code-point order,
    PostgreSQL's "C" collation of the key column)."""
    last = previous
    for op in page:
        if op.key <= last:
            raise InvalidArgumentError(
                f"import_replace needs keys strictly ascending across pages: {op.key!r} "
                f"after {last!r}"
            )
        last = op.key
