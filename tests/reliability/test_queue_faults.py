"""Work queues under faults: producers and consumers killed with SIGKILL, servers killed and
started again, and the wake-ups that cross processes.

Servers that are killed are the harness's own, started for these tests
(``fleetmem_postgres_factory``, ``fleetmem_redis_factory``); the other tests use the session's
servers, and nothing here touches the machine's own services. Child processes are
``queue_worker.py``: every line they print is flushed at once, so an id the test read was
printed after its ``put`` returned, and survives whatever kills the process after.

Durability is promised on PostgreSQL, SQLite and the hybrid (whose queues live in PostgreSQL).
Redis is only as durable as its persistence: the Redis crash test runs a server with
``appendonly yes`` and ``appendfsync always``; with less (or none) a crash loses what was not
yet written, and the queue with it.

The assertions are on ids, tokens, attempts and the server's clock; the few on this machine's
clock have seconds of slack, so a loaded machine does not fail them. The wake-up tests assert a
lag under 0.9 s (the contract says 100 ms on an idle machine) and print what they measured.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lease_worker import WorkerProcess, open_spec_store, store_spec
from queue_worker import job_from_json

from fleetmem import BackendUnavailableError, Job, LeaseLostError, QueueStats
from fleetmem.testing.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("queue_worker.py")
QUEUE = "faults"
#: The killed consumer's lease (seconds).
LEASE = 2.0
#: Slack (seconds) for a loaded machine.
SLACK = 1.0
#: The most a waiting claim may take after a lease ran out: one poll, plus generous slack.
LATE = 5.0
#: The producer's lease on the jobs it claims (and acks at once).
PRODUCER_LEASE = 1.0
#: The producer's put_many size, and how often (in put calls) it claims and acks a job.
BATCH = 50
ACK_EVERY = 4
#: The most a wake-up across processes may take here (the contract: 100 ms, idle machine).
WAKE_LIMIT = 0.9
#: When the other process puts or acks: this long after the waiter's second try, 1 s after
#: its first (its poll interval), so that a waiter that only polled would take nearly a
#: second more, and only a notification wakes it within WAKE_LIMIT.
WAKE_PHASES = (0.02, 0.05, 0.1)

T = TypeVar("T")


class Child(WorkerProcess):
    """A ``queue_worker`` process and its JSON lines."""

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send a ``serve`` command; its outcome."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        event = await self.event()
        assert event["event"] == command["op"], event
        return event

    async def rest(self) -> list[dict[str, Any]]:
        """Every line it printed that was not read yet, once it has ended (killed or not):
        a half-printed last line is dropped."""
        assert self.proc.stdout is not None
        events: list[dict[str, Any]] = []
        while line := await self.proc.stdout.readline():
            if line.endswith(b"\n"):
                events.append(json.loads(line))
        return events


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(spec, mode, **options)`` starts a worker (``queue`` is ``QUEUE``); every
    worker still running is killed afterwards."""
    children: list[Child] = []

    async def start(spec: dict[str, Any], mode: str, **options: Any) -> Child:
        child_spec = {**spec, "mode": mode, "queue": QUEUE, **options}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(child_spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        children.append(Child(proc))
        ready = await children[-1].event(timeout=90.0)
        assert ready["event"] == "ready", ready
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()


BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
    pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.redis], id="redis-cluster"),
]


def shared_spec(
    backend: str, request: pytest.FixtureRequest, namespace: str, tmp_path: Path
) -> dict[str, Any]:
    """The spec of ``backend`` on the session's servers (SQLite: a file in ``tmp_path``)."""
    spec = store_spec(backend, namespace, request.getfixturevalue, tmp_path)
    if backend == "sqlite":
        spec["path"] = str(tmp_path / "queues.db")
    return spec


