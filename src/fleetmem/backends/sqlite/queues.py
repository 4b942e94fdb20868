"""``SQLiteQueues``: durable work queues in the ``fleetmem_jobs`` table of a file.

One row per job, whatever its state (``sql/queues.sql`` describes the columns). Every
transition -- put, claim, extend, ack, nack, cancel, retry, purge -- is one ``BEGIN IMMEDIATE``
transaction, so processes sharing the file never both claim a job, and a ``put`` commits with
the WAL synced to disk whatever ``synchronous`` says (as a lease grant does): a job is durable
once ``put`` returns. ``put`` of many jobs is one transaction and one sync, all or nothing. Job
ids are the table's ``INTEGER PRIMARY KEY AUTOINCREMENT``, so they are never reused, even once
a job is deleted. Times are milliseconds on this process's wall clock, the clock of the entries
and the leases.

A row only moves on a write: a claim whose lease expired stays ``claimed`` in the file, yet it
is ready again (ordered by its lease's expiry, through the ``due_at`` column that the claim
index sorts on) or, on its last attempt, dead since that expiry. Every read reports the
effective state; the writes that could meet such a dead job (a claim of its queue, a ``put`` of
its dedupe key, ``retry_dead``, ``purge_dead``) move it to the dead letter first.

Job ids are 16 hex digits, up to ``ffffffffffffffff``; SQLite's integers stop at
``2**63 - 1`` (``7fffffffffffffff``), so no job can have a larger id: every call given one
answers "unknown" before any statement (``result`` ``None``, ``cancel``/``ack``/``nack``
``False``, ``extend`` :func:`~fleetmem.backends.seam.job_lost`, ``dead(after=)`` ``[]``).

Results past their TTL are invisible at once; their rows are deleted by the writes that hold
the write lock on their queue anyway (each ``ack``, and each ``claim`` that finds a job due:
up to 256 rows each), and by :func:`delete_expired_results`, every queue of a namespace at
once, which the store's ``cleanup_expired`` runs. Reads never delete (they would need the
write lock).

Wake-ups: a put, ack or nack made through this store (or a view of it) notifies the connector's
:class:`~fleetmem._notify.Notifier` at once. SQLite has no notifications between processes, so
a waiting ``claim`` or ``result`` polls the file every :attr:`SQLiteQueues.poll_interval`
seconds, as a waiting lease ``acquire`` does. A poll of a queue with nothing claimable is one
read of two index entries, without the write lock.
"""

from __future__ import annotations

import sqlite3
from typing import Any, ClassVar

import orjson

from fleetmem._codec import decode_value, utc_from_ms
from fleetmem.backends.seam import NewJob, QueueBackend, job_lost
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms
from fleetmem.protocol import Job, JobResult, QueueStats

__all__ = ["SQLiteQueues", "delete_expired_results"]

#: The largest INTEGER PRIMARY KEY SQLite can hold: the largest id a job can have.
_MAX_ROW_ID = 2**63 - 1


def _job_id(row_id: int) -> str:
    return f"{row_id:016x}"


def _row_id(job_id: str) -> int | None:
    """The row id of ``job_id`` (16 hex digits), or ``None`` past SQLite's integers: no job
    has such an id, and sqlite3 would raise ``OverflowError`` binding it."""
    row_id = int(job_id, 16)
    return row_id if row_id <= _MAX_ROW_ID else None


def delete_expired_results(conn: sqlite3.Connection, namespace: str, now: int) -> int:
    """Delete the rows of every done job of ``namespace`` whose result expired at ``now``
    (milliseconds), in every queue; return how many. Run inside a write transaction (the
    store's ``cleanup_expired``): these rows are invisible to every call already, this only
    frees their space, including that of queues nobody acks in any more."""
    return int(conn.execute(SQL["job_sweep_namespace_results"], (namespace, now)).rowcount)


def _json_ids(ids: list[int]) -> str:
    return orjson.dumps(ids).decode("ascii")


def _next_ms(row: tuple[int | None, int | None], now: int) -> int | None:
    """Milliseconds until the earliest of a waiting and a claimed job's ``due_at``."""
    due = [at for at in row if at is not None]
    return None if not due else max(0, min(due) - now)


