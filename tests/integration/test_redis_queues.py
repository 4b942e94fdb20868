"""Redis-specific behaviour of the work queues (the rules themselves are proven by the
conformance suite on every backend).

* the key layout: every key of a namespace's queues is in the namespace's slot, of the kinds
  ``lua/queues/_lib.lua`` documents; a done job keeps its result, not its payload, and expires
  natively with it;
* wake-ups by pub/sub: a put in another client wakes a waiting claim (as many waiters as jobs),
  an ack or a nack to the dead letter in another client wakes a result waiter (the fallback
  poll is pushed out of reach, so only a notification can wake them in time); one message per
  put script call carrying its count, and a result message only for an awaited job;
* a Redis Cluster: namespaces spread over the three masters, every transition runs there (as
  plain scripts, also after the script cache was flushed), each namespace in one slot, and a put
  wakes a claim waiting on another client;
* ``put_many`` of 10,000 jobs is 10 script calls (counted by the server), ids and order kept;
* the exact claim order: many priorities (both 32-bit extremes) put in one script call (one
  ``TIME``, so equal ready times), and delayed jobs and expired claims joining the ready set at
  their due time;
* a full server (``maxmemory``, ``noeviction``): reads, ``extend``, ``cancel`` and
  ``purge_dead`` run; ``put`` and ``claim`` are refused with nothing written;
* the same random sequence of calls (no expiry in it) on Redis and on the in-memory reference
  gives the same answers.

Every server that is filled is started by the harness for the test.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, InMemoryStore, OutcomeUnknownError
from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis.queues import RedisQueues
from fleetmem.backends.redis.scripts import QUEUE_FLAGS, QUEUE_SCRIPTS
from fleetmem.backends.seam import NewJob
from fleetmem.protocol import Job, JobResult
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")
from redis.crc import key_slot  # noqa: E402 - after the importorskip

#: A wake-up promised within 100 ms, checked with slack but well under the 1 s fallback poll.
_WAKE = 0.8
#: Long enough to stay put for the length of any test.
_LONG = 120
#: The kinds of key a namespace's queues use (``lua/queues/_lib.lua``).
_KINDS = {"qn", "qs", "j", "qr", "qd", "qc", "ql", "qx", "qo", "qk"}


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Push the waiters' fallback poll out of reach: only a notification wakes them in time."""
    monkeypatch.setattr(RedisQueues, "poll_interval", 60.0)


