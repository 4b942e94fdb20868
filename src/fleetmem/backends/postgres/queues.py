"""``PostgresQueues``: durable work queues in the table ``<table>_jobs`` (migration 0004).

Every operation is one statement of ``sql/queues.sql`` judged by the server's ``now()`` (see the
comment at the top of that file for how a row's ``state`` and ``due_at`` give its effective
state):

* ``put`` inserts every job of the call with one ``INSERT ... SELECT FROM unnest(arrays)``
  (10,000 jobs: one round trip), and sends one ``NOTIFY`` for all of them at its commit. A call
  larger than :data:`PUT_CHUNK_JOBS` jobs or :data:`PUT_CHUNK_BYTES` of payloads runs one such
  statement per chunk in one transaction: all or nothing either way, and one ``NOTIFY`` with the
  call's total at its end (PostgreSQL delivers identical payloads of one transaction once, so
  one per chunk could announce 10,000 jobs for 20,000). Dedupe keys go through the
  unique index of live keys (``ON CONFLICT DO NOTHING``), after a holder whose lease ran out on
  its last attempt was moved to the dead letter by the same statement.
* ``claim`` locks ready rows ``FOR NO KEY UPDATE SKIP LOCKED`` in claim order, through a loose index
  scan of the queue's priorities and a range of the claim index ending at ``now()`` per
  priority, bounded by ``LIMIT`` in a ``MATERIALIZED`` CTE, and updates them in the same
  statement; concurrent claimers pass over each other's rows and never wait.
* ``ack``, ``nack`` and ``extend`` compare and set on ``(id, token)`` in one ``UPDATE`` each.
  ``ack`` ``NOTIFY``-s only for a job a ``result(wait=...)`` marked (:meth:`await_result`):
  PostgreSQL commits notifying transactions one at a time, and most acks have no waiter. A
  mark is a row of ``<table>_jobs_awaited``, not a column of the job: writing the job's row
  would lock it, and a claim running meanwhile would skip the job (a later job, or none, in
  its place). The mark's foreign key deletes it with its job.

Wake-ups in this process are direct (the connector's :class:`~fleetmem._notify.Notifier`);
other processes' puts, ``retry_dead`` and awaited acks and deaths by ``nack`` arrive through the
lease :class:`Listener`'s ``LISTEN``. A job ready again after a ``nack`` (``retry_in=0``
included) or an expired lease, or a delay that comes due, wakes a waiting claim of another
process at its next poll (:attr:`poll_interval`, 1 s) or when the time the claim reported (the
next job's due time) comes; a death by an expired lease wakes a waiting ``result`` of another
process at its next poll.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from fleetmem._notify import Watch
from fleetmem.backends.postgres import migrate
from fleetmem.backends.postgres.connector import (
    FETCH,
    FETCHROW,
    FETCHVAL,
    PostgresConnector,
    sqlstate,
    statements,
)
from fleetmem.backends.postgres.leases import counted_user, start_listener
from fleetmem.backends.seam import NewJob, QueueBackend, job_lost
from fleetmem.errors import FleetmemError
from fleetmem.protocol import Job, JobResult, QueueStats

__all__ = ["PUT_CHUNK_BYTES", "PUT_CHUNK_JOBS", "PostgresQueues", "queue_statements"]

#: The most jobs one put statement inserts; a larger call runs several in one transaction.
PUT_CHUNK_JOBS = 10_000
#: The most payload bytes one put statement carries (a statement is one protocol message).
PUT_CHUNK_BYTES = 32 * 1024 * 1024

#: The largest job id PostgreSQL can hold (a bigint): a larger one names no job.
_MAX_ID = 2**63 - 1
#: unique_violation: a put of the same dedupe key won a race with retry_dead.
_UNIQUE_VIOLATION = "23505"
#: foreign_key_violation: the job a result(wait=) marks was deleted meanwhile (cancelled).
_FOREIGN_KEY_VIOLATION = "23503"
#: How many times a statement that lost such a race is run again.
_RACE_TRIES = 5


@functools.lru_cache(maxsize=32)
def queue_statements(schema: str, table: str) -> dict[str, str]:
    """The named statements of ``sql/queues.sql`` for the entries table ``schema.table``: the
    connector's (:func:`~fleetmem.backends.postgres.connector.statements`), with
    ``{jobs_awaited}`` replaced by the quoted mark table of migration 0004,
    ``<table>_jobs_awaited`` (a derived name, quoted whole: it may pass the 40 characters of a
    checked identifier). ``claim`` takes how many to claim as ``$5``; ``claim_one`` is the same
    statement for one job, with the constant ``1`` in its place and no ``$5``: PostgreSQL keeps
    a generic plan for it, where it plans ``claim`` anew at every call (a parameter ``LIMIT``
    makes the generic plan look dearer than a custom one)."""
    awaited = f'{migrate.quote_ident(schema)}."{migrate.queue_table(table)}_awaited"'
    out = {
        name: sql.replace("{jobs_awaited}", awaited)
        for name, sql in statements("queues.sql", schema, table).items()
    }
    claim = out["claim"]
    out["claim"] = claim.replace("{limit}", "$5")
    out["claim_one"] = claim.replace("{limit}", "1")
    return out


def _db_id(job_id: str) -> int | None:
    """The row id of ``job_id`` (16 hex digits), ``None`` if no row can have it."""
    value = int(job_id, 16)
    return value if value <= _MAX_ID else None


def _chunks(jobs: list[NewJob]) -> Iterator[list[NewJob]]:
    """``jobs`` in runs of at most :data:`PUT_CHUNK_JOBS` jobs and :data:`PUT_CHUNK_BYTES`."""
    chunk: list[NewJob] = []
    size = 0
    for job in jobs:
        if chunk and (len(chunk) >= PUT_CHUNK_JOBS or size + len(job.payload) > PUT_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(job)
        size += len(job.payload)
    if chunk:
        yield chunk


def _columns(jobs: list[NewJob]) -> tuple[list[bytes], list[int], list[int], list[int]]:
    return (
        [job.payload for job in jobs],
        [job.priority for job in jobs],
        [job.delay_ms for job in jobs],
        [job.max_attempts for job in jobs],
    )


class PostgresQueues(QueueBackend):
    """The work queues of one namespace, on the connector of the store's table."""

    def __init__(self, connector: PostgresConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._run = connector.run
        self._q = queue_statements(connector.schema, connector.table)

    def _job(self, queue: str, row: Any) -> Job:
        # payload arrives decoded by the connection's jsonb codec.
        return Job(
            f"{row[0]:016x}",
            queue,
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9],
            row[10],
            row[11],
            self._namespace,
        )

    # ---------------------------------------------------------------- producing

    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        # One statement notifies for itself; a transaction of several notifies once, at its
        # end, with the call's total (identical payloads of a transaction arrive once).
        if any(job.dedupe_key is not None for job in jobs):
            ids, added = await self._put_dedupe(queue, jobs)
        else:
            ids = await self._put_plain(queue, jobs)
            added = len(ids)
        if added:
            self._notifier.notify(self.claim_key(queue), added)
        return [f"{i:016x}" for i in ids]

    async def _put_plain(self, queue: str, jobs: list[NewJob]) -> list[int]:
        connector = self._connector
        query = self._q["put"]
        chunks = list(_chunks(jobs))
        if len(chunks) == 1:
            row = await self._run(
                FETCHROW,
                query,
                (self._namespace, queue, *_columns(jobs), connector.channel),
                write=True,
            )
            return list(row[0])
        ids: list[int] = []
        async with connector.transaction() as conn:
            for i, chunk in enumerate(chunks):
                if i:
                    connector.arm_command_timeout(conn)
                row = await conn.fetchrow(query, self._namespace, queue, *_columns(chunk), None)
                ids.extend(row[0])
            await self._notify_put(conn, queue, len(ids))
        return ids

    async def _notify_put(self, conn: Any, queue: str, added: int) -> None:
        """The one notification of a put that ran several statements in the transaction of
        ``conn`` (sent at its commit)."""
        if added:
            connector = self._connector
            connector.arm_command_timeout(conn)
            await conn.execute(
                self._q["notify_put"], self._namespace, queue, connector.channel, added
            )

    async def _put_dedupe(self, queue: str, jobs: list[NewJob]) -> tuple[list[int], int]:
        """Jobs with dedupe keys: one statement (see ``put_dedupe`` in ``sql/queues.sql``).
        A key it could not resolve -- a concurrent put of the same key committed after its
        snapshot -- is looked up by running it again for the jobs left; a call of several jobs
        does all of it in one transaction, so it stays all or nothing."""
        if len(jobs) == 1:
            return await self._put_dedupe_on(None, queue, jobs)
        async with self._connector.transaction() as conn:
            ids, added = await self._put_dedupe_on(conn, queue, jobs)
            await self._notify_put(conn, queue, added)
            return ids, added

    async def _put_dedupe_on(
        self, conn: Any, queue: str, jobs: list[NewJob]
    ) -> tuple[list[int], int]:
        connector = self._connector
        query = self._q["put_dedupe"]
        resolved: dict[int, int] = {}  # position in jobs -> id
        added = 0
        pending = list(range(len(jobs)))
        # Alone, each statement notifies for itself; in a transaction the caller does, once.
        channel = connector.channel if conn is None else None
        for attempt in range(_RACE_TRIES + 1):
            batch = [jobs[i] for i in pending]
            args = (
                self._namespace,
                queue,
                *_columns(batch),
                [job.dedupe_key for job in batch],
                channel,
            )
            if conn is None:
                rows = await self._run(FETCH, query, args, write=True)
            else:
                if attempt:
                    connector.arm_command_timeout(conn)
                rows = await conn.fetch(query, *args)
            inserted_keyed: dict[str, int] = {}
            inserted_plain: list[int] = []
            held: dict[str, int] = {}
            for row in rows:
                job_id, key, new = row[0], row[1], row[2]
                if job_id is None:
                    continue  # the notification's row
                if new:
                    added += 1
                    if key is None:
                        inserted_plain.append(job_id)
                    else:
                        inserted_keyed[key] = job_id
                elif key not in held or job_id < held[key]:
                    held[key] = job_id
            inserted_plain.sort()  # ids are taken in the order of the arrays
            plain = iter(inserted_plain)
            left: list[int] = []
            for i, job in zip(pending, batch, strict=True):
                key = job.dedupe_key
                if key is None:
                    resolved[i] = next(plain)
                elif key in inserted_keyed:
                    resolved[i] = inserted_keyed[key]
                elif key in held:
                    resolved[i] = held[key]
                else:
                    left.append(i)
            if not left:
                return [resolved[i] for i in range(len(jobs))], added
            pending = left
        raise FleetmemError(  # pragma: no cover - a key that changes hands at every statement
            f"put to queue {queue!r} kept racing other puts of the same dedupe key; try again"
        )

    # ---------------------------------------------------------------- consuming

    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        # One job (claim(), the common call): the statement PostgreSQL keeps one plan for.
        args: tuple[Any, ...]
        if limit == 1:
            query, args = self._q["claim_one"], (self._namespace, queue, consumer, lease_ms)
        else:
            query, args = self._q["claim"], (self._namespace, queue, consumer, lease_ms, limit)
        rows = await self._run(FETCH, query, args, write=True)
        jobs: list[Job] = []
        next_ms: int | None = None
        for row in rows:
            if row[0] is None:
                next_ms = row[12]
            else:
                jobs.append(self._job(queue, row))
        if len(jobs) > 1:
            jobs.sort(key=lambda job: (-job.priority, job.ready_at, job.id))
        if len(jobs) >= limit or next_ms is None:
            return jobs, None
        return jobs, max(0, int(next_ms))

    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        row_id = _db_id(job_id)
        row = None
        if row_id is not None:
            row = await self._run(
                FETCHROW,
                self._q["extend"],
                (self._namespace, queue, row_id, token, lease_ms),
                write=True,
            )
        if row is None:
            raise job_lost(queue, job_id, token)
        return self._job(queue, row)

    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        row_id = _db_id(job_id)
        if row_id is None:
            return False
        connector = self._connector
        row = await self._run(
            FETCHROW,
            self._q["ack"],
            (
                self._namespace,
                queue,
                row_id,
                token,
                result,
                result_ttl_ms,
                connector.channel,
                job_id,
            ),
            write=True,
        )
        if row is None:
            return False
        self._notifier.notify_every(self.result_key(job_id))
        return True

    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        row_id = _db_id(job_id)
        if row_id is None:
            return False
        connector = self._connector
        row = await self._run(
            FETCHROW,
            self._q["nack"],
            (self._namespace, queue, row_id, token, retry_in_ms, error, connector.channel, job_id),
            write=True,
        )
        if row is None:
            return False
        if row[0]:
            self._notifier.notify_every(self.result_key(job_id))
        else:
            # A claim waiting in this process learns when the job comes due.
            self._notifier.notify(self.claim_key(queue))
        return True

    # ---------------------------------------------------------------- inspecting

    async def cancel(self, queue: str, job_id: str) -> bool:
        row_id = _db_id(job_id)
        if row_id is None:
            return False
        value = await self._run(
            FETCHVAL, self._q["cancel"], (self._namespace, queue, row_id), write=True
        )
        return value is not None

    async def result(self, queue: str, job_id: str) -> JobResult | None:
        row_id = _db_id(job_id)
        if row_id is None:
            return None
        row = await self._run(
            FETCHROW, self._q["result"], (self._namespace, queue, row_id), write=False
        )
        if row is None:
            return None
        return JobResult(job_id, "done" if row[0] else "dead", row[1], row[2], row[3], row[4])

    async def stats(self, queue: str) -> QueueStats:
        row = await self._run(FETCHROW, self._q["stats"], (self._namespace, queue), write=False)
        return QueueStats(int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))

    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        start = 0 if after is None else _db_id(after)
        if start is None:
            return []
        rows = await self._run(
            FETCH, self._q["dead"], (self._namespace, queue, start, limit), write=False
        )
        return [self._job(queue, row) for row in rows]

    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        args: tuple[Any, ...]
        if ids is None:
            query = self._q["retry_dead_all"]
            args = (self._namespace, queue, self._connector.channel)
        else:
            row_ids = [i for i in map(_db_id, ids) if i is not None]
            if not row_ids:
                return 0
            query = self._q["retry_dead_ids"]
            args = (self._namespace, queue, self._connector.channel, row_ids)
        for attempt in range(_RACE_TRIES + 1):
            # One statement: its candidates include the claims that died of an expired lease
            # (judged at its now(), like the rest of it).
            try:
                row = await self._run(FETCHROW, query, args, write=True)
            except FleetmemError as exc:
                if sqlstate(exc.__cause__) != _UNIQUE_VIOLATION or attempt == _RACE_TRIES:
                    raise
                continue  # a put took a key this retry was giving back: look again
            moved = int(row[0])
            if moved:
                self._notifier.notify(self.claim_key(queue), moved)
            return moved
        raise AssertionError("unreachable")  # pragma: no cover

    async def purge_dead(self, queue: str) -> int:
        value = await self._run(
            FETCHVAL, self._q["purge_dead"], (self._namespace, queue), write=True
        )
        return int(value)

    async def list_queues(self) -> list[str]:
        rows = await self._run(FETCH, self._q["list_queues"], (self._namespace,), write=False)
        return [row[0] for row in rows]

    # ---------------------------------------------------------------- wake-ups

    async def await_result(self, queue: str, job_id: str) -> None:
        """Mark the job as awaited (a row of ``<table>_jobs_awaited``; its row is not written):
        its ``ack`` or its death by ``nack`` then sends a ``NOTIFY``. Nothing for a job that is
        not live (finished, dead, gone)."""
        row_id = _db_id(job_id)
        if row_id is None:
            return
        try:
            await self._run(
                FETCH, self._q["await_result"], (self._namespace, queue, row_id), write=True
            )
        except FleetmemError as exc:
            if sqlstate(exc.__cause__) != _FOREIGN_KEY_VIOLATION:
                raise
            # Cancelled (deleted) while this marked it: nothing to wait for; result() says so.

    async def listen(self) -> None:
        """Start the connector's ``LISTEN`` connection (shared with the leases) once.

        Connects the store first if it is not connected yet, and raises what
        :meth:`PostgresConnector.connect` raises then (``StoreClosedError``,
        ``BackendUnavailableError``, ``ConfigurationError``, ``SchemaVersionError``: the
        error the waiting call's first statement would have raised). Once connected it never
        raises: a ``LISTEN`` that cannot be opened or delivers nothing leaves the waiters to
        poll (:attr:`poll_interval`)."""
        await start_listener(self._connector)

    @contextlib.contextmanager
    def watch(self, key: tuple[str, str, str]) -> Iterator[Watch]:
        """Watch a claim or result key; counts the waiters so that a connection borrowed from
        an injected pool for ``LISTEN`` goes back with the last one."""
        with counted_user(self._connector.listener), self._notifier.watch(key) as w:
            yield w
