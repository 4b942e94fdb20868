"""``SQLiteKV``: the key-value primitive on a SQLite file, one function per operation.

Each operation is one function run on the connector's worker thread; a write is one
``BEGIN IMMEDIATE`` transaction. There is no server, so expiry is measured on this process's
wall clock, in milliseconds. A fenced write checks its lease first inside that transaction
(:func:`~fleetmem.backends.sqlite.leases.check_fence`), with the write's own ``now``: the
write lock is held from the check to the commit, so a lost fence changes nothing and wins over
anything else the write could decide (a version conflict, a value that is not a number).

Every write that changed something also records its changes in the namespace's change feed,
when that is enabled, inside the same transaction (``changes.py``): the write statement returns
the feed's epoch as its last column (``NULL``: no feed), so the probe of the flag rides on it;
nothing about the feed is cached between transactions. Then it wakes this process's watchers.

Export and import (``fleetmem.portability``): an export reads every page inside one read
transaction of a session of its own (:meth:`SQLiteConnector.reader`): one snapshot, which no
writer waits for in WAL mode; an import writes each batch in one ``BEGIN IMMEDIATE``, and a
``replace`` holds one ``BEGIN IMMEDIATE`` for the whole import in a writing session
(:meth:`SQLiteConnector.writer`): nobody sees a half-replaced namespace, and any failure --
also of the caller's pages, or a cancellation -- rolls everything back. Both record their
changes exactly as ``set_many`` and ``delete_many`` do.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from operator import itemgetter
from typing import Any, ClassVar

import orjson

from fleetmem._codec import decode_value, encode_value, incremented, utc_from_ms
from fleetmem._validate import GlobPattern, prefix_upper_bound
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
    SnapshotBackend,
)
from fleetmem.backends.sqlite.agents import SQLiteAgents
from fleetmem.backends.sqlite.changes import (
    ChangeRow,
    SQLiteChanges,
    feed_epoch,
    record,
    record_sets,
)
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms
from fleetmem.backends.sqlite.leases import SQLiteLeases, check_fence
from fleetmem.backends.sqlite.queues import SQLiteQueues, delete_expired_results
from fleetmem.backends.sqlite.snapshots import SQLiteSnapshots
from fleetmem.errors import (
    InvalidArgumentError,
    KeyNotFoundError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["SQLiteKV"]

_UPSERT_RETURNING = SQL["upsert"] + "\n" + SQL["returning_meta"]


_dt = utc_from_ms


def _dt_or_none(ms: int | None) -> datetime | None:
    return None if ms is None else _dt(ms)


def _meta(row: tuple[Any, ...]) -> EntryMeta:
    partition, version, created, updated, expires = row[:5]
    return EntryMeta(partition, version, _dt(created), _dt(updated), _dt_or_none(expires))


def _live(expires_at: int | None, now: int) -> bool:
    return expires_at is None or expires_at > now


def _json_keys(keys: list[str]) -> str:
    return orjson.dumps(keys).decode("utf-8")


def _entries(rows: Iterable[tuple[Any, ...]]) -> list[Entry]:
    """Entries from rows of (key, value, partition, version, created, updated, expires)."""
    return [
        Entry(
            key,
            decode_value(value),
            partition,
            version,
            _dt(created),
            _dt(updated),
            _dt_or_none(expires),
        )
        for key, value, partition, version, created, updated, expires in rows
    ]


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)

#: An :class:`ImportOp` as the import statements take it: key, payload, partition, expiry in
#: milliseconds (rounded down: an imported entry never outlives its source).
_ImportRow = tuple[str, bytes, str, int | None]

#: Keys a replace deletes per statement (and holds in memory, with their changes).
_DELETE_CHUNK = 1000


def _import_rows(ops: list[ImportOp]) -> list[_ImportRow]:
    return [
        (
            op.key,
            op.payload,
            op.partition,
            None if op.expires_at is None else (op.expires_at - _EPOCH) // _ONE_MS,
        )
        for op in ops
    ]


class SQLiteKV(KVBackend):
    """Entries of one namespace in the ``entries`` table of the connector's file."""

    backend_name = "sqlite"

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._db = connector

    def _written(self) -> None:
        """After a write: wake this process's watchers of the namespace's feed (a dict lookup
        when nobody watches; a watcher woken by a write that recorded nothing reads nothing)."""
        self._db.notifier.notify_every(("changes", self._namespace))

    @property
    def connector(self) -> SQLiteConnector:
        return self._db

    def describe(self) -> str:
        return f" path={self._db.path!r}"

    async def connect(self) -> None:
        """Open the database, switch it to WAL and create or check the schema. Idempotent.

        Any operation opens the database on first use too; ``connect()`` reports problems early.
        """
        await self._db.call(_noop)

    async def aclose(self) -> None:
        await self._db.shutdown()

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Any:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Any:
            row = conn.execute(SQL["get_value"], (ns, key, now_ms())).fetchone()
            return MISSING if row is None else decode_value(row[0])

        return await self._db.call(run)

    async def get_entry(self, key: str) -> Entry | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(SQL["get_entry"], (ns, key, now_ms())).fetchone()
            if row is None:
                return None
            return Entry(key, decode_value(row[0]), *_meta(row[1:]))

        return await self._db.call(run)

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        """One statement for all ``keys`` (distinct); in the order of ``keys``."""
        if not keys:
            return {}
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> dict[str, Entry]:
            rows = conn.execute(SQL["get_entries"], (ns, _json_keys(keys), now_ms()))
            found = {entry.key: entry for entry in _entries(rows)}
            return {key: found[key] for key in keys if key in found}

        return await self._db.call(run)

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            rows = conn.execute(SQL["get_many"], (ns, _json_keys(keys), now_ms()))
            return {k: decode_value(v) for k, v in rows}

        return await self._db.call(run)

    async def exists(self, key: str) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL["get_version"], (ns, key, now_ms())).fetchone() is not None

        return await self._db.call(run)

    async def ttl(self, key: str) -> float | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> float | None:
            now = time.time() * 1000.0
            row = conn.execute(SQL["get_expiry"], (ns, key, math.floor(now))).fetchone()
            if row is None:
                raise KeyNotFoundError(f"key {key!r} does not exist")
            expires: int | None = row[0]
            return None if expires is None else max(0.0, (expires - now) / 1000.0)

        return await self._db.call(run)

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        ns = self._namespace

        # Half-open range [low, high) over the primary key: low is the prefix, or the smallest
        # string above ``after`` (``after`` + U+0000, as no key holds U+0000).
        low = after + "\x00" if after is not None and after >= prefix else prefix
        high = prefix_upper_bound(prefix)
        lim = -1 if limit is None else limit

        def run(conn: sqlite3.Connection) -> list[str]:
            now = now_ms()
            if partition is None:
                rows = conn.execute(SQL["keys"], (ns, low, high, now, lim))
            else:
                rows = conn.execute(SQL["keys_in_partition"], (ns, low, high, now, lim, partition))
            return [row[0] for row in rows]

        return await self._db.call(run)

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        ns = self._namespace

        # The literal prefix becomes a key range; the exact glob matcher filters in Python
        # (SQLite's LIKE ignores ASCII case and its GLOB has no escapes).
        low, high = pattern.prefix, prefix_upper_bound(pattern.prefix)

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            now = now_ms()
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

    async def partitions(self) -> list[str]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(SQL["partitions"], (ns, now_ms()))]

        return await self._db.call(run)

    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        # A loose index scan of the primary key (see the statement in sql/kv.sql).
        args = (
            prefix,
            prefix_upper_bound(prefix),
            "" if after is None else after,
            -1 if limit is None else limit,
            RESERVED_NAMESPACE_PREFIX + "*",
        )

        def run(conn: sqlite3.Connection) -> list[str]:
            low, high, cursor, lim, reserved = args
            rows = conn.execute(SQL["namespaces"], (low, high, cursor, now_ms(), lim, reserved))
            return [row[0] for row in rows]

        return await self._db.call(run)

    async def stats(self) -> StoreStats:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> StoreStats:
            with Transaction(conn, write=False):  # one snapshot for both counts
                now = now_ms()
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

    async def health(self) -> dict[str, Any]:
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

    def leases(self) -> LeaseBackend:
        return SQLiteLeases(self._db, namespace=self._namespace)

    def agents(self) -> AgentBackend:
        return SQLiteAgents(self._db, namespace=self._namespace)

    def queues(self) -> QueueBackend:
        return SQLiteQueues(self._db, namespace=self._namespace)

    def changes(self) -> ChangeBackend:
        return SQLiteChanges(self._db, namespace=self._namespace)

    def snapshots(self) -> SnapshotBackend:
        return SQLiteSnapshots(self._db, namespace=self._namespace)

    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> EntryMeta:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                expires = None if ttl_ms is None else now + ttl_ms
                row = conn.execute(
                    _UPSERT_RETURNING, (ns, key, partition, payload, now, expires, keep_ttl)
                ).fetchone()
                change = ("set", key, row[0], row[1], payload, row[4])
                record(db, conn, ns, row[5], now, [change])
            return _meta(row)

        meta = await db.call(run)
        self._written()
        return meta

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        ns = self._namespace
        db = self._db

        # One transaction for the whole call: all or nothing, and one commit (so one fence
        # check, and one probe of the feed, cover every chunk).
        def run(conn: sqlite3.Connection) -> int:
            count = 0
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                epoch = feed_epoch(db, conn, ns, now)
                expires = None if ttl_ms is None else now + ttl_ms
                for chunk in chunks:
                    conn.executemany(
                        SQL["upsert"],
                        [(ns, k, partition, p, now, expires, False) for k, p in chunk],
                    )
                    if epoch is not None and chunk:
                        record_sets(conn, ns, epoch, now, _json_keys([k for k, _ in chunk]))
                    count += len(chunk)
            return count

        count = await db.call(run)
        self._written()
        return count

    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                expires = None if ttl_ms is None else now + ttl_ms
                row = conn.execute(
                    SQL["insert_if_absent"], (ns, key, partition, payload, now, expires)
                ).fetchone()
                if row is None:
                    return False
                # A new entry: version 1, in the given partition or the default one.
                stored = "default" if partition is None else partition
                record(db, conn, ns, row[0], now, [("set", key, stored, 1, payload, expires)])
                return True

        wrote = await db.call(run)
        if wrote:
            self._written()
        return wrote

    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> EntryMeta:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                row = conn.execute(SQL["get_version"], (ns, key, now)).fetchone()
                current = 0 if row is None else int(row[0])
                if current != version:
                    raise VersionConflictError(key, version, current)
                expires = None if ttl_ms is None else now + ttl_ms
                meta = conn.execute(
                    _UPSERT_RETURNING,
                    (ns, key, partition, payload, now, expires, ttl_ms is None),
                ).fetchone()
                change = ("set", key, meta[0], meta[1], payload, meta[4])
                record(db, conn, ns, meta[5], now, [change])
            return _meta(meta)

        result = await db.call(run)
        self._written()
        return result

    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> int | float:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                row = conn.execute(SQL["get_value"], (ns, key, now)).fetchone()
                result = incremented(key, 0 if row is None else decode_value(row[0]), amount)
                expires = None if ttl_ms is None else now + ttl_ms
                stored = encode_value(result)
                meta = conn.execute(
                    _UPSERT_RETURNING,
                    (ns, key, partition, stored, now, expires, ttl_ms is None),
                ).fetchone()
                change = ("set", key, meta[0], meta[1], stored, meta[4])
                record(db, conn, ns, meta[5], now, [change])
            return result

        result = await db.call(run)
        self._written()
        return result

    async def delete(self, key: str, fence: Fence | None = None) -> bool:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                row = conn.execute(SQL["delete"], (ns, key)).fetchone()
                if row is None or not _live(row[0], now):
                    return False  # an expired row removed is no change
                record(db, conn, ns, row[2], now, [("delete", key, row[1], None, None, None)])
                return True

        deleted = await db.call(run)
        if deleted:
            self._written()
        return deleted

    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
                now = now_ms()
                if fence is not None:
                    check_fence(conn, ns, fence, now)
                rows = conn.execute(SQL["delete_many"], (ns, _json_keys(keys))).fetchall()
                live = {row[1]: row[2] for row in rows if _live(row[0], now)}
                if live:  # recorded in the order the keys were given
                    changes: list[ChangeRow] = [
                        ("delete", key, live[key], None, None, None) for key in keys if key in live
                    ]
                    record(db, conn, ns, rows[0][3], now, changes)
            return len(live)

        count = await db.call(run)
        if count:
            self._written()
        return count

    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                now = now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                row = conn.execute(SQL["set_expiry"], (ns, key, expires, now, version)).fetchone()
                if row is None:
                    return False
                record(db, conn, ns, row[2], now, [("ttl", key, row[1], row[0], None, expires)])
                return True

        changed = await db.call(run)
        if changed:
            self._written()
        return changed

    async def clear(self, partition: str | None) -> int:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
                now = now_ms()
                if partition is None:
                    live, epoch = conn.execute(SQL["count_live"], (ns, now)).fetchone()
                    conn.execute(SQL["delete_namespace"], (ns,))
                else:
                    live, epoch = conn.execute(
                        SQL["count_live_in_partition"], (ns, now, partition)
                    ).fetchone()
                    conn.execute(SQL["delete_partition"], (ns, partition))
                if live:  # one change for the call, however many entries went
                    change: ChangeRow = ("clear", None, partition, None, None, None)
                    record(db, conn, ns, epoch, now, [change])
            return int(live)

        count = await db.call(run)
        if count:
            self._written()
        return count

    # ------------------------------------------------------------------ portability

    #: One read transaction for a whole export (see :meth:`export_pages`).
    export_consistency: ClassVar[str] = "snapshot"
    #: One write transaction for a whole replace (see :meth:`import_replace`).
    replace_is_atomic: ClassVar[bool] = True

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """Keyset pages (ascending by key: SQLite's BINARY order on UTF-8 is code-point
        order) read in **one** read transaction of a session of its own: every page comes from
        the snapshot its first ``SELECT`` fixed, and liveness is judged against one ``now``
        taken at the start. In WAL mode no writer waits for it (this store's writes go on
        through the store's own connection); the WAL cannot be checkpointed past the snapshot
        meanwhile, so it grows with what is written during a long export. Closing the
        generator early (or cancelling its consumer) ends the transaction and gives the
        connection up, without blocking the event loop."""
        ns = self._namespace
        high = prefix_upper_bound(prefix)
        now = now_ms()
        session = await self._db.reader()
        try:
            low = prefix
            begin = True
            while True:
                page = await session.call(
                    partial(_export_page, ns, low, high, now, page_size, partition, begin)
                )
                begin = False
                if page:
                    yield page
                if len(page) < page_size:
                    return
                low = page[-1].key + "\x00"  # the smallest string above it (no key holds U+0000)
        finally:
            session.close()

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """One ``BEGIN IMMEDIATE`` for the batch, on one ``now``: an op expiring at or before
        it is skipped (``expired``); with ``missing_only`` a key with a live entry is skipped
        (``existing``; an expired row counts as absent: recreated at version 1); every other
        op is upserted as ``set`` does (its own partition and absolute expiry; version + 1 and
        ``created_at`` kept for a live entry, version 1 otherwise), and each written key is
        recorded as a ``set`` in the change feed, as ``set_many`` records its keys. Keys must
        be distinct (``InvalidArgumentError`` before any I/O)."""
        if not ops:
            return ImportTally(0, 0, 0)
        rows = _import_rows(ops)
        if len({row[0] for row in rows}) != len(rows):
            raise InvalidArgumentError("an import batch must not repeat a key")
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> ImportTally:
            with Transaction(conn):
                now = now_ms()
                epoch = feed_epoch(db, conn, ns, now)
                written, expired, existing = _write_imports(
                    conn, ns, rows, now, epoch, missing_only
                )
            return ImportTally(len(written), expired, existing)

        tally = await db.call(run)
        if tally.written:
            self._written()
        return tally

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """One ``BEGIN IMMEDIATE`` for the whole import, in a writing session: per page, the
        upserts of :meth:`import_batch` and the deletion of every key above the previous
        page's last key, up to this page's last, that this page did not write (also a key
        whose op had expired); after the last page, of every key above it. A deleted live
        entry is recorded as a ``delete``, in key order, as ``delete_many`` records it (an
        expired row removed is no change). Other writers wait for the commit (up to their busy
        timeout) and readers see the namespace as it was until then; any exception -- also
        one raised by ``pages``, or a cancellation -- rolls everything back. Keys must be
        strictly ascending within and across pages (``InvalidArgumentError``, rolled back):
        the deletions depend on it. Holds one page of ops (and of deleted keys) at a time."""
        ns = self._namespace
        db = self._db
        written = expired = 0
        session = await db.writer()
        try:
            epoch = await session.call(partial(_begin_replace, db, ns))
            previous: str | None = None
            async for page in pages:
                if not page:
                    continue
                rows = _import_rows(page)
                _check_ascending(rows, previous)
                done, gone = await session.call(
                    partial(_replace_page, db, ns, epoch, rows, previous)
                )
                written += done
                expired += gone
                previous = rows[-1][0]
            await session.call(partial(_finish_replace, db, ns, epoch, previous))
        finally:
            await session.aclose()
        self._written()
        return ImportTally(written, expired, 0)

    async def cleanup_expired(self) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
                now = now_ms()
                # The work queues' results past their TTL go too (invisible already; a queue
                # nobody acks in any more would keep them): not counted, entries are.
                delete_expired_results(conn, ns, now)
                return conn.execute(SQL["delete_expired"], (ns, now)).rowcount

        return await self._db.call(run)