@pytest.fixture
async def two_stores(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    url = fleetmem_redis_server.url
    async with (
        connected_store(RedisStore.from_url(url, namespace=fleetmem_namespace)) as a,
        connected_store(RedisStore.from_url(url, namespace=fleetmem_namespace)) as b,
    ):
        yield a, b


def _kind(key: bytes, prefix: bytes) -> str:
    """The kind of a queue key: ``qn``, ``j`` (``j:<id>``), ``qr`` (``qr:<queue>``)..."""
    assert key.startswith(prefix), key
    rest = key[len(prefix) :].decode()
    return rest.split(":", 1)[0]


async def _every_transition(store: RedisStore) -> None:
    """Leave a namespace holding a job in each state, having run every script."""
    q = store.queue("jobs")
    other = store.queue("other:queue{with}braces")
    await other.put("x", dedupe_key="d1")
    await q.put({"n": 1}, dedupe_key="k1")
    await q.put({"n": 2}, delay=_LONG)
    await q.put_many([{"n": 3}, {"n": 4}, {"n": 5}, {"n": 6}])
    await q.put({"n": 7}, max_attempts=1)
    jobs = await q.claim_many(3, consumer="c", lease=_LONG)
    assert len(jobs) == 3
    assert await q.ack(jobs[0], result={"ok": True}) is True
    assert await q.nack(jobs[1], retry_in=_LONG, error="later") is True
    await q.extend(jobs[2], lease=_LONG)
    last = await q.put({"n": 8}, max_attempts=1, priority=9)
    dying = await q.claim(lease=_LONG)
    assert dying is not None and dying.id == last
    assert await q.nack(dying, retry_in=0, error="dead") is True
    assert await q.result(last) is not None
    await q.backend.await_result("jobs", jobs[2].id)
    assert [j.id for j in await q.dead()] == [last]
    assert await q.retry_dead() == 1
    again = await q.claim(lease=_LONG)
    assert again is not None and await q.nack(again, error="dead again") is True
    assert await q.cancel(await q.put("gone")) is True
    assert await store.queue("purged").put("p", max_attempts=1)
    purged = store.queue("purged")
    assert await purged.nack(await _claim(purged), error="x")
    assert await purged.purge_dead() == 1
    stats = await q.stats()
    assert (stats.delayed, stats.claimed, stats.dead, stats.done) == (2, 1, 1, 1)
    assert await store.list_queues() == ["jobs", "other:queue{with}braces"]


async def _claim(q: Any, **options: Any) -> Job:
    job = await q.claim(lease=_LONG, **options)
    assert isinstance(job, Job)
    return job


# ------------------------------------------------------------------------------ key layout


async def test_keys_of_a_namespace_are_in_its_slot_and_of_the_documented_kinds(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    ns = fleetmem_namespace
    prefix = f"fm:{{{ns}}}:".encode()
    admin = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        async with connected_store(
            RedisStore.from_url(fleetmem_redis_server.url, namespace=ns)
        ) as store:
            await _every_transition(store)
            keys = [k async for k in admin.scan_iter(match=prefix + b"*", count=1000)]
            assert keys
            assert {key_slot(k) for k in keys} == {key_slot(prefix)}
            assert {_kind(k, prefix) for k in keys} <= _KINDS
            # Queues are invisible to the key-value primitive, and clear() leaves them.
            assert await store.keys() == [] and (await store.stats()).keys == 0
            await store.clear()
            assert (await store.queue("jobs").stats()).delayed == 2
            # A done job keeps its result, not its payload, and expires with its result.
            done = [k for k in keys if _kind(k, prefix) == "j" and await admin.hget(k, "s") == b"o"]
            assert len(done) == 1
            fields = await admin.hgetall(done[0])
            assert b"p" not in fields and fields[b"v"] == b'{"ok":true}'
            assert 0 < await admin.pttl(done[0]) <= 86_400_000
            # A payload is stored once: in its job's hash, nowhere else.
            holders = [k for k in keys if b'{"n":5}' in await _content(admin, k)]
            assert len(holders) == 1 and _kind(holders[0], prefix) == "j"
    finally:
        await admin.aclose()


async def _content(admin: Any, key: bytes) -> bytes:
    """Everything a key holds, as one byte string."""
    kind = await admin.type(key)
    if kind == b"hash":
        return b"\0".join(v for kv in (await admin.hgetall(key)).items() for v in kv)
    if kind == b"zset":
        return b"\0".join(await admin.zrange(key, 0, -1))
    return bytes(await admin.get(key) or b"")


def test_script_flags() -> None:
    """Reads are ``no-writes``; what only removes, moves or overwrites runs on a full server;
    what may add data is refused there."""
    for name, script in QUEUE_SCRIPTS.items():
        assert script.flags == QUEUE_FLAGS.get(name, ()), name
    for name in ("put", "claim", "ack", "nack", "retry_dead"):
        assert QUEUE_SCRIPTS[name].flags == (), name
    assert QUEUE_SCRIPTS["result"].flags == ("no-writes",)
    assert QUEUE_SCRIPTS["stats"].flags == ("no-writes",)


# ------------------------------------------------------------------------------ wake-ups


async def test_a_put_in_another_client_wakes_a_waiting_claim(
    two_stores: tuple[RedisStore, RedisStore], no_poll: None
) -> None:
    waiter, producer = two_stores
    took: list[float] = []
    for i in range(5):
        task = asyncio.create_task(waiter.queue("q").claim(lease=_LONG, wait=20))
        await asyncio.sleep(0.3)  # the waiter subscribed, tried and sleeps
        assert not task.done()
        put_at = time.monotonic()
        job_id = await producer.queue("q").put({"i": i})
        job = await asyncio.wait_for(task, 10)
        took.append(time.monotonic() - put_at)
        assert job is not None and job.id == job_id and job.payload == {"i": i}
    print(f"\nput -> claim in another client: {[round(t, 4) for t in took]} s")
    assert max(took) < _WAKE, took


async def test_a_put_of_n_jobs_wakes_n_waiting_claims(
    two_stores: tuple[RedisStore, RedisStore], no_poll: None
) -> None:
    waiter, producer = two_stores
    tasks = [asyncio.create_task(waiter.queue("q").claim(lease=_LONG, wait=20)) for _ in range(4)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in tasks)
    put_at = time.monotonic()
    ids = await producer.queue("q").put_many([1, 2, 3])
    done, pending = await asyncio.wait(tasks, timeout=_WAKE)
    took = time.monotonic() - put_at
    assert len(done) == 3, (len(done), took)
    assert sorted(t.result().id for t in done) == ids  # type: ignore[union-attr]
    assert len(pending) == 1
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def test_an_ack_or_a_death_in_another_client_wakes_a_result_waiter(
    two_stores: tuple[RedisStore, RedisStore], no_poll: None
) -> None:
    waiter, worker = two_stores
    for outcome in ("ack", "dead"):
        job_id = await worker.queue("q").put(outcome, max_attempts=1)
        task = asyncio.create_task(waiter.queue("q").result(job_id, wait=20))
        await asyncio.sleep(0.3)
        assert not task.done()
        job = await _claim(worker.queue("q"))
        finished_at = time.monotonic()
        if outcome == "ack":
            assert await worker.queue("q").ack(job, result={"r": 1}) is True
        else:
            assert await worker.queue("q").nack(job, error="boom") is True
        res = await asyncio.wait_for(task, 10)
        took = time.monotonic() - finished_at
        assert isinstance(res, JobResult)
        assert res.status == ("done" if outcome == "ack" else "dead")
        assert took < _WAKE, (outcome, took)


async def test_messages_one_per_put_call_and_results_only_when_awaited(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    ns = fleetmem_namespace
    admin = aioredis.Redis.from_url(fleetmem_redis_server.url)
    pubsub = admin.pubsub()
    try:
        await pubsub.subscribe("fm:queues")
        async with connected_store(
            RedisStore.from_url(fleetmem_redis_server.url, namespace=ns)
        ) as store:
            q = store.queue("q")
            origin = store._kv.connector.origin
            await q.put("a")
            await q.put_many(list(range(2500)))  # three script calls
            await q.put("a-again", dedupe_key="d")
            await q.put("deduped", dedupe_key="d")  # adds nothing: no message
            jobs = await q.claim_many(2, lease=_LONG)
            assert await q.ack(jobs[0]) is True  # nobody awaits it: no message
            await q.backend.await_result("q", jobs[1].id)
            assert await q.ack(jobs[1]) is True
            job = await _claim(q)
            assert await q.nack(job, retry_in=0) is True  # ready now: claimers are told
            job = await _claim(q)
            assert await q.nack(job, retry_in=_LONG) is True  # later: nobody is told
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None:
                if len(got) >= 7:
                    break
                continue
            parts = message["data"].split(b"\0")
            if parts[1] == ns.encode():
                got.append(message["data"])
        q_ = b"\0q\0" + origin + b"\0"
        assert got == [
            b"p\0" + ns.encode() + q_ + b"1",
            b"p\0" + ns.encode() + q_ + b"1000",
            b"p\0" + ns.encode() + q_ + b"1000",
            b"p\0" + ns.encode() + q_ + b"500",
            b"p\0" + ns.encode() + q_ + b"1",
            b"r\0" + ns.encode() + b"\0" + jobs[1].id.encode() + b"\0" + origin,
            b"p\0" + ns.encode() + q_ + b"1",
        ], got
    finally:
        await pubsub.aclose()
        await admin.aclose()


async def test_a_lease_release_still_wakes_through_the_shared_listener(
    two_stores: tuple[RedisStore, RedisStore], no_poll: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener a waiting claim starts serves lease waiters too (one subscription)."""
    from fleetmem.backends.redis.leases import RedisLeases

    monkeypatch.setattr(RedisLeases, "poll_interval", 60.0)
    waiter, other = two_stores
    assert await waiter.queue("q").claim(wait=0.05) is None  # starts the listener
    held = await other.leases.acquire("l", owner="a", ttl=60)
    assert held is not None
    task = asyncio.create_task(waiter.leases.acquire("l", owner="b", ttl=60, wait=20))
    await asyncio.sleep(0.3)
    released_at = time.monotonic()
    assert await other.leases.release(held)
    lease = await asyncio.wait_for(task, 10)
    assert lease is not None and time.monotonic() - released_at < _WAKE


# ------------------------------------------------------------------------------ Cluster


async def _slot_owner(url: str, key: bytes) -> str:
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster.from_url(url)
    try:
        await client.initialize()
        node = client.get_node_from_key(key.decode())
        assert node is not None
        return str(node.name)
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_queues_on_a_cluster(
    fleetmem_redis_cluster: Any, fleetmem_namespace: str, no_poll: None
) -> None:
    """Namespaces spread over the three masters: every transition runs in the namespace's
    slot, the keys are all on one node, and a put through another client wakes a claim."""
    from redis.asyncio.cluster import RedisCluster

    url = fleetmem_redis_cluster.url
    raw = RedisCluster.from_url(url)
    owners = set()
    took: list[float] = []
    try:
        for suffix in ("a", "b", "c", "d", "e", "f"):
            ns = fleetmem_namespace + suffix
            prefix = f"fm:{{{ns}}}:".encode()
            owners.add(await _slot_owner(url, prefix))
            async with (
                connected_store(RedisStore.from_url(url, namespace=ns)) as store,
                connected_store(RedisStore.from_url(url, namespace=ns)) as producer,
            ):
                if suffix == "b":  # the plain scripts again after the cache was lost
                    await raw.execute_command("SCRIPT", "FLUSH", target_nodes=raw.ALL_NODES)
                await _every_transition(store)
                task = asyncio.create_task(store.queue("w").claim(lease=_LONG, wait=20))
                await asyncio.sleep(0.3)
                assert not task.done()
                put_at = time.monotonic()
                job_id = await producer.queue("w").put("wake")
                job = await asyncio.wait_for(task, 10)
                took.append(time.monotonic() - put_at)
                assert job is not None and job.id == job_id
                keys = [k async for k in raw.scan_iter(match=prefix + b"*")]
                assert {key_slot(k) for k in keys} == {key_slot(prefix)}
                assert {_kind(k, prefix) for k in keys} <= _KINDS
                for k in keys:
                    await raw.delete(k)
    finally:
        await raw.aclose()
    print(f"\ncluster: put -> claim in another client: {[round(t, 4) for t in took]} s")
    assert max(took) < _WAKE, took
    assert len(owners) >= 2, "the namespaces did not spread over the masters"


# ------------------------------------------------------------------------------ put_many


async def _script_calls(admin: Any) -> int:
    stats = await admin.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("fcall", "evalsha")
    )


async def test_put_many_of_10000_jobs_is_10_script_calls(
    fleetmem_redis_factory: Callable[..., Any], fleetmem_namespace: str
) -> None:
    server = fleetmem_redis_factory()
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with connected_store(
            RedisStore.from_url(server.url, namespace=fleetmem_namespace)
        ) as store:
            q = store.queue("bulk")
            await q.stats()  # loads the library: counting starts
            before = await _script_calls(admin)
            started = time.monotonic()
            ids = await q.put_many({"n": i, "pad": "x" * 100} for i in range(10_000))
            took = time.monotonic() - started
            assert await _script_calls(admin) - before == 10
            assert len(ids) == 10_000 and ids == sorted(ids) and len(set(ids)) == 10_000
            assert [int(i, 16) for i in ids] == list(
                range(int(ids[0], 16), int(ids[0], 16) + 10_000)
            )
            assert (await q.stats()).ready == 10_000
            before = await _script_calls(admin)
            jobs = await q.claim_many(10_000, lease=_LONG)
            assert await _script_calls(admin) - before == 10
            assert [j.payload["n"] for j in jobs] == list(range(10_000))
            print(f"\nput_many of 10,000 jobs: {took:.3f} s")
    finally:
        await admin.aclose()


# ------------------------------------------------------------------------------ order


def _assert_claim_order(jobs: list[Job]) -> None:
    keys = [(-j.priority, j.ready_at, j.id) for j in jobs]
    assert keys == sorted(keys)


async def test_exact_order_with_many_priorities_and_equal_ready_times(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    """One script call (one ``TIME``): equal ready times; the order is priority down, then put
    order, for priorities across the whole signed 32-bit range."""
    rng = random.Random(18)
    special = [2**31 - 1, -(2**31), 0, 1, -1, 255, 256, -256, 65535, 65536, 2**24, -(2**24)]
    priorities = special + [rng.randint(-(2**31), 2**31 - 1) for _ in range(40)]
    async with connected_store(
        RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    ) as store:
        q = store.queue("order")
        news = [NewJob(str(i).encode(), rng.choice(priorities), 0, 5, None) for i in range(1000)]
        ids = await q.backend.put("order", news)
        assert ids == sorted(ids)
        jobs = await q.claim_many(2000, lease=_LONG)
        assert len({j.ready_at for j in jobs}) == 1
        expected = sorted(range(1000), key=lambda i: (-news[i].priority, i))
        assert [j.payload for j in jobs] == expected
        assert [j.priority for j in jobs] == [news[i].priority for i in expected]
        _assert_claim_order(jobs)


async def test_delayed_jobs_and_expired_claims_join_the_ready_set_at_their_due_time(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    async with connected_store(
        RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    ) as store:
        q = store.queue("due")
        lapsed = await q.put("lapsed")
        first = await _claim(q)
        # Claimed again with a short lease: it lapses and is ready again at its expiry.
        assert await q.nack(first, retry_in=0) is True
        short = await q.claim(lease=0.4)
        assert short is not None and short.id == lapsed and short.lease_expires_at is not None
        delayed = await q.put("delayed", delay=0.2)
        later = await q.put("later", delay=0.6)
        now = await q.put("now")
        urgent = await q.put("urgent", priority=1, delay=0.5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (await q.stats()).ready < 5:
            assert loop.time() < deadline, await q.stats()
            await asyncio.sleep(0.05)
        jobs = await q.claim_many(10, lease=_LONG)
        _assert_claim_order(jobs)
        by_id = {j.id: j for j in jobs}
        assert jobs[0].id == urgent
        assert by_id[lapsed].ready_at == short.lease_expires_at
        assert by_id[lapsed].attempts == 3 and by_id[lapsed].token == short.token + 1
        for job_id, delay in ((delayed, 0.2), (later, 0.6), (urgent, 0.5)):
            job = by_id[job_id]
            assert (job.ready_at - job.enqueued_at).total_seconds() == pytest.approx(delay)
        assert by_id[now].ready_at == by_id[now].enqueued_at


# ------------------------------------------------------------------------------ full server

MAXMEMORY = 3 * 1024 * 1024


@pytest.mark.slow
async def test_a_full_server_keeps_queues_readable_and_removable(
    fleetmem_redis_factory: Callable[..., Any], fleetmem_namespace: str
) -> None:
    server = fleetmem_redis_factory(
        extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]
    )
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with connected_store(
            RedisStore.from_url(server.url, namespace=fleetmem_namespace)
        ) as store:
            q = store.queue("q")
            held = await q.put("held")
            job = await _claim(q)
            assert job.id == held
            waiting = await q.put("waiting", delay=_LONG)
            dead_id = await q.put("dead", max_attempts=1)
            assert await q.nack(await _claim(q), error="x") is True
            done_id = await q.put("done")
            assert await q.ack(await _claim(q), result=1) is True
            n = 0
            while True:  # fill until Redis refuses
                try:
                    await store.set_many({f"k/{n + i:06d}": "x" * 200 for i in range(200)})
                except BackendUnavailableError as exc:
                    assert not isinstance(exc, OutcomeUnknownError)
                    break
                n += 200
                assert n < 100_000, "maxmemory never reached"
            used = int((await admin.info("memory"))["used_memory"])
            await admin.config_set("maxmemory", str(used - 256 * 1024))
            before = await q.stats()
            with pytest.raises(BackendUnavailableError, match="full"):
                await q.put("refused")
            with pytest.raises(BackendUnavailableError, match="full"):
                await q.claim(lease=_LONG)
            assert await q.stats() == before
            # Reads, extend, cancel, purge still run.
            result = await q.result(done_id)
            assert result is not None and result.value == 1
            assert [j.id for j in await q.dead()] == [dead_id]
            assert await store.list_queues() == ["q"]
            assert (await q.extend(job, lease=_LONG)).id == held
            assert await q.cancel(waiting) is True
            assert await q.purge_dead() == 1
            assert await q.stats() == type(before)(0, 0, 1, 0, 1)
            await admin.config_set("maxmemory", "0")
    finally:
        await admin.aclose()


# ------------------------------------------------------------------------------ differential


def _job_view(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        job.queue,
        job.payload,
        job.priority,
        job.attempts,
        job.max_attempts,
        job.consumer,
        job.token,
        job.last_error,
    )


async def _apply(store: Any, op: str, name: str, args: dict[str, Any], job: Job | None) -> Any:
    """One call of the random sequence on ``store``, its answer made comparable (times
    aside); ``job``: this store's copy of the claim the call is about."""
    q = store.queue(name)
    if op == "put":
        return await q.put(args["payload"], **args["options"])
    if op == "put_many":
        return await q.put_many(range(args["count"]), priority=args["priority"])
    if op == "claim":
        jobs = await q.claim_many(args["count"], consumer=args["consumer"], lease=_LONG)
        return [_job_view(j) for j in jobs], jobs
    if op == "ack":
        return await q.ack(job, args["value"])
    if op == "nack":
        return await q.nack(job, retry_in=args["retry"], error=args["error"])
    if op == "extend":
        try:
            return _job_view(await q.extend(job, lease=_LONG))
        except Exception as exc:
            return type(exc).__name__
    if op == "cancel":
        return await q.cancel(args["id"])
    if op == "result":
        res = await q.result(args["id"])
        return None if res is None else (res.id, res.status, res.value, res.error, res.attempts)
    if op == "stats":
        return await q.stats()
    if op == "dead":
        return [_job_view(j) for j in await q.dead()]
    if op == "retry":
        return await q.retry_dead(args["ids"])
    if op == "purge":
        return await q.purge_dead()
    assert op == "list"
    return await store.list_queues()


_OPS = (
    ["put"] * 4
    + ["put_many", "claim", "claim", "ack", "nack", "nack", "extend", "cancel", "result"]
    + ["stats", "dead", "retry", "purge", "list"]
)


async def test_the_same_calls_answer_as_the_memory_reference(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    """A random sequence of 600 calls over two queues, with leases, delays and retries long
    enough never to come due: every answer equals the in-memory store's (ids included, both
    counting from 1 in a new namespace), times aside."""
    rng = random.Random(1818)
    async with (
        connected_store(InMemoryStore(namespace=fleetmem_namespace)) as memory,
        connected_store(
            RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
        ) as redis_store,
    ):
        held: list[tuple[Job, Job]] = []
        known: list[str] = []
        for step in range(600):
            name, op = rng.choice(["a", "b"]), rng.choice(_OPS)
            args: dict[str, Any] = {}
            pair: tuple[Job | None, Job | None] = (None, None)
            if op == "put":
                args["payload"] = {"step": step}
                args["options"] = {
                    "priority": rng.choice([0, 0, 1, -1, 2**31 - 1]),
                    "dedupe_key": rng.choice([None, None, "d1", "d2"]),
                    "max_attempts": rng.choice([1, 2, 3]),
                    "delay": rng.choice([None, None, None, _LONG]),
                }
            elif op == "put_many":
                args.update(count=rng.randint(0, 5), priority=rng.choice([0, 3]))
            elif op == "claim":
                args.update(count=rng.randint(1, 3), consumer=f"c{step}")
            elif op in ("ack", "nack", "extend"):
                if not held:
                    continue
                pair = held[rng.randrange(len(held))]
                name = pair[0].queue
                args.update(
                    value=rng.choice([None, {"r": step}]),
                    retry=rng.choice([0, _LONG]),
                    error=rng.choice([None, f"e{step}"]),
                )
            elif op in ("cancel", "result"):
                if not known:
                    continue
                args["id"] = rng.choice(known)
            elif op == "retry":
                args["ids"] = None if rng.random() < 0.5 else rng.sample(known, min(3, len(known)))
            a = await _apply(memory, op, name, args, pair[0])
            b = await _apply(redis_store, op, name, args, pair[1])
            # A few milliseconds apart: equal ready times stay equal on both clocks.
            await asyncio.sleep(0.003)
            if op == "claim":
                assert a[0] == b[0], f"step {step}: {op} {name}"
                held.extend(zip(a[1], b[1], strict=True))
                continue
            assert a == b, f"step {step}: {op} {name} {args}"
            if op == "put":
                known.append(a)
            elif op == "put_many":
                known.extend(a)
        for name in ("a", "b"):
            assert await memory.queue(name).stats() == await redis_store.queue(name).stats()


async def test_a_claim_drops_the_index_entries_of_expired_results(
    two_stores: tuple[RedisStore, RedisStore],
) -> None:
    """An idle queue that consumers still poll does not keep the index entries of results past
    their TTL (the job hashes expire by themselves)."""
    store, _ = two_stores
    q = store.queue("idle")
    await q.put_many(range(3))
    for job in await q.claim_many(3, lease=_LONG):
        assert await q.ack(job, result=1, result_ttl=0.2)
    client = store.kv.connector.client
    key = f"fm:{{{store.namespace}}}:qo:idle"
    assert await client.zcard(key) == 3
    await asyncio.sleep(0.5)
    assert await q.claim() is None
    assert await client.zcard(key) == 0


async def test_a_stale_ready_member_of_a_live_claim_is_never_claimed(
    two_stores: tuple[RedisStore, RedisStore],
) -> None:
    """If the server's clock went back after a claim promoted an expired lease, extend must
    not leave the ready member behind, and a claim drops any member of a live claim."""
    store, _ = two_stores
    q = store.queue("clock")
    await q.put("x")
    job = await q.claim(lease=60)
    assert job is not None
    client = store.kv.connector.client
    prefix = f"fm:{{{store.namespace}}}:"
    # Forge what a promotion seen by a clock ahead of now leaves: a ready member for the claim.
    members = await client.zrange(prefix + "qc:clock", 0, -1)
    assert len(members) == 1
    code, job_hex = members[0][:8], members[0][8:]
    forged = code + b"%012x" % 0 + job_hex
    await client.zadd(prefix + "qr:clock", {forged: 0})
    assert await q.claim() is None  # the live claim is not handed out twice
    assert await q.ack(job) is True


async def test_a_store_closes_right_after_a_waiting_call_started_its_listener(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    """A ``claim(wait=)`` that finds a job at once has started the pub/sub listener without
    waiting for it; closing the store then must not hang while the listener connects (redis-py
    can swallow the cancellation that lands during its connection set-up)."""
    for _ in range(20):
        store = RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
        await store.connect()
        q = store.queue("close")
        await q.put(1)
        job = await q.claim(lease=_LONG, wait=5)
        assert job is not None and await q.ack(job)
        await asyncio.wait_for(store.close(), 30)