async def retrying(call: Callable[[], Awaitable[T]], seconds: float = 30.0) -> T:
    """``call()``, tried again while the server is still coming back."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- acknowledged puts survive


class Produced:
    """What a ``produce`` worker printed: the jobs it put (id -> number), the jobs it claimed
    (id -> token) and those whose ack returned True (id -> token), and its errors."""

    def __init__(self) -> None:
        self.puts: dict[str, int] = {}
        self.claimed: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []

    def add(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "put":
            self.puts.update(zip(event["ids"], event["ns"], strict=True))
        elif kind == "claimed":
            job = event["job"]
            self.claimed[job["id"]] = job["token"]
        elif kind == "acked":
            if event["ok"]:
                self.acked[event["id"]] = event["token"]
        elif kind == "error":
            self.errors.append(event["error"])
        else:
            raise AssertionError(f"unexpected line {event}")


async def check_kept(queue: Any, produced: Produced) -> str:
    """Every job the producer printed is in the queue: claimable (with its payload) or, if it
    printed its ack, done with its result; a job it claimed but had not printed the ack of is
    one of the two. A summary of what was found."""
    puts, acked = produced.puts, produced.acked
    assert puts, "the producer put nothing"
    ids = list(puts)
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids not ascending in put order"
    for job_id, token in acked.items():
        result = await queue.result(job_id)
        assert result is not None and result.status == "done", (job_id, result)
        assert result.value == {"n": puts[job_id], "token": token}, result
        assert result.attempts == 1, result
    # Claim until every job not acked is found. A job the producer claimed and was killed
    # with comes back once its lease (PRODUCER_LEASE) ran out.
    pending = set(puts) - set(acked)
    found: dict[str, Job] = {}
    while pending - found.keys():
        jobs = await queue.claim_many(1000, consumer="after", lease=300, wait=PRODUCER_LEASE + LATE)
        if not jobs:
            break
        found.update((job.id, job) for job in jobs)
    missing = pending - found.keys()
    for job_id in sorted(missing):
        # Acked by the producer, which died before it printed so.
        result = await queue.result(job_id)
        assert job_id in produced.claimed, f"acknowledged put {job_id} lost ({result})"
        assert result is not None and result.status == "done", (job_id, result)
        assert result.value == {"n": puts[job_id], "token": produced.claimed[job_id]}, result
    for job_id in pending & found.keys():
        job = found[job_id]
        assert job.payload == {"n": puts[job_id]}, job
        # Claimed once by the producer if it printed so (or if its claim went through as the
        # server died, before the answer came back).
        expected = (2,) if job_id in produced.claimed else (1, 2)
        assert job.attempts in expected, job
    unprinted = sorted(found.keys() - puts.keys())
    for job_id in unprinted:  # put, but the producer died before it printed the id
        assert job_id > max(ids), (job_id, max(ids))
    return (
        f"{len(puts)} puts acknowledged, {len(acked)} acks acknowledged, all there; "
        f"{len(missing)} acked unreported; {len(unprinted)} put unreported; "
        f"{len(produced.errors)} calls failed (server down)"
    )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_puts_acknowledged_before_the_producer_was_killed_are_kept(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """A process puts jobs (``put`` and ``put_many``), acks some, and kills itself with
    SIGKILL right after a put returned, closing nothing: a store opened afterwards (a new
    connection; on SQLite, the file opened again) has every job it put, claimable, and the
    results of every job it acked."""
    spec = shared_spec(backend, request, fleetmem_namespace, tmp_path)
    async with open_spec_store(spec) as store:  # a fresh database is migrated here, once
        await store.queue(QUEUE).stats()
    producer = await spawn(
        spec,
        "produce",
        batch=BATCH,
        ack_every=ACK_EVERY,
        lease=PRODUCER_LEASE,
        kill_after=500,
    )
    assert await asyncio.wait_for(producer.proc.wait(), 60.0) == -signal.SIGKILL
    produced = Produced()
    for event in await producer.rest():
        produced.add(event)
    assert produced.errors == []
    assert len(produced.puts) >= 500 and produced.acked
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        stats = await queue.stats()
        assert stats == QueueStats(
            ready=len(produced.puts) - len(produced.acked),
            delayed=0,
            claimed=0,
            dead=0,
            done=len(produced.acked),
        ), stats
        summary = await check_kept(queue, produced)
        print(f"{backend}: {summary}")


async def crash_while_producing(
    spec: dict[str, Any],
    spawn: Spawn,
    kill_server: Callable[[], None],
    start_server: Callable[[], None],
) -> Produced:
    """A producer puts and acks jobs; the server is killed with SIGKILL under it, then the
    producer; the server is started again. What the producer printed."""
    async with open_spec_store(spec) as store:  # the schema, once
        await store.queue(QUEUE).stats()
    producer = await spawn(spec, "produce", batch=BATCH, ack_every=ACK_EVERY, lease=PRODUCER_LEASE)
    produced = Produced()
    while len(produced.puts) < 500 or len(produced.acked) < 5:
        produced.add(await producer.event(timeout=60.0))
    await asyncio.to_thread(kill_server)
    try:
        # Let the producer meet the dead server (its calls fail; it goes on), then kill it.
        await asyncio.sleep(0.5)
        assert producer.proc.returncode is None, await producer.event()  # it did not crash
        producer.proc.send_signal(signal.SIGKILL)
        assert await producer.proc.wait() == -signal.SIGKILL
        for event in await producer.rest():
            produced.add(event)
    finally:
        await asyncio.to_thread(start_server)
    return produced


@pytest.fixture(scope="module")
def pg_queue_server(fleetmem_postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """A PostgreSQL server of this module's own (fsync on): it is killed."""
    return fleetmem_postgres_factory(durable=True)


@pytest.fixture
def pg_victim(pg_queue_server: PostgresServer) -> Any:
    yield pg_queue_server
    pg_queue_server.start()  # running again for the next test, whatever this one did


