"""``PostgresChanges``: the change feed of a namespace in ``<table>_feeds`` and ``<table>_changes``
(migration 0005).

Recording is done by the key-value writes (``sql/kv.sql``): each write statement looks up the
namespace's feed once and inserts its changes in the same statement, with no position. Positions
are given after commit, by whoever reads: the read function of migration 0005 (one round trip)
trims what is past retention, numbers every committed change in id order under the feed row's
lock, and returns the header (epoch, head, floor) and the changes after the cursor. That is
what keeps the feed lossless although change ids are drawn before commit: a write that commits
after later-numbered changes were read gets a position above them, and is read next.

Wake-ups. This process's writes wake this process's watchers directly (``kv.py``). Other
processes' writes arrive as a ``NOTIFY`` on the table's channel (payload ``~namespace``) through
the connector's ``LISTEN`` connection (:class:`~fleetmem.backends.postgres.leases.Listener`).
A ``NOTIFY`` makes PostgreSQL commit notifying transactions one at a time, so writers send one
only while a watcher sleeps: :meth:`PostgresChanges.wait` marks the feed ``watched_until`` a
little past its sleep, then -- once that committed -- checks that nothing arrived meanwhile,
and sleeps. A write whose statement began before the mark committed and that commits after the
check sends nothing; the watcher finds it at its next poll (:attr:`~PostgresChanges.poll_interval`,
0.5 s), as it does whenever ``LISTEN`` is unavailable.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from fleetmem._notify import Watch
from fleetmem.backends.postgres.connector import FETCH, FETCHROW, FETCHVAL, PostgresConnector
from fleetmem.backends.postgres.leases import (
    Listener,
    counted_user,
    shared_listener,
    start_listener,
)
from fleetmem.backends.seam import ChangeBackend, ChangeEvent, ChangePage
from fleetmem.errors import FleetmemError

__all__ = ["PostgresChanges", "sweep_changes"]

_log = logging.getLogger("fleetmem.postgres")

#: ``op`` as the change table stores it ("char", which asyncpg returns as bytes).
_OPS = {b"s": "set", b"d": "delete", b"t": "ttl", b"c": "clear"}
#: How long a mark keeps writers notifying (ms): a watcher marks again only when less than its
#: next sleep plus :data:`_MARK_MARGIN` is left, so a watch that keeps sleeping writes its feed
#: row about once a second, not once per sleep.
_MARK_MS = 2000
_MARK_MARGIN = 0.25


class PostgresChanges(ChangeBackend):
    """The change feed of one namespace, on the connector of the store's table."""

    poll_interval = 0.5

    def __init__(self, connector: PostgresConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._run = connector.run
        self._q = connector.statements("changes.sql")
        #: Until when (``time.monotonic()``) writers are known to notify: a mark this object
        #: made, counted from before it was sent.
        self._marked_until = 0.0

    async def enable(self, retention_ms: int) -> None:
        await self._run(FETCHVAL, self._q["enable"], (self._namespace, retention_ms), write=True)

    async def disable(self) -> None:
        await self._run(FETCHVAL, self._q["disable"], (self._namespace,), write=True)
        self._marked_until = 0.0
        self._notifier.notify_every(self.wake_key())  # watchers here see the feed gone

    async def enabled(self) -> bool:
        found = await self._run(FETCHVAL, self._q["enabled"], (self._namespace,), write=False)
        return found is not None

    async def head(self) -> tuple[int, int]:
        # Numbering may write, but running it again is harmless: retried like a read.
        row = await self._run(FETCHROW, self._q["head"], (self._namespace,), write=False)
        if row is None:
            raise self.not_enabled()
        return int(row[0]), int(row[1])

    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        # Trimming and numbering write, but a read run again after a lost connection returns
        # the same changes (positions are given once): it is retried like any read.
        rows = await self._run(
            FETCH, self._q["read"], (self._namespace, epoch, after, limit), write=False
        )
        if not rows:
            raise self.not_enabled()
        if len(rows) > 1 and after is not None and rows[1][1] != after + 1:
            # Positions are contiguous: a first change above ``after + 1`` means a sequencer
            # trimmed (or a disable deleted) between the function's first statement and its
            # changes'. Read again: the header then says what happened (expired, not enabled).
            rows = await self._run(
                FETCH, self._q["read"], (self._namespace, epoch, after, limit), write=False
            )
            if not rows:
                raise self.not_enabled()
        header = rows[0]
        current, head, floor = int(header[0]), int(header[1]), int(header[5])
        if after is None:
            after = floor
        else:
            assert epoch is not None
            self.check_after(epoch, after, current, floor, head)
        events = [
            ChangeEvent(row[1], _OPS[row[2]], row[3], row[4], row[5], row[6], row[7], row[8])
            for row in rows[1:]
        ]
        return ChangePage(current, events, events[-1].pos if events else after)

    # ---------------------------------------------------------------- wake-ups

    async def listen(self) -> None:
        """Start the connector's ``LISTEN`` connection (shared with leases and queues) once.

        Connects the store first if it is not connected yet (and raises what connecting
        raises); once connected it never raises: without ``LISTEN``, :meth:`wait` polls."""
        await start_listener(self._connector)

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watch]:
        """Watch this namespace's changes; counts the waiters so that a connection borrowed
        from an injected pool for ``LISTEN`` goes back with the last one. A watch is entered
        before its first :meth:`listen`, so the listener is made here (:meth:`listen` starts
        it): counted from the start, it is stopped when the last watch leaves."""
        listener = shared_listener(self._connector)
        with counted_user(listener), self._notifier.watch(self.wake_key()) as w:
            yield w

    async def wait(self, watch: Watch, epoch: int, after: int, timeout: float) -> None:
        """Sleep until woken or for at most :attr:`poll_interval` (and ``timeout``). While
        ``LISTEN`` works, first make sure writers notify: mark the feed watched (unless a
        mark of this object still covers the sleep) and, once that committed, check that
        nothing was recorded after ``(epoch, after)`` meanwhile."""
        sleep = min(timeout, self.poll_interval)
        listener: Listener | None = self._connector.listener
        if sleep > 0 and listener is not None and listener.listening:
            sent = time.monotonic()
            if self._marked_until < sent + sleep + _MARK_MARGIN:
                ns = self._namespace
                row = await self._run(FETCHROW, self._q["mark"], (ns, _MARK_MS), write=False)
                if row is None:
                    return  # the feed is gone: the next read says so
                self._marked_until = sent + _MARK_MS / 1000.0
                if row[0] != epoch or row[1] > after:
                    return
                if await self._run(FETCHVAL, self._q["pending"], (ns, epoch, after), write=False):
                    return
        await watch.wait(sleep)


async def sweep_changes(connector: PostgresConnector, batch: int) -> int:
    """The sweeper's share of the feeds of ``connector``'s table: trim every feed past its
    retention (numbering what is committed), and delete pending changes of stale epochs (left
    by writes that raced a ``disable``), ``batch`` at a time. Returns how many stale changes
    went; a failure of one feed is logged and the others are still swept."""
    q = connector.statements("changes.sql")
    rows: Any = await connector.run(FETCH, q["feeds"], (), write=False)
    for row in rows:
        try:
            await connector.run(FETCHVAL, q["trim"], (row[0],), write=True)
        except FleetmemError as exc:
            _log.warning("trimming the change feed of %r failed: %s", row[0], exc)
    removed = 0
    for _ in range(100):
        gone = int(await connector.run(FETCHVAL, q["sweep_stale"], (batch,), write=True))
        removed += gone
        if gone < batch:
            break
    return removed