def _noop(conn: sqlite3.Connection) -> None:
    return None


# ---------------------------------------------------------------------- export and import
# Run on a session's thread (or the store's), inside the caller's transaction.


def _export_page(
    ns: str,
    low: str,
    high: str,
    now: int,
    limit: int,
    partition: str | None,
    begin: bool,
    conn: sqlite3.Connection,
) -> list[Entry]:
    if begin:  # the SELECT below fixes the snapshot every later page reads
        conn.execute(SQL["begin"])
    if partition is None:
        rows = conn.execute(SQL["export_page"], (ns, low, high, now, limit))
    else:
        rows = conn.execute(SQL["export_page_in_partition"], (ns, low, high, now, limit, partition))
    return _entries(rows)


def _write_imports(
    conn: sqlite3.Connection,
    ns: str,
    rows: list[_ImportRow],
    now: int,
    epoch: int | None,
    missing_only: bool,
) -> tuple[list[str], int, int]:
    """Upsert the ops of ``rows`` that are still live at ``now`` (with ``missing_only``, only
    over keys without a live entry) and record a ``set`` of each in the feed of ``epoch``.
    Returns the keys written, the count skipped as expired and as existing."""
    live = [row for row in rows if row[3] is None or row[3] > now]
    expired = len(rows) - len(live)
    existing = 0
    if missing_only and live:
        keys_json = _json_keys([row[0] for row in live])
        present = {r[0] for r in conn.execute(SQL["live_keys_among"], (ns, keys_json, now))}
        if present:  # under the write lock: still true when the upsert below runs
            existing = len(present)
            live = [row for row in live if row[0] not in present]
    if not live:
        return [], expired, existing
    # The upsert of set(): the op's partition, its absolute expiry (keep_ttl off); over a live
    # entry version + 1 and created_at kept, over a missing or expired one version 1.
    conn.executemany(
        SQL["upsert"],
        [(ns, key, part, payload, now, expires, False) for key, payload, part, expires in live],
    )
    keys = [row[0] for row in live]
    if epoch is not None:
        record_sets(conn, ns, epoch, now, _json_keys(keys))
    return keys, expired, existing


