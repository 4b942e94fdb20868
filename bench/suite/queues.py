"""``--only queues``: durable work queues (``store.queue(name)``) against the peers a Python user
would pick and a raw-driver loop doing the same claim and ack, in one run.

Two workloads per backend, every subject measured in the same process against the same server,
the subjects taking turns repetition by repetition (the first one rotating):

* ``<backend> queue 16 consumers`` (jobs/s): 16 consumers wait; one producer enqueues the
  run's jobs (20,000 in a full run; ~200-byte JSON payloads) in chunks of 1,000, with the
  system's batch put where it has one (fleetmem ``put_many``, procrastinate
  ``batch_defer_async``, the raw loops' one statement or script per chunk) and otherwise 20
  concurrent single puts (saq's own limit on concurrent operations; arq likewise), while the
  consumers claim and ack. The clock runs from the first put to the last ack. Every job's
  payload carries its number: the run checks that every job was handed to a consumer and
  acknowledged exactly once, and says so in a note.
* ``<backend> queue put to claim p50`` / ``p99`` (ms): 16 consumers wait idle; a producer
  puts one job every 5 ms (or back to back when a put takes longer); the latency of a job is
  from the start of its ``put`` to the return of the consumer's ``claim`` (for the peers: to
  the start of the task function the worker calls).

Subjects:

* ``fleetmem``: the loop a user writes from the docs, ``job = await q.claim(wait=30)`` then
  ``await q.ack(job)``, 16 such coroutines; ``fleetmem claim_many``: the same with
  ``claim_many(10, wait=30)`` and an ``ack`` per job;
* ``raw``: asyncpg (PostgreSQL) or redis-py (Redis) doing one claim and one ack round trip per
  job on a table or keys of its own: on PostgreSQL one ``FOR UPDATE SKIP LOCKED`` claim
  statement with a CTE and one ``UPDATE`` to ack, on Redis one Lua script claiming from a
  sorted set and one acking. Its consumers wait on in-process wake-ups (the producer wakes as
  many consumers as it put jobs; a poll every second besides): the ceiling of those
  statements on this machine, not a queue between processes;
* peers (``--no-peers`` skips them), each run in-process with 16 concurrent jobs:
  procrastinate (PostgreSQL, psycopg pool of 10 connections, its schema applied in a schema
  of its own), saq and arq (Redis). arq polls its queue every ``poll_delay`` (0.5 s by
  default), reading at most 100 jobs a poll: subject ``arq poll 10ms`` sets
  ``poll_delay=0.01`` and runs both workloads; subject ``arq`` has its defaults and runs the
  latency workload only (~200 jobs/s here: 100 s a repetition of 20,000 jobs).
  A peer's ack is observed after the library recorded it: saq's ``after_process`` hook,
  arq's ``after_job_end`` hook, and procrastinate's ``JobManager.finish_job`` returning.

fleetmem on SQLite, on the in-memory store and on the hybrid (whose queues are PostgreSQL's)
runs for reference, without peers or raw loop. A backend whose queues are not in this build is
skipped with a note. The targets (not in the report's target table: they are absolute figures
or ratios to subjects the other sections do not have) are notes with their figure and verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import logging
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fleetmem.errors import ConfigurationError

from .timing import load_average
from .workloads import SMOKE, VALUE, Bench

#: fleetmem's namespace; the raw loops and the peers have tables, schemas and keys of their own.
QUEUE_NAMESPACE = "bench-queues"
#: The raw PostgreSQL loop's table and procrastinate's schema.
RAW_TABLE = "bench_raw_queue"
PROCRASTINATE_SCHEMA = "bench_procrastinate"
#: Key prefixes on Redis: the raw loop's, saq's queue name, arq's queue name and job ids.
RAW_REDIS_PREFIX = "rawq:{bench}:"
SAQ_QUEUE = "bench-saq"
ARQ_QUEUE = "bench-arq"

CONSUMERS = 16
#: Jobs per put of the throughput producer.
CHUNK = 1000
#: Concurrent single puts of a system without a batch put (saq's ``max_concurrent_ops``).
PUT_CONCURRENCY = 20
#: ``claim_many``'s n in the variant.
CLAIM_MANY = 10
#: The lease of every claim and a consumer's ``claim(wait=...)``: no lease expires in a run.
LEASE = 30.0
WAIT = 30.0
#: The latency producer's pace: one put every INTERVAL seconds.
INTERVAL = 0.005
#: The raw loops' fallback poll while waiting (fleetmem's ``poll_interval``).
RAW_POLL = 1.0
#: Time the consumers get to start and wait before the producer's first put.
SETTLE = 0.5
#: Progress steps per backend.
STEPS_PER_BACKEND = 2
BACKENDS = ("postgres", "redis", "sqlite", "memory", "hybrid")

#: Targets of the issue (reported as notes, never asserted).
_FLOOR = {"redis": 5000.0, "postgres": 2000.0}
_PEER_RATIO = 2.0
_RAW_RATIO = 0.7
_P50_MS = 5.0
_P99_MS = 50.0
_PEERS_OF = {"postgres": ("procrastinate",), "redis": ("saq", "arq", "arq poll 10ms")}


@dataclass(frozen=True)
class QueueSizes:
    jobs: int  # jobs per repetition of the throughput workload
    samples: int  # jobs per repetition of the latency workload
    warm: int  # jobs of each subject's warm-up run
    settle: float  # seconds the consumers get to start and wait before the first put


def queue_sizes(bench: Bench) -> QueueSizes:
    """20,000 jobs in a full run (the issue's workload), 5,000 with ``--quick``, 400 in a
    smoke run."""
    if bench.sizes == SMOKE:
        return QueueSizes(400, 20, 100, 0.1)
    if bench.quick:
        return QueueSizes(5000, 100, 500, SETTLE)
    return QueueSizes(20_000, 300, 1000, SETTLE)


def queue_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs))


def _clock() -> int:
    return time.perf_counter_ns()


# --------------------------------------------------------------------------- bookkeeping


class Tracker:
    """One repetition's record: when each job was put, claimed and acked, and how often."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = [0] * n
        self.claims = bytearray(n)
        self.acks = bytearray(n)
        self.latency_ns: list[int] = []
        self.acked = 0
        self.last_ack = 0
        self.strays = 0  # jobs of another repetition or run
        self.done = asyncio.Event()

    def claimed(self, i: int) -> None:
        now = _clock()
        if not 0 <= i < self.n:
            self.strays += 1
            return
        if self.claims[i] == 0 and self.sent[i]:
            self.latency_ns.append(now - self.sent[i])
        self.claims[i] = min(self.claims[i] + 1, 255)

    def acknowledged(self, i: int) -> None:
        if not 0 <= i < self.n:
            return
        self.acks[i] = min(self.acks[i] + 1, 255)
        if self.acks[i] == 1:
            self.acked += 1
            if self.acked == self.n:
                self.last_ack = _clock()
                self.done.set()

    def problems(self) -> str:
        """What broke "each job claimed and acked exactly once" (empty when nothing did)."""
        twice = sum(1 for c in self.claims if c > 1)
        acked_twice = sum(1 for a in self.acks if a > 1)
        missing = self.n - self.acked
        parts = [
            f"{count} {what}"
            for count, what in (
                (missing, "never acked"),
                (twice, "claimed more than once"),
                (acked_twice, "acked more than once"),
                (self.strays, "jobs not of this repetition"),
            )
            if count
        ]
        return ", ".join(parts)


class _Turn:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.granted = False


class Wakeups:
    """The raw loops' in-process wake-ups: a put of n jobs wakes the n consumers that have
    waited longest and are not woken yet; a consumer registers before it tries, and one that
    leaves woken but without a job passes the wake-up on."""

    def __init__(self) -> None:
        self._turns: dict[_Turn, None] = {}

    @contextlib.contextmanager
    def watch(self) -> Iterator[_Turn]:
        turn = _Turn()
        self._turns[turn] = None
        try:
            yield turn
        finally:
            del self._turns[turn]
            if turn.event.is_set() and not turn.granted:
                self.notify(1)

    def notify(self, n: int) -> None:
        for turn in self._turns:
            if n <= 0:
                return
            if not turn.event.is_set():
                turn.event.set()
                n -= 1

    def notify_all(self) -> None:
        for turn in self._turns:
            turn.event.set()


async def _wait(turn: _Turn, timeout: float) -> None:
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        await asyncio.wait_for(turn.event.wait(), timeout)
    turn.event.clear()


def _number(payload: Any) -> int:
    return int(payload["n"])


# --------------------------------------------------------------------------- the subjects


class Subject:
    """One queue system: 16 consumers started and stopped per repetition, a batch put, a
    single put. Consumers report to the repetition's :class:`Tracker`."""

    name = ""
    #: False: measured in the latency workload only (see :class:`Arq`).
    in_throughput = True

    def __init__(self) -> None:
        self.tracker = Tracker(0)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, tracker: Tracker, queue: str) -> None:
        self.tracker = tracker
        self._stopping = False
        self._tasks = [asyncio.create_task(self._consume(queue, i)) for i in range(CONSUMERS)]

    async def _consume(self, queue: str, i: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the consumers: those waiting for a job are cancelled (a user's shutdown)."""
        self._stopping = True
        await asyncio.sleep(0)
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for res in results:
            if isinstance(res, Exception):
                raise res

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    async def pending(self, queue: str) -> int:
        """Jobs of ``queue`` not finished according to the system itself (after a repetition:
        0, or its acks did not all land)."""
        return 0

    async def close(self) -> None:
        pass


class FleetmemSubject(Subject):
    """``q.claim(wait=30)`` then ``q.ack(job)``; with ``many``, ``claim_many(many, wait=30)``
    then an ``ack`` per job."""

    def __init__(self, store: Any, many: int = 0) -> None:
        super().__init__()
        self.store = store
        self.many = many
        self.name = "fleetmem claim_many" if many else "fleetmem"

    async def _consume(self, queue: str, i: int) -> None:
        q = self.store.queue(queue)
        who = f"bench-{i}"
        tracker = self.tracker
        while not self._stopping:
            if self.many:
                jobs = await q.claim_many(self.many, consumer=who, lease=LEASE, wait=WAIT)
            else:
                job = await q.claim(consumer=who, lease=LEASE, wait=WAIT)
                jobs = [] if job is None else [job]
            for job in jobs:
                tracker.claimed(_number(job.payload))
            for job in jobs:
                assert await q.ack(job), "an ack found its claim superseded"
                tracker.acknowledged(_number(job.payload))

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        await self.store.queue(queue).put_many(payloads)

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.store.queue(queue).put(payload)

    async def pending(self, queue: str) -> int:
        s = await self.store.queue(queue).stats()
        return int(s.ready + s.delayed + s.claimed + s.dead)


# ----- raw PostgreSQL

_RAW_PG_DDL = f"""
DROP TABLE IF EXISTS {RAW_TABLE};
CREATE TABLE {RAW_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text COLLATE "C" NOT NULL,
    payload jsonb NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    state smallint NOT NULL DEFAULT 0,  -- 0 ready, 1 claimed, 2 done
    ready_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0,
    consumer text,
    claimed_at timestamptz,
    lease_expires_at timestamptz,
    finished_at timestamptz,
    result jsonb
);
CREATE INDEX {RAW_TABLE}_ready ON {RAW_TABLE} (queue, priority DESC, ready_at, id)
    WHERE state = 0;
"""
_RAW_PG_PUT_MANY = (
    f"INSERT INTO {RAW_TABLE} (queue, payload) "
    "SELECT $1, p::jsonb FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i"
)
_RAW_PG_PUT = f"INSERT INTO {RAW_TABLE} (queue, payload) VALUES ($1, $2::jsonb)"
_RAW_PG_CLAIM = f"""
WITH next AS (
    SELECT id FROM {RAW_TABLE}
    WHERE queue = $1 AND state = 0 AND ready_at <= now()
    ORDER BY priority DESC, ready_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE {RAW_TABLE} AS j
SET state = 1, attempts = j.attempts + 1, token = j.token + 1, consumer = $2,
    claimed_at = now(), lease_expires_at = now() + $3 * interval '1 millisecond'
FROM next WHERE j.id = next.id
RETURNING j.id, j.token, j.payload::text
"""
_RAW_PG_ACK = (
    f"UPDATE {RAW_TABLE} SET state = 2, finished_at = now(), result = $3::jsonb "
    "WHERE id = $1 AND token = $2 AND state = 1"
)


class RawPostgres(Subject):
    """asyncpg on a pool of 10 connections (the store's size), prepared by its statement
    cache: the claim and the ack statements above, on table ``bench_raw_queue``."""

    name = "raw"

    def __init__(self, pool: Any) -> None:
        super().__init__()
        self.pool = pool
        self.wakeups = Wakeups()

    @classmethod
    async def open(cls, dsn: str) -> RawPostgres:
        import asyncpg

        pool: Any = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
        async with pool.acquire() as conn:
            await conn.execute(_RAW_PG_DDL)
        return cls(pool)

    async def _consume(self, queue: str, i: int) -> None:
        who, lease_ms, tracker, pool = f"bench-{i}", int(LEASE * 1000), self.tracker, self.pool
        while not self._stopping:
            with self.wakeups.watch() as turn:
                row = await pool.fetchrow(_RAW_PG_CLAIM, queue, who, lease_ms)
                if row is None:
                    await _wait(turn, RAW_POLL)
                    continue
                turn.granted = True
            n = _number(orjson.loads(row[2]))
            tracker.claimed(n)
            status = await pool.execute(_RAW_PG_ACK, row[0], row[1], "null")
            assert status == "UPDATE 1", "a raw ack found its claim superseded"
            tracker.acknowledged(n)

    async def stop(self) -> None:
        self._stopping = True
        self.wakeups.notify_all()
        await super().stop()

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        data = [orjson.dumps(p).decode() for p in payloads]
        await self.pool.execute(_RAW_PG_PUT_MANY, queue, data)
        self.wakeups.notify(len(payloads))

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.pool.execute(_RAW_PG_PUT, queue, orjson.dumps(payload).decode())
        self.wakeups.notify(1)

    async def pending(self, queue: str) -> int:
        sql = f"SELECT count(*) FROM {RAW_TABLE} WHERE queue = $1 AND state <> 2"
        return int(await self.pool.fetchval(sql, queue))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pool.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        await self.pool.close()


# ----- raw Redis

_RAW_REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
#: KEYS[1]: the prefix; ARGV: the payloads. Ids: 16 hex digits of a counter; the ready set's
#: score is the ready time (ms), equal scores ordered by id.
_RAW_REDIS_PUT = (
    _RAW_REDIS_NOW
    + """
local p = KEYS[1]
local last = redis.call('INCRBY', p .. 'seq', #ARGV)
local first = last - #ARGV
local ready = {}
for i = 1, #ARGV do
    local id = string.format('%016x', first + i)
    redis.call('HSET', p .. 'job:' .. id, 'payload', ARGV[i], 'state', 'ready',
        'attempts', 0, 'token', 0, 'enqueued_at', now)
    ready[2 * i - 1] = now
    ready[2 * i] = id
end
redis.call('ZADD', p .. 'ready', unpack(ready))
return #ARGV
"""
)
#: KEYS[1]: the prefix; ARGV: consumer, lease (ms). Returns {id, token, payload} or nil.
_RAW_REDIS_CLAIM = (
    _RAW_REDIS_NOW
    + """
local p = KEYS[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'ready', '-inf', now, 'LIMIT', 0, 1)
if #ids == 0 then return false end
local id = ids[1]
local job = p .. 'job:' .. id
redis.call('ZREM', p .. 'ready', id)
redis.call('HINCRBY', job, 'attempts', 1)
local token = redis.call('HINCRBY', job, 'token', 1)
local expires = now + tonumber(ARGV[2])
redis.call('HSET', job, 'state', 'claimed', 'consumer', ARGV[1], 'claimed_at', now,
    'lease_expires_at', expires)
redis.call('ZADD', p .. 'claimed', expires, id)
return {id, token, redis.call('HGET', job, 'payload')}
"""
)
#: KEYS[1]: the prefix; ARGV: id, token, result, result ttl (ms). Returns 1 or 0.
_RAW_REDIS_ACK = (
    _RAW_REDIS_NOW
    + """
local p = KEYS[1]
local job = p .. 'job:' .. ARGV[1]
local held = redis.call('HMGET', job, 'token', 'state')
if held[1] ~= ARGV[2] or held[2] ~= 'claimed' then return 0 end
redis.call('HSET', job, 'state', 'done', 'result', ARGV[3], 'finished_at', now)
redis.call('ZREM', p .. 'claimed', ARGV[1])
redis.call('PEXPIRE', job, ARGV[4])
return 1
"""
)


class RawRedis(Subject):
    """redis-py (hiredis) on a client of its own, ``EVALSHA`` of the three scripts above on
    keys ``rawq:{bench}:*``; the ack holds a null result for a day, as fleetmem's default."""

    name = "raw"

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = client
        self.wakeups = Wakeups()
        self.put_script = client.register_script(_RAW_REDIS_PUT)
        self.claim_script = client.register_script(_RAW_REDIS_CLAIM)
        self.ack_script = client.register_script(_RAW_REDIS_ACK)

    @classmethod
    async def open(cls, url: str) -> RawRedis:
        import redis.asyncio as aioredis

        client: Any = aioredis.from_url(url)
        self = cls(client)
        await self._delete_keys()
        return self

    async def _delete_keys(self) -> None:
        keys = [k async for k in self.client.scan_iter(match="rawq:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await self.client.delete(*keys[i : i + 1000])

    async def _consume(self, queue: str, i: int) -> None:
        who, lease_ms, tracker = f"bench-{i}", int(LEASE * 1000), self.tracker
        keys = [RAW_REDIS_PREFIX + queue + ":"]
        while not self._stopping:
            with self.wakeups.watch() as turn:
                res = await self.claim_script(keys=keys, args=[who, lease_ms])
                if res is None:
                    await _wait(turn, RAW_POLL)
                    continue
                turn.granted = True
            job_id, token, payload = res
            n = _number(orjson.loads(payload))
            tracker.claimed(n)
            ok = await self.ack_script(keys=keys, args=[job_id, token, "null", 86_400_000])
            assert ok == 1, "a raw ack found its claim superseded"
            tracker.acknowledged(n)

    async def stop(self) -> None:
        self._stopping = True
        self.wakeups.notify_all()
        await super().stop()

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        data = [orjson.dumps(p) for p in payloads]
        await self.put_script(keys=[RAW_REDIS_PREFIX + queue + ":"], args=data)
        self.wakeups.notify(len(payloads))

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.put_script(keys=[RAW_REDIS_PREFIX + queue + ":"], args=[orjson.dumps(payload)])
        self.wakeups.notify(1)

    async def pending(self, queue: str) -> int:
        p = RAW_REDIS_PREFIX + queue + ":"
        return int(await self.client.zcard(p + "ready")) + int(
            await self.client.zcard(p + "claimed")
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._delete_keys()
        await self.client.aclose()


# ----- peers


async def _bounded_gather(calls: list[Any], limit: int) -> None:
    """Run the coroutines of ``calls`` at most ``limit`` at a time."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Any) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(c) for c in calls))


class Procrastinate(Subject):
    """procrastinate's ``App`` with its ``PsycopgConnector`` (psycopg pool of 10 connections,
    ``search_path`` = a schema of its own where its schema is applied), a task ``bench``;
    ``batch_defer_async`` per chunk, ``defer_async`` per single put; the worker in-process
    (``run_worker_async(concurrency=16)``, LISTEN/NOTIFY on, its defaults otherwise)."""

    name = "procrastinate"

    def __init__(self, app: Any, task: Any, dsn: str) -> None:
        super().__init__()
        self.app = app
        self.task = task
        self.dsn = dsn
        self._worker: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, dsn: str) -> Procrastinate:
        import asyncpg

        procrastinate: Any = importlib.import_module("procrastinate")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f"DROP SCHEMA IF EXISTS {PROCRASTINATE_SCHEMA} CASCADE; "
                f"CREATE SCHEMA {PROCRASTINATE_SCHEMA}"
            )
        finally:
            await conn.close()
        connector = procrastinate.PsycopgConnector(
            conninfo=dsn,
            kwargs={"options": f"-c search_path={PROCRASTINATE_SCHEMA}"},
            min_size=10,
            max_size=10,
        )
        app = procrastinate.App(connector=connector)
        await app.open_async()
        await app.schema_manager.apply_schema_async()
        holder: list[Procrastinate] = []

        async def bench(payload: dict[str, Any]) -> None:
            holder[0].tracker.claimed(_number(payload))

        task = app.task(name="bench")(bench)
        self = cls(app, task, dsn)
        holder.append(self)
        manager = app.job_manager
        finish = manager.finish_job

        async def finish_job(*args: Any, **kwargs: Any) -> Any:
            out = await finish(*args, **kwargs)
            job = kwargs["job"] if "job" in kwargs else args[0]
            self.tracker.acknowledged(_number(job.task_kwargs["payload"]))
            return out

        manager.finish_job = finish_job  # the ack, observed once it returned
        return self

    async def start(self, tracker: Tracker, queue: str) -> None:
        self.tracker = tracker
        self._worker = asyncio.create_task(
            self.app.run_worker_async(
                queues=[queue], concurrency=CONSUMERS, install_signal_handlers=False, wait=True
            )
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        await self.task.configure(queue=queue).batch_defer_async(
            *({"payload": p} for p in payloads)
        )

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.task.configure(queue=queue).defer_async(payload=payload)

    async def pending(self, queue: str) -> int:
        row = await self.app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs "
            "WHERE queue_name = %(queue)s AND status <> 'succeeded'",
            queue=queue,
        )
        return int(row["n"])

    async def close(self) -> None:
        await self.app.close_async()
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {PROCRASTINATE_SCHEMA} CASCADE")
        finally:
            await conn.close()


class Saq(Subject):
    """saq's ``RedisQueue`` (its defaults: JSON, 20 concurrent operations), a function
    ``bench``; ``enqueue`` per job (no batch put: a chunk is 20 concurrent enqueues); a
    ``Worker(concurrency=16)`` in-process, its signal handlers off, woken by ``BLMOVE``."""

    name = "saq"

    def __init__(self, url: str) -> None:
        super().__init__()
        saq: Any = importlib.import_module("saq")
        self.saq = saq
        self.queue: Any = saq.Queue.from_url(url, name=SAQ_QUEUE)
        # Its worker's stop() cancels the consumers blocked in BLMOVE and logs a warning each
        # time: quiet while the section runs.
        self._logger = logging.getLogger("saq")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self._worker: Any = None
        self._run: asyncio.Task[None] | None = None

    async def _handler(self, ctx: Any, *, payload: dict[str, Any]) -> None:
        self.tracker.claimed(_number(payload))

    async def _after(self, ctx: Any) -> None:
        self.tracker.acknowledged(_number(ctx["job"].kwargs["payload"]))

    async def start(self, tracker: Tracker, queue: str) -> None:
        self.tracker = tracker
        worker = self.saq.Worker(
            self.queue,
            functions=[("bench", self._handler)],
            concurrency=CONSUMERS,
            after_process=self._after,
        )
        worker.SIGNALS = []  # the bench's own SIGINT/SIGTERM handling stays
        self._worker = worker
        self._run = asyncio.create_task(worker.start())

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
        if self._run is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        self._worker = self._run = None

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        await _bounded_gather(
            [self.queue.enqueue("bench", payload=p) for p in payloads], PUT_CONCURRENCY
        )

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.queue.enqueue("bench", payload=payload)

    async def pending(self, queue: str) -> int:
        return int(await self.queue.count("incomplete"))

    async def close(self) -> None:
        redis = self.queue.redis
        with contextlib.suppress(Exception):
            keys = [k async for k in redis.scan_iter(match=f"saq:*{SAQ_QUEUE}*", count=1000)]
            for i in range(0, len(keys), 1000):
                await redis.delete(*keys[i : i + 1000])
        await self.queue.disconnect()
        self._logger.setLevel(self._level)


@contextlib.contextmanager
def _arq_on_new_redis() -> Iterator[None]:
    """arq (which declares ``redis<6``) passes redis-py an argument deprecated since 6.0
    (``retry_on_timeout``) when it opens a pool and calls its deprecated ``close()`` when its
    worker closes: a warning turned into an error (``-W error``, the test suite) would stop
    it half way, connections left open."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class Arq(Subject):
    """arq's ``ArqRedis`` pool for the producer (``enqueue_job`` per job: no batch put, so a
    chunk is 20 concurrent enqueues), a ``Worker(max_jobs=16)`` on a pool of its own per
    repetition, its signal handlers off, polling every ``poll_delay`` seconds; job ids
    ``bench-<run>-<n>`` (arq refuses an id it still holds a result for)."""

    def __init__(self, url: str, pool: Any, poll_delay: float | None) -> None:
        super().__init__()
        self.arq: Any = importlib.import_module("arq")
        self.connections: Any = importlib.import_module("arq.connections")
        self.url = url
        self.pool = pool
        self.poll_delay = poll_delay
        self.name = "arq" if poll_delay is None else f"arq poll {poll_delay * 1000:.0f}ms"
        # With its defaults arq reads at most 100 job ids per poll and polls every 0.5 s:
        # ~200 jobs/s here, 100 s a repetition of 20,000 jobs. Its throughput is measured with
        # poll_delay=0.01; its defaults in the latency workload.
        self.in_throughput = poll_delay is not None
        self.tag = "bench-arq"
        self._worker: Any = None
        self._run: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, poll_delay: float | None = None) -> Arq:
        connections: Any = importlib.import_module("arq.connections")
        settings = connections.RedisSettings.from_dsn(url)
        with _arq_on_new_redis():
            pool = await connections.create_pool(settings, default_queue_name=ARQ_QUEUE)
        return cls(url, pool, poll_delay)

    @staticmethod
    def _key(queue: str) -> str:
        """arq's queue is a sorted set named like the queue: one under ``bench-arq``."""
        return f"{ARQ_QUEUE}:{queue}"

    async def _handler(self, ctx: Any, payload: dict[str, Any]) -> None:
        self.tracker.claimed(_number(payload))

    async def _after(self, ctx: Any) -> None:
        tag, _, n = str(ctx["job_id"]).rpartition("-")
        if tag == self.tag:
            self.tracker.acknowledged(int(n))

    async def start(self, tracker: Tracker, queue: str) -> None:
        self.tracker = tracker
        self.tag = f"bench-{uuid.uuid4().hex[:12]}"  # a new id space per repetition
        settings = self.connections.RedisSettings.from_dsn(self.url)
        queue = self._key(queue)
        with _arq_on_new_redis():
            pool = await self.connections.create_pool(settings, default_queue_name=queue)
        options: dict[str, Any] = {} if self.poll_delay is None else {"poll_delay": self.poll_delay}
        self._worker = self.arq.Worker(
            functions=[self.arq.func(self._handler, name="bench")],
            queue_name=queue,
            redis_pool=pool,
            max_jobs=CONSUMERS,
            handle_signals=False,
            after_job_end=self._after,
            **options,
        )
        self._run = asyncio.create_task(self._worker.async_run())

    async def stop(self) -> None:
        # The worker's loop first (a cancel can land where arq swallows it: try again), then
        # its close(), which closes its pool: closing first can leave the loop polling a
        # closed pool.
        if self._run is not None:
            while not self._run.done():
                self._run.cancel()
                await asyncio.wait({self._run}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
        if self._worker is not None:
            with _arq_on_new_redis():  # close() calls redis-py's deprecated close()
                await self._worker.close()
        self._worker = self._run = None

    async def put_batch(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        enqueue, key = self.pool.enqueue_job, self._key(queue)
        await _bounded_gather(
            [
                enqueue("bench", p, _job_id=f"{self.tag}-{p['n']}", _queue_name=key)
                for p in payloads
            ],
            PUT_CONCURRENCY,
        )

    async def put_one(self, queue: str, payload: dict[str, Any]) -> None:
        await self.pool.enqueue_job(
            "bench", payload, _job_id=f"{self.tag}-{payload['n']}", _queue_name=self._key(queue)
        )

    async def pending(self, queue: str) -> int:
        return int(await self.pool.zcard(self._key(queue)))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            keys = [k async for k in self.pool.scan_iter(match="arq:*bench-*", count=1000)]
            keys += [k async for k in self.pool.scan_iter(match=f"{ARQ_QUEUE}*", count=1000)]
            for i in range(0, len(keys), 1000):
                await self.pool.delete(*keys[i : i + 1000])
        await self.pool.aclose()


# --------------------------------------------------------------------------- the workloads


class Stalled(RuntimeError):
    """A repetition whose jobs were not all acked in time."""


def _payloads(n: int) -> list[dict[str, Any]]:
    return [{**VALUE, "n": i} for i in range(n)]


async def throughput(
    subject: Subject, queue: str, n: int, settle: float = SETTLE
) -> tuple[float, Tracker]:
    """One repetition of the throughput workload: jobs/s from the first put to the last ack."""
    tracker = Tracker(n)
    payloads = _payloads(n)
    await subject.start(tracker, queue)
    try:
        await asyncio.sleep(settle)
        start = _clock()
        for i in range(0, n, CHUNK):
            await subject.put_batch(queue, payloads[i : i + CHUNK])
        await _drained(tracker, n)
    finally:
        await subject.stop()
    return n / ((tracker.last_ack - start) / 1e9), tracker


async def latency(
    subject: Subject, queue: str, n: int, settle: float = SETTLE
) -> tuple[list[float], Tracker]:
    """One repetition of the latency workload: ms from each put's start to its claim."""
    tracker = Tracker(n)
    payloads = _payloads(n)
    await subject.start(tracker, queue)
    try:
        await asyncio.sleep(settle)
        loop = asyncio.get_running_loop()
        due = loop.time()
        for i, payload in enumerate(payloads):
            due += INTERVAL
            tracker.sent[i] = _clock()
            await subject.put_one(queue, payload)
            await asyncio.sleep(max(0.0, due - loop.time()))
        await _drained(tracker, n)
    finally:
        await subject.stop()
    return [ns / 1e6 for ns in tracker.latency_ns], tracker


async def _drained(tracker: Tracker, n: int) -> None:
    """Wait for the last ack: a system slower than 50 jobs/s (on a busy machine, the slowest
    peer here runs at ~200/s) counts as stalled."""
    timeout = 60 + n / 50
    try:
        await asyncio.wait_for(tracker.done.wait(), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise Stalled(f"{tracker.acked} of {n} jobs acked after {timeout:.0f} s") from None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class _Outcome:
    """What a backend's subjects did in every repetition of one workload."""

    failures: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


async def _repeat(
    bench: Bench,
    label: str,
    subjects: dict[str, Subject],
    queue: str,
    run: Any,
    outcome: _Outcome,
) -> dict[str, list[Any]]:
    """Each subject once per repetition, the first one rotating (like :func:`.timing.alternate`),
    after a warm-up run each. A subject that fails or stalls is dropped with a note."""
    names = [n for n, s in subjects.items() if s.in_throughput or run is not throughput]
    out: dict[str, list[Any]] = {name: [] for name in names}
    alive = {name: subjects[name] for name in names}

    async def once(name: str, jobs: int, rep: int) -> Any:
        subject = alive[name]
        try:
            figure, tracker = await run(subject, queue, jobs, queue_sizes(bench).settle)
        except Exception as exc:
            outcome.failures[f"{label} {name}"] = f"{type(exc).__name__}: {exc}"
            del alive[name]
            return None
        left = await subject.pending(queue)
        problems = tracker.problems()
        if left:
            problems = ", ".join(filter(None, [problems, f"{left} jobs left unfinished"]))
        if problems:
            which = "warm-up" if rep < 0 else f"repetition {rep + 1}"
            outcome.violations.append(f"{label} {name} {which}: {problems}")
        return figure

    warm = queue_sizes(bench).warm if run is throughput else 20
    for name in names:  # warm up: connections, statements, scripts
        await once(name, warm, -1)
    for rep in range(bench.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            if name not in alive:
                continue
            gc.collect()
            figure = await once(name, _jobs_of(bench, run), rep)
            if figure is not None:
                out[name].append(figure)
    return out


def _jobs_of(bench: Bench, run: Any) -> int:
    sizes = queue_sizes(bench)
    return sizes.jobs if run is throughput else sizes.samples


async def _bench_backend(bench: Bench, backend: str, subjects: dict[str, Subject]) -> None:
    workload = f"{backend} queue {CONSUMERS} consumers"
    bench.progress.step(workload)
    outcome = _Outcome()
    rates = await _repeat(bench, workload, subjects, "throughput", throughput, outcome)
    bench.record(workload, "jobs/s", {k: v for k, v in rates.items() if v})

    label = f"{backend} queue put to claim"
    bench.progress.step(label)
    samples = await _repeat(bench, label, subjects, "latency", latency, outcome)
    p50 = {k: [_percentile(s, 0.5) for s in v if s] for k, v in samples.items()}
    p99 = {k: [_percentile(s, 0.99) for s in v if s] for k, v in samples.items()}
    bench.record(label + " p50", "ms", {k: v for k, v in p50.items() if v})
    bench.record(label + " p99", "ms", {k: v for k, v in p99.items() if v})

    notes = bench.report.notes
    for what, why in outcome.failures.items():
        notes.append(f"queues: {what} failed and was dropped: {why}")
    if outcome.violations:
        notes.extend(f"queues: NOT exactly once: {v}" for v in outcome.violations)
    else:
        notes.append(
            f"queues: {backend}: every subject claimed and acked each of its jobs exactly "
            "once in every repetition"
        )


# --------------------------------------------------------------------------- the backends


@contextlib.asynccontextmanager
async def _fleetmem_store(
    bench: Bench, backend: str, dsn: str | None, url: str | None
) -> AsyncIterator[Any]:
    """The backend's store (namespace ``bench-queues``), or ``None`` with a note when its
    queues are not in this build (``store.queue(...).put`` fails)."""
    with contextlib.ExitStack() as stack:
        if backend == "memory":
            from fleetmem.backends.memory import InMemoryStore

            store: Any = InMemoryStore(namespace=QUEUE_NAMESPACE)
        elif backend == "sqlite":
            from fleetmem.backends.sqlite import SQLiteStore

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetmem-bench-"))
            store = SQLiteStore(Path(folder) / "queues.db", namespace=QUEUE_NAMESPACE)
        elif backend == "postgres":
            from fleetmem.backends.postgres import PostgresStore

            assert dsn is not None
            store = PostgresStore.from_url(dsn, namespace=QUEUE_NAMESPACE)
        elif backend == "redis":
            from fleetmem.backends.redis import RedisStore

            assert url is not None
            store = RedisStore.from_url(url, namespace=QUEUE_NAMESPACE)
        else:
            from fleetmem.factory import open_store

            assert dsn is not None and url is not None
            store = await open_store(hybrid=(dsn, url), namespace=QUEUE_NAMESPACE)
        try:
            await store.connect()
            try:
                probe = store.queue("probe")
                await probe.put({"probe": True})
                job = await probe.claim(consumer="bench", lease=LEASE)
                assert job is not None and await probe.ack(job)
            except (ConfigurationError, NotImplementedError) as exc:
                bench.report.notes.append(f"queues: fleetmem on {backend} skipped: {exc}")
                yield None
                return
            yield store
        finally:
            await store.close()


async def _peer(bench: Bench, name: str, opener: Any) -> Subject | None:
    try:
        subject: Subject = await opener()
    except ImportError as exc:
        bench.report.notes.append(f"queues: peer {name} skipped: {exc}")
        return None
    return subject


async def _saq(url: str) -> Subject:
    return Saq(url)


async def _open_others(
    bench: Bench,
    backend: str,
    dsn: str | None,
    url: str | None,
    subjects: dict[str, Subject],
    stack: contextlib.AsyncExitStack,
) -> None:
    """Open the raw loop and (unless ``--no-peers``) the peers of PostgreSQL or Redis into
    ``subjects``; ``stack`` closes them."""
    openers: list[tuple[str, Any]] = []
    if backend == "postgres":
        assert dsn is not None
        openers.append(("raw", functools.partial(RawPostgres.open, dsn)))
        openers.append(("procrastinate", functools.partial(Procrastinate.open, dsn)))
    else:
        assert url is not None
        openers.append(("raw", functools.partial(RawRedis.open, url)))
        openers.append(("saq", functools.partial(_saq, url)))
        openers.append(("arq", functools.partial(Arq.open, url)))
        openers.append(("arq", functools.partial(Arq.open, url, 0.01)))
    for name, opener in openers:
        if name != "raw" and not bench.peers:
            continue
        subject = await opener() if name == "raw" else await _peer(bench, name, opener)
        if subject is not None:
            subjects[subject.name] = subject
            stack.push_async_callback(subject.close)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def bench_queues(bench: Bench, dsn: str | None, url: str | None) -> None:
    """The two queue workloads on PostgreSQL and Redis (with the raw loops and peers) when
    their servers are given, and on SQLite, memory and the hybrid (fleetmem alone)."""
    sizes = queue_sizes(bench)
    notes = bench.report.notes
    before = load_average()
    notes.append(
        f"queues: {sizes.jobs:,} jobs a repetition ({sizes.samples} for the put-to-claim "
        f"latency, one put every {INTERVAL * 1000:.0f} ms), {CONSUMERS} consumers, ~"
        f"{len(orjson.dumps({**VALUE, 'n': 0}))}-byte payloads; versions: "
        + ", ".join(
            f"{d} {_version(d)}"
            for d in ("procrastinate", "saq", "arq", "psycopg", "asyncpg", "redis")
        )
    )
    for backend in BACKENDS:
        if backend in ("postgres", "hybrid") and dsn is None:
            continue
        if backend in ("redis", "hybrid") and url is None:
            continue
        reference_only = backend not in ("postgres", "redis")
        async with contextlib.AsyncExitStack() as stack:
            subjects: dict[str, Subject] = {}
            store = await stack.enter_async_context(_fleetmem_store(bench, backend, dsn, url))
            if store is not None:
                subjects["fleetmem"] = FleetmemSubject(store)
                subjects["fleetmem claim_many"] = FleetmemSubject(store, CLAIM_MANY)
            if not reference_only:
                await _open_others(bench, backend, dsn, url, subjects, stack)
            if not subjects or (reference_only and store is None):
                continue
            await _bench_backend(bench, backend, subjects)
    if before:
        notes.append(
            f"queues: 1-minute load average {before} before the section, {load_average()} after"
        )
    _verdicts(bench)


def _verdicts(bench: Bench) -> None:
    """A note per queue target measured: its figure and whether it was met."""
    report = bench.report

    def median(workload: str, subject: str) -> float | None:
        row = report.get(workload, subject)
        return statistics.median(row.values) if row is not None and row.values else None

    def verdict(text: str, value: float, ok: bool, fmt: str = "{:.2f}") -> None:
        report.notes.append(
            f"queue target {text}: {fmt.format(value)} ({'met' if ok else 'NOT met'})"
        )

    for backend in BACKENDS:
        workload = f"{backend} queue {CONSUMERS} consumers"
        for mine in ("fleetmem", "fleetmem claim_many"):
            rate = median(workload, mine)
            if rate is None:
                continue
            peers = {p: median(workload, p) for p in _PEERS_OF.get(backend, ())}
            best = max(((v, p) for p, v in peers.items() if v), default=None)
            if best is not None:
                verdict(
                    f"{backend} {mine} ≥ {_PEER_RATIO:g}x the best peer ({best[1]})",
                    rate / best[0],
                    rate / best[0] >= _PEER_RATIO,
                )
            raw = median(workload, "raw")
            if raw:
                verdict(
                    f"{backend} {mine} ≥ {_RAW_RATIO:g}x the raw loop",
                    rate / raw,
                    rate / raw >= _RAW_RATIO,
                )
            floor = _FLOOR.get(backend)
            if floor is not None:
                verdict(f"{backend} {mine} ≥ {floor:,.0f} jobs/s", rate, rate >= floor, "{:,.0f}")
            for suffix, bound in ((" p50", _P50_MS), (" p99", _P99_MS)):
                ms = median(f"{backend} queue put to claim{suffix}", mine)
                if ms is not None and backend in ("postgres", "redis"):
                    verdict(
                        f"{backend} {mine} put to claim{suffix} ≤ {bound:g} ms",
                        ms,
                        ms <= bound,
                        "{:.2f} ms",
                    )
