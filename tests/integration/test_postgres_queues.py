"""Work queues on PostgreSQL beyond the conformance suite: the plan and the locks of the claim
statement, concurrent claimers and dedupe keys, LISTEN wake-ups from another store, the rows a
statement moves, the schema and table settings, a large put in one statement, a crash of the
server. Every test talks to a real server."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleetmem import InvalidArgumentError
from fleetmem.errors import BackendUnavailableError, StoreClosedError
from fleetmem.protocol import QueueStats

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore, init_connection  # noqa: E402
from fleetmem.backends.postgres import queues as pg_queues  # noqa: E402
from fleetmem.backends.postgres.connector import FETCHVAL, statements  # noqa: E402
from fleetmem.backends.postgres.leases import Listener  # noqa: E402
from fleetmem.backends.seam import NewJob  # noqa: E402

_JOBS = "fleetmem.entries_jobs"
_AWAITED = "fleetmem.entries_jobs_awaited"
_Q = pg_queues.queue_statements("fleetmem", "entries")
_CLAIM = _Q["claim"]


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _until_awaited(store: PostgresStore, job_id: str, timeout: float = 20.0) -> None:
    """Until a result(wait=) marked ``job_id`` (its ack or death will be notified)."""
    deadline = time.monotonic() + timeout
    query = f"SELECT count(*) FROM {_AWAITED} WHERE id = $1"
    while True:
        marks = await store.kv.connector.run(FETCHVAL, query, (int(job_id, 16),), write=False)
        if marks:
            return
        assert time.monotonic() < deadline, "the job was never marked"
        await asyncio.sleep(0.01)


@pytest.fixture
async def two_stores(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database and namespace with connectors (pools, notifiers, LISTEN
    connections) of their own: what two processes see."""
    async with (
        PostgresStore.from_url(fleetmem_postgres_database, namespace=fleetmem_namespace) as one,
        PostgresStore.from_url(fleetmem_postgres_database, namespace=fleetmem_namespace) as two,
    ):
        yield one, two


_INSERT = f"""
INSERT INTO {_JOBS} (namespace, queue, state, priority, due_at, attempts, max_attempts,
                     enqueued_at, ready_at, payload, result, finished_at)
SELECT $1, $2, $3, $4, now() + $5::bigint * interval '1 second', $6, 5, now(), now(), '{{}}',
       '1', now()
FROM generate_series(1, $7)
"""


async def _rows(dsn: str, ns: str, queue: str, state: str, n: int, **kw: int) -> None:
    """``n`` raw rows in ``state`` (due ``due`` seconds from now, ``attempts`` made)."""
    await _fetch(
        dsn, _INSERT, ns, queue, state, kw.get("priority", 0), kw.get("due", 0),
        kw.get("attempts", 0), n,
    )  # fmt: skip


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads a table or an index."""
    found = []
    if plan["Node Type"] != "ModifyTable" and ("Relation Name" in plan or "Index Name" in plan):
        found.append(plan)
    for child in plan.get("Plans", ()):
        found.extend(_scans(child))
    return found


def _rows_read(node: dict[str, Any]) -> float:
    """Rows a table scan produced or threw away, over all its loops (0 for an index node
    under a bitmap scan: its heap scan counts them)."""
    if "Relation Name" not in node:
        return 0.0
    loops = node.get("Actual Loops", 1)
    return float(
        node.get("Actual Rows", 0) * loops
        + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
    )


# ------------------------------------------------------------------------------ the claim


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_the_claim_reads_only_ready_rows_through_the_claim_index(
    fleetmem_postgres_database: str, fleetmem_namespace: str, plan_mode: str
) -> None:
    """Done, dead and delayed jobs and live claims -- even at a higher priority than the ready
    ones -- are never read: the claim walks the queue's priorities (one descent each) and
    reads, per priority, the range of the claim index that is due. Both plans PostgreSQL may
    pick for the prepared statement (custom, and generic after five runs) do."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    await _rows(dsn, ns, "q", "done", 3000, due=3600)
    await _rows(dsn, ns, "q", "dead", 3000)
    await _rows(dsn, ns, "q", "waiting", 2000, priority=9, due=3600)  # delayed
    await _rows(dsn, ns, "q", "claimed", 2000, priority=5, due=3600, attempts=1)  # live leases
    await _rows(dsn, ns, "q", "waiting", 10, priority=0)  # ready
    await _rows(dsn, ns, "other", "waiting", 2000, priority=0)  # another queue, all ready
    await _fetch(dsn, f"ANALYZE {_JOBS}")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        await conn.execute("PREPARE claim (text, text, text, bigint, int) AS " + _CLAIM)
        for limit, claims in ((3, 3), (50, 10)):  # all claimed; fewer: the next due is read
            tx = conn.transaction()
            await tx.start()
            try:
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, FORMAT JSON) "
                    f"EXECUTE claim('{ns}', 'q', 'c', 30000, {limit})"
                )
            finally:
                await tx.rollback()
            plan = json.loads(rows[0][0])[0]["Plan"]
            scans = _scans(plan)
            assert "Seq Scan" not in {node["Node Type"] for node in scans}
            indexes = {node["Index Name"] for node in scans if "Index Name" in node}
            assert indexes <= {
                "entries_jobs_claim_idx",
                "entries_jobs_last_attempt_idx",
                "entries_jobs_pkey",
            }, indexes
            claimed = [n for n in scans if n.get("Index Name") == "entries_jobs_pkey"]
            assert sum(_rows_read(n) for n in claimed) == claims
            read = sum(_rows_read(n) for n in scans)
            # The ready rows, the claimed rows looked up again, a few descents: never the
            # 10,000 other rows of the queue.
            assert read <= 2 * claims + 12, json.dumps(plan, indent=1)
    finally:
        await conn.close()


