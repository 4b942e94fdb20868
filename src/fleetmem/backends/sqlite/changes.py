"""``SQLiteChanges``: the change feed of a namespace, in the ``fleetmem_changes`` table of a file.

**Recording** (:func:`record`, :func:`feed_epoch`, :func:`record_sets`) is done by the KV
writes of ``kv.py``, each inside its own ``BEGIN IMMEDIATE`` transaction: one probe of
``fleetmem_feeds`` (a ``WITHOUT ROWID`` primary key seek) tells whether the namespace's feed is
enabled -- a scalar subquery in the write statement's own ``RETURNING`` (or, for ``set_many``,
one query per transaction, not per row) -- and if it is, the write's changes are inserted before
the commit: no write without its change, no change without its write, also when the process
dies mid-call. Nothing about the feed is cached in Python between transactions: another process
may enable or disable it at any time, and this process's next write must honour that.

**Positions** are the changes' ids (``AUTOINCREMENT``: never reused, even once the rows above
are trimmed or dropped). SQLite has one writer at a time and a write holds the lock from
``BEGIN IMMEDIATE`` to ``COMMIT``, so ids are handed out in commit order, and a reader's
snapshot (WAL) holds every change up to some id and none above it: "everything after the last
id I read" loses nothing.

**Epochs** come from a counter in ``fleetmem_meta`` (``feed_epoch``) that survives
``disable()``, so each ``enable()`` of a disabled feed starts a greater epoch than any before.

**Retention**: a ``read`` first trims the prefix of the log written before ``now - retention``
(exactly; a plain read when nothing is due, without the write lock) and records the highest
trimmed id as the feed's ``floor``. Writes trim too, at most every :data:`TRIM_EVERY` seconds
per namespace and process, so that a log nobody reads does not grow without bound.

**Wake-ups**: a write through this connector wakes this process's watchers at once
(``notifier.notify_every``); SQLite cannot notify another process, so a waiting watcher polls
the file's head every :attr:`SQLiteChanges.poll_interval` seconds (two index seeks, no lock).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, ClassVar

from fleetmem._codec import decode_value, utc_from_ms
from fleetmem._notify import Watch
from fleetmem.backends.seam import ChangeBackend, ChangeEvent, ChangePage
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms

__all__ = ["TRIM_EVERY", "ChangeRow", "SQLiteChanges", "feed_epoch", "record", "record_sets"]

#: Seconds between the trims a process's writes make of one namespace's log (reads trim
#: exactly, every time).
TRIM_EVERY = 5.0

#: One change as a write records it: op, key, partition, version, value (the stored payload),
#: expires_at (milliseconds).
ChangeRow = tuple[str, str | None, str | None, int | None, bytes | None, int | None]

#: Above every id (SQLite's largest integer).
_ABOVE_ALL = 2**63 - 1


def feed_epoch(
    db: SQLiteConnector, conn: sqlite3.Connection, namespace: str, now: int
) -> int | None:
    """The epoch of ``namespace``'s feed if it is enabled, else ``None``: the probe of a write
    transaction whose statements do not return the epoch themselves (``set_many``)."""
    row = conn.execute(SQL["feed_probe"], (namespace,)).fetchone()
    if row is None:
        return None
    _trim_now_and_then(db, conn, namespace, now, int(row[1]))
    return int(row[0])


def record(
    db: SQLiteConnector,
    conn: sqlite3.Connection,
    namespace: str,
    epoch: int | None,
    now: int,
    changes: list[ChangeRow],
) -> None:
    """Record ``changes`` (of one write, in order) in ``namespace``'s feed of ``epoch``, the
    epoch the write statement returned (``None``: no feed, nothing to do). Call inside the
    write's transaction, after the write."""
    if epoch is None or not changes:
        return
    _trim_now_and_then(db, conn, namespace, now, None)
    insert = SQL["change_insert"]
    if len(changes) == 1:
        conn.execute(insert, (namespace, epoch, *changes[0], now))
    else:
        conn.executemany(insert, [(namespace, epoch, *change, now) for change in changes])


def _trim_now_and_then(
    db: SQLiteConnector,
    conn: sqlite3.Connection,
    namespace: str,
    now: int,
    retention_ms: int | None,
) -> None:
    """Trim ``namespace``'s log if this process's writes have not for :data:`TRIM_EVERY`
    seconds (inside a write transaction of a namespace whose feed is enabled)."""
    last = db.feed_trims.get(namespace)
    tick = time.monotonic()
    if last is not None and tick - last < TRIM_EVERY:
        return
    db.feed_trims[namespace] = tick
    if retention_ms is None:
        row = conn.execute(SQL["feed_probe"], (namespace,)).fetchone()
        if row is None:  # pragma: no cover - the caller's statement just saw the feed
            return
        retention_ms = int(row[1])
    trim(conn, namespace, retention_ms, now)


def record_sets(
    conn: sqlite3.Connection, namespace: str, epoch: int, now: int, keys_json: str
) -> None:
    """Record a ``set`` of each key of ``keys_json`` (a JSON array, distinct keys) as its
    entry now stands: after the upsert of a ``set_many`` chunk, whose ``executemany`` cannot
    return the versions. ``epoch`` is :func:`feed_epoch`'s, probed once per transaction."""
    conn.execute(SQL["change_insert_sets"], (namespace, epoch, keys_json, now))