@pytest.mark.postgres
@pytest.mark.parametrize(
    "backend", ["postgres", pytest.param("hybrid", marks=[pytest.mark.hybrid, pytest.mark.redis])]
)
async def test_acknowledged_puts_and_acks_survive_a_postgres_crash(
    backend: str,
    request: pytest.FixtureRequest,
    pg_victim: PostgresServer,
    fleetmem_namespace: str,
    spawn: Spawn,
) -> None:
    """PostgreSQL killed with SIGKILL while a process puts and acks jobs, then that process
    killed too; PostgreSQL started again: every put and every ack the process saw return is
    there (the jobs claimable, the results readable). On the hybrid the queues are
    PostgreSQL's: the same holds."""
    spec: dict[str, Any] = {"backend": backend, "dsn": pg_victim.dsn}
    spec["namespace"] = fleetmem_namespace
    if backend == "hybrid":
        spec["url"] = request.getfixturevalue("fleetmem_redis_server").url
    produced = await crash_while_producing(spec, spawn, pg_victim.kill, pg_victim.start)
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        await retrying(queue.stats)
        summary = await check_kept(queue, produced)
        print(f"{backend}, PostgreSQL killed: {summary}")


@pytest.mark.redis
async def test_acknowledged_puts_and_acks_survive_a_redis_crash_with_aof_always(
    fleetmem_redis_factory: Callable[..., RedisServer],
    fleetmem_namespace: str,
    spawn: Spawn,
) -> None:
    """Redis is as durable as its persistence: with ``appendonly yes`` and ``appendfsync
    always``, Redis killed with SIGKILL under a producer (then the producer killed) and started
    again has every put and ack the producer saw return."""
    server = fleetmem_redis_factory(appendonly=True, appendfsync="always")
    spec = {"backend": "redis", "url": server.url, "namespace": fleetmem_namespace}
    try:
        produced = await crash_while_producing(spec, spawn, server.kill, server.start)
        async with open_spec_store(spec) as store:
            queue = store.queue(QUEUE)
            await retrying(queue.stats)
            summary = await check_kept(queue, produced)
            print(f"redis (AOF, fsync always) killed: {summary}")
    finally:
        server.close()