def _check_ascending(rows: list[_ImportRow], previous: str | None) -> None:
    last = previous
    for row in rows:
        if last is not None and row[0] <= last:
            raise InvalidArgumentError(
                f"import_replace needs keys strictly ascending: {row[0]!r} after {last!r}"
            )
        last = row[0]


def _begin_replace(db: SQLiteConnector, ns: str, conn: sqlite3.Connection) -> int | None:
    """Take the write lock for the whole replace; the feed's epoch (the lock keeps it)."""
    conn.execute(SQL["begin_immediate"])
    return feed_epoch(db, conn, ns, now_ms())


def _replace_page(
    db: SQLiteConnector,
    ns: str,
    epoch: int | None,
    rows: list[_ImportRow],
    previous: str | None,
    conn: sqlite3.Connection,
) -> tuple[int, int]:
    now = now_ms()
    keys, expired, _ = _write_imports(conn, ns, rows, now, epoch, False)
    low = "" if previous is None else previous + "\x00"
    high = rows[-1][0] + "\x00"  # the page's last key included
    _delete_range(db, conn, ns, epoch, now, low, high, _json_keys(keys))
    return len(keys), expired


def _finish_replace(
    db: SQLiteConnector, ns: str, epoch: int | None, previous: str | None, conn: sqlite3.Connection
) -> None:
    now = now_ms()
    low = "" if previous is None else previous + "\x00"
    _delete_range(db, conn, ns, epoch, now, low, prefix_upper_bound(""), "[]")
    conn.execute(SQL["commit"])


def _delete_range(
    db: SQLiteConnector,
    conn: sqlite3.Connection,
    ns: str,
    epoch: int | None,
    now: int,
    low: str,
    high: str,
    keep_json: str,
) -> None:
    """Delete the keys in ``[low, high)`` not in ``keep_json``, recording a ``delete`` of
    each live one, in key order, a chunk at a time (memory stays bounded however many go)."""
    while True:
        rows = conn.execute(
            SQL["replace_delete_range"], (ns, low, high, keep_json, _DELETE_CHUNK)
        ).fetchall()
        if not rows:
            return
        rows.sort(key=itemgetter(1))  # RETURNING has no order; str order is BINARY's
        changes: list[ChangeRow] = [
            ("delete", key, partition, None, None, None)
            for expires, key, partition in rows
            if _live(expires, now)
        ]
        record(db, conn, ns, epoch, now, changes)
        if len(rows) < _DELETE_CHUNK:
            return
        low = rows[-1][1] + "\x00"