def trim(conn: sqlite3.Connection, namespace: str, retention_ms: int, now: int) -> None:
    """Inside a write transaction: delete the prefix of ``namespace``'s log written before
    ``now - retention_ms`` and raise its floor to the highest id deleted.

    Only a prefix (in feed order) goes, so every change above the floor is still there; a
    change written after the cutoff keeps every change after it (a wall clock stepped back
    only delays the trim of those)."""
    first_kept = conn.execute(SQL["change_first_kept"], (namespace, now - retention_ms)).fetchone()
    bound = _ABOVE_ALL if first_kept is None else int(first_kept[0])
    upto = conn.execute(SQL["change_last_before"], (namespace, bound)).fetchone()[0]
    if upto is not None:
        conn.execute(SQL["changes_trim"], (namespace, upto))
        conn.execute(SQL["feed_set_floor"], (namespace, upto))


def _event(row: tuple[Any, ...]) -> ChangeEvent:
    pos, op, key, partition, version, value, expires, at = row
    return ChangeEvent(
        pos,
        op,
        key,
        partition,
        version,
        None if value is None else decode_value(value),
        None if expires is None else utc_from_ms(expires),
        utc_from_ms(at),
    )


class SQLiteChanges(ChangeBackend):
    """The change feed of one namespace of a SQLite file."""

    #: SQLite cannot notify another process: a waiting watcher polls the file this often
    #: (seconds), so a change written by another process wakes it within about 50 ms.
    poll_interval: ClassVar[float] = 0.05

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._db = connector

    async def enable(self, retention_ms: int) -> None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> None:
            with Transaction(conn):
                if conn.execute(SQL["feed_enabled"], (ns,)).fetchone() is not None:
                    conn.execute(SQL["feed_set_retention"], (ns, retention_ms))
                    return
                epoch = int(conn.execute(SQL["feed_next_epoch"]).fetchone()[0])
                # No row can be left over (disable drops them with the flag); if one were,
                # it must not appear in the new epoch.
                conn.execute(SQL["changes_delete_namespace"], (ns,))
                conn.execute(SQL["feed_insert"], (ns, epoch, retention_ms))

        await self._db.call(run)

    async def disable(self) -> None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                if conn.execute(SQL["feed_delete"], (ns,)).rowcount == 0:
                    return False
                conn.execute(SQL["changes_delete_namespace"], (ns,))
                return True

        if await self._db.call(run):
            # Watchers of this process learn at once (their next read: not enabled).
            self._notifier.notify_every(self.wake_key())

    async def enabled(self) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL["feed_enabled"], (ns,)).fetchone() is not None

        return await self._db.call(run)

    async def head(self) -> tuple[int, int]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> tuple[int, int] | None:
            row = conn.execute(SQL["feed_head"], (ns,)).fetchone()
            return None if row is None else (int(row[0]), int(row[1]))

        found = await self._db.call(run)
        if found is None:
            raise self.not_enabled()
        return found

    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        ns = self._namespace

        def snapshot(conn: sqlite3.Connection, now: int | None) -> ChangePage | None:
            # One read transaction, so the feed's state and its rows agree. ``None`` when a
            # trim is due at ``now`` (then the caller trims and reads again, with None).
            with Transaction(conn, write=False):
                state = conn.execute(SQL["feed_state"], (ns,)).fetchone()
                if state is None:
                    raise self.not_enabled()
                current, floor, retention_ms, newest, oldest_at = state
                if now is not None and oldest_at is not None and oldest_at < now - retention_ms:
                    return None
                head = floor if newest is None else max(int(newest), floor)
                if after is None:
                    start = floor
                else:
                    assert epoch is not None
                    self.check_after(epoch, after, current, floor, head)
                    start = after
                rows = conn.execute(SQL["changes_after"], (ns, start, limit)).fetchall()
            events = [_event(row) for row in rows]
            return ChangePage(current, events, events[-1].pos if events else start)

        def run(conn: sqlite3.Connection) -> ChangePage:
            now = now_ms()
            page = snapshot(conn, now)
            if page is not None:
                return page
            with Transaction(conn):  # the write lock only when something is due
                row = conn.execute(SQL["feed_probe"], (ns,)).fetchone()
                if row is not None:  # still enabled (maybe anew: trim by its retention)
                    trim(conn, ns, int(row[1]), now)
            page = snapshot(conn, None)
            assert page is not None
            return page

        return await self._db.call(run)

    async def wait(self, watch: Watch, epoch: int, after: int, timeout: float) -> None:
        """Wait for this process's writes on ``watch``, and poll the file's head every
        :attr:`poll_interval` seconds for other processes' (or a disable/enable)."""
        ns = self._namespace

        def moved(conn: sqlite3.Connection) -> bool:
            row = conn.execute(SQL["feed_head"], (ns,)).fetchone()
            return row is None or (int(row[0]), int(row[1])) != (epoch, after)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            if await watch.wait(min(self.poll_interval, left)):
                return
            if loop.time() >= deadline:
                return  # the caller reads next: polling the head first would be a waste
            if await self._db.call(moved):
                return
