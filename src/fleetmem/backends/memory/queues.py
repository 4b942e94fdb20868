"""Work queues held in this process's memory: the reference implementation of the queue seam.

Every operation first *settles* its queue at ``now``: jobs whose delay or retry came due move to
the ready heap, claims whose lease expired move back to ready (or, on their last attempt, to the
dead letter, dead since their lease's expiry), results past their TTL are dropped. Settling and
the operation run without awaiting in between, so each is atomic with respect to every other
coroutine, and the stored state always equals the effective state the seam describes. Times
are this process's wall clock.

Structures per queue: ``ready`` is a heap of ``(-priority, ready_at, seq)`` (claim order);
``pending`` a heap of ``(due, seq)`` for delayed jobs and live claims; ``results`` a heap of
``(expires, seq)`` for held results. Heap entries carry the record's ``version`` and are
dropped when stale, so a record moves in O(log n).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fleetmem._codec import decode_value
from fleetmem._notify import Notifier
from fleetmem.backends.seam import NewJob, QueueBackend, job_lost
from fleetmem.protocol import Job, JobResult, QueueStats

__all__ = ["MemoryQueues", "QueueSpace"]

_WAITING = "waiting"  # ready or delayed, by ready_at
_CLAIMED = "claimed"
_DONE = "done"
_DEAD = "dead"


@dataclass(slots=True)
class _Job:
    seq: int
    payload: bytes
    priority: int
    max_attempts: int
    dedupe_key: str | None
    enqueued_at: float
    ready_at: float
    state: str = _WAITING
    attempts: int = 0
    token: int = 0
    claimed_at: float | None = None
    lease_expires_at: float | None = None
    consumer: str | None = None
    last_error: str | None = None
    finished_at: float | None = None
    result: bytes | None = None
    result_expires_at: float | None = None
    version: int = 0
    #: Waiting again because its claim's lease expired: that claim still holds (ack, nack,
    #: extend) until the next claim supersedes it.
    lapsed: bool = False


@dataclass(slots=True)
class _Queue:
    jobs: dict[int, _Job] = field(default_factory=dict)
    ready: list[tuple[int, float, int, int]] = field(default_factory=list)
    pending: list[tuple[float, int, int]] = field(default_factory=list)
    results: list[tuple[float, int]] = field(default_factory=list)
    dedupe: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class QueueSpace:
    """The queues of every namespace of one in-memory store (shared by its views)."""

    queues: dict[tuple[str, str], _Queue] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    notifier: Notifier = field(default_factory=Notifier)


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def _maybe_dt(epoch: float | None) -> datetime | None:
    return None if epoch is None else _dt(epoch)


class MemoryQueues(QueueBackend):
    """The queues of one namespace; puts and acks wake this process's waiters at once."""

    def __init__(self, *, namespace: str, space: QueueSpace, clock: Callable[[], float]) -> None:
        super().__init__(namespace=namespace, notifier=space.notifier)
        self._space = space
        self._clock = clock

    # ------------------------------------------------------------------ internals

    def _queue(self, name: str, create: bool = False) -> _Queue | None:
        key = (self._namespace, name)
        q = self._space.queues.get(key)
        if q is None and create:
            q = self._space.queues[key] = _Queue()
        return q

    def _drop_if_empty(self, name: str, q: _Queue) -> None:
        if not q.jobs:
            self._space.queues.pop((self._namespace, name), None)

    @staticmethod
    def _schedule(q: _Job, queue: _Queue, now: float) -> None:
        """File a waiting job in ``ready`` (due) or ``pending`` (delayed)."""
        q.version += 1
        if q.ready_at <= now:
            heapq.heappush(queue.ready, (-q.priority, q.ready_at, q.seq, q.version))
        else:
            heapq.heappush(queue.pending, (q.ready_at, q.seq, q.version))

    def _finish(self, job: _Job, queue: _Queue, state: str, at: float) -> None:
        job.state = state
        job.lapsed = False
        job.finished_at = at
        job.version += 1
        if job.dedupe_key is not None and queue.dedupe.get(job.dedupe_key) == job.seq:
            del queue.dedupe[job.dedupe_key]
        self._space.notifier.notify_every(self.result_key(f"{job.seq:016x}"))

    def _settle(self, name: str, now: float) -> _Queue | None:
        queue = self._queue(name)
        if queue is None:
            return None
        pending = queue.pending
        while pending and pending[0][0] <= now:
            due, seq, version = heapq.heappop(pending)
            job = queue.jobs.get(seq)
            if job is None or job.version != version:
                continue
            if job.state == _CLAIMED:
                if job.attempts >= job.max_attempts:
                    self._finish(job, queue, _DEAD, due)
                    continue
                job.state = _WAITING
                job.lapsed = True
                job.ready_at = due
            self._schedule(job, queue, now)
        results = queue.results
        while results and results[0][0] <= now:
            expires, seq = heapq.heappop(results)
            job = queue.jobs.get(seq)
            if job is not None and job.state == _DONE and job.result_expires_at == expires:
                del queue.jobs[seq]
        if not queue.jobs:
            self._drop_if_empty(name, queue)
            return None
        return queue

    def _job(self, name: str, job: _Job) -> Job:
        return Job(
            id=f"{job.seq:016x}",
            queue=name,
            payload=decode_value(job.payload),
            priority=job.priority,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            enqueued_at=_dt(job.enqueued_at),
            ready_at=_dt(job.ready_at),
            claimed_at=_maybe_dt(job.claimed_at),
            lease_expires_at=_maybe_dt(job.lease_expires_at),
            consumer=job.consumer,
            token=job.token,
            last_error=job.last_error,
            namespace=self._namespace,
        )

    def _held(self, name: str, job_id: str, token: int, now: float) -> tuple[_Queue, _Job] | None:
        queue = self._settle(name, now)
        if queue is None:
            return None
        job = queue.jobs.get(int(job_id, 16))
        if job is None or job.token != token:
            return None
        if job.state != _CLAIMED and not (job.state == _WAITING and job.lapsed):
            return None
        return queue, job

    # ------------------------------------------------------------------ the seam

    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        now = self._clock()
        q = self._settle(queue, now) or self._queue(queue, create=True)
        assert q is not None
        ids: list[str] = []
        added = 0
        for new in jobs:
            if new.dedupe_key is not None:
                held = q.dedupe.get(new.dedupe_key)
                if held is not None:
                    ids.append(f"{held:016x}")
                    continue
            seq = self._space.seq.get(self._namespace, 0) + 1
            self._space.seq[self._namespace] = seq
            job = _Job(
                seq=seq,
                payload=new.payload,
                priority=new.priority,
                max_attempts=new.max_attempts,
                dedupe_key=new.dedupe_key,
                enqueued_at=now,
                ready_at=now + new.delay_ms / 1000,
            )
            q.jobs[seq] = job
            if new.dedupe_key is not None:
                q.dedupe[new.dedupe_key] = seq
            self._schedule(job, q, now)
            ids.append(f"{seq:016x}")
            added += 1
        if added:
            self._space.notifier.notify(self.claim_key(queue), added)
        else:
            self._drop_if_empty(queue, q)
        return ids

    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        now = self._clock()
        q = self._settle(queue, now)
        if q is None:
            return [], None
        claimed: list[Job] = []
        ready = q.ready
        expires = now + lease_ms / 1000
        while ready and len(claimed) < limit:
            _, _, seq, version = heapq.heappop(ready)
            job = q.jobs.get(seq)
            if job is None or job.version != version or job.state != _WAITING:
                continue
            job.state = _CLAIMED
            job.lapsed = False
            job.attempts += 1
            job.token += 1
            job.claimed_at = now
            job.lease_expires_at = expires
            job.consumer = consumer
            job.version += 1
            heapq.heappush(q.pending, (expires, seq, job.version))
            claimed.append(self._job(queue, job))
        next_ms: int | None = None
        pending = q.pending
        while pending and self._stale(q, pending[0]):
            heapq.heappop(pending)
        if len(claimed) < limit and pending:
            next_ms = max(0, math.ceil((pending[0][0] - now) * 1000))
        return claimed, next_ms

    @staticmethod
    def _stale(queue: _Queue, entry: tuple[float, int, int]) -> bool:
        job = queue.jobs.get(entry[1])
        return job is None or job.version != entry[2]

    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        now = self._clock()
        held = self._held(queue, job_id, token, now)
        if held is None:
            raise job_lost(queue, job_id, token)
        q, job = held
        job.state = _CLAIMED  # a lapsed claim nobody superseded is live again
        job.lapsed = False
        job.lease_expires_at = now + lease_ms / 1000
        job.version += 1
        heapq.heappush(q.pending, (job.lease_expires_at, job.seq, job.version))
        return self._job(queue, job)

    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        now = self._clock()
        held = self._held(queue, job_id, token, now)
        if held is None:
            return False
        q, job = held
        job.result = result
        job.result_expires_at = now + result_ttl_ms / 1000
        heapq.heappush(q.results, (job.result_expires_at, job.seq))
        self._finish(job, q, _DONE, now)
        return True

    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        now = self._clock()
        held = self._held(queue, job_id, token, now)
        if held is None:
            return False
        q, job = held
        job.last_error = error
        if job.attempts >= job.max_attempts:
            self._finish(job, q, _DEAD, now)
            return True
        job.state = _WAITING
        job.lapsed = False
        job.ready_at = now + retry_in_ms / 1000
        self._schedule(job, q, now)
        if job.ready_at <= now:
            self._space.notifier.notify(self.claim_key(queue))
        return True

    async def cancel(self, queue: str, job_id: str) -> bool:
        q = self._settle(queue, self._clock())
        if q is None:
            return False
        job = q.jobs.get(int(job_id, 16))
        if job is None or job.state != _WAITING:
            return False
        del q.jobs[job.seq]
        job.version += 1
        if job.dedupe_key is not None and q.dedupe.get(job.dedupe_key) == job.seq:
            del q.dedupe[job.dedupe_key]
        self._drop_if_empty(queue, q)
        return True

    async def result(self, queue: str, job_id: str) -> JobResult | None:
        q = self._settle(queue, self._clock())
        if q is None:
            return None
        job = q.jobs.get(int(job_id, 16))
        if job is None or job.state not in (_DONE, _DEAD):
            return None
        assert job.finished_at is not None
        done = job.state == _DONE
        return JobResult(
            id=job_id,
            status=job.state,
            value=decode_value(job.result) if done and job.result is not None else None,
            error=None if done else job.last_error,
            attempts=job.attempts,
            finished_at=_dt(job.finished_at),
        )

    async def stats(self, queue: str) -> QueueStats:
        now = self._clock()
        q = self._settle(queue, now)
        counts = {"ready": 0, "delayed": 0, _CLAIMED: 0, _DEAD: 0, _DONE: 0}
        for job in q.jobs.values() if q is not None else ():
            if job.state == _WAITING:
                counts["ready" if job.ready_at <= now else "delayed"] += 1
            else:
                counts[job.state] += 1
        return QueueStats(
            ready=counts["ready"],
            delayed=counts["delayed"],
            claimed=counts[_CLAIMED],
            dead=counts[_DEAD],
            done=counts[_DONE],
        )

    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        q = self._settle(queue, self._clock())
        if q is None:
            return []
        start = -1 if after is None else int(after, 16)
        seqs = sorted(s for s, j in q.jobs.items() if j.state == _DEAD and s > start)
        return [self._job(queue, q.jobs[s]) for s in seqs[:limit]]

    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        now = self._clock()
        q = self._settle(queue, now)
        if q is None:
            return 0
        if ids is None:
            seqs = sorted(s for s, j in q.jobs.items() if j.state == _DEAD)
        else:
            seqs = [int(i, 16) for i in ids]
        moved = 0
        for seq in seqs:
            job = q.jobs.get(seq)
            if job is None or job.state != _DEAD:
                continue
            if job.dedupe_key is not None:
                if job.dedupe_key in q.dedupe:
                    continue  # another live job holds the key: retrying would run it twice
                q.dedupe[job.dedupe_key] = seq
            job.state = _WAITING
            job.lapsed = False
            job.attempts = 0
            job.finished_at = None
            job.ready_at = now
            self._schedule(job, q, now)
            moved += 1
        if moved:
            self._space.notifier.notify(self.claim_key(queue), moved)
        return moved

    async def purge_dead(self, queue: str) -> int:
        q = self._settle(queue, self._clock())
        if q is None:
            return 0
        doomed = [s for s, j in q.jobs.items() if j.state == _DEAD]
        for seq in doomed:
            del q.jobs[seq]
        self._drop_if_empty(queue, q)
        return len(doomed)

    async def list_queues(self) -> list[str]:
        now = self._clock()
        names = sorted(name for ns, name in self._space.queues if ns == self._namespace)
        return [name for name in names if self._settle(name, now) is not None]
