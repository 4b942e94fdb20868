"""Durable work queues: ``store.queue(name)`` and ``store.list_queues()``.

Every rule of ``COORDINATION.md`` ("Work queues"), as tests of the ``store`` fixture through
the public :class:`~fleetmem.queues.Queue` API only. Times are compared on the server's clock
(the ``Job`` and ``JobResult`` timestamps), never against this process's clock beyond
``clock_skew``. Short leases (``lease_ttl``) are never assumed to be still live: a test that
lets one expire polls until the expiry shows (``until``, up to ``queue_patience`` seconds)
instead of sleeping an exact time, and anything that must stay put for the length of a test
gets a lease, delay or retry of 30 s or more. Wake-ups promised "within 100 ms" are checked
against ``lease_wake_slack``, still well under the one-second fallback poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest

from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    LeaseLostError,
    SerializationError,
    ValueTooLargeError,
)
from fleetmem.protocol import Job, JobResult, MemoryStore, QueueStats
from fleetmem.queues import Queue
from fleetmem.testing.conformance._base import (
    BAD_KEYS,
    GOOD_KEYS,
    GOOD_PARTITIONS,
    assert_same_json,
    assert_utc,
    utcnow,
)
from fleetmem.testing.conformance._expiry import BAD_TTLS
from fleetmem.testing.conformance._leases import CoordinationBase
from fleetmem.testing.conformance._values import REFUSED_VALUES, ROUND_TRIP_VALUES

_T = TypeVar("_T")

#: Two timestamps of one event read twice agree to this many seconds (a backend may round).
_SAME_MOMENT = 0.002
#: An id no test ever reaches.
_UNKNOWN_ID = "7fffffffffffffff"
_JOB_ID = re.compile(r"[0-9a-f]{16}")
#: Nothing in the queue.
EMPTY = QueueStats(ready=0, delayed=0, claimed=0, dead=0, done=0)
#: Long enough to stay put for the length of any test (a lease, a delay, a retry).
_LONG = 120

#: Queue names every backend accepts and returns unchanged (the key rules, at most 255 bytes).
GOOD_QUEUE_NAMES: list[str] = [
    *GOOD_PARTITIONS,
    *(name for name in GOOD_KEYS if len(name.encode("utf-8")) <= 255),
]
#: Queue names refused with ``InvalidKeyError`` (the bad keys, and over 255 UTF-8 bytes).
BAD_QUEUE_NAMES: list[Any] = [*BAD_KEYS, "q" * 256, "\u00e9" * 128]
#: Consumers and dedupe keys refused with ``InvalidKeyError`` (``None`` means "none given").
BAD_NAMES: list[Any] = [key for key in BAD_KEYS if key is not None]
#: Priorities refused with ``InvalidArgumentError``: not an int, or outside signed 32 bits.
BAD_PRIORITIES: list[Any] = [True, False, 1.0, 1.5, "1", None, 2**31, -(2**31) - 1, 2**64]
#: ``max_attempts`` refused with ``InvalidArgumentError``: below 1 or not an int.
BAD_MAX_ATTEMPTS: list[Any] = [0, -1, True, False, 1.5, 3.0, "3"]
#: Delays and retries refused with ``InvalidArgumentError`` (0 means "now" and is fine).
BAD_DURATIONS: list[Any] = [
    -1,
    -0.001,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    "1",
    b"1",
    [1],
    timedelta(seconds=-1),
    101 * 365 * 24 * 3600,  # over 100 years
    10**400,  # too large for a float: refused, not an OverflowError
]
#: Waits refused with ``InvalidArgumentError``.
BAD_WAITS: list[Any] = [-1, float("nan"), float("inf"), True, "1", timedelta(seconds=-1)]
#: Strings that are not job ids (16 lowercase hex digits).
BAD_JOB_IDS: list[Any] = [
    "",
    "1",
    "000000000000000",  # 15 digits
    "00000000000000001",  # 17 digits
    "00000000000000AB",  # upper case
    "000000000000000g",
    " 000000000000001",
    "0x00000000000001",
    "-000000000000001",
    "000000000000001\n",
    1,
    None,
    b"0000000000000001",
]


def seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def stats_of(
    ready: int = 0, delayed: int = 0, claimed: int = 0, dead: int = 0, done: int = 0
) -> QueueStats:
    return QueueStats(ready=ready, delayed=delayed, claimed=claimed, dead=dead, done=done)


def claimed(job: Job | None, what: str = "claim") -> Job:
    """``job``, asserted to be a job."""
    assert job is not None, f"{what}: no job was claimed"
    assert isinstance(job, Job), f"{what}: {job!r} is not a Job"
    return job


def assert_order(jobs: list[Job]) -> None:
    """``jobs`` were claimed in claim order: priority down, then ready_at, then id."""
    keys = [(-job.priority, job.ready_at, job.id) for job in jobs]
    assert keys == sorted(keys), [(j.id, j.priority, j.ready_at, j.payload) for j in jobs]


def assert_dead_result(
    result: JobResult | None, job_id: str, error: str | None, attempts: int
) -> JobResult:
    assert result is not None, f"result({job_id}) of a dead job is None"
    assert isinstance(result, JobResult)
    assert (result.id, result.status, result.value, result.error, result.attempts) == (
        job_id,
        "dead",
        None,
        error,
        attempts,
    ), result
    assert_utc(result.finished_at, "finished_at")
    return result


class QueueConformance(CoordinationBase):
    """The rules of ``COORDINATION.md`` ("Work queues").

    ``queue_patience``
        How long (seconds) a test waits for something that is due -- a lease to expire, a
        delay to come due, a result to expire -- before it fails. Generous on purpose: it
        bounds a wait, it measures nothing.
    """

    pytestmark = [pytest.mark.asyncio]

    queue_patience: float = 15.0

    async def until(
        self, probe: Callable[[], Awaitable[_T]], done: Callable[[_T], bool], what: str
    ) -> _T:
        """Call ``probe`` until ``done(its result)``; fail after ``queue_patience`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_patience
        while True:
            value = await probe()
            if done(value):
                return value
            if loop.time() > deadline:
                raise AssertionError(f"{what}: still {value!r} after {self.queue_patience} s")
            await asyncio.sleep(0.05)

    async def until_stats(self, queue: Queue, expected: QueueStats, what: str) -> None:
        await self.until(queue.stats, lambda s: s == expected, what)

    async def claim_soon(self, queue: Queue, what: str, **options: Any) -> Job:
        """Claim (polling) a job that becomes ready soon, with a long lease by default."""
        options.setdefault("lease", _LONG)
        job = await self.until(lambda: queue.claim(**options), lambda j: j is not None, what)
        return claimed(job, what)

    async def dead_job(
        self, queue: Queue, payload: Any = None, error: str | None = "failed", **put: Any
    ) -> tuple[str, Job]:
        """A job of ``queue`` sent to the dead letter by a ``nack`` on its only attempt; its id
        and its last claim. Nothing else of ``queue`` may be ready."""
        job_id = await queue.put(payload, max_attempts=1, priority=2**31 - 1, **put)
        job = claimed(await queue.claim(lease=_LONG))
        assert job.id == job_id
        assert await queue.nack(job, retry_in=0, error=error) is True
        return job_id, job

    # ------------------------------------------------------------ put / claim / ack

    async def test_queue_put_claim_ack_round_trip(self, store: MemoryStore) -> None:
        q = store.queue("tasks")
        assert q.name == "tasks" and q.namespace == store.namespace
        assert await q.stats() == EMPTY
        assert await q.claim() is None
        job_id = await q.put({"test": "t-17"}, priority=5, dedupe_key="t-17", max_attempts=3)
        assert isinstance(job_id, str) and _JOB_ID.fullmatch(job_id), job_id
        assert await q.stats() == stats_of(ready=1)
        assert await q.result(job_id) is None  # not finished yet
        job = claimed(await q.claim(consumer="agent-7", lease=30))
        assert (job.id, job.queue, job.priority, job.attempts, job.max_attempts) == (
            job_id,
            "tasks",
            5,
            1,
            3,
        )
        assert_same_json(job.payload, {"test": "t-17"}, "payload")
        assert await q.stats() == stats_of(claimed=1)
        assert await q.claim() is None  # claimed under a live lease: nobody else gets it
        assert await q.result(job_id) is None
        assert await q.ack(job, result={"passed": True}) is True
        assert await q.stats() == stats_of(done=1)
        result = await q.result(job_id)
        assert isinstance(result, JobResult)
        assert (result.id, result.status, result.error, result.attempts) == (
            job_id,
            "done",
            None,
            1,
        )
        assert_same_json(result.value, {"passed": True}, "result value")
        finished = assert_utc(result.finished_at, "finished_at")
        assert job.claimed_at is not None and finished >= job.claimed_at
        skew = timedelta(seconds=self.clock_skew)
        assert finished <= utcnow() + skew
        assert await q.claim() is None  # a finished job is never claimed again
        # ack without a result: the value is None.
        other = await q.put("bare")
        bare = claimed(await q.claim())
        assert bare.id == other
        assert await q.ack(bare) is True
        got = await q.result(other)
        assert got is not None and (got.status, got.value) == ("done", None)

    async def test_queue_payloads_and_results_round_trip(self, store: MemoryStore) -> None:
        q = store.queue("q")
        values = ROUND_TRIP_VALUES
        ids = await q.put_many(values)
        jobs = await q.claim_many(len(values) + 5, lease=_LONG)
        assert [job.id for job in jobs] == ids
        for index, (job, value) in enumerate(zip(jobs, values, strict=True)):
            assert_same_json(job.payload, value, f"payload #{index}")
        for index, job in enumerate(jobs):
            assert await q.ack(job, result=values[-1 - index]) is True
        for index, job_id in enumerate(ids):
            result = await q.result(job_id)
            assert result is not None and result.status == "done", index
            assert_same_json(result.value, values[-1 - index], f"result #{index}")
        single = await q.put(values[-1])
        job = claimed(await q.claim())
        assert job.id == single
        assert_same_json(job.payload, values[-1], "put payload")
        await q.put(True)
        assert claimed(await q.claim()).payload is True

    async def test_queue_job_fields(self, store: MemoryStore) -> None:
        q = store.queue("fields")
        before = utcnow()
        job_id = await q.put([1, "two"], priority=-7, max_attempts=4)
        job = claimed(await q.claim(consumer="agent-7", lease=30))
        assert isinstance(job, Job)
        assert (job.id, job.queue, job.namespace) == (job_id, "fields", store.namespace)
        assert type(job.priority) is int and job.priority == -7
        assert type(job.attempts) is int and job.attempts == 1
        assert type(job.max_attempts) is int and job.max_attempts == 4
        assert type(job.token) is int and job.token >= 1, job.token
        assert job.consumer == "agent-7"
        assert job.last_error is None
        enqueued = assert_utc(job.enqueued_at, "enqueued_at")
        ready = assert_utc(job.ready_at, "ready_at")
        claimed_at = assert_utc(job.claimed_at, "claimed_at")
        expires = assert_utc(job.lease_expires_at, "lease_expires_at")
        assert abs(seconds(ready, enqueued)) <= _SAME_MOMENT  # no delay: ready when put
        assert enqueued <= claimed_at < expires
        assert abs(seconds(expires, claimed_at) - 30) <= self.ttl_slack, job
        skew = timedelta(seconds=self.clock_skew)
        assert before - skew <= enqueued <= utcnow() + skew, enqueued
        with pytest.raises(dataclasses.FrozenInstanceError):
            job.token = 99  # type: ignore[misc]
        # Defaults: max_attempts 5, priority 0, a 30 s lease, a consumer named for the process.
        await q.put("defaults")
        plain = claimed(await q.claim())
        assert (plain.priority, plain.max_attempts, plain.attempts) == (0, 5, 1)
        assert isinstance(plain.consumer, str) and plain.consumer
        assert plain.claimed_at is not None and plain.lease_expires_at is not None
        assert abs(seconds(plain.lease_expires_at, plain.claimed_at) - 30) <= self.ttl_slack
        assert plain.token >= 1
        # A timedelta is a lease too.
        await q.put("delta")
        delta = claimed(await q.claim(lease=timedelta(minutes=2)))
        assert delta.claimed_at is not None and delta.lease_expires_at is not None
        assert abs(seconds(delta.lease_expires_at, delta.claimed_at) - 120) <= self.ttl_slack

    async def test_queue_ids_are_unique_hex_ascending(self, store: MemoryStore) -> None:
        a, b = store.queue("a"), store.queue("b")
        ids: list[str] = []
        for i in range(10):
            ids.append(await (a if i % 2 else b).put(i))
        ids += await a.put_many(range(20))
        ids += await b.put_many(["x", "y"])
        ids.append(await a.put("last"))
        for job_id in ids:
            assert isinstance(job_id, str) and _JOB_ID.fullmatch(job_id), job_id
        assert len(set(ids)) == len(ids), "an id was given twice"
        assert ids == sorted(ids), "ids do not ascend in put order"
        # Ids are never reused: not after a job is finished, cancelled or dead.
        job = claimed(await a.claim())
        assert await a.ack(job) is True
        assert await b.cancel(ids[0]) is True
        await self.dead_job(a)
        later = [await a.put("after"), *await b.put_many([1, 2])]
        assert min(later) > max(ids), (later, ids)

    # ------------------------------------------------------------ order

    async def test_queue_order_by_priority_then_put(self, store: MemoryStore) -> None:
        q = store.queue("q")
        priorities = [0, 5, -3, 5, 2**31 - 1, -(2**31), 0, 1, 5]
        ids = [await q.put(i, priority=p) for i, p in enumerate(priorities)]
        jobs = [claimed(await q.claim(lease=_LONG)) for _ in priorities]
        expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
        assert [job.payload for job in jobs] == expected
        assert [job.id for job in jobs] == [ids[i] for i in expected]
        assert [job.priority for job in jobs] == [priorities[i] for i in expected]
        assert await q.claim() is None

    async def test_queue_order_by_ready_at(self, store: MemoryStore) -> None:
        """At equal priority the earliest ready_at goes first, whatever the put order: a job
        put with a delay waits behind jobs put after it that were ready earlier."""
        q = store.queue("q")
        late = await q.put("late", delay=0.4)
        soon = await q.put("soon", delay=0.2)
        now = await q.put("now")
        high = await q.put("high", priority=1, delay=0.4)
        await self.until_stats(q, stats_of(ready=4), "every delay came due")
        jobs = [claimed(await q.claim(lease=_LONG)) for _ in range(4)]
        assert_order(jobs)
        assert jobs[0].id == high
        assert {job.id for job in jobs} == {late, soon, now, high}
        # The order is that of ready_at (server clock), not of put.
        by_ready = sorted(jobs[1:], key=lambda j: (j.ready_at, j.id))
        assert [j.id for j in jobs[1:]] == [j.id for j in by_ready]
        assert jobs[1].ready_at <= jobs[2].ready_at <= jobs[3].ready_at

    async def test_queue_order_of_an_expired_claim(self, store: MemoryStore) -> None:
        """A job whose lease expired is ready again as if ready_at were its lease's expiry."""
        q = store.queue("q")
        first = await q.put("first")
        stale = claimed(await q.claim(lease=self.lease_ttl))
        assert stale.id == first and stale.lease_expires_at is not None
        second = await q.put("second")
        await self.until_stats(q, stats_of(ready=2), "the lease expired")
        jobs = [claimed(await q.claim(lease=_LONG)) for _ in range(2)]
        by_id = {job.id: job for job in jobs}
        put_second = by_id[second].ready_at
        # "second" goes first if it was put before the lease expired (the usual case).
        expected = [second, first] if put_second < stale.lease_expires_at else [first, second]
        assert [job.id for job in jobs] == expected, (put_second, stale.lease_expires_at)
        assert by_id[first].attempts == 2

    # ------------------------------------------------------------ delay

    async def test_queue_delay(self, store: MemoryStore) -> None:
        q = store.queue("q")
        held = await q.put("held", delay=_LONG)
        also = await q.put("also held", delay=timedelta(hours=1))
        assert await q.stats() == stats_of(delayed=2)
        assert await q.claim() is None
        assert await q.claim_many(5) == []
        assert await q.result(held) is None
        # A short delay: delayed, then ready (polled), then claimable.
        soon = await q.put("soon", delay=self.lease_ttl)
        await self.until_stats(q, stats_of(ready=1, delayed=2), "the delay came due")
        job = claimed(await q.claim(lease=_LONG))
        assert job.id == soon
        # Never ready before put + delay (server clock), and claimed only once ready.
        waited = seconds(job.ready_at, job.enqueued_at)
        assert self.lease_ttl - _SAME_MOMENT <= waited <= self.lease_ttl + self.ttl_slack, waited
        assert job.claimed_at is not None and job.claimed_at >= job.ready_at
        assert await q.claim() is None
        assert await q.stats() == stats_of(claimed=1, delayed=2)
        # delay=0 (or a zero timedelta): ready now.
        zero = await q.put("zero", delay=0)
        zero_td = await q.put("zero td", delay=timedelta(0))
        assert [j.id for j in await q.claim_many(5)] == [zero, zero_td]
        assert {held, also}.isdisjoint({zero, zero_td, soon})
        assert await q.stats() == stats_of(claimed=3, delayed=2)

    # ------------------------------------------------------------ claim_many

    async def test_queue_claim_many(self, store: MemoryStore) -> None:
        q = store.queue("q")
        assert await q.claim_many(3) == []  # empty
        ids = await q.put_many(["a", "b", "c", "d", "e"])
        urgent = await q.put("urgent", priority=9)
        assert await q.claim_many(0) == []
        assert await q.stats() == stats_of(ready=6)  # n=0 claims nothing
        first = await q.claim_many(3, consumer="agent-7", lease=_LONG)
        assert [j.id for j in first] == [urgent, ids[0], ids[1]]
        assert all(j.consumer == "agent-7" and j.attempts == 1 for j in first)
        rest = await q.claim_many(10, lease=_LONG)  # fewer than n: what there is
        assert [j.id for j in rest] == ids[2:]
        assert [j.payload for j in rest] == ["c", "d", "e"]
        assert await q.claim_many(10) == []
        assert await q.stats() == stats_of(claimed=6)
        with pytest.raises(InvalidArgumentError):
            await q.claim_many(-1)

    # ------------------------------------------------------------ exactly one claimer

    async def test_queue_exactly_one_claimer(self, store: MemoryStore) -> None:
        q = store.queue("q")
        ids = await q.put_many(range(5))
        n = self.concurrency
        results = await asyncio.gather(
            *(q.claim(consumer=f"agent-{i}", lease=_LONG) for i in range(n))
        )
        got = [job for job in results if job is not None]
        assert sorted(job.id for job in got) == ids, "a job was given twice, or not at all"
        assert await q.stats() == stats_of(claimed=5)
        # claim_many racing as well: every job to one claimer.
        more = await q.put_many(range(12))
        batches = await asyncio.gather(*(q.claim_many(3, lease=_LONG) for _ in range(n)))
        taken = [job.id for batch in batches for job in batch]
        assert sorted(taken) == more, "claim_many gave a job twice, or lost one"
        for batch in batches:
            assert_order(batch)

    async def test_queue_exactly_one_claimer_after_expiry(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x")
        stale = claimed(await q.claim(lease=self.lease_ttl))
        await self.until_stats(q, stats_of(ready=1), "the lease expired")
        results = await asyncio.gather(
            *(q.claim(consumer=f"agent-{i}", lease=_LONG) for i in range(self.concurrency))
        )
        got = [job for job in results if job is not None]
        assert len(got) == 1, f"{len(got)} claimers got the job"
        assert got[0].id == job_id and got[0].attempts == 2 and got[0].token > stale.token

    # ------------------------------------------------------------ leases of claims

    async def test_queue_lease_expiry_makes_the_job_claimable_again(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        job_id = await q.put({"n": 1}, max_attempts=3, dedupe_key="k")
        first = claimed(await q.claim(consumer="a", lease=self.lease_ttl))
        assert first.lease_expires_at is not None
        await self.until_stats(q, stats_of(ready=1), "the lease expired")
        # Ready again, still live: its dedupe key is still held.
        assert await q.put({"n": 2}, dedupe_key="k") == job_id
        second = await self.claim_soon(q, "claim after the expiry", consumer="b")
        assert (second.id, second.consumer, second.attempts) == (job_id, "b", 2)
        assert second.token > first.token
        assert second.claimed_at is not None
        assert second.claimed_at >= first.lease_expires_at - timedelta(seconds=_SAME_MOMENT)
        assert abs(seconds(second.enqueued_at, first.enqueued_at)) <= _SAME_MOMENT
        assert_same_json(second.payload, {"n": 1})
        assert await q.stats() == stats_of(claimed=1)

    async def test_queue_expired_claim_still_holds_until_superseded(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        to_ack = await q.put("ack", max_attempts=2)
        to_nack = await q.put("nack", max_attempts=2)
        to_extend = await q.put("extend", max_attempts=2)
        jobs = await q.claim_many(3, lease=self.lease_ttl)
        assert [j.id for j in jobs] == [to_ack, to_nack, to_extend]
        # Expired, attempts left: ready again, but nobody claimed them since.
        await self.until_stats(q, stats_of(ready=3), "the leases expired")
        assert await q.ack(jobs[0], result="late") is True
        assert await q.nack(jobs[1], retry_in=_LONG, error="late") is True
        extended = await q.extend(jobs[2], lease=_LONG)
        assert (extended.id, extended.token, extended.attempts) == (to_extend, jobs[2].token, 1)
        assert extended.lease_expires_at is not None
        assert extended.lease_expires_at > utcnow() - timedelta(seconds=self.clock_skew)
        assert await q.stats() == stats_of(delayed=1, claimed=1, done=1)
        assert await q.claim() is None  # the extended claim is live again
        result = await q.result(to_ack)
        assert result is not None and (result.status, result.value) == ("done", "late")
        assert await q.ack(extended) is True

    async def test_queue_extending_an_expired_claim_reports_when_it_became_ready(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        await q.put("x", max_attempts=3)
        job = claimed(await q.claim(lease=self.lease_ttl))
        assert job.lease_expires_at is not None
        await self.until_stats(q, stats_of(ready=1), "the lease expired")
        extended = await q.extend(job, lease=_LONG)
        # Nobody claimed it since: the claim is live again, and the job's ready_at is the
        # moment its lease ran out (when it became ready again), as a claim would report.
        assert abs(seconds(extended.ready_at, job.lease_expires_at)) <= _SAME_MOMENT
        assert await q.nack(extended, retry_in=_LONG) is True
        assert await q.stats() == stats_of(delayed=1)

    async def test_queue_int_subclasses_are_stored_as_ints(self, store: MemoryStore) -> None:
        class Level(enum.IntEnum):
            HIGH = 7
            ONCE = 1

        q = store.queue("q")
        await q.put("low")
        job_id = await q.put("high", priority=Level.HIGH, max_attempts=Level.ONCE)
        job = claimed(await q.claim(lease=_LONG))
        assert (job.id, job.priority, job.max_attempts) == (job_id, 7, 1)
        assert type(job.priority) is int and type(job.max_attempts) is int
        assert await q.nack(job, retry_in=0, error="once") is True  # its only attempt: dead
        assert await q.stats() == stats_of(ready=1, dead=1)
        assert len(await q.claim_many(Level.HIGH, lease=_LONG)) == 1

    async def test_queue_superseded_claim_changes_nothing(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=5)
        old = claimed(await q.claim(consumer="a", lease=self.lease_ttl))
        new = await self.claim_soon(q, "claim after the expiry", consumer="b")
        assert new.id == job_id and new.token > old.token and new.attempts == 2
        assert await q.ack(old, result="stale") is False
        assert await q.nack(old, retry_in=0, error="stale") is False
        with pytest.raises(LeaseLostError) as info:
            await q.extend(old, lease=_LONG)
        assert isinstance(info.value, FleetmemError)
        assert await q.result(job_id) is None  # the stale result was not stored
        assert await q.stats() == stats_of(claimed=1)
        assert await q.claim() is None  # the stale nack did not give the job back
        assert await q.ack(new, result="fresh") is True
        assert await q.ack(old, result="stale") is False
        result = await q.result(job_id)
        assert result is not None
        assert (result.status, result.value, result.attempts) == ("done", "fresh", 2)

    async def test_queue_extend(self, store: MemoryStore) -> None:
        q = store.queue("q")
        await q.put("x")
        job = claimed(await q.claim(consumer="a", lease=30))
        assert job.claimed_at is not None and job.lease_expires_at is not None
        longer = await q.extend(job, lease=100)
        assert isinstance(longer, Job)
        assert (longer.id, longer.token, longer.attempts, longer.consumer) == (
            job.id,
            job.token,
            1,
            "a",
        )
        assert longer.claimed_at is not None and longer.lease_expires_at is not None
        assert abs(seconds(longer.claimed_at, job.claimed_at)) <= _SAME_MOMENT
        assert longer.lease_expires_at > job.lease_expires_at
        # The lease ends ``lease`` from now: time since the claim + the new lease.
        span = seconds(longer.lease_expires_at, longer.claimed_at)
        assert 100 - self.ttl_slack <= span <= 100 + 5, longer
        # The old object extends too (it carries the token); a timedelta works; shorter is fine.
        shorter = await q.extend(job, lease=timedelta(seconds=50))
        assert shorter.lease_expires_at is not None
        assert shorter.lease_expires_at < longer.lease_expires_at
        default = await q.extend(shorter)  # the default lease: 30 s
        assert default.lease_expires_at is not None and default.claimed_at is not None
        assert 30 - self.ttl_slack <= seconds(default.lease_expires_at, default.claimed_at)
        assert seconds(default.lease_expires_at, default.claimed_at) <= 30 + 5
        assert await q.stats() == stats_of(claimed=1)
        assert await q.claim() is None
        # An extension keeps a short lease alive past its first expiry.
        await q.put("short")
        short = claimed(await q.claim(lease=self.lease_ttl))
        kept = await q.extend(short, lease=_LONG)
        await asyncio.sleep(self.lease_ttl + self.lease_expiry_margin)
        assert await q.claim() is None
        assert await q.ack(kept) is True
        assert await q.ack(job) is True

    async def test_queue_finished_job_is_never_claimed_again(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x")
        job = claimed(await q.claim(lease=self.lease_ttl))
        assert await q.ack(job, result=1) is True
        assert await q.ack(job, result=2) is False  # no longer claimed
        assert await q.nack(job, retry_in=0) is False
        with pytest.raises(LeaseLostError):
            await q.extend(job)
        await asyncio.sleep(self.lease_ttl + self.lease_expiry_margin)  # past its lease too
        assert await q.claim() is None
        assert await q.stats() == stats_of(done=1)
        result = await q.result(job_id)
        assert result is not None and (result.status, result.value) == ("done", 1)
        # After a nack the claim no longer holds either.
        other = await q.put("y")
        nacked = claimed(await q.claim())
        assert await q.nack(nacked, retry_in=_LONG) is True
        assert await q.nack(nacked, retry_in=0) is False
        assert await q.ack(nacked) is False
        with pytest.raises(LeaseLostError):
            await q.extend(nacked)
        assert await q.stats() == stats_of(delayed=1, done=1)
        assert await q.result(other) is None

    async def test_queue_token_grows_with_every_claim(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=3)
        tokens: list[int] = []
        for attempt in range(1, 4):
            job = claimed(await q.claim(lease=_LONG))
            assert (job.id, job.attempts) == (job_id, attempt)
            tokens.append(job.token)
            assert await q.nack(job, retry_in=0) is True
        assert await q.stats() == stats_of(dead=1)
        assert await q.retry_dead() == 1
        again = claimed(await q.claim(lease=self.lease_ttl))
        assert again.attempts == 1  # attempts reset, the token does not
        tokens.append(again.token)
        after_expiry = await self.claim_soon(q, "claim after the expiry")
        tokens.append(after_expiry.token)
        assert after_expiry.attempts == 2
        assert all(a < b for a, b in itertools.pairwise(tokens)), tokens

    # ------------------------------------------------------------ nack

    async def test_queue_nack_retry_in_and_last_error(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=10)
        first = claimed(await q.claim())
        assert first.last_error is None
        assert await q.nack(first, retry_in=0, error="boom") is True
        second = claimed(await q.claim())
        assert (second.id, second.attempts, second.last_error) == (job_id, 2, "boom")
        assert second.token > first.token
        assert await q.nack(second, retry_in=timedelta(0)) is True  # error=None replaces it
        third = claimed(await q.claim())
        assert (third.attempts, third.last_error) == (3, None)
        unicode_error = "flaky \u00e9 \U0001f600\n" + "x" * 10_000
        assert await q.nack(third, retry_in=0, error=unicode_error) is True
        fourth = claimed(await q.claim())
        assert fourth.last_error == unicode_error
        # A retry in the future: delayed until then.
        assert await q.nack(fourth, retry_in=_LONG, error="later") is True
        assert await q.stats() == stats_of(delayed=1)
        assert await q.claim() is None
        assert await q.result(job_id) is None  # not finished
        # A short retry comes due: ready at nack time + retry_in (server clock).
        other = await q.put("y", max_attempts=10)
        job = claimed(await q.claim())
        assert job.id == other and job.claimed_at is not None
        assert await q.nack(job, retry_in=self.lease_ttl, error="soon") is True
        again = await self.claim_soon(q, "the retry came due")
        assert (again.id, again.attempts, again.last_error) == (other, 2, "soon")
        assert seconds(again.ready_at, job.claimed_at) >= self.lease_ttl - _SAME_MOMENT
        assert again.claimed_at is not None and again.claimed_at >= again.ready_at

    async def test_queue_nack_default_backoff(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        job_id = await q.put("x")
        start = loop.time()
        first = claimed(await q.claim())
        assert await q.nack(first, error="transient") is True
        took = loop.time() - start
        assert first.claimed_at is not None
        second = await self.claim_soon(q, "the backoff came due")
        assert (second.id, second.attempts, second.last_error) == (job_id, 2, "transient")
        # After the first attempt: 1 s plus up to 10% jitter, from the nack.
        gap = seconds(second.ready_at, first.claimed_at)
        assert 1.0 - _SAME_MOMENT <= gap <= 1.1 + took + self.ttl_slack, gap
        assert second.claimed_at is not None and second.claimed_at >= second.ready_at

    # ------------------------------------------------------------ dead letter

    async def test_queue_nack_on_the_last_attempt_goes_dead(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put({"n": 1}, max_attempts=2)
        first = claimed(await q.claim(consumer="a"))
        assert await q.nack(first, retry_in=0, error="first") is True
        last = claimed(await q.claim(consumer="b"))
        assert last.attempts == 2
        assert await q.nack(last, retry_in=0, error="final") is True
        assert await q.stats() == stats_of(dead=1)
        assert await q.claim() is None
        result = assert_dead_result(await q.result(job_id), job_id, "final", 2)
        assert last.claimed_at is not None and result.finished_at >= last.claimed_at
        dead = await q.dead()
        assert [job.id for job in dead] == [job_id]
        assert (dead[0].queue, dead[0].attempts, dead[0].max_attempts) == (q.name, 2, 2)
        assert (dead[0].last_error, dead[0].consumer, dead[0].token) == ("final", "b", last.token)
        assert_same_json(dead[0].payload, {"n": 1})
        assert await q.ack(last) is False
        assert await q.nack(last) is False
        with pytest.raises(LeaseLostError):
            await q.extend(last)
        assert await q.stats() == stats_of(dead=1)
        # max_attempts=1: the first nack is the last.
        once, _ = await self.dead_job(q, "once", error=None)
        assert_dead_result(await q.result(once), once, None, 1)
        assert [job.id for job in await q.dead()] == [job_id, once]

    async def test_queue_lease_expiring_on_the_last_attempt_is_dead_on_every_path(
        self, store: MemoryStore
    ) -> None:
        """Each path is the first to look at its own job, so none relies on another having
        moved the record: they all report it dead from the moment its last lease expired."""
        paths = [
            "result",
            "dead",
            "claim",
            "claim_many",
            "stats",
            "ack",
            "nack",
            "extend",
            "cancel",
            "put",
            "retry_dead",
            "purge_dead",
            "list_queues",
        ]
        queues = {path: store.queue(path) for path in paths}
        jobs: dict[str, Job] = {}
        for path, q in queues.items():
            job_id = await q.put(path, max_attempts=1, dedupe_key="k")
            jobs[path] = claimed(await q.claim(lease=self.lease_ttl))
            assert jobs[path].id == job_id
        # A probe claimed last with the same lease: once it is dead, every other is too.
        probe = store.queue("probe")
        await probe.put("probe", max_attempts=1)
        claimed(await probe.claim(lease=self.lease_ttl))
        await self.until_stats(probe, stats_of(dead=1), "the probe's lease expired")

        def job(path: str) -> Job:
            return jobs[path]

        result = await queues["result"].result(job("result").id)
        got = assert_dead_result(result, job("result").id, None, 1)
        expiry = job("result").lease_expires_at
        assert expiry is not None and abs(seconds(got.finished_at, expiry)) <= _SAME_MOMENT
        dead = await queues["dead"].dead()
        assert [(j.id, j.attempts) for j in dead] == [(job("dead").id, 1)]
        assert await queues["claim"].claim() is None
        assert await queues["claim_many"].claim_many(5) == []
        assert await queues["stats"].stats() == stats_of(dead=1)
        assert await queues["ack"].ack(job("ack"), result="late") is False
        assert await queues["nack"].nack(job("nack"), retry_in=0) is False
        with pytest.raises(LeaseLostError):
            await queues["extend"].extend(job("extend"), lease=_LONG)
        assert await queues["cancel"].cancel(job("cancel").id) is False
        fresh = await queues["put"].put("again", dedupe_key="k")  # its dedupe key is free
        assert fresh != job("put").id
        assert await queues["retry_dead"].retry_dead() == 1
        assert await queues["purge_dead"].purge_dead() == 1
        listed = sorted({*paths, "probe"} - {"purge_dead"})  # purged: no job left
        assert await store.list_queues() == listed
        # Afterwards every path agrees.
        for path, q in queues.items():
            job_id = job(path).id
            if path == "purge_dead":
                assert await q.stats() == EMPTY
                assert await q.result(job_id) is None
                continue
            if path == "retry_dead":
                assert await q.stats() == stats_of(ready=1)
                again = claimed(await q.claim(), path)
                assert (again.id, again.attempts) == (job_id, 1)
                continue
            expected = stats_of(dead=1, ready=1 if path == "put" else 0)
            assert await q.stats() == expected, path
            assert_dead_result(await q.result(job_id), job_id, None, 1)
            assert [j.id for j in await q.dead()] == [job_id], path
            assert await q.ack(job(path)) is False, path
            assert await q.nack(job(path)) is False, path
            assert await q.cancel(job_id) is False, path
            if path == "put":
                assert claimed(await q.claim()).id == fresh
            else:
                assert await q.claim() is None, path

    async def test_queue_retry_dead(self, store: MemoryStore) -> None:
        q = store.queue("q")
        a, job_a = await self.dead_job(q, "a", error="e-a")
        b, job_b = await self.dead_job(q, "b", error="e-b")
        c, _ = await self.dead_job(q, "c", error="e-c")
        pending = await q.put("pending")
        assert await q.stats() == stats_of(ready=1, dead=3)
        assert await q.retry_dead([b]) == 1
        assert await q.stats() == stats_of(ready=2, dead=2)
        assert await q.result(b) is None  # pending again
        assert [j.id for j in await q.dead()] == [a, c]
        retried = claimed(await q.claim(lease=_LONG))  # dead_job's priority: first
        assert retried.id == b
        assert retried.attempts == 1  # reset to 0, then claimed once
        assert retried.token > job_b.token
        assert retried.last_error == "e-b"  # the error of its latest nack is kept
        assert await q.retry_dead([b]) == 0  # not dead any more
        assert await q.retry_dead([_UNKNOWN_ID, pending]) == 0  # unknown, not dead
        assert await q.retry_dead([]) == 0
        assert await q.retry_dead([a, a]) == 1  # an id given twice moves once
        assert await q.retry_dead() == 1  # every remaining one: c
        assert await q.retry_dead() == 0
        assert await q.stats() == stats_of(ready=3, claimed=1)
        assert await q.dead() == []
        # max_attempts still applies after a retry.
        jobs = await q.claim_many(3, lease=_LONG)
        assert {j.id for j in jobs} == {a, c, pending}
        again = next(j for j in jobs if j.id == a)
        assert again.attempts == 1 and again.token > job_a.token
        assert await q.nack(again, retry_in=0, error="again") is True
        assert_dead_result(await q.result(a), a, "again", 1)

    async def test_queue_retry_dead_keeps_a_job_whose_dedupe_key_is_held(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        first, _ = await self.dead_job(q, "first", dedupe_key="k")
        second = await q.put("second", dedupe_key="k")  # the dead job freed the key
        assert second != first
        assert await q.retry_dead() == 0
        assert await q.retry_dead([first]) == 0
        assert [j.id for j in await q.dead()] == [first]
        assert await q.stats() == stats_of(ready=1, dead=1)
        job = claimed(await q.claim())
        assert job.id == second
        assert await q.retry_dead([first]) == 0  # claimed still holds the key
        assert await q.ack(job) is True
        assert await q.retry_dead([first]) == 1  # the key is free now
        assert await q.put("third", dedupe_key="k") == first  # the retried job holds it

    async def test_queue_dead_pages(self, store: MemoryStore) -> None:
        q = store.queue("q")
        ids = await q.put_many(range(5), max_attempts=1)
        jobs = await q.claim_many(5, consumer="c", lease=_LONG)
        for job in jobs:
            assert await q.nack(job, retry_in=0, error=f"e{job.payload}") is True
        await q.put("alive")
        dead = await q.dead()
        assert [j.id for j in dead] == ids
        assert all(isinstance(j, Job) for j in dead)
        assert [j.last_error for j in dead] == [f"e{i}" for i in range(5)]
        assert [j.payload for j in dead] == list(range(5))
        assert all(j.queue == q.name and j.consumer == "c" and j.attempts == 1 for j in dead)
        assert [j.id for j in await q.dead(limit=2)] == ids[:2]
        assert [j.id for j in await q.dead(limit=2, after=ids[1])] == ids[2:4]
        assert [j.id for j in await q.dead(after=ids[3])] == ids[4:]
        assert await q.dead(after=ids[-1]) == []
        assert await q.dead(limit=0) == []
        assert [j.id for j in await q.dead(after="0000000000000000")] == ids
        pages: list[str] = []
        cursor: str | None = None
        while page := await q.dead(limit=2, after=cursor):
            pages += [j.id for j in page]
            cursor = page[-1].id
        assert pages == ids
        assert await store.queue("other").dead() == []  # this queue only

    async def test_queue_purge_dead(self, store: MemoryStore) -> None:
        q = store.queue("q")
        dead_ids = [(await self.dead_job(q, i))[0] for i in range(3)]
        done = await q.put("done", priority=1)
        job = claimed(await q.claim())
        assert job.id == done and await q.ack(job, result="r") is True
        await q.put("claimed", priority=1)
        live = claimed(await q.claim(lease=_LONG))
        ready = await q.put("ready")
        other = store.queue("other")
        other_dead, _ = await self.dead_job(other)
        assert await q.stats() == stats_of(ready=1, claimed=1, dead=3, done=1)
        assert await q.purge_dead() == 3
        assert await q.stats() == stats_of(ready=1, claimed=1, done=1)
        assert await q.dead() == []
        for job_id in dead_ids:
            assert await q.result(job_id) is None
        assert await q.retry_dead(dead_ids) == 0
        assert await q.purge_dead() == 0
        # Nothing else was touched, in this queue or another.
        done_result = await q.result(done)
        assert done_result is not None and done_result.value == "r"
        assert claimed(await q.claim()).id == ready
        assert await q.ack(live) is True
        assert await other.stats() == stats_of(dead=1)
        assert [j.id for j in await other.dead()] == [other_dead]

    # ------------------------------------------------------------ cancel

    async def test_queue_cancel_ready_and_delayed(self, store: MemoryStore) -> None:
        q = store.queue("q")
        ready = await q.put("ready", dedupe_key="r")
        delayed = await q.put("delayed", delay=_LONG, dedupe_key="d")
        kept = await q.put("kept")
        assert await q.stats() == stats_of(ready=2, delayed=1)
        assert await q.cancel(ready) is True
        assert await q.cancel(delayed) is True
        assert await q.stats() == stats_of(ready=1)
        for job_id in (ready, delayed):
            assert await q.result(job_id) is None
            assert await q.cancel(job_id) is False  # gone
            assert await q.retry_dead([job_id]) == 0
        # Never claimed; the dedupe keys are free.
        assert claimed(await q.claim()).id == kept
        assert await q.claim() is None
        assert await q.put("again", dedupe_key="r") not in (ready, delayed)
        assert await q.put("again", dedupe_key="d", delay=_LONG) not in (ready, delayed)

    async def test_queue_cancel_refuses_what_is_not_waiting(self, store: MemoryStore) -> None:
        q = store.queue("q")
        live = await q.put("live", dedupe_key="live")
        job = claimed(await q.claim(lease=_LONG))
        done = await q.put("done")
        done_job = claimed(await q.claim())
        assert await q.ack(done_job, result="r") is True
        dead, _ = await self.dead_job(q, error="e")
        other = store.queue("other")
        elsewhere = await other.put("elsewhere")
        before = await q.stats()
        assert before == stats_of(claimed=1, dead=1, done=1)
        assert await q.cancel(live) is False  # claimed under a live lease
        assert await q.cancel(done) is False
        assert await q.cancel(dead) is False
        assert await q.cancel(_UNKNOWN_ID) is False
        assert await q.cancel(elsewhere) is False  # a job of another queue
        assert await q.stats() == before
        assert await other.stats() == stats_of(ready=1)
        assert await q.ack(job) is True  # the claim still holds
        result = await q.result(done)
        assert result is not None and result.value == "r"
        assert_dead_result(await q.result(dead), dead, "e", 1)

    async def test_queue_cancel_an_expired_claim(self, store: MemoryStore) -> None:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=3, dedupe_key="k")
        stale = claimed(await q.claim(lease=self.lease_ttl))
        await self.until_stats(q, stats_of(ready=1), "the lease expired")
        assert await q.cancel(job_id) is True  # ready again right now
        assert await q.stats() == EMPTY
        assert await q.result(job_id) is None
        assert await q.ack(stale) is False
        assert await q.nack(stale) is False
        with pytest.raises(LeaseLostError):
            await q.extend(stale)
        assert await q.claim() is None
        assert await q.put("y", dedupe_key="k") != job_id

    # ------------------------------------------------------------ dedupe

    async def test_queue_dedupe(self, store: MemoryStore) -> None:
        q = store.queue("q")
        first = await q.put({"n": 1}, dedupe_key="k", priority=1, max_attempts=3)
        # While it is ready: same id, nothing changed (not the payload, priority or delay).
        assert await q.put({"n": 2}, dedupe_key="k", priority=9, delay=_LONG) == first
        assert await q.stats() == stats_of(ready=1)
        other = await q.put({"n": 3}, dedupe_key="other")
        plain = await q.put({"n": 4})
        assert len({first, other, plain}) == 3
        job = claimed(await q.claim())
        assert (job.id, job.priority, job.max_attempts) == (first, 1, 3)
        assert_same_json(job.payload, {"n": 1})
        # While it is claimed: still the same id.
        assert await q.put({"n": 5}, dedupe_key="k") == first
        assert await q.stats() == stats_of(ready=2, claimed=1)
        # While it is delayed (retrying): still the same id.
        assert await q.nack(job, retry_in=_LONG) is True
        assert await q.put({"n": 6}, dedupe_key="k") == first
        delayed = await q.put("delayed", dedupe_key="d", delay=_LONG)
        assert await q.put("again", dedupe_key="d") == delayed
        assert await q.stats() == stats_of(ready=2, delayed=2)

    async def test_queue_dedupe_key_is_free_after_done_dead_or_cancel(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        done = await q.put("a", dedupe_key="done")
        job = claimed(await q.claim())
        assert await q.ack(job) is True
        after_done = await q.put("b", dedupe_key="done")
        assert after_done != done
        dead, _ = await self.dead_job(q, dedupe_key="dead")
        after_dead = await q.put("c", dedupe_key="dead")
        assert after_dead != dead
        cancelled = await q.put("d", dedupe_key="cancel", delay=_LONG)
        assert await q.cancel(cancelled) is True
        after_cancel = await q.put("e", dedupe_key="cancel")
        assert after_cancel != cancelled
        # The new jobs hold the keys now.
        assert await q.put("f", dedupe_key="done") == after_done
        assert await q.put("g", dedupe_key="dead") == after_dead
        assert await q.put("h", dedupe_key="cancel") == after_cancel
        assert await q.stats() == stats_of(ready=3, dead=1, done=1)

    async def test_queue_dedupe_is_per_queue(self, store: MemoryStore) -> None:
        a, b = store.queue("a"), store.queue("b")
        in_a = await a.put("a", dedupe_key="k")
        in_b = await b.put("b", dedupe_key="k")
        assert in_a != in_b
        assert await a.put("a2", dedupe_key="k") == in_a
        assert await b.put("b2", dedupe_key="k") == in_b
        assert await a.stats() == stats_of(ready=1) and await b.stats() == stats_of(ready=1)

    # ------------------------------------------------------------ wait=

    async def test_queue_result_wait_is_woken_by_an_ack(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        job_id = await q.put("x")
        job = claimed(await q.claim(lease=_LONG))
        waiters = [asyncio.ensure_future(q.result(job_id, wait=30)) for _ in range(3)]
        try:
            await asyncio.sleep(0.1)
            assert not any(w.done() for w in waiters), "a result came before the ack"
            acked_at = loop.time()
            assert await q.ack(job, result={"ok": True}) is True
            results = await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, waiters)), 30)
            took = loop.time() - acked_at
        finally:
            for waiter in waiters:
                waiter.cancel()
        for result in results:  # every waiter of the job is woken
            assert result is not None and result.status == "done"
            assert_same_json(result.value, {"ok": True})
        assert took < self.lease_wake_slack, f"woken {took:.3f} s after the ack"
        # A finished job: returned at once.
        start = loop.time()
        result = await q.result(job_id, wait=30)
        assert result is not None and loop.time() - start < self.lease_wake_slack

    async def test_queue_result_wait_is_woken_by_a_death(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        job_id = await q.put("x", max_attempts=1)
        job = claimed(await q.claim(lease=_LONG))
        waiter = asyncio.ensure_future(q.result(job_id, wait=timedelta(seconds=30)))
        try:
            await asyncio.sleep(0.1)
            assert not waiter.done()
            nacked_at = loop.time()
            assert await q.nack(job, retry_in=0, error="gave up") is True
            result = await asyncio.wait_for(asyncio.shield(waiter), 30)
            took = loop.time() - nacked_at
        finally:
            waiter.cancel()
        assert_dead_result(result, job_id, "gave up", 1)
        assert took < self.lease_wake_slack, f"woken {took:.3f} s after the nack"

    async def test_queue_result_wait_sees_a_death_by_lease_expiry(self, store: MemoryStore) -> None:
        """A job whose last lease expires finishes (dead) then; a waiting ``result`` sees it
        within one poll (nobody acks or nacks it to send a notification)."""
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        job_id = await q.put("x", max_attempts=1)
        job = claimed(await q.claim(lease=self.lease_ttl))
        start = loop.time()
        result = await q.result(job_id, wait=30)
        took = loop.time() - start
        got = assert_dead_result(result, job_id, None, 1)
        assert job.lease_expires_at is not None
        assert abs(seconds(got.finished_at, job.lease_expires_at)) <= _SAME_MOMENT
        bound = self.lease_ttl + 1.0 + self.lease_wake_slack
        assert took < bound, f"seen {took:.3f} s after a {self.lease_ttl} s lease"

    async def test_queue_result_wait_runs_out(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        pending = await q.put("x")
        for job_id in (pending, _UNKNOWN_ID):
            start = loop.time()
            assert await q.result(job_id, wait=0.5) is None
            took = loop.time() - start
            assert 0.45 <= took < 0.5 + self.lease_wake_slack, f"{job_id}: {took:.3f} s"
        start = loop.time()
        assert await q.result(pending, wait=0) is None
        assert loop.time() - start < self.lease_wake_slack
        assert await q.stats() == stats_of(ready=1)

    async def test_queue_claim_wait_is_woken_by_a_put(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(q.claim(consumer="w", lease=_LONG, wait=30))
        try:
            await asyncio.sleep(0.1)
            assert not waiter.done(), "a claim returned from an empty queue"
            put_at = loop.time()
            job_id = await q.put("x")
            job = await asyncio.wait_for(asyncio.shield(waiter), 30)
            took = loop.time() - put_at
        finally:
            waiter.cancel()
        job = claimed(job, "the waiting claim")
        assert (job.id, job.consumer) == (job_id, "w")
        assert took < self.lease_wake_slack, f"woken {took:.3f} s after the put"
        # Another queue's put does not satisfy this queue's waiter.
        other = store.queue("other")
        assert await q.put("y", delay=_LONG)
        start = loop.time()
        waiting = asyncio.ensure_future(q.claim(lease=_LONG, wait=0.6))
        await asyncio.sleep(0.1)
        await other.put("elsewhere")
        assert await waiting is None
        assert loop.time() - start >= 0.55
        assert await other.stats() == stats_of(ready=1)

    async def test_queue_claim_wait_every_waiter_gets_a_job(self, store: MemoryStore) -> None:
        """A put of n jobs serves n waiting claims at once (not one, the others polling)."""
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        waiters = [
            asyncio.ensure_future(q.claim(consumer=f"w{i}", lease=_LONG, wait=30)) for i in range(3)
        ]
        try:
            await asyncio.sleep(0.1)
            assert not any(w.done() for w in waiters)
            put_at = loop.time()
            ids = await q.put_many(range(3))
            jobs = await asyncio.wait_for(asyncio.gather(*map(asyncio.shield, waiters)), 30)
            took = loop.time() - put_at
        finally:
            for waiter in waiters:
                waiter.cancel()
        taken = [claimed(job, "a waiting claim").id for job in jobs]
        assert sorted(taken) == ids, "every job to one waiter, every waiter served"
        assert sorted(str(job.consumer) for job in jobs if job is not None) == ["w0", "w1", "w2"]
        assert took < self.lease_wake_slack, f"served {took:.3f} s after the put"

    async def test_queue_claim_many_wait_returns_what_came(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        batch = asyncio.ensure_future(q.claim_many(10, consumer="many", lease=_LONG, wait=30))
        try:
            await asyncio.sleep(0.1)
            assert not batch.done()
            put_at = loop.time()
            ids = await q.put_many(["a", "b"])
            jobs = await asyncio.wait_for(asyncio.shield(batch), 30)
            took = loop.time() - put_at
        finally:
            batch.cancel()
        # As soon as at least one job was claimed: one or both, in order, never more.
        assert 1 <= len(jobs) <= 2 and [j.id for j in jobs] == ids[: len(jobs)]
        assert all(job.consumer == "many" for job in jobs)
        assert took < self.lease_wake_slack, f"served {took:.3f} s after the put"

    async def test_queue_claim_wait_is_woken_when_a_delay_comes_due(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        job_id = await q.put("x", delay=self.lease_ttl)
        start = loop.time()
        job = claimed(await q.claim(lease=_LONG, wait=30), "the waiting claim")
        took = loop.time() - start
        assert job.id == job_id
        assert job.claimed_at is not None and job.claimed_at >= job.ready_at
        # Within 100 ms + one poll (at most 1 s) of the delay.
        bound = self.lease_ttl + 1.0 + self.lease_wake_slack
        assert took < bound, f"claimed {took:.3f} s after a {self.lease_ttl} s delay"

    async def test_queue_claim_wait_is_woken_when_a_retry_or_lease_comes_due(
        self, store: MemoryStore
    ) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        bound = self.lease_ttl + 1.0 + self.lease_wake_slack
        job_id = await q.put("x", max_attempts=5)
        job = claimed(await q.claim())
        assert await q.nack(job, retry_in=self.lease_ttl) is True
        start = loop.time()
        retried = claimed(await q.claim(lease=self.lease_ttl, wait=30), "after the retry")
        took = loop.time() - start
        assert (retried.id, retried.attempts) == (job_id, 2)
        assert took < bound, f"claimed {took:.3f} s after a {self.lease_ttl} s retry"
        # Its short lease expires: a waiting claim takes it over.
        start = loop.time()
        taken = claimed(await q.claim(lease=_LONG, wait=30), "after the lease expired")
        took = loop.time() - start
        assert (taken.id, taken.attempts) == (job_id, 3) and taken.token > retried.token
        assert taken.claimed_at is not None and retried.lease_expires_at is not None
        assert taken.claimed_at >= retried.lease_expires_at - timedelta(seconds=_SAME_MOMENT)
        assert took < bound, f"claimed {took:.3f} s after a {self.lease_ttl} s lease"

    async def test_queue_claim_wait_runs_out(self, store: MemoryStore) -> None:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        await q.put("delayed", delay=_LONG)
        await q.put("claimed")
        job = claimed(await q.claim(lease=_LONG))
        for wait in (0.5, timedelta(milliseconds=500)):
            start = loop.time()
            assert await q.claim(wait=wait) is None
            took = loop.time() - start
            assert 0.45 <= took < 0.5 + self.lease_wake_slack, f"wait={wait!r}: {took:.3f} s"
        start = loop.time()
        assert await q.claim_many(3, wait=0.5) == []
        assert 0.45 <= loop.time() - start < 0.5 + self.lease_wake_slack
        assert await q.claim(wait=0) is None
        assert await q.stats() == stats_of(delayed=1, claimed=1)
        assert await q.ack(job) is True

    # ------------------------------------------------------------ results

    async def test_queue_result_ttl(self, store: MemoryStore) -> None:
        q = store.queue("q")
        short = await q.put("short", dedupe_key="short")
        kept = await q.put("kept")
        jobs = await q.claim_many(2)
        assert [j.id for j in jobs] == [short, kept]
        assert await q.ack(jobs[0], result="gone soon", result_ttl=self.lease_ttl) is True
        assert await q.ack(jobs[1], result="kept", result_ttl=timedelta(hours=1)) is True
        await self.until(lambda: q.result(short), lambda r: r is None, "the result expired")
        await self.until_stats(q, stats_of(done=1), "the expired result is not counted")
        result = await q.result(kept)
        assert result is not None and result.value == "kept"
        assert await q.claim() is None  # expired, still never claimed again
        assert await q.ack(jobs[0]) is False
        assert await q.put("new", dedupe_key="short") != short

    async def test_queue_result_is_per_queue(self, store: MemoryStore) -> None:
        a, b = store.queue("a"), store.queue("b")
        job_id = await a.put("x")
        job = claimed(await a.claim())
        assert await a.ack(job, result="r") is True
        assert await b.result(job_id) is None
        assert await b.result(job_id, wait=0.2) is None
        result = await a.result(job_id)
        assert result is not None and result.value == "r"

    # ------------------------------------------------------------ stats / list_queues

    async def test_queue_stats_count_each_state(self, store: MemoryStore) -> None:
        q, other = store.queue("q"), store.queue("other")
        assert await q.stats() == EMPTY
        await self.dead_job(q)
        await q.put("done", priority=10)
        done = claimed(await q.claim())
        assert await q.ack(done) is True
        await q.put("claimed", priority=10)
        claimed(await q.claim(lease=_LONG))
        await q.put_many(["r1", "r2"])
        await q.put("delayed", delay=_LONG)
        await other.put("elsewhere")
        stats = await q.stats()
        assert isinstance(stats, QueueStats)
        assert stats == stats_of(ready=2, delayed=1, claimed=1, dead=1, done=1)
        assert all(type(getattr(stats, f.name)) is int for f in dataclasses.fields(stats))
        assert await other.stats() == stats_of(ready=1)
        assert await store.queue("unused").stats() == EMPTY

    async def test_queue_list_queues(self, store: MemoryStore) -> None:
        assert await store.list_queues() == []
        store.queue("never used")  # no I/O, nothing created
        for name in ("b", "a", "c"):
            await store.queue(name).put(name)
        assert await store.list_queues() == ["a", "b", "c"]
        c = store.queue("c")
        job = claimed(await c.claim())
        assert await c.nack(job, retry_in=_LONG) is True
        assert await store.list_queues() == ["a", "b", "c"]
        assert await c.cancel(job.id) is True  # its only job: no longer listed
        assert await store.list_queues() == ["a", "b"]
        done = store.queue("done")
        await done.put("x")
        assert await done.ack(claimed(await done.claim()), result_ttl=_LONG) is True
        await self.dead_job(store.queue("dead"))
        expiring = store.queue("expiring")
        await expiring.put("x")
        job = claimed(await expiring.claim())
        assert await expiring.ack(job, result_ttl=self.lease_ttl) is True
        await self.until(
            lambda: store.list_queues(),
            lambda names: names == ["a", "b", "dead", "done"],
            "a queue whose only result expired is no longer listed",
        )
        assert await store.queue("dead").purge_dead() == 1
        assert await store.list_queues() == ["a", "b", "done"]
        async with self.sibling_namespaces(store, "x") as (other,):
            await other.queue("z").put(1)
            assert await other.list_queues() == ["z"]
            assert await store.list_queues() == ["a", "b", "done"]

    # ------------------------------------------------------------ namespaces, key-value

    async def test_queue_namespaces_are_separate(self, store: MemoryStore) -> None:
        async with self.sibling_namespaces(store, "x") as (other,):
            mine, theirs = store.queue("q"), other.queue("q")
            assert theirs.namespace == other.namespace
            mine_id = await mine.put("mine", dedupe_key="k")
            assert await theirs.stats() == EMPTY
            assert await theirs.claim() is None
            assert await theirs.dead() == []
            await theirs.put("theirs", dedupe_key="k")  # dedupe keys are per namespace too
            job_m = claimed(await mine.claim(lease=_LONG))
            job_t = claimed(await theirs.claim(lease=_LONG))
            assert (job_m.payload, job_m.namespace) == ("mine", store.namespace)
            assert (job_t.payload, job_t.namespace) == ("theirs", other.namespace)
            # A claim of one namespace is refused by the other's queue.
            with pytest.raises(InvalidArgumentError):
                await theirs.ack(job_m)
            with pytest.raises(InvalidArgumentError):
                await theirs.nack(job_m)
            with pytest.raises(InvalidArgumentError):
                await theirs.extend(job_m)
            assert await theirs.stats() == stats_of(claimed=1)
            assert await mine.ack(job_m, result="m") is True
            assert await theirs.stats() == stats_of(claimed=1)
            assert await other.list_queues() == ["q"]
            # A view on the same namespace sees the same queues.
            same = store.with_namespace(store.namespace)
            try:
                view = same.queue("q")
                result = await view.result(mine_id)
                assert result is not None and result.value == "m"
                assert await view.stats() == stats_of(done=1)
                assert await same.list_queues() == ["q"]
            finally:
                await same.close()
            assert await theirs.ack(job_t) is True

    async def test_queue_is_invisible_to_key_value(self, store: MemoryStore) -> None:
        ns = store.namespace
        q = store.queue("x")
        await self.dead_job(q)
        await q.put("done", priority=5)
        assert await q.ack(claimed(await q.claim()), result="r") is True
        await q.put("claimed", priority=5)
        claimed(await q.claim(lease=_LONG))
        await q.put("ready", dedupe_key="x")
        before = await q.stats()
        assert await store.keys() == []
        assert await store.exists("x") is False
        assert await store.search("*") == {}
        assert (await store.stats()).keys == 0
        assert await store.namespaces(ns) == []
        # A key of the same name is independent, and clear() clears key-value entries only.
        assert await store.set_if_absent("x", "key") is True
        assert await store.keys() == ["x"]
        assert await store.clear() == 1
        assert await q.stats() == before
        assert await store.list_queues() == ["x"]
        # A lease and an agent named like the queue are separate too.
        lease = await store.leases.acquire("x", owner="a", ttl=30)
        assert lease is not None
        await store.agents.register("x", ttl=30)
        assert await q.stats() == before
        assert await store.list_queues() == ["x"]
        assert claimed(await q.claim()).payload == "ready"
        assert await store.leases.release(lease) is True
        assert await store.agents.deregister("x") is True

    # ------------------------------------------------------------ put_many

    async def test_queue_put_many_applies_its_options(self, store: MemoryStore) -> None:
        q = store.queue("q")
        assert await q.put_many([]) == []
        assert await q.stats() == EMPTY
        ids = await q.put_many(iter(["a", "b", "c"]), priority=3, max_attempts=2)
        delayed = await q.put_many([1, 2], delay=_LONG, priority=9)
        assert len(set(ids + delayed)) == 5
        assert await q.stats() == stats_of(ready=3, delayed=2)
        jobs = await q.claim_many(5, lease=_LONG)
        assert [j.id for j in jobs] == ids  # in put order, the delayed ones not yet
        assert all((j.priority, j.max_attempts) == (3, 2) for j in jobs)
        assert [j.payload for j in jobs] == ["a", "b", "c"]

    async def test_queue_put_many_is_all_or_nothing(self, store: MemoryStore) -> None:
        q = store.queue("q")
        await q.put("before")
        too_large = "x" * self.max_value_bytes
        for bad, error in [
            ({1, 2}, SerializationError),
            (float("nan"), SerializationError),
            ("\x00", SerializationError),
            (too_large, ValueTooLargeError),
        ]:
            with pytest.raises(error):
                await q.put_many([1, 2, bad, 3])
            with pytest.raises(error):
                await q.put_many(x for x in [1, bad])
            with pytest.raises(error):
                await q.put_many([bad])
        assert await q.stats() == stats_of(ready=1)
        assert [j.payload for j in await q.claim_many(10)] == ["before"]

    async def test_queue_put_many_ten_thousand_jobs(self, store: MemoryStore) -> None:
        q = store.queue("q")
        n = 10_000
        ids = await q.put_many({"n": i} for i in range(n))
        assert len(ids) == n and len(set(ids)) == n
        assert all(_JOB_ID.fullmatch(job_id) for job_id in ids)
        assert ids == sorted(ids)
        assert await q.stats() == stats_of(ready=n)
        first = await q.claim_many(3, lease=_LONG)
        assert [j.id for j in first] == ids[:3]
        assert [j.payload for j in first] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert await q.put("after") > ids[-1]

    # ------------------------------------------------------------ names

    async def test_queue_names_consumers_and_dedupe_keys_round_trip(
        self, store: MemoryStore
    ) -> None:
        names = GOOD_QUEUE_NAMES
        for index, name in enumerate(names):
            q = store.queue(name)
            assert q.name == name
            key = GOOD_KEYS[index % len(GOOD_KEYS)]
            owner = GOOD_KEYS[(index + 1) % len(GOOD_KEYS)]  # consumers follow the key rules
            job_id = await q.put(name, dedupe_key=key)
            assert await q.put("again", dedupe_key=key) == job_id
            job = claimed(await q.claim(consumer=owner, lease=_LONG), name)
            assert (job.id, job.queue, job.consumer, job.payload) == (job_id, name, owner, name)
            assert await q.ack(job, result=key) is True
            result = await q.result(job_id)
            assert result is not None and result.value == key
        assert await store.list_queues() == sorted(set(names))

    # ------------------------------------------------------------ bad input

    async def test_queue_bad_input_changes_nothing(self, store: MemoryStore) -> None:
        q = store.queue("q")
        await q.put("ready", dedupe_key="k")
        await q.put("delayed", delay=_LONG)
        await q.put("claimed", priority=1)
        job = claimed(await q.claim(lease=_LONG))
        before = await q.stats()
        names_before = await store.list_queues()
        calls: list[tuple[str, type[BaseException], Callable[[], Awaitable[object]]]] = []

        def add(
            name: str, error: type[BaseException], call: Callable[[], Awaitable[object]]
        ) -> None:
            calls.append((name, error, call))

        def bind(
            fn: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any
        ) -> Callable[[], Awaitable[object]]:
            return lambda: fn(*args, **kwargs)

        for i, value in enumerate(REFUSED_VALUES):
            add(f"put(payload #{i})", SerializationError, bind(q.put, value))
            add(f"ack(result #{i})", SerializationError, bind(q.ack, job, value))
        too_large = "x" * self.max_value_bytes
        add("put(too large)", ValueTooLargeError, bind(q.put, too_large))
        add("ack(result too large)", ValueTooLargeError, bind(q.ack, job, too_large))
        for i, bad in enumerate(BAD_PRIORITIES):
            add(f"put(priority #{i})", InvalidArgumentError, bind(q.put, 1, priority=bad))
            add(
                f"put_many(priority #{i})",
                InvalidArgumentError,
                bind(q.put_many, [1], priority=bad),
            )
        for i, bad in enumerate(BAD_MAX_ATTEMPTS):
            add(f"put(max_attempts #{i})", InvalidArgumentError, bind(q.put, 1, max_attempts=bad))
            add(
                f"put_many(max_attempts #{i})",
                InvalidArgumentError,
                bind(q.put_many, [1], max_attempts=bad),
            )
        for i, bad in enumerate(BAD_DURATIONS):
            add(f"put(delay #{i})", InvalidArgumentError, bind(q.put, 1, delay=bad))
            add(f"put_many(delay #{i})", InvalidArgumentError, bind(q.put_many, [1], delay=bad))
            add(f"nack(retry_in #{i})", InvalidArgumentError, bind(q.nack, job, retry_in=bad))
        for i, bad in enumerate(BAD_TTLS):
            add(f"claim(lease #{i})", InvalidArgumentError, bind(q.claim, lease=bad))
            add(f"claim_many(lease #{i})", InvalidArgumentError, bind(q.claim_many, 1, lease=bad))
            add(f"extend(lease #{i})", InvalidArgumentError, bind(q.extend, job, lease=bad))
            add(f"ack(result_ttl #{i})", InvalidArgumentError, bind(q.ack, job, result_ttl=bad))
        for i, bad in enumerate(BAD_WAITS):
            add(f"claim(wait #{i})", InvalidArgumentError, bind(q.claim, wait=bad))
            add(f"result(wait #{i})", InvalidArgumentError, bind(q.result, job.id, wait=bad))
        for i, bad in enumerate(BAD_NAMES):
            add(f"put(dedupe_key #{i})", InvalidKeyError, bind(q.put, 1, dedupe_key=bad))
            add(f"claim(consumer #{i})", InvalidKeyError, bind(q.claim, consumer=bad))
            add(f"claim_many(consumer #{i})", InvalidKeyError, bind(q.claim_many, 2, consumer=bad))
        for i, bad in enumerate(BAD_JOB_IDS):
            add(f"cancel(id #{i})", InvalidArgumentError, bind(q.cancel, bad))
            add(f"result(id #{i})", InvalidArgumentError, bind(q.result, bad))
            add(f"retry_dead(id #{i})", InvalidArgumentError, bind(q.retry_dead, [bad]))
            if bad is not None:
                add(f"dead(after #{i})", InvalidArgumentError, bind(q.dead, after=bad))
        add("claim_many(-1)", InvalidArgumentError, bind(q.claim_many, -1))
        # A job of another queue, or of another namespace, is refused by this queue.
        other_queue = dataclasses.replace(job, queue="other")
        other_ns = dataclasses.replace(job, namespace=store.namespace + "x")
        for what, foreign in (("another queue", other_queue), ("another namespace", other_ns)):
            add(f"ack(job of {what})", InvalidArgumentError, bind(q.ack, foreign))
            add(f"nack(job of {what})", InvalidArgumentError, bind(q.nack, foreign))
            add(f"extend(job of {what})", InvalidArgumentError, bind(q.extend, foreign))
        malformed = [
            dataclasses.replace(job, id="XYZ"),
            dataclasses.replace(job, token=0),
            dataclasses.replace(job, token=-1),
        ]
        for i, bad in enumerate(malformed):
            add(f"ack(malformed job #{i})", InvalidArgumentError, bind(q.ack, bad))
            add(f"nack(malformed job #{i})", InvalidArgumentError, bind(q.nack, bad))
            add(f"extend(malformed job #{i})", InvalidArgumentError, bind(q.extend, bad))

        for name, error, call in calls:
            try:
                result = await call()
            except error:
                continue
            except Exception as exc:
                raise AssertionError(
                    f"{name} raised {type(exc).__name__}: {exc}, expected {error.__name__}"
                ) from exc
            raise AssertionError(f"{name} returned {result!r}, expected {error.__name__}")
        for i, bad in enumerate(BAD_QUEUE_NAMES):
            with pytest.raises(InvalidKeyError):
                store.queue(bad)
                raise AssertionError(f"queue name #{i} was accepted")

        assert await q.stats() == before
        assert await store.list_queues() == names_before
        assert await q.dead() == []
        # The claim is untouched: it still holds, and the queue still has its jobs.
        assert await q.ack(job) is True
        assert claimed(await q.claim()).payload == "ready"
        assert await q.put("again", dedupe_key="k") != job.id