async def test_a_claim_locks_no_more_rows_than_it_claims(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """While a claim's transaction is open, every other ready row of the queue can still be
    locked by another claimer, across priorities too: the LIMIT bounds the locking."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("q")
        for priority in (3, 2, 1):
            await q.put_many(range(5), priority=priority)
    count_free = (
        f"SELECT count(*) FROM (SELECT 1 FROM {_JOBS} WHERE namespace = $1 AND queue = 'q' "
        "FOR UPDATE SKIP LOCKED) s"
    )
    claimer = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        await init_connection(claimer)
        for limit in (1, 2, 5, 7, 12):
            tx = claimer.transaction()
            await tx.start()
            try:
                rows = await claimer.fetch(_CLAIM, ns, "q", "c", 30000, limit)
                priorities = sorted((row[2] for row in rows if row[0] is not None), reverse=True)
                assert priorities == ([3] * 5 + [2] * 5 + [1] * 5)[:limit]
                assert await other.fetchval(count_free, ns) == 15 - limit
            finally:
                await tx.rollback()
    finally:
        await claimer.close()
        await other.close()


async def test_sixteen_concurrent_claimers_never_get_the_same_job(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """16 consumers in two stores (two processes' pools) claim 3,000 jobs in batches of random
    sizes: each job is claimed once, each claim's ack holds, nothing is left."""
    one, two = two_stores
    total = 3000
    ids = await one.queue("work").put_many(range(total))
    claims: list[str] = []
    acks: list[bool] = []

    async def consumer(store: PostgresStore, name: str) -> None:
        q = store.queue("work")
        while True:
            jobs = await q.claim_many(random.randint(1, 8), consumer=name, lease=300)
            if not jobs:
                if (await q.stats()).ready == 0:
                    return
                continue
            for job in jobs:
                claims.append(job.id)
                assert job.attempts == 1 and job.consumer == name
            acks.extend(await asyncio.gather(*(q.ack(job, result=job.payload) for job in jobs)))

    await asyncio.wait_for(
        asyncio.gather(*(consumer((one, two)[i % 2], f"c{i}") for i in range(16))), 120
    )
    assert len(claims) == total
    assert sorted(claims) == sorted(ids)
    assert all(acks)
    assert await one.queue("work").stats() == QueueStats(0, 0, 0, 0, total)


async def test_the_claim_moves_a_claim_that_died_on_its_last_attempt(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A claim whose lease ran out on its last attempt is dead from its expiry on every path
    while its row still says 'claimed'; the next claim of the queue moves the row to 'dead',
    finished at the lease's expiry."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    state = f"SELECT state, finished_at FROM {_JOBS} WHERE namespace = $1 AND id = $2"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=1)
        job = await q.claim(lease=0.2)
        assert job is not None and job.lease_expires_at is not None
        row_id = int(job_id, 16)
        deadline = time.monotonic() + 20
        while (await q.stats()).dead == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert [tuple(r) for r in await _fetch(dsn, state, ns, row_id)] == [("claimed", None)]
        result = await q.result(job_id)
        assert result is not None and result.status == "dead"
        assert result.finished_at == job.lease_expires_at
        assert await q.claim() is None
        assert [tuple(r) for r in await _fetch(dsn, state, ns, row_id)] == [
            ("dead", job.lease_expires_at)
        ]
        # A put of its dedupe key moves it the same way (and takes the key).
        keyed = await q.put("y", max_attempts=1, dedupe_key="k")
        assert (await q.claim(lease=0.2)) is not None
        while (await q.stats()).dead == 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        fresh = await q.put("z", dedupe_key="k")
        assert fresh != keyed
        rows = await _fetch(dsn, state, ns, int(keyed, 16))
        assert rows[0][0] == "dead"


async def test_a_result_waiting_for_a_job_never_hides_it_from_a_claim(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """Marking a job as awaited (a result(wait=) about to wait) writes a row of the mark table,
    never the job's row: with the mark's transaction still open, a claim gets the job it
    should -- the best one first, and the only one rather than nothing."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    marking = await asyncpg.connect(dsn)
    try:
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            q = store.queue("q")
            high = await q.put("high", priority=10)
            await q.put("low", priority=0)
            lone = await store.queue("lone").put("only")
            tx = marking.transaction()
            await tx.start()
            try:
                # await_result's statement, caught between its insert and its commit.
                await marking.execute(_Q["await_result"], ns, "q", int(high, 16))
                await marking.execute(_Q["await_result"], ns, "lone", int(lone, 16))
                job = await q.claim(lease=60)
                jobs, next_ms = await store.queue("lone").backend.claim("lone", "c", 60000, 1)
            finally:
                await tx.commit()
            assert job is not None and job.id == high
            assert [j.id for j in jobs] == [lone] and next_ms is None
            # The marks hold: the ack of an awaited job is notified, and its mark goes.
            marks = f"SELECT id FROM {_AWAITED} ORDER BY id"
            assert [r[0] for r in await _fetch(dsn, marks)] == [int(high, 16), int(lone, 16)]
            assert await q.ack(job, result=1)
            assert [r[0] for r in await _fetch(dsn, marks)] == [int(lone, 16)]
    finally:
        await marking.close()


async def test_marks_of_awaited_jobs_do_not_outlive_them(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A mark goes when its job is acked, dies by nack, is cancelled or purged, or its result
    expires and the row is swept; a nack that gives the job back keeps it (the waiter still
    waits). A job that is not live is not marked."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    marks = f"SELECT id FROM {_AWAITED} ORDER BY id"

    async def marked() -> list[str]:
        return [f"{r[0]:016x}" for r in await _fetch(dsn, marks)]

    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("q")
        backend = q.backend
        acked, nacked, retried, cancelled, expired = await q.put_many(range(5), max_attempts=2)
        mortal = await q.put("mortal", max_attempts=1)
        for job_id in (acked, nacked, retried, cancelled, expired, mortal):
            await backend.await_result("q", job_id)
            await backend.await_result("q", job_id)  # once is enough
        assert await marked() == sorted([acked, nacked, retried, cancelled, expired, mortal])
        jobs = {j.id: j for j in await q.claim_many(6, lease=60)}
        assert await q.cancel(cancelled) is False  # claimed: stays, and so does its mark
        assert await q.ack(jobs[acked], result=1)
        assert await q.nack(jobs[retried], retry_in=0)  # back to the queue: still awaited
        assert await q.nack(jobs[mortal], error="x")  # dead: the death was told
        assert await q.nack(jobs[nacked], retry_in=0)
        again = {j.id: j for j in await q.claim_many(2, lease=60)}
        assert await q.nack(again[nacked], error="x")  # its last attempt: dead
        assert await q.ack(jobs[expired], result=1, result_ttl=0.05)
        assert await marked() == sorted([retried, cancelled])
        # Gone with their jobs: a cancelled one, and a dead one purged.
        await q.nack(jobs[cancelled], retry_in=60)
        assert await q.cancel(cancelled)
        assert await marked() == [retried]
        # A mark that came too late for the ack (the race await_result's statement describes),
        # of a done job: it goes with the row when the result expired and is swept.
        await _fetch(dsn, f"INSERT INTO {_AWAITED} VALUES ($1)", int(expired, 16))
        deadline = time.monotonic() + 20
        while await q.result(expired) is not None:
            assert time.monotonic() < deadline, "the result never expired"
            await asyncio.sleep(0.02)
        assert await store.sweep_expired() >= 1
        assert await marked() == [retried]
        # Finished, dead and unknown jobs are not marked.
        for job_id in (acked, nacked, "00000000000fffff"):
            await backend.await_result("q", job_id)
        assert await marked() == [retried]
        dead_by_lease = await q.put("lease", max_attempts=1)
        await backend.await_result("q", dead_by_lease)
        assert await q.claim(lease=0.05) is not None
        await _until_dead(q, 3)
        assert await q.purge_dead() == 3
        assert await marked() == [retried]


async def _until_dead(q: Any, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (await q.stats()).dead != n:
        assert time.monotonic() < deadline, "the jobs never died"
        await asyncio.sleep(0.02)


async def test_marking_a_job_that_is_being_cancelled_is_not_an_error(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """The mark's foreign key waits for a cancel in flight and then finds the job gone:
    await_result gives up quietly (result() says the job is unknown)."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    other = await asyncpg.connect(dsn)
    try:
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            q = store.queue("q")
            job_id = await q.put("x")
            tx = other.transaction()
            await tx.start()
            assert await other.fetchval(_Q["cancel"], ns, "q", int(job_id, 16)) is not None
            marking = asyncio.create_task(q.backend.await_result("q", job_id))
            await _until_blocked(dsn)
            await tx.commit()
            await asyncio.wait_for(marking, 30)
            assert await q.result(job_id, wait=0.05) is None
            assert await _fetch(dsn, f"SELECT id FROM {_AWAITED}") == []
    finally:
        await other.close()


async def test_concurrent_puts_of_one_dedupe_key_enqueue_one_job(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    one, two = two_stores
    for round_ in range(3):
        puts = [
            (one, two)[i % 2].queue("q").put({"i": i}, dedupe_key=f"key-{round_}")
            for i in range(16)
        ]
        ids = await asyncio.gather(*puts)
        assert len(set(ids)) == 1
        rows = await _fetch(
            fleetmem_postgres_database,
            f"SELECT count(*) FROM {_JOBS} WHERE namespace = $1 AND dedupe_key = $2",
            one.namespace,
            f"key-{round_}",
        )
        assert rows[0][0] == 1
    assert (await one.queue("q").stats()).ready == 3


_LIVE_KEY = f"""
INSERT INTO {_JOBS} (namespace, queue, state, priority, due_at, max_attempts, enqueued_at,
                     ready_at, dedupe_key, payload)
VALUES ($1, 'q', 'waiting', 0, now(), 5, now(), now(), $2, '"other"')
RETURNING id
"""


async def _until_blocked(dsn: str, timeout: float = 20.0) -> None:
    """Until some session of the database waits for a lock (a transaction of another)."""
    deadline = time.monotonic() + timeout
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    while (await _fetch(dsn, query))[0][0] == 0:
        assert time.monotonic() < deadline, "nobody waited"
        await asyncio.sleep(0.02)


async def test_a_put_that_waited_for_another_put_of_its_key_returns_that_job(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A put whose dedupe key another transaction is inserting waits for its commit (the
    unique index), enqueues nothing, and -- the holder being newer than its snapshot -- looks
    again and returns the holder's id."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    other = await asyncpg.connect(dsn)
    try:
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            tx = other.transaction()
            await tx.start()
            holder = await other.fetchval(_LIVE_KEY, ns, "k")
            put = asyncio.create_task(store.queue("q").put("mine", dedupe_key="k"))
            await _until_blocked(dsn)
            await tx.commit()
            assert await asyncio.wait_for(put, 30) == f"{holder:016x}"
            job = await store.queue("q").claim()
            assert job is not None and job.payload == "other"
    finally:
        await other.close()


async def test_a_retry_dead_that_races_a_put_of_the_key_keeps_the_job_dead(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """retry_dead gives a dead job its dedupe key back only if no live job holds it; a put of
    that key committed while retry_dead runs makes the unique index refuse the retry, which
    runs again, sees the holder, and leaves the job dead (no error reaches the caller)."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    other = await asyncpg.connect(dsn)
    try:
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            q = store.queue("q")
            dead_id = await q.put("mine", dedupe_key="k", max_attempts=1)
            job = await q.claim(lease=60)
            assert job is not None and await q.nack(job, error="x")
            tx = other.transaction()
            await tx.start()
            await other.fetchval(_LIVE_KEY, ns, "k")
            retry = asyncio.create_task(q.retry_dead())
            await _until_blocked(dsn)
            await tx.commit()
            assert await asyncio.wait_for(retry, 30) == 0
            assert [j.id for j in await q.dead()] == [dead_id]
            assert await q.stats() == QueueStats(1, 0, 0, 1, 0)
    finally:
        await other.close()


async def test_retry_dead_decides_in_one_statement_at_one_instant(
    two_stores: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """retry_dead is one statement: what it moves is what was dead at one instant. Right after
    its (first) statement, a claim holding a dead job's dedupe key dies of its lease and another
    job dies by nack: nothing of that may show in what it moved."""
    store, retrying = two_stores
    q = store.queue("q")
    dead = await q.put("a", dedupe_key="k", max_attempts=1)
    first = await q.claim(lease=60)
    assert first is not None and await q.nack(first, error="x")
    holder = await q.put("x", dedupe_key="k", max_attempts=1)  # holds k while its lease runs
    claimed = await q.claim(lease=3)
    assert claimed is not None and claimed.id == holder
    mortal = await q.put("z", max_attempts=1)
    doomed = await q.claim(lease=60)
    assert doomed is not None and doomed.id == mortal

    connector = retrying.kv.connector
    run = connector.run
    ran: list[str] = []

    async def run_then_meanwhile(kind: int, query: str, *args: Any, **kw: Any) -> Any:
        value = await run(kind, query, *args, **kw)
        ran.append(query)
        if len(ran) == 1:
            # The holder's lease runs out (dead: its last attempt), the other job dies.
            await _until_dead(q, 2)
            assert await q.nack(doomed, error="z")
        return value

    monkeypatch.setattr(connector, "run", run_then_meanwhile)
    moved = await retrying.queue("q").retry_dead()  # its first queue: built on the wrapper
    assert len(ran) == 1
    assert moved == 0  # at its instant the key was held and the other job was alive
    assert [j.id for j in await q.dead()] == [dead, holder, mortal]
    # Now the holder is dead: the lowest id of the key comes back, the holder stays dead.
    assert await q.retry_dead() == 2
    assert [j.id for j in await q.dead()] == [holder]
    assert [j.id for j in await q.claim_many(3, lease=60)] == [dead, mortal]


async def test_retry_dead_takes_a_key_from_a_claim_that_died_of_its_lease(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A claim that died of its lease still holds its key in the unique index of live keys:
    retrying another dead job of that key (by id, or all) moves the claim's row to 'dead' in
    the same statement and gives the key to the job retried -- no unique violation, one live
    job per key."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    state = f"SELECT id, state FROM {_JOBS} WHERE namespace = $1 ORDER BY id"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        for ids_given in (True, False):
            q = store.queue(f"q{int(ids_given)}")
            dead = await q.put("a", dedupe_key="k", max_attempts=1)
            first = await q.claim(lease=60)
            assert first is not None and await q.nack(first, error="x")
            holder = await q.put("b", dedupe_key="k", max_attempts=1)
            assert await q.claim(lease=0.05) is not None
            await _until_dead(q, 2)
            moved = await q.retry_dead([dead] if ids_given else None)
            assert moved == 1
            assert [j.id for j in await q.dead()] == [holder]
            rows = dict(await _fetch(dsn, state, ns))
            assert (rows[int(dead, 16)], rows[int(holder, 16)]) == ("waiting", "dead")
            assert await q.put("c", dedupe_key="k") == dead  # the key is the retried job's
        # A claim that died of its lease alone is retried from its row as it is.
        q = store.queue("alone")
        only = await q.put("d", dedupe_key="k", max_attempts=1)
        assert await q.claim(lease=0.05) is not None
        await _until_dead(q, 1)
        assert await q.retry_dead([only]) == 1
        job = await q.claim(lease=60)
        assert job is not None and (job.id, job.attempts) == (only, 1)


async def test_purge_dead_removes_a_job_a_concurrent_claim_is_burying(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A claim whose lease ran out on its last attempt is dead; a claim of the queue moves its
    row to 'dead' while purge_dead runs. The purge read the row as 'claimed', waits for the
    claim's lock, and re-checks the row as 'dead': one condition covers both, so it goes."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    other = await asyncpg.connect(dsn)
    try:
        await init_connection(other)
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            q = store.queue("q")
            await q.put("x", max_attempts=1)
            assert await q.claim(lease=0.05) is not None
            await _until_dead(q, 1)
            tx = other.transaction()
            await tx.start()
            try:
                await other.fetch(_CLAIM, ns, "q", "c", 60000, 1)  # buries it, not committed
                purge = asyncio.create_task(q.purge_dead())
                await _until_blocked(dsn)
            finally:
                await tx.commit()
            assert await asyncio.wait_for(purge, 30) == 1
            assert await q.dead() == []
            assert await _fetch(dsn, f"SELECT id FROM {_JOBS} WHERE namespace = $1", ns) == []
    finally:
        await other.close()


async def test_extending_an_expired_claim_reports_when_the_job_became_ready(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """An extend of a claim whose lease ran out (nobody claimed the job since) makes it live
    again and reports, and stores, ready_at = the old lease's expiry; an extend of a live claim
    keeps ready_at."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    ready_at = f"SELECT ready_at FROM {_JOBS} WHERE id = $1"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("q")
        job_id = await q.put("x", max_attempts=3)
        job = await q.claim(lease=0.05)
        assert job is not None and job.lease_expires_at is not None
        deadline = time.monotonic() + 20
        while (await q.stats()).ready != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        extended = await q.extend(job, lease=60)
        assert extended.ready_at == job.lease_expires_at != job.ready_at
        assert (await _fetch(dsn, ready_at, int(job_id, 16)))[0][0] == job.lease_expires_at
        again = await q.extend(extended, lease=60)
        assert again.ready_at == job.lease_expires_at
        assert again.lease_expires_at is not None and extended.lease_expires_at is not None
        assert again.lease_expires_at >= extended.lease_expires_at


async def test_acks_delete_the_results_that_expired(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """Rows of done jobs go once their result expired: each ack deletes up to two of them, so
    a queue in use never piles them up."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    count = f"SELECT count(*) FROM {_JOBS} WHERE namespace = $1 AND state = 'done'"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("q")
        await q.put_many(range(6))
        for job in await q.claim_many(5, lease=60):
            assert await q.ack(job, result=1, result_ttl=2)
        deadline = time.monotonic() + 20
        while (await q.stats()).done:  # expired: not counted, not readable
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await _fetch(dsn, count, ns))[0][0] == 5
        last = await q.claim(lease=60)
        assert last is not None
        assert await q.ack(last, result=2)
        assert (await _fetch(dsn, count, ns))[0][0] == 4  # 5 - 2 expired + 1 new
        assert (await q.stats()).done == 1


async def test_the_sweeper_deletes_the_expired_results_of_an_idle_queue(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A queue nobody acks in any more still loses its expired results: ``sweep_expired`` (the
    background sweeper) deletes them, and leaves held results and other jobs alone."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    count = f"SELECT state, count(*) FROM {_JOBS} WHERE namespace = $1 GROUP BY state"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        q = store.queue("idle")
        await q.put_many(range(4))
        jobs = await q.claim_many(3, lease=60)
        assert await q.ack(jobs[0], result=1, result_ttl=0.2)
        assert await q.ack(jobs[1], result=1, result_ttl=0.2)
        assert await q.ack(jobs[2], result=1, result_ttl=600)
        deadline = time.monotonic() + 20
        while (await q.stats()).done != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert dict(await _fetch(dsn, count, ns)) == {"done": 3, "waiting": 1}
        assert await store.sweep_expired() >= 2
        assert dict(await _fetch(dsn, count, ns)) == {"done": 1, "waiting": 1}
        held = await q.result(jobs[2].id)
        assert held is not None and held.value == 1


_DONE_ROWS = f"""
INSERT INTO {_JOBS} (namespace, queue, state, priority, due_at, max_attempts, enqueued_at,
                     ready_at, payload, result, finished_at)
SELECT $1, $2, 'done', 0, now() + $3::bigint * interval '1 second' + g * interval '1 ms', 5,
       now(), now(), '{{}}', '1', now()
FROM generate_series(1, $4) g
"""


def _blocks(node: dict[str, Any]) -> int:
    """The buffers a plan node touched (its loops included)."""
    return int(node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0))


async def test_the_sweeper_reads_only_expired_results(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """sweep_results walks the queues of the done index (one descent each) and reads per queue
    the range of expired results: the entries of 26,000 results still held are never read."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    await _fetch(dsn, _DONE_ROWS, ns, "held", 3600, 20_000)
    for queue in ("a", "b", "c"):
        await _fetch(dsn, _DONE_ROWS, ns, queue, -60, 10)
        await _fetch(dsn, _DONE_ROWS, ns, queue, 3600, 2000)
    await _fetch(dsn, f"ANALYZE {_JOBS}")
    sweep = statements("kv.sql", "fleetmem", "entries")["sweep_results"]
    conn = await asyncpg.connect(dsn)
    try:
        size = await conn.fetchval("SELECT pg_relation_size('fleetmem.entries_jobs_done_idx')")
        for batch, swept in ((1000, 30), (15, 15)):
            tx = conn.transaction()
            await tx.start()
            try:
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sweep.replace("$1", str(batch))
                )
            finally:
                await tx.rollback()
            plan = json.loads(rows[0][0])[0]["Plan"]
            scans = _scans(plan)
            assert "Seq Scan" not in {node["Node Type"] for node in scans}
            assert sum(_rows_read(node) for node in scans) <= 2 * swept + 12
            # A few descents per queue and the expired entries: not the index's pages.
            done = [n for n in scans if n.get("Index Name") == "entries_jobs_done_idx"]
            read = sum(_blocks(n) for n in done)
            assert read <= 60 < size // 8192, json.dumps(plan, indent=1)
        async with PostgresStore.from_url(dsn, namespace=ns) as store:
            assert await store.sweep_expired() == 30
        left = f"SELECT count(*) FROM {_JOBS} WHERE namespace = $1 AND due_at <= now()"
        assert (await _fetch(dsn, left, ns))[0][0] == 0
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ wake-ups


async def test_a_put_in_another_store_wakes_a_waiting_claim_through_listen(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    waiting_store, putting_store = two_stores
    waiting = waiting_store.queue("q")
    # Polling would take a minute: only the notification can wake the waiter in time.
    waiting.backend.poll_interval = 60.0  # type: ignore[misc]
    claim = asyncio.create_task(waiting.claim(consumer="w", wait=30))
    notifier = waiting_store.kv.connector.notifier
    await _until(lambda: notifier.watching(waiting.backend.claim_key("q")))
    listener = waiting_store.kv.connector.listener
    assert isinstance(listener, Listener) and listener.listening
    put_at = time.monotonic()
    job_id = await putting_store.queue("q").put({"n": 1})
    job = await asyncio.wait_for(claim, 30)
    latency = time.monotonic() - put_at
    assert job is not None and job.id == job_id
    assert latency < 5.0, latency  # the contract's 100 ms, with room for a loaded host


async def test_an_ack_in_another_store_wakes_a_waiting_result_through_listen(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    waiting_store, working_store = two_stores
    waiting = waiting_store.queue("q")
    waiting.backend.poll_interval = 60.0  # type: ignore[misc]
    working = working_store.queue("q")
    job_id = await working.put({"n": 1})
    job = await working.claim(lease=60)
    assert job is not None
    results = [asyncio.create_task(waiting.result(job_id, wait=30)) for _ in range(3)]
    notifier = waiting_store.kv.connector.notifier
    await _until(lambda: len(notifier) == 3)
    await _until_awaited(waiting_store, job_id)
    acked_at = time.monotonic()
    assert await working.ack(job, result={"ok": True})
    done = await asyncio.wait_for(asyncio.gather(*results), 30)
    assert time.monotonic() - acked_at < 5.0
    assert [(r.status, r.value) for r in done if r is not None] == [("done", {"ok": True})] * 3


async def test_only_puts_and_awaited_finishes_notify(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    """One notification per put statement (with its job count), none for an ack or a nack
    nobody waits for, one for an ack or a death a result(wait=) marked."""
    store, waiter_store = two_stores
    ns = store.namespace
    q = store.queue("q")
    got: list[str] = []
    sentinel = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == "sentinel":
            sentinel.set()
        else:
            got.append(payload)

    async def received() -> list[str]:
        """What arrived before a sentinel sent now (delivered in commit order)."""
        sentinel.clear()
        await listener.execute(f"NOTIFY \"{channel}\", 'sentinel'")
        await asyncio.wait_for(sentinel.wait(), 10)
        out = list(got)
        got.clear()
        return out

    channel = store.kv.connector.channel
    listener = await asyncpg.connect(fleetmem_postgres_database)
    try:
        await listener.add_listener(channel, on_notify)
        first = await q.put("a")
        await q.put_many(["b", "c", "d"])
        await q.put("again", dedupe_key="k")
        await q.put("again", dedupe_key="k")  # deduplicated: nothing enqueued, no notification
        assert await received() == [f">1:{ns}:q", f">3:{ns}:q", f">1:{ns}:q"]
        jobs = await q.claim_many(3, lease=60)
        assert len(jobs) == 3 and jobs[0].id == first
        assert await q.ack(jobs[0], result=1)
        assert await q.nack(jobs[1], retry_in=60)
        assert await received() == []
        # Awaited: the ack, and a death, notify.
        for job, finish in ((jobs[2], "ack"), (None, "nack")):
            if job is None:
                job_id = await q.put("mortal", max_attempts=1, priority=9)
                job = await q.claim(lease=60)
                assert job is not None and job.id == job_id
            waiting = asyncio.create_task(waiter_store.queue("q").result(job.id, wait=30))
            await _until_awaited(waiter_store, job.id)
            if finish == "ack":
                assert await q.ack(job, result=2)
            else:
                assert await q.nack(job, error="fatal")
            result = await asyncio.wait_for(waiting, 30)
            assert result is not None and result.status == ("done" if finish == "ack" else "dead")
            notes = await received()
            assert [n for n in notes if n.startswith("!")] == [f"!{ns}:{job.id}"]
    finally:
        await listener.close()


async def test_a_put_of_several_statements_notifies_once_with_its_total(
    fleetmem_postgres_database: str, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL delivers identical payloads of one transaction once: a put of three chunks of
    three jobs sends one notification for nine (not three notifications of '>3' that arrive as
    one); a put of several dedupe keys likewise."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    monkeypatch.setattr(pg_queues, "PUT_CHUNK_JOBS", 3)
    got: list[str] = []
    sentinel = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == "sentinel":
            sentinel.set()
        else:
            got.append(payload)

    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        channel = store.kv.connector.channel
        listener = await asyncpg.connect(dsn)
        try:
            await listener.add_listener(channel, on_notify)
            ids = await store.queue("q").put_many(list(range(9)))
            keyed = [NewJob(b"%d" % i, 0, 0, 5, f"k{i % 4}") for i in range(6)]
            await store.queue("q").backend.put("q", keyed)
            await listener.execute(f"NOTIFY \"{channel}\", 'sentinel'")
            await asyncio.wait_for(sentinel.wait(), 10)
        finally:
            await listener.close()
        assert len(ids) == 9
        assert got == [f">9:{ns}:q", f">4:{ns}:q"]
        assert (await store.queue("q").stats()).ready == 13


async def test_listen_raises_only_what_connecting_raises(fleetmem_namespace: str) -> None:
    """listen() connects a store that is not connected yet and raises what that raises (the
    error the waiting call's first statement would raise); a closed store says so."""
    store = PostgresStore.from_url(
        "postgresql://fleetmem@127.0.0.1:1/nowhere", namespace=fleetmem_namespace
    )
    try:
        with pytest.raises(BackendUnavailableError):
            await store.queue("q").backend.listen()
    finally:
        await store.close()
    with pytest.raises(StoreClosedError):
        await store.queue("q").backend.listen()


async def test_a_lost_listening_connection_is_replaced_and_a_waiting_claim_still_gets_its_job(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    waiting_store, putting_store = two_stores
    waiting = waiting_store.queue("q")
    waiting.backend.poll_interval = 60.0  # type: ignore[misc]
    await waiting.backend.listen()
    listener = waiting_store.kv.connector.listener
    assert isinstance(listener, Listener) and listener.listening
    killed = await _fetch(
        fleetmem_postgres_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND query LIKE 'NOTIFY \"' || $1 || '\"%'",
        waiting_store.kv.connector.channel,
    )
    assert [r[0] for r in killed] == [True]
    claim = asyncio.create_task(waiting.claim(wait=30))
    await asyncio.sleep(0.2)
    job_id = await putting_store.queue("q").put("x")
    job = await asyncio.wait_for(claim, 30)
    assert job is not None and job.id == job_id
    await _until(lambda: listener.listening)  # reconnected


async def test_an_injected_pool_lends_the_listener_a_connection_only_while_claims_wait(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    pool = await asyncpg.create_pool(
        fleetmem_postgres_database, min_size=1, max_size=3, init=init_connection
    )
    try:
        store = PostgresStore(pool=pool, namespace=fleetmem_namespace)
        await store.connect()
        q = store.queue("q")
        assert await q.claim(wait=0.2) is None
        assert await q.result("0000000000000001", wait=0.2) is None
        listener = store.kv.connector.listener
        assert isinstance(listener, Listener)
        await _until(lambda: pool.get_idle_size() == pool.get_size())  # given back
        assert not listener.listening
        await asyncio.wait_for(pool.close(), 10)
        await store.close()
    finally:
        pool.terminate()


# ------------------------------------------------------------------------------ put


async def test_a_put_of_ten_thousand_jobs_is_one_statement(
    fleetmem_postgres_database: str, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        connector = store.kv.connector
        statements_run: list[str] = []
        run = connector.run

        async def counting_run(kind: int, query: str, *args: Any, **kw: Any) -> Any:
            statements_run.append(query)
            return await run(kind, query, *args, **kw)

        monkeypatch.setattr(connector, "run", counting_run)
        q = store.queue("bulk")  # built now: it takes the connector's run from here on
        ids = await q.put_many([{"i": i} for i in range(10_000)], priority=3)
        assert len(statements_run) == 1
        assert [int(i, 16) for i in ids] == sorted(int(i, 16) for i in ids)
        assert len(set(ids)) == 10_000
    rows = await _fetch(
        dsn,
        f"SELECT count(*), count(DISTINCT xmin::text), count(DISTINCT enqueued_at), "
        f"min(priority), max(priority) FROM {_JOBS} WHERE namespace = $1 AND queue = 'bulk'",
        ns,
    )
    assert tuple(rows[0]) == (10_000, 1, 1, 3, 3)  # one transaction, one now()
    rows = await _fetch(
        dsn,
        f"SELECT id, payload->>'i' FROM {_JOBS} WHERE namespace = $1 ORDER BY id LIMIT 3",
        ns,
    )
    assert [(f"{r[0]:016x}", r[1]) for r in rows] == [(ids[i], str(i)) for i in range(3)]


async def test_a_put_larger_than_a_statement_is_one_transaction_all_or_nothing(
    fleetmem_postgres_database: str, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    monkeypatch.setattr(pg_queues, "PUT_CHUNK_JOBS", 1000)
    count = f"SELECT count(*), count(DISTINCT xmin::text) FROM {_JOBS} WHERE namespace = $1"
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        backend = store.queue("q").backend
        jobs = [NewJob(b"%d" % i, 0, 0, 5, None) for i in range(3500)]
        ids = await backend.put("q", jobs)
        assert len(ids) == 3500 and ids == sorted(ids)
        assert tuple((await _fetch(dsn, count, ns))[0]) == (3500, 1)
        # The last chunk fails on the server (not JSON): the chunks before it are undone too.
        bad = [*jobs, NewJob(b"{not json", 0, 0, 5, None)]
        with pytest.raises(InvalidArgumentError):
            await backend.put("q", bad)
        assert tuple((await _fetch(dsn, count, ns))[0]) == (3500, 1)
        claimed = await store.queue("q").claim_many(3)
        assert [j.payload for j in claimed] == [0, 1, 2]


async def test_an_acknowledged_put_survives_a_crash_of_the_server(
    fleetmem_postgres_factory: Any,
) -> None:
    server = fleetmem_postgres_factory(durable=True)
    async with PostgresStore.from_url(server.dsn, namespace="n") as store:
        q = store.queue("q")
        one = await q.put({"n": 0}, dedupe_key="only")
        many = await q.put_many([{"n": i} for i in range(1, 1001)])
        first = await q.claim(lease=0.05)
        assert first is not None and first.id == one
    await asyncio.to_thread(server.kill)  # SIGKILL: no shutdown checkpoint
    await asyncio.to_thread(server.start)
    async with PostgresStore.from_url(server.dsn, namespace="n") as store:
        q = store.queue("q")
        jobs = await q.claim_many(2000, lease=60)
        # The expired claim is ready again as of its lease's expiry, after the others.
        assert [j.id for j in jobs] == [*many, one]
        assert jobs[-1].token == first.token + 1 and jobs[-1].attempts == 2
        assert await q.put({"n": 0}, dedupe_key="only") == one
        newer = await q.put("after")
        assert int(newer, 16) > int(many[-1], 16)  # ids never go back


# ------------------------------------------------------------------------------ schema


async def test_a_custom_schema_and_table_have_their_own_job_table(
    fleetmem_postgres_empty_database: str,
) -> None:
    dsn = fleetmem_postgres_empty_database
    async with (
        PostgresStore.from_url(dsn, namespace="n", schema="coord", table="kv") as custom,
        PostgresStore.from_url(dsn, namespace="n") as default,
    ):
        job_id = await custom.queue("q").put("custom")
        assert await default.queue("q").stats() == QueueStats(0, 0, 0, 0, 0)
        assert await default.list_queues() == []
        assert await custom.list_queues() == ["q"]
        waiter = asyncio.create_task(default.queue("q").claim(wait=30))
        await asyncio.sleep(0.2)
        await custom.queue("q").put("custom again")  # another table's put wakes nobody here
        await asyncio.sleep(0.3)
        assert not waiter.done()
        mine = await default.queue("q").put("default")
        job = await asyncio.wait_for(waiter, 30)
        assert job is not None and (job.id, job.payload) == (mine, "default")
        got = await custom.queue("q").claim()
        assert got is not None and (got.id, got.payload) == (job_id, "custom")
    rows = await _fetch(
        dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'coord' "
        "ORDER BY table_name",
    )
    assert "kv_jobs" in [r[0] for r in rows]
    rows = await _fetch(dsn, "SELECT payload #>> '{}' FROM coord.kv_jobs ORDER BY id")
    assert [r[0] for r in rows] == ["custom", "custom again"]


async def test_the_least_privilege_grants_from_the_docs_cover_queues(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """The grants of the job table and of its mark table are enough: the identity column needs
    no grant on a sequence, and the mark's foreign key checks and cascades as the tables'
    owner."""
    from urllib.parse import urlsplit, urlunsplit

    dsn = fleetmem_postgres_database
    role = "fm_queue_" + fleetmem_namespace.replace("-", "_").replace(".", "_").lower()[:40]
    await _fetch(dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        for grant in (
            f'GRANT USAGE ON SCHEMA fleetmem TO "{role}"',
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries_jobs TO "{role}"',
            f'GRANT SELECT, INSERT, DELETE ON fleetmem.entries_jobs_awaited TO "{role}"',
            f'GRANT SELECT ON fleetmem.alembic_version TO "{role}"',
        ):
            await _fetch(dsn, grant)
        parts = urlsplit(dsn)
        app_dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        async with PostgresStore.from_url(app_dsn, namespace="lp", auto_migrate=False) as store:
            q = store.queue("q")
            ids = await q.put_many(["a", "b", "c"])
            await q.put("d", dedupe_key="k", max_attempts=1)
            for job_id in (ids[0], ids[1], ids[1]):  # marked as awaited (once)
                assert await q.result(job_id, wait=0.05) is None
            jobs = await q.claim_many(4, lease=60)
            assert [j.id for j in jobs][:3] == ids
            assert await q.extend(jobs[0], lease=60)
            assert await q.ack(jobs[0], result=1)
            assert await q.nack(jobs[1], retry_in=0)
            assert await q.nack(jobs[3], error="x")  # dead
            assert await q.cancel(ids[1])  # awaited: its mark goes with it
            assert await _fetch(dsn, f"SELECT id FROM {_AWAITED}") == []
            assert (await q.result(ids[0])) is not None
            assert await q.result(jobs[0].id, wait=0.1) is not None
            assert await q.claim(wait=0.1) is None
            assert len(await q.dead()) == 1
            assert await q.retry_dead() == 1
            assert await q.stats() == QueueStats(1, 0, 1, 0, 1)
            assert await store.list_queues() == ["q"]
            assert await q.purge_dead() == 0
    finally:
        await _fetch(dsn, f'DROP OWNED BY "{role}"')


async def test_the_single_job_claim_keeps_a_generic_plan(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """``claim()`` runs ``claim_one`` (a constant ``LIMIT 1``): with ``LIMIT $5`` PostgreSQL
    costed the generic plan at a tenth of the queue and planned every call again, which cost
    about 4x the statement's run time. Once prepared statements settle, the plan is reused."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        await store.queue("plan").put_many(range(50))  # creates the tables, fills the queue
    assert "$5" not in _Q["claim_one"] and "$5" in _Q["claim"]
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        stmt = await conn.prepare(_Q["claim_one"])
        for _ in range(20):
            rows = await stmt.fetch(ns, "plan", "planner", 60_000)
            assert sum(1 for r in rows if r["id"] is not None) <= 1
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            _Q["claim_one"],
        )
        assert plans is not None
        assert plans["generic_plans"] >= 10, dict(plans)
    finally:
        await conn.close()
