"""The work queue front end refuses bad input before any I/O, enqueueing nothing.

"Before any I/O" is shown three ways: on a :class:`~fleetmem.queues.Queue` whose backend records
and refuses every call (a bad call raises its own error and the backend saw nothing, while a
good call of the same shape reaches it); on a store whose server is unreachable (a bad call
raises its own error, a good one ``BackendUnavailableError``); on a closed store (its own
error rather than ``StoreClosedError``). On an open in-memory store a bad call changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest

from fleetmem import InMemoryStore, MemoryStore
from fleetmem._notify import Notifier
from fleetmem.backends.seam import NewJob, QueueBackend
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
)
from fleetmem.protocol import Job, JobResult, Lease, QueueStats
from fleetmem.queues import MAX_ERROR_BYTES, Queue
from fleetmem.testing.conformance._expiry import BAD_TTLS
from fleetmem.testing.conformance._queues import (
    BAD_DURATIONS,
    BAD_JOB_IDS,
    BAD_MAX_ATTEMPTS,
    BAD_NAMES,
    BAD_PRIORITIES,
    BAD_QUEUE_NAMES,
    BAD_WAITS,
)
from fleetmem.testing.conformance._values import REFUSED_VALUES

Call = tuple[str, type[BaseException], Callable[[], Awaitable[object]]]

NS = "frontend-ns"
MAX_VALUE_BYTES = 8 * 1024 * 1024
BAD_LIMITS: list[Any] = [-1, -(2**70), 1.5, "1", True, None, [1]]
BAD_ERRORS: list[Any] = [1, b"bytes", ["e"], "lone \ud800", "x" * (MAX_ERROR_BYTES + 1)]


def _job(namespace: str = NS, queue: str = "q", token: int = 7) -> Job:
    now = datetime.now(timezone.utc)
    return Job(
        id="0000000000000001",
        queue=queue,
        payload={"n": 1},
        priority=0,
        attempts=1,
        max_attempts=5,
        enqueued_at=now,
        ready_at=now,
        claimed_at=now,
        lease_expires_at=now + timedelta(seconds=30),
        consumer="agent-7",
        token=token,
        last_error=None,
        namespace=namespace,
    )


def bad_calls(q: Queue, job: Job) -> list[Call]:
    """Every bad call of the queue front end, with the error it must raise.

    ``job`` is a claim of ``q`` (live or not: it is never used for I/O here).
    """
    calls: list[Call] = []

    def add(name: str, error: type[BaseException], call: Callable[[], Awaitable[object]]) -> None:
        calls.append((name, error, call))

    too_large = "x" * MAX_VALUE_BYTES  # over max_value_bytes once encoded (the quotes)
    # Payloads and results.
    for i, value in enumerate(REFUSED_VALUES):
        add(f"put(payload #{i})", SerializationError, partial(q.put, value))
        add(f"put_many(payload #{i})", SerializationError, partial(q.put_many, [1, value, 2]))
        add(f"ack(result #{i})", SerializationError, partial(q.ack, job, value))
    add("put(too large)", ValueTooLargeError, partial(q.put, too_large))
    add("put_many(too large)", ValueTooLargeError, partial(q.put_many, [1, too_large]))
    add("ack(result too large)", ValueTooLargeError, partial(q.ack, job, too_large))
    # put / put_many options.
    for i, bad in enumerate([*BAD_PRIORITIES, 2**31 + 1]):
        add(f"put(priority #{i})", InvalidArgumentError, partial(q.put, 1, priority=bad))
        add(
            f"put_many(priority #{i})", InvalidArgumentError, partial(q.put_many, [1], priority=bad)
        )
    for i, bad in enumerate([*BAD_MAX_ATTEMPTS, 2**31, 2**64]):
        add(f"put(max_attempts #{i})", InvalidArgumentError, partial(q.put, 1, max_attempts=bad))
        add(
            f"put_many(max_attempts #{i})",
            InvalidArgumentError,
            partial(q.put_many, [1], max_attempts=bad),
        )
    for i, bad in enumerate(BAD_DURATIONS):
        add(f"put(delay #{i})", InvalidArgumentError, partial(q.put, 1, delay=bad))
        add(f"put_many(delay #{i})", InvalidArgumentError, partial(q.put_many, [1], delay=bad))
        add(f"nack(retry_in #{i})", InvalidArgumentError, partial(q.nack, job, retry_in=bad))
    for i, bad in enumerate(BAD_NAMES):
        add(f"put(dedupe_key #{i})", InvalidKeyError, partial(q.put, 1, dedupe_key=bad))
        add(f"claim(consumer #{i})", InvalidKeyError, partial(q.claim, consumer=bad))
        add(
            f"claim(consumer #{i}, wait)",
            InvalidKeyError,
            partial(q.claim, consumer=bad, wait=1),
        )
        add(f"claim_many(consumer #{i})", InvalidKeyError, partial(q.claim_many, 2, consumer=bad))
    not_iterables: list[Any] = [1, None, 1.5, "payload", b"payload", {"a": 1}]
    for i, bad in enumerate(not_iterables):
        add(f"put_many(payloads #{i})", InvalidArgumentError, partial(q.put_many, bad))
    # Leases, waits, n.
    for i, bad in enumerate(BAD_TTLS):
        add(f"claim(lease #{i})", InvalidArgumentError, partial(q.claim, lease=bad))
        add(f"claim(lease #{i}, wait)", InvalidArgumentError, partial(q.claim, lease=bad, wait=1))
        add(f"claim_many(lease #{i})", InvalidArgumentError, partial(q.claim_many, 1, lease=bad))
        add(f"extend(lease #{i})", InvalidArgumentError, partial(q.extend, job, lease=bad))
        add(f"ack(result_ttl #{i})", InvalidArgumentError, partial(q.ack, job, result_ttl=bad))
    for i, bad in enumerate(BAD_WAITS):
        add(f"claim(wait #{i})", InvalidArgumentError, partial(q.claim, wait=bad))
        add(f"claim_many(wait #{i})", InvalidArgumentError, partial(q.claim_many, 1, wait=bad))
        add(f"result(wait #{i})", InvalidArgumentError, partial(q.result, job.id, wait=bad))
    for i, bad in enumerate(BAD_LIMITS):
        if bad is not None:
            add(f"claim_many(n #{i})", InvalidArgumentError, partial(q.claim_many, bad))
        add(f"dead(limit #{i})", InvalidArgumentError, partial(q.dead, bad))
    # Job ids.
    for i, bad in enumerate(BAD_JOB_IDS):
        add(f"cancel(id #{i})", InvalidArgumentError, partial(q.cancel, bad))
        add(f"result(id #{i})", InvalidArgumentError, partial(q.result, bad))
        add(f"result(id #{i}, wait)", InvalidArgumentError, partial(q.result, bad, wait=1))
        add(f"retry_dead(id #{i})", InvalidArgumentError, partial(q.retry_dead, ["0" * 16, bad]))
        if bad is not None:
            add(f"dead(after #{i})", InvalidArgumentError, partial(q.dead, after=bad))
    bad_id_lists: list[Any] = [1, "0000000000000001", b"ids"]
    for i, bad in enumerate(bad_id_lists):
        add(f"retry_dead(ids #{i})", InvalidArgumentError, partial(q.retry_dead, bad))
    # nack's error.
    for i, bad in enumerate(BAD_ERRORS):
        add(f"nack(error #{i})", InvalidArgumentError, partial(q.nack, job, error=bad))
    # Not a claim: not a Job, a job of another queue or namespace, or one no claim can give.
    now = datetime.now(timezone.utc)
    lease = Lease("q", "agent-7", 7, now, now + timedelta(seconds=30), NS)
    result = JobResult(job.id, "done", None, None, 1, now)
    not_jobs: list[Any] = [job.id, 7, None, {"id": job.id, "token": 7}, lease, result, object()]
    bad_tokens: list[Any] = [0, -1, 2**63, 2**70, True, 1.0, "7", None]
    malformed: list[Any] = [
        _job(queue="other"),
        _job(namespace="other-ns"),
        *(replace(job, token=bad) for bad in bad_tokens),
        *(replace(job, id=bad) for bad in BAD_JOB_IDS),
    ]
    for i, bad in enumerate([*not_jobs, *malformed]):
        add(f"ack(not a claim #{i})", InvalidArgumentError, partial(q.ack, bad))
        add(f"nack(not a claim #{i})", InvalidArgumentError, partial(q.nack, bad))
        add(
            f"nack(not a claim #{i}, retry_in)",
            InvalidArgumentError,
            partial(q.nack, bad, retry_in=1),
        )
        add(f"extend(not a claim #{i})", InvalidArgumentError, partial(q.extend, bad))
    return calls


def good_calls(q: Queue, job: Job) -> list[Callable[[], Awaitable[object]]]:
    """One good call of every method (the shapes of :func:`bad_calls`)."""
    return [
        partial(q.put, {"n": 1}, priority=2**31 - 1, delay=timedelta(0), dedupe_key="k"),
        partial(q.put_many, [1, 2], priority=-(2**31), delay=0, max_attempts=1),
        partial(q.claim, consumer="c" * 1024, lease=0.001),
        partial(q.claim_many, 3, lease=timedelta(seconds=1)),
        partial(q.extend, job, lease=1),
        partial(q.ack, job, {"ok": True}, result_ttl=1),
        partial(q.nack, job, retry_in=0, error="e" * MAX_ERROR_BYTES),
        partial(q.nack, job),
        partial(q.cancel, job.id),
        partial(q.result, job.id),
        q.stats,
        partial(q.dead, 1, after=job.id),
        partial(q.retry_dead, [job.id]),
        q.retry_dead,
        q.purge_dead,
    ]


async def assert_refused(calls: list[Call]) -> None:
    """Every call raises its own error (or a subclass of it), never another one."""
    assert len(calls) > 500
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


def assert_bad_names_refused(store: MemoryStore) -> None:
    for i, bad in enumerate(BAD_QUEUE_NAMES):
        with pytest.raises(InvalidKeyError):
            store.queue(bad)
            raise AssertionError(f"queue name #{i} was accepted")


# ---------------------------------------------------------------------------- a backend


class Reached(Exception):
    """A call reached the backend."""


class RecordingQueues(QueueBackend):
    """A queue backend that records each call and refuses it: any call is I/O."""

    def __init__(self) -> None:
        super().__init__(namespace=NS, notifier=Notifier())
        self.calls: list[str] = []

    def _reach(self, name: str) -> Reached:
        self.calls.append(name)
        return Reached(name)

    async def listen(self) -> None:
        raise self._reach("listen")

    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        raise self._reach("put")

    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        raise self._reach("claim")

    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        raise self._reach("extend")

    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        raise self._reach("ack")

    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        raise self._reach("nack")

    async def cancel(self, queue: str, job_id: str) -> bool:
        raise self._reach("cancel")

    async def result(self, queue: str, job_id: str) -> JobResult | None:
        raise self._reach("result")

    async def stats(self, queue: str) -> QueueStats:
        raise self._reach("stats")

    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        raise self._reach("dead")

    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        raise self._reach("retry_dead")

    async def purge_dead(self, queue: str) -> int:
        raise self._reach("purge_dead")

    async def list_queues(self) -> list[str]:
        raise self._reach("list_queues")


async def test_bad_input_never_reaches_the_backend() -> None:
    backend = RecordingQueues()
    q = Queue(backend, "q", lambda: None, MAX_VALUE_BYTES)
    job = _job()
    await assert_refused(bad_calls(q, job))
    assert backend.calls == []
    # Good calls of the same shapes do reach it.
    for call in good_calls(q, job):
        with pytest.raises(Reached):
            await call()
    assert len(backend.calls) == len(good_calls(q, job))
    for i, bad in enumerate(BAD_QUEUE_NAMES):
        with pytest.raises(InvalidKeyError):
            Queue(backend, bad, lambda: None, MAX_VALUE_BYTES)
            raise AssertionError(f"queue name #{i} was accepted")


async def test_calls_that_need_no_io_do_none() -> None:
    backend = RecordingQueues()
    q = Queue(backend, "q", lambda: None, MAX_VALUE_BYTES)
    assert await q.put_many([]) == []
    assert await q.put_many(iter(())) == []
    assert await q.claim_many(0) == []
    assert await q.claim_many(0, wait=5) == []
    assert await q.dead(0) == []
    assert await q.retry_dead([]) == 0
    assert backend.calls == []


# ---------------------------------------------------------------------------- stores


def _unreachable(kind: str) -> MemoryStore:
    if kind == "redis":
        pytest.importorskip("redis.asyncio")
        from fleetmem.backends.redis import RedisStore

        return RedisStore.from_url("redis://127.0.0.1:1/0", namespace=NS)
    if kind == "postgres":
        pytest.importorskip("asyncpg")
        from fleetmem.backends.postgres import PostgresStore

        return PostgresStore.from_url("postgresql://u@127.0.0.1:1/db", namespace=NS)
    pytest.importorskip("redis.asyncio")
    pytest.importorskip("asyncpg")
    from fleetmem.backends.hybrid import HybridStore

    return HybridStore.from_urls(
        "postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0", namespace=NS
    )


@pytest.fixture(params=["redis", "postgres", "hybrid"])
async def unreachable(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore]:
    """A store whose server refuses every connection, never connected."""
    store = _unreachable(request.param)
    try:
        yield store
    finally:
        await store.close()


async def test_bad_input_never_reaches_the_server(unreachable: MemoryStore) -> None:
    store = unreachable
    try:
        q = store.queue("q")
    except ConfigurationError:
        pytest.skip(f"the {store.backend} backend has no work queues yet")
    job = _job()
    for call in [*good_calls(q, job), store.list_queues]:
        with pytest.raises(BackendUnavailableError):
            await call()
    await assert_refused(bad_calls(q, job))
    assert_bad_names_refused(store)


async def test_bad_input_is_refused_before_the_closed_check() -> None:
    store = InMemoryStore(namespace=NS)
    q = store.queue("q")
    job = _job()
    await store.close()
    for call in [*good_calls(q, job), store.list_queues, store.queue("other").stats]:
        with pytest.raises(StoreClosedError):
            await call()
    await assert_refused(bad_calls(q, job))
    assert_bad_names_refused(store)


async def test_bad_input_changes_nothing() -> None:
    async with InMemoryStore(namespace=NS) as store:
        q = store.queue("q")
        await q.put("ready", dedupe_key="k")
        await q.put("delayed", delay=3600)
        await q.put("claimed", priority=1)
        dead_id = await q.put("dead", priority=2, max_attempts=1)
        dead = await q.claim()
        assert dead is not None and dead.id == dead_id
        assert await q.nack(dead, error="e") is True
        live = await q.claim(lease=60)
        assert live is not None and live.payload == "claimed"
        before = await q.stats()
        assert before == QueueStats(ready=1, delayed=1, claimed=1, dead=1, done=0)

        await assert_refused(bad_calls(q, live))
        assert_bad_names_refused(store)

        assert await q.stats() == before
        assert await store.list_queues() == ["q"]
        assert [job.id for job in await q.dead()] == [dead_id]
        assert await q.result(live.id) is None
        # The claim still holds (nothing above consumed it) and the jobs are where they were.
        assert await q.ack(live, result="ok") is True
        nxt = await q.claim()
        assert nxt is not None and nxt.payload == "ready"
        assert await q.put("again", dedupe_key="k") == nxt.id
        assert await q.stats() == QueueStats(ready=0, delayed=1, claimed=1, dead=1, done=1)


async def test_a_hand_built_job_with_huge_or_bad_attempts() -> None:
    """The default backoff caps its exponent before computing a power (a forged ``attempts``
    of 10**12 must not stall the event loop), and bad attempts are refused before any I/O."""
    async with InMemoryStore() as store:
        q = store.queue("q")
        await q.put("x")
        job = await q.claim(lease=60)
        assert job is not None
        bad_attempts: list[Any] = [-1, True, 1.5, None]
        for bad in bad_attempts:
            with pytest.raises(InvalidArgumentError, match="attempts"):
                await q.nack(replace(job, attempts=bad))
        assert await asyncio.wait_for(q.nack(replace(job, attempts=10**12)), 30)
        assert (await q.stats()).delayed == 1  # retried after the longest backoff


async def test_a_nack_error_holding_nul_is_refused_before_any_io() -> None:
    """PostgreSQL text cannot hold U+0000: refused on every backend alike, the claim kept."""
    async with InMemoryStore() as store:
        q = store.queue("q")
        await q.put("x")
        job = await q.claim(lease=60)
        assert job is not None
        with pytest.raises(InvalidArgumentError, match="NUL"):
            await q.nack(job, error="boom\x00")
        assert (await q.stats()).claimed == 1
        assert await q.nack(job, error="boom") is True
