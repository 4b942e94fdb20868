"""``RedisQueues``: durable work queues on Redis 7 (standalone or Cluster).

Layout (see ``lua/queues/_lib.lua``): a job is the hash ``fm:{<ns>}:j:<id>`` (payload stored
once, priority, attempts, token, state, claim fields, times in ms on the server's ``TIME``);
each queue has a few sorted sets in the namespace's slot -- ready jobs (score 0, members
``<priority code><ready_at><id>`` in fixed-width hex, so ``ZPOPMIN`` pops them exactly in claim
order: priority DESC, ready_at ASC, id ASC), delayed jobs and live claims (scored by due time;
claims on their last attempt in a set of their own), the dead letter (by id), held results (by
expiry) -- and a hash of dedupe keys. Job ids are an ``INCRBY`` of the namespace's sequence
``fm:{<ns>}:qn`` as 16 hex digits. Every key of a namespace shares its hash tag, so each script
runs on one Cluster node.

One script per transition (``lua/queues/``), atomic, on the server's clock: ``put`` (one call
per chunk of up to 1,000 jobs and 8 MB of payloads), ``claim`` (which first settles the queue:
delayed jobs that came due and claims that expired with attempts left become ready, claims that
expired on their last attempt become dead, then it pops in order), ``extend``, ``ack``,
``nack``, ``cancel``, ``retry_dead``, ``purge_dead``, and the reads ``result``, ``stats``,
``dead``, ``list_queues``, which apply the seam's effective-state rules themselves (``dead``
and the others that list dead jobs first move the claims that died to the dead letter).

Wake-ups: ``put`` (and a ``nack`` or ``retry_dead`` that makes jobs ready now) publishes
``p\\0<ns>\\0<queue>\\0<origin>\\0<count>`` on the channel ``fm:queues``; the connector's one
pub/sub listener (``leases.ReleaseListener``) wakes ``count`` claim waiters of that queue in
every other process, and the calling process wakes its own at once. ``ack`` and a ``nack`` to the
dead letter publish ``r\\0<ns>\\0<id>\\0<origin>`` only for a job that a ``result(wait=...)``
marked (:meth:`RedisQueues.await_result`): a publish is cheap for Redis, but every subscribed
process receives every message of the server, and on a Cluster each is forwarded to every
node; results are rarely awaited, acks are the hot path.

Durability is Redis's: with AOF ``appendfsync always`` an acknowledged put survives a crash;
with ``everysec`` or RDB snapshots the last ones may be lost; a failover to a replica that
missed them loses them too. See docs/backends/redis.md, "Work queues".
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from fleetmem._codec import decode_value
from fleetmem.backends.redis.connector import PreparedCall, RedisConnector
from fleetmem.backends.redis.entries import ms_datetime
from fleetmem.backends.redis.leases import ReleaseListener
from fleetmem.backends.redis.scripts import QUEUE_SCRIPTS, Script
from fleetmem.backends.seam import NewJob, QueueBackend, job_lost
from fleetmem.errors import BackendUnavailableError, OutcomeUnknownError
from fleetmem.protocol import Job, JobResult, QueueStats

__all__ = ["RedisQueues"]

_PUT, _CLAIM, _EXTEND = QUEUE_SCRIPTS["put"], QUEUE_SCRIPTS["claim"], QUEUE_SCRIPTS["extend"]
_ACK, _NACK, _CANCEL = QUEUE_SCRIPTS["ack"], QUEUE_SCRIPTS["nack"], QUEUE_SCRIPTS["cancel"]
_RESULT, _STATS, _DEAD = QUEUE_SCRIPTS["result"], QUEUE_SCRIPTS["stats"], QUEUE_SCRIPTS["dead"]
_RETRY_DEAD, _PURGE_DEAD = QUEUE_SCRIPTS["retry_dead"], QUEUE_SCRIPTS["purge_dead"]
_LIST_QUEUES, _AWAIT = QUEUE_SCRIPTS["list_queues"], QUEUE_SCRIPTS["await_result"]

#: Jobs per ``put`` script call at most, and payload bytes per call at most (a job larger than
#: that goes alone): each call is atomic, and keeps Redis busy a few milliseconds.
PUT_CHUNK = 1000
_PUT_BYTES = 8 << 20
#: Jobs per ``claim`` call, dead jobs per ``dead`` / ``retry_dead`` / ``purge_dead`` call, and
#: queue names per ``list_queues`` call.
_CLAIM_CHUNK = 1000
_DEAD_PAGE = 1000
_NAMES_PAGE = 500
#: Fields per claimed job in a ``claim`` reply, and per job in a ``dead`` reply.
_CLAIMED_FIELDS, _DEAD_FIELDS = 9, 12
_STATUS = {1: "done", 2: "dead"}


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


class RedisQueues(QueueBackend):
    """The work queues of one namespace on Redis (see the module docstring). Built by
    ``RedisKV.queues()``; shares its connector (client, deadline, error translation, the
    pub/sub listener and the :class:`~fleetmem._notify.Notifier`)."""

    def __init__(self, connector: RedisConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._keys = (f"fm:{{{namespace}}}:".encode(),)
        # The constant head of the hot calls, in both forms (see RedisConnector.prepare).
        self._heads: dict[str, PreparedCall] = {
            s.name: RedisConnector.prepare(s, self._keys) for s in (_PUT, _CLAIM, _ACK, _NACK)
        }

    def _run(self, script: Script, write: bool, *args: Any) -> Awaitable[Any]:
        """One call of ``script`` on this namespace (a prepared head when there is one)."""
        connector = self._connector
        head = self._heads.get(script.name)
        if head is not None and connector.form >= 0:
            return connector.execute(write, *head[connector.form], *args)
        return connector.call(script, self._keys, *args, write=write)

    # ------------------------------------------------------------------ producing

    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        """One ``put`` script call per chunk (up to :data:`PUT_CHUNK` jobs and 8 MB of
        payloads), one after the other so that ids and ready times follow the jobs' order; each
        chunk is atomic. A chunk that fails after earlier ones were applied raises the error
        with what they enqueued (they stay)."""
        origin = self._connector.origin
        ids: list[str] = []
        start, total = 0, len(jobs)
        while start < total:
            args: list[Any] = [queue, origin]
            size, end = 0, start
            while end < total and end - start < PUT_CHUNK:
                job = jobs[end]
                size += len(job.payload)
                if size > _PUT_BYTES and end > start:
                    break
                args += (
                    job.payload,
                    job.priority,
                    job.delay_ms,
                    job.max_attempts,
                    job.dedupe_key or b"",
                )
                end += 1
            try:
                res = await self._run(_PUT, True, *args)
            except BackendUnavailableError as exc:
                if not ids:
                    raise
                raise _failed_midway(exc, ids) from exc
            added = int(res[0])
            ids += [raw.decode() for raw in res[1:]]
            if added:
                self._notifier.notify(self.claim_key(queue), added)
            start = end
        return ids

    # ------------------------------------------------------------------ consuming

    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        """One ``claim`` call per 1,000 jobs asked for (a later call only when the previous
        one filled up)."""
        jobs: list[Job] = []
        ns = self._namespace
        while True:
            want = min(limit - len(jobs), _CLAIM_CHUNK)
            res = await self._run(_CLAIM, True, queue, consumer, lease_ms, want)
            claimed_at, expires = ms_datetime(res[0]), ms_datetime(res[1])
            for i in range(3, len(res), _CLAIMED_FIELDS):
                jid, payload, prio, attempts, most, enq, ready, token, error = res[
                    i : i + _CLAIMED_FIELDS
                ]
                jobs.append(
                    Job(
                        jid.decode(),
                        queue,
                        decode_value(payload),
                        prio,
                        attempts,
                        most,
                        ms_datetime(enq),
                        ms_datetime(ready),
                        claimed_at,
                        expires,
                        consumer,
                        token,
                        None if error is None else error.decode(),
                        ns,
                    )
                )
            got = (len(res) - 3) // _CLAIMED_FIELDS
            if got < want or len(jobs) >= limit:
                next_ms = int(res[2])
                return jobs, (None if next_ms < 0 or len(jobs) >= limit else next_ms)

    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        res = await self._run(_EXTEND, True, queue, job_id, token, lease_ms)
        if res is None:
            raise job_lost(queue, job_id, token)
        payload, prio, attempts, most, enq, ready, claimed, consumer, error, expires = res
        return Job(
            job_id,
            queue,
            decode_value(payload),
            prio,
            attempts,
            most,
            ms_datetime(enq),
            ms_datetime(ready),
            ms_datetime(claimed),
            ms_datetime(expires),
            _text(consumer),
            token,
            _text(error),
            self._namespace,
        )

    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        connector = self._connector
        try:
            res = await self._run(
                _ACK, True, queue, job_id, token, result, result_ttl_ms, connector.origin
            )
        except OutcomeUnknownError:
            # Maybe acked (a reply lost in flight): this process's result waiters look again.
            self._notifier.notify_every(self.result_key(job_id))
            raise
        if res != 1:
            return False
        # This process's waiters at once; the listener skips this connector's own message.
        self._notifier.notify_every(self.result_key(job_id))
        return True

    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        res = await self._run(
            _NACK,
            True,
            queue,
            job_id,
            token,
            retry_in_ms,
            b"0" if error is None else b"1",
            b"" if error is None else error,
            self._connector.origin,
        )
        if res == 2:
            self._notifier.notify(self.claim_key(queue))
        elif res == 3:
            self._notifier.notify_every(self.result_key(job_id))
        return bool(res)

    # ------------------------------------------------------------------ inspecting

    async def cancel(self, queue: str, job_id: str) -> bool:
        return bool(await self._run(_CANCEL, True, queue, job_id) == 1)

    async def result(self, queue: str, job_id: str) -> JobResult | None:
        res = await self._run(_RESULT, False, queue, job_id)
        if res is None:
            return None
        status, data, attempts, finished = res
        done = status == 1
        return JobResult(
            job_id,
            _STATUS[status],
            decode_value(data) if done and data is not None else None,
            None if done else _text(data),
            attempts,
            ms_datetime(finished),
        )

    async def stats(self, queue: str) -> QueueStats:
        ready, delayed, claimed, dead, done = await self._run(_STATS, False, queue)
        return QueueStats(ready, delayed, claimed, dead, done)

    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        """Pages of 1,000 by id; each call first moves the claims that died on their last
        lease to the dead letter (idempotent, so retried like a read)."""
        out: list[Job] = []
        ns = self._namespace
        cursor = after or ""
        while len(out) < limit:
            want = min(limit - len(out), _DEAD_PAGE)
            res = await self._run(_DEAD, False, queue, cursor, want)
            for i in range(0, len(res), _DEAD_FIELDS):
                (jid, payload, prio, attempts, most, enq, ready, claimed, expires) = res[i : i + 9]
                consumer, token, error = res[i + 9 : i + 12]
                out.append(
                    Job(
                        jid.decode(),
                        queue,
                        decode_value(payload),
                        prio,
                        attempts,
                        most,
                        ms_datetime(enq),
                        ms_datetime(ready),
                        None if claimed is None else ms_datetime(claimed),
                        None if expires is None else ms_datetime(expires),
                        _text(consumer),
                        token,
                        _text(error),
                        ns,
                    )
                )
            if len(res) < want * _DEAD_FIELDS:
                break
            cursor = out[-1].id
        return out

    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        """Atomic per call of up to 1,000 dead jobs looked at."""
        origin = self._connector.origin
        moved = 0
        if ids is None:
            cursor = ""
            while True:
                count, cursor = await self._run(
                    _RETRY_DEAD, True, queue, origin, "*", cursor, _DEAD_PAGE
                )
                moved += self._retried(queue, int(count))
                if not cursor:
                    return moved
        for start in range(0, len(ids), _DEAD_PAGE):
            count, _ = await self._run(
                _RETRY_DEAD, True, queue, origin, "=", *ids[start : start + _DEAD_PAGE]
            )
            moved += self._retried(queue, int(count))
        return moved

    def _retried(self, queue: str, count: int) -> int:
        if count:
            self._notifier.notify(self.claim_key(queue), count)
        return count

    async def purge_dead(self, queue: str) -> int:
        """Atomic per call of up to 1,000 dead jobs."""
        removed = 0
        while True:
            count = int(await self._run(_PURGE_DEAD, True, queue, _DEAD_PAGE))
            removed += count
            if count < _DEAD_PAGE:
                return removed

    async def list_queues(self) -> list[str]:
        """The namespace's set of queue names, a page per call; each call drops the names of
        the empty queues it passes (idempotent, so retried like a read)."""
        out: list[str] = []
        cursor: bytes | str = ""
        while True:
            res = await self._run(_LIST_QUEUES, False, cursor, _NAMES_PAGE)
            out += [name.decode() for name in res[1:]]
            cursor = res[0]
            if not cursor:
                return out

    # ------------------------------------------------------------------ wake-ups

    async def listen(self) -> None:
        """Start the connector's pub/sub listener (once; shared with the lease waiters),
        without waiting for its subscription: every waiter is woken when it is confirmed, so
        a put made before it reached nobody is not lost."""
        connector = self._connector
        listener = connector.release_listener
        if listener is None:
            listener = connector.release_listener = ReleaseListener(connector)
        await listener.start(0)

    async def await_result(self, queue: str, job_id: str) -> None:
        """Mark the job as awaited: its ``ack`` (or ``nack`` to the dead letter) then
        publishes a wake-up for its result. Idempotent, so retried like a read."""
        await self._run(_AWAIT, False, queue, job_id)


def _failed_midway(exc: BackendUnavailableError, ids: list[str]) -> BackendUnavailableError:
    """``exc`` (of the same class) saying what the earlier calls of a ``put`` enqueued."""
    if isinstance(exc, OutcomeUnknownError):
        failed = "the failed call may or may not have been applied"
    else:
        failed = "the failed call was not applied"
    return type(exc)(
        f"{exc}; earlier script calls of this put enqueued {len(ids):,} of its jobs (ids "
        f"{ids[0]} to {ids[-1]}), which stay; {failed}, and the rest was not sent"
    )