class SQLiteQueues(QueueBackend):
    """The work queues of one namespace of a SQLite file."""

    #: SQLite cannot notify another process: a waiting claim or result polls the file this
    #: often (seconds), so a put or ack in another process wakes it within about 50 ms.
    poll_interval: ClassVar[float] = 0.05

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._db = connector

    def _job(self, queue: str, row: tuple[Any, ...]) -> Job:
        (
            row_id,
            priority,
            attempts,
            max_attempts,
            enqueued,
            ready,
            claimed,
            expires,
            consumer,
            token,
            last_error,
            payload,
        ) = row
        return Job(
            id=_job_id(row_id),
            queue=queue,
            payload=decode_value(payload),
            priority=priority,
            attempts=attempts,
            max_attempts=max_attempts,
            enqueued_at=utc_from_ms(enqueued),
            ready_at=utc_from_ms(ready),
            claimed_at=None if claimed is None else utc_from_ms(claimed),
            lease_expires_at=None if expires is None else utc_from_ms(expires),
            consumer=consumer,
            token=token,
            last_error=last_error,
            namespace=self._namespace,
        )

    def _wake_results(self, row_ids: list[int]) -> None:
        for row_id in row_ids:
            self._notifier.notify_every(self.result_key(_job_id(row_id)))

    # ------------------------------------------------------------------ producing

    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> tuple[list[int], int, list[int]]:
            ids: list[int] = []
            added = 0
            buried: list[int] = []
            batch: list[tuple[Any, ...]] = []

            def flush() -> None:
                # Jobs without a dedupe key go in one executemany; in one write transaction
                # AUTOINCREMENT hands out consecutive ids, the last one is last_insert_rowid().
                if batch:
                    conn.executemany(SQL["job_insert"], batch)
                    last = int(conn.execute(SQL["last_insert_rowid"]).fetchone()[0])
                    ids.extend(range(last - len(batch) + 1, last + 1))
                    batch.clear()

            # Synced to disk even in normal mode, as a lease grant: the jobs are durable once
            # put returns. One transaction for the whole call: all of it, or nothing.
            with db.synced(conn), Transaction(conn):
                now = now_ms()
                for job in jobs:
                    key = job.dedupe_key
                    due = now + job.delay_ms
                    args = (ns, queue, job.priority, job.max_attempts, key, now, due, job.payload)
                    if key is None:
                        batch.append(args)
                        added += 1
                        continue
                    flush()
                    holder = conn.execute(
                        SQL["job_dedupe_holder"], (ns, queue, key, now)
                    ).fetchone()
                    if holder is not None and not holder[1]:
                        ids.append(int(holder[0]))
                        continue
                    if holder is not None:  # its lease expired on its last attempt: dead
                        conn.execute(SQL["job_bury"], (holder[0],))
                        buried.append(int(holder[0]))
                    conn.execute(SQL["job_insert"], args)
                    ids.append(int(conn.execute(SQL["last_insert_rowid"]).fetchone()[0]))
                    added += 1
                flush()
            return ids, added, buried

        ids, added, buried = await db.call(run)
        if added:
            self._notifier.notify(self.claim_key(queue), added)
        self._wake_results(buried)
        return [_job_id(i) for i in ids]

    # ------------------------------------------------------------------ consuming

    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        ns = self._namespace

        def run(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[Any, ...]], int | None, list[int]]:
            # Nothing claimable is answered from a plain read (no write lock), so waiters
            # polling an empty queue do not queue behind writers.
            now = now_ms()
            next_ms = _next_ms(conn.execute(SQL["job_next_due"], (ns, queue)).fetchone(), now)
            if next_ms is None or next_ms > 0:
                return [], next_ms, []
            with Transaction(conn):
                now = now_ms()
                buried = [
                    int(r[0]) for r in conn.execute(SQL["job_bury_expired"], (ns, queue, now))
                ]
                # Holding the write lock anyway: delete a batch of expired results, so a queue
                # that is still claimed from but no longer acked in does not keep them.
                conn.execute(SQL["job_sweep_results"], (ns, queue, now))
                chosen = [
                    int(r[0]) for r in conn.execute(SQL["job_claimable"], (ns, queue, now, limit))
                ]
                rows: list[tuple[Any, ...]] = []
                if chosen:
                    rows = conn.execute(
                        SQL["job_claim"], (_json_ids(chosen), now, lease_ms, consumer)
                    ).fetchall()
                next_ms = None
                if len(rows) < limit:
                    next_ms = _next_ms(
                        conn.execute(SQL["job_next_due"], (ns, queue)).fetchone(), now
                    )
            order = {row_id: i for i, row_id in enumerate(chosen)}
            rows.sort(key=lambda r: order[r[0]])  # RETURNING has no order: the claim order
            return rows, next_ms, buried

        rows, next_ms, buried = await self._db.call(run)
        self._wake_results(buried)
        return [self._job(queue, row) for row in rows], next_ms

    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        ns = self._namespace
        row_id = _row_id(job_id)
        if row_id is None:
            raise job_lost(queue, job_id, token)

        def run(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            with Transaction(conn):
                args = (ns, queue, row_id, token, now_ms(), lease_ms)
                row: tuple[Any, ...] | None = conn.execute(SQL["job_extend"], args).fetchone()
            return row

        row = await self._db.call(run)
        if row is None:
            raise job_lost(queue, job_id, token)
        return self._job(queue, row)

    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        ns = self._namespace
        row_id = _row_id(job_id)
        if row_id is None:
            return False

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                now = now_ms()
                args = (ns, queue, row_id, token, now, result, result_ttl_ms)
                if conn.execute(SQL["job_ack"], args).rowcount != 1:
                    return False
                # Results past their TTL are invisible already; each ack deletes a batch of
                # them, so the rows of finished jobs do not pile up.
                conn.execute(SQL["job_sweep_results"], (ns, queue, now))
            return True

        acked = await self._db.call(run)
        if acked:
            self._wake_results([row_id])
        return acked

    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        ns = self._namespace
        row_id = _row_id(job_id)
        if row_id is None:
            return False

        def run(conn: sqlite3.Connection) -> str | None:
            with Transaction(conn):
                args = (ns, queue, row_id, token, now_ms(), retry_in_ms, error)
                row = conn.execute(SQL["job_nack"], args).fetchone()
            return None if row is None else str(row[0])

        state = await self._db.call(run)
        if state == "dead":
            self._wake_results([row_id])
        elif state == "waiting" and retry_in_ms == 0:
            self._notifier.notify(self.claim_key(queue))
        return state is not None

    # ------------------------------------------------------------------ inspecting

    async def cancel(self, queue: str, job_id: str) -> bool:
        ns = self._namespace
        row_id = _row_id(job_id)
        if row_id is None:
            return False

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                cursor = conn.execute(SQL["job_cancel"], (ns, queue, row_id, now_ms()))
                return cursor.rowcount == 1

        return await self._db.call(run)

    async def result(self, queue: str, job_id: str) -> JobResult | None:
        ns = self._namespace
        row_id = _row_id(job_id)
        if row_id is None:
            return None

        def run(conn: sqlite3.Connection) -> JobResult | None:
            now = now_ms()
            row = conn.execute(SQL["job_result"], (ns, queue, row_id)).fetchone()
            if row is None:
                return None
            state, due, attempts, max_attempts, expires, finished, error, value = row
            if state == "done" and due > now:
                return JobResult(
                    job_id, "done", decode_value(value), None, attempts, utc_from_ms(finished)
                )
            if state == "claimed" and due <= now and attempts >= max_attempts:
                state, finished = "dead", expires  # died with its lease, not moved yet
            if state == "dead":
                return JobResult(job_id, "dead", None, error, attempts, utc_from_ms(finished))
            return None

        return await self._db.call(run)

    async def stats(self, queue: str) -> QueueStats:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> QueueStats:
            row = conn.execute(SQL["job_stats"], (ns, queue, now_ms())).fetchone()
            return QueueStats(*(int(n) for n in row))

        return await self._db.call(run)

    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        ns = self._namespace
        start = -1 if after is None else _row_id(after)
        if start is None:
            return []  # no job has a larger id than the largest SQLite integer

        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            with Transaction(conn, write=False):  # one snapshot for both reads
                args = (ns, queue, start, limit)
                rows = conn.execute(SQL["job_dead_page"], args).fetchall()
                rows += conn.execute(SQL["job_expired_dead_page"], (*args, now_ms())).fetchall()
            rows.sort(key=lambda r: int(r[0]))
            return rows[:limit]

        return [self._job(queue, row) for row in await self._db.call(run)]

    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        ns = self._namespace
        # Ids past SQLite's integers name no job: left out, as any unknown id.
        wanted = None if ids is None else _json_ids([r for r in map(_row_id, ids) if r is not None])

        def run(conn: sqlite3.Connection) -> tuple[int, list[int]]:
            with Transaction(conn):
                now = now_ms()
                buried = [
                    int(r[0]) for r in conn.execute(SQL["job_bury_expired"], (ns, queue, now))
                ]
                moving: list[int] = []
                keys: set[str] = set()
                if wanted is None:
                    dead = conn.execute(SQL["job_dead_all"], (ns, queue)).fetchall()
                else:
                    dead = conn.execute(SQL["job_dead_of"], (ns, queue, wanted)).fetchall()
                for row_id, key in dead:
                    if key is not None:
                        # Another live job holds the key (or a job retried just before in this
                        # call): retrying this one would run that work twice.
                        held = conn.execute(SQL["job_dedupe_held"], (ns, queue, key)).fetchone()
                        if key in keys or held is not None:
                            continue
                        keys.add(key)
                    moving.append(int(row_id))
                if moving:
                    conn.execute(SQL["job_retry"], (_json_ids(moving), now))
            return len(moving), buried

        moved, buried = await self._db.call(run)
        self._wake_results(buried)
        if moved:
            self._notifier.notify(self.claim_key(queue), moved)
        return moved

    async def purge_dead(self, queue: str) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            with Transaction(conn):
                conn.execute(SQL["job_bury_expired"], (ns, queue, now_ms())).fetchall()
                return conn.execute(SQL["job_purge_dead"], (ns, queue)).rowcount

        return await self._db.call(run)

    async def list_queues(self) -> list[str]:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> list[str]:
            return [str(row[0]) for row in conn.execute(SQL["job_queues"], (ns, now_ms()))]

        return await self._db.call(run)