# ---------------------------------------------------------------- a consumer killed


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_killed_consumers_jobs_go_to_another_consumer_after_their_lease(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """A process claims three jobs (lease 2 s) and is killed with SIGKILL. Nobody gets them
    while the lease lasts; then another consumer does, attempt 2 with a greater token, ready
    since the lease's expiry. The dead consumer's claims, rebuilt from what it printed, are
    superseded: ack and nack return False, extend raises LeaseLostError, nothing changes. The
    third job, never claimed since its lease ran out, is still the dead claim's: its ack
    succeeds."""
    spec = shared_spec(backend, request, fleetmem_namespace, tmp_path)
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        poll = queue.backend.poll_interval
        ids = await queue.put_many([{"n": n} for n in range(3)])
        consumer = await spawn(spec, "serve")
        claimed = await consumer.call({"op": "claim", "n": 3, "consumer": "doomed", "lease": LEASE})
        held = [job_from_json(job) for job in claimed["jobs"]]
        assert [job.id for job in held] == ids
        assert all(job.attempts == 1 and job.consumer == "doomed" for job in held), held
        consumer.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await consumer.proc.wait() == -signal.SIGKILL
        expiry = held[0].lease_expires_at
        assert expiry is not None and held[0].claimed_at is not None
        assert all(job.lease_expires_at == expiry for job in held), held

        # Dead, but its claims are live until the lease runs out: nobody else gets them.
        early = await queue.claim(consumer="taker", lease=30)
        if time.monotonic() < claimed["after"] + LEASE - SLACK:  # not this late (loaded box)
            assert early is None, early
            assert await queue.stats() == QueueStats(0, 0, 3, 0, 0)

        first = early or await queue.claim(consumer="taker", lease=30, wait=LEASE + LATE + 30)
        granted_at = time.monotonic()
        assert first is not None, "the killed consumer's jobs never came back"
        second = await queue.claim(consumer="taker", lease=30)
        assert second is not None
        for old, new in ((held[0], first), (held[1], second)):
            assert new.id == old.id and new.payload == old.payload
            assert new.attempts == 2 and new.token > old.token, (old, new)
            assert new.consumer == "taker"
            # Ready again from the lease's expiry on, and not claimed before it (server clock).
            assert new.ready_at == expiry, (new.ready_at, expiry)
            assert new.claimed_at is not None and new.claimed_at >= expiry, (new, expiry)
        assert granted_at - killed_at <= LEASE + poll + LATE, granted_at - killed_at
        assert await queue.stats() == QueueStats(ready=1, delayed=0, claimed=2, dead=0, done=0)

        # The dead consumer's superseded claims finish, fail and extend nothing.
        zombie_a, zombie_b, still_c = held
        assert await queue.ack(zombie_a, {"by": "zombie"}) is False
        assert await queue.nack(zombie_b, retry_in=0, error="zombie") is False
        for zombie in (zombie_a, zombie_b):
            with pytest.raises(LeaseLostError):
                await queue.extend(zombie, lease=30)
        assert await queue.result(zombie_a.id) is None
        assert await queue.result(zombie_b.id) is None
        # The third one: its lease ran out but nobody claimed it since; the claim still holds.
        assert await queue.ack(still_c, {"by": "doomed"}) is True
        done_c = await queue.result(still_c.id)
        assert done_c is not None and done_c.status == "done", done_c
        assert done_c.value == {"by": "doomed"} and done_c.attempts == 1

        # The taker finishes the first and gives the second back, which comes back once more.
        assert await queue.ack(first, {"by": "taker"}) is True
        assert await queue.ack(zombie_a, {"by": "zombie"}) is False
        done_a = await queue.result(first.id)
        assert done_a is not None and done_a.value == {"by": "taker"} and done_a.attempts == 2
        assert await queue.nack(second, retry_in=0, error="retry") is True
        third = await queue.claim(consumer="taker", lease=30, wait=10)
        assert third is not None and third.id == second.id, third
        assert third.attempts == 3 and third.token > second.token and third.last_error == "retry"
        assert await queue.ack(zombie_b, {"by": "zombie"}) is False
        assert await queue.ack(second, {"by": "taker"}) is False
        assert await queue.ack(third, {"by": "taker"}) is True
        assert await queue.stats() == QueueStats(ready=0, delayed=0, claimed=0, dead=0, done=3)
        print(
            f"{backend}: taken {granted_at - killed_at:.3f} s after the kill "
            f"(lease {LEASE} s, poll {poll} s)"
        )


# ---------------------------------------------------------------- wake-ups across processes


async def timed(call: Coroutine[Any, Any, T]) -> tuple[T, float]:
    """``call``'s value and ``time.monotonic()`` when it returned."""
    value = await call
    return value, time.monotonic()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_waiting_claim_is_woken_by_a_put_in_another_process(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """claim(wait=30) on an empty queue; another process puts a job just after the waiter's
    poll: the waiter has the job within WAKE_LIMIT of the put's return, every time (a waiter
    that only polled would take about a second)."""
    spec = shared_spec(backend, request, fleetmem_namespace, tmp_path)
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        producer = await spawn(spec, "serve")
        assert await queue.claim(consumer="waiter", wait=0.05) is None  # listening from now
        lags: list[float] = []
        for number, phase in enumerate(WAKE_PHASES):
            waiting = asyncio.create_task(timed(queue.claim(consumer="waiter", wait=30)))
            await asyncio.sleep(1.0 + phase)
            assert not waiting.done(), waiting
            put = await producer.call({"op": "put", "payload": {"n": number}})
            job, returned_at = await asyncio.wait_for(waiting, 60.0)
            assert job is not None and job.id == put["id"] and job.payload == {"n": number}
            lags.append(returned_at - put["after"])
            assert await queue.ack(job)
        poll = queue.backend.poll_interval
        print(f"{backend}: put -> claim {[round(lag, 4) for lag in lags]} s (poll {poll} s)")
        assert max(lags) < WAKE_LIMIT, lags


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_waiting_result_is_woken_by_an_ack_in_another_process(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """result(job_id, wait=30) of a job another process holds; that process acks it just
    after the waiter's poll: the waiter has the result within WAKE_LIMIT of the ack's return,
    every time."""
    spec = shared_spec(backend, request, fleetmem_namespace, tmp_path)
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        worker = await spawn(spec, "serve")
        lags: list[float] = []
        for number, phase in enumerate(WAKE_PHASES):
            job_id = await queue.put({"n": number})
            claimed = await worker.call({"op": "claim", "n": 1, "consumer": "worker", "lease": 60})
            assert [job["id"] for job in claimed["jobs"]] == [job_id]
            waiting = asyncio.create_task(timed(queue.result(job_id, wait=30)))
            await asyncio.sleep(1.0 + phase)
            assert not waiting.done(), waiting
            acked = await worker.call({"op": "ack", "id": job_id, "result": {"r": number}})
            assert acked["ok"] is True
            result, returned_at = await asyncio.wait_for(waiting, 60.0)
            assert result is not None and result.status == "done", result
            assert result.value == {"r": number} and result.attempts == 1
            lags.append(returned_at - acked["after"])
        poll = queue.backend.poll_interval
        print(f"{backend}: ack -> result {[round(lag, 4) for lag in lags]} s (poll {poll} s)")
        assert max(lags) < WAKE_LIMIT, lags
