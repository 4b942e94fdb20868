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
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

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
    KVBackend,
    LeaseBackend,
    QueueBackend,
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
from fleetmem.errors import (
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

    async def expire(self, key: str, ttl_ms: int | None) -> bool:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                now = now_ms()
                expires = None if ttl_ms is None else now + ttl_ms
                row = conn.execute(SQL["set_expiry"], (ns, key, expires, now)).fetchone()
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
