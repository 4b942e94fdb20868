"""HybridStore under faults, on servers the harness started for these tests alone.

Each test carries the pass criterion of the hybrid issue as its assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from fleetmem import BackendUnavailableError, Entry, OutcomeUnknownError
from fleetmem.backends.hybrid import HybridStore
from fleetmem.testing.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def make_hybrid(pg: PostgresServer, rs: RedisServer, namespace: str, **options: Any) -> HybridStore:
    return HybridStore.from_urls(pg.dsn, rs.url, namespace=namespace, **options)


async def cache_mismatches(store: HybridStore, rs: RedisServer, keys: list[str]) -> list[str]:
    """Keys whose live cached value differs from what the durable store holds."""
    client = aioredis.from_url(rs.url)
    try:
        epoch = await client.get(f"fmh:{{{store.namespace}}}:E")  # b"<epoch>.<nonce>|"
        bad = []
        for key in keys:
            truth = await store.durable.get(key)
            raw: Any = await client.get(f"fmh:{{{store.namespace}}}:k:{key}")
            if raw is None or epoch is None or not raw.startswith(epoch):
                continue  # nothing live cached
            body = raw[len(epoch) :]
            if body == b"N":
                if truth is not None:
                    bad.append(key)
                continue
            import orjson

            if orjson.loads(body[body.index(b"\n") + 1 :]) != truth:
                bad.append(key)
        return bad
    finally:
        await client.aclose()


@pytest.fixture
async def tiers(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_factory: Callable[..., RedisServer],
) -> AsyncIterator[tuple[PostgresServer, RedisServer]]:
    """The shared PostgreSQL and a Redis of this test's own (it may be killed or paused)."""
    rs = fleetmem_redis_factory()
    try:
        yield fleetmem_postgres_server, rs
    finally:
        rs.resume()
        rs.close()


# 1 -------------------------------------------------------------------------------------------


async def test_stale_fill_race_made_deterministic(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """A reader paused between its PostgreSQL read and its fill while a writer commits and
    invalidates: 1,000 iterations, 0 keys whose cached value differs from PostgreSQL's."""
    pg, rs = tiers
    async with make_hybrid(pg, rs, fleetmem_namespace) as store:
        durable = store.kv.durable
        original = durable.get_entries_ttl
        reached = asyncio.Event()
        release = asyncio.Event()
        pause = {"on": False}

        async def paused_read(keys: list[str]) -> dict[str, tuple[Entry, int | None]]:
            found = await original(keys)
            if pause["on"]:
                reached.set()
                await release.wait()
            return found

        durable.get_entries_ttl = paused_read  # type: ignore[method-assign]
        keys = [f"hot{i}" for i in range(20)]
        stale_reads_after_ack = 0
        for i in range(1000):
            key = keys[i % 20]
            await store.set(key, {"i": i, "phase": "old"})
            reached.clear()
            release.clear()
            pause["on"] = True
            reader = asyncio.create_task(store.get(key))
            await asyncio.wait_for(reached.wait(), 5)
            pause["on"] = False
            await store.set(key, {"i": i, "phase": "new"})  # commit + invalidate while paused
            release.set()
            assert (await reader) == {"i": i, "phase": "old"}  # it read before the write
            if await store.get(key) != {"i": i, "phase": "new"}:
                stale_reads_after_ack += 1
        assert stale_reads_after_ack == 0
        assert await cache_mismatches(store, rs, keys) == []
        assert store.metrics.fills_voided >= 1000  # every paused fill was refused
        await store.clear()


# 2 -------------------------------------------------------------------------------------------


def _soak_process(args: tuple[str, str, str, int, float, int]) -> tuple[int, list[str]]:
    dsn, url, namespace, workers, seconds, seed = args
    return asyncio.run(_soak(dsn, url, namespace, workers, seconds, seed))


async def _soak(
    dsn: str, url: str, namespace: str, workers: int, seconds: float, seed: int
) -> tuple[int, list[str]]:
    keys = [f"hot{i}" for i in range(20)]
    problems: list[str] = []
    ops = 0
    async with HybridStore.from_urls(dsn, url, namespace=namespace) as store:
        deadline = time.monotonic() + seconds

        async def worker(w: int) -> None:
            nonlocal ops
            rng = random.Random(seed * 100 + w)
            while time.monotonic() < deadline:
                key = rng.choice(keys)
                roll = rng.random()
                if roll < 0.45:
                    await store.get(key)
                elif roll < 0.8:
                    written = await store.set(key, {"w": f"{seed}-{w}", "n": ops})
                    await asyncio.sleep(rng.random() * 0.002)
                    seen = await store.get_entry(key)
                    # Read-your-writes: my write or a later one (versions only grow here).
                    if seen is None or seen.version < written.version:
                        problems.append(f"{key}: wrote v{written.version}, read {seen}")
                elif roll < 0.9:
                    value = await store.incr(f"count-{key}")
                    if await store.get(f"count-{key}") < value:
                        problems.append(f"count-{key}: incr gave {value}, read less")
                else:
                    entry = await store.get_entry(key)
                    version = entry.version if entry is not None else 0
                    try:
                        done = await store.compare_and_set(key, {"cas": w}, version=version)
                    except Exception as exc:
                        if type(exc).__name__ != "VersionConflictError":
                            raise
                    else:
                        seen = await store.get_entry(key)
                        if seen is None or seen.version < done.version:
                            problems.append(f"{key}: cas wrote v{done.version}, read {seen}")
                ops += 1
                await asyncio.sleep(rng.random() * 0.003)

        await asyncio.gather(*(worker(w) for w in range(workers)))
    return ops, problems


async def test_soak_two_processes_no_mismatch_and_read_your_writes(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """32 coroutines in 2 processes on 20 hot keys for 30 s with random delays: 0 cache /
    PostgreSQL mismatches at the end, and every acknowledged write read back by its writer."""
    pg, rs = tiers
    ctx = multiprocessing.get_context("spawn")
    jobs = [(pg.dsn, rs.url, fleetmem_namespace, 16, 30.0, seed) for seed in (1, 2)]
    loop = asyncio.get_running_loop()
    with ctx.Pool(2) as pool:
        results = await loop.run_in_executor(None, pool.map, _soak_process, jobs)
    total_ops = sum(ops for ops, _ in results)
    problems = [p for _, ps in results for p in ps]
    assert total_ops > 1000
    assert problems == []
    async with make_hybrid(pg, rs, fleetmem_namespace) as store:
        keys = [f"hot{i}" for i in range(20)] + [f"count-hot{i}" for i in range(20)]
        assert await cache_mismatches(store, rs, keys) == []
        await store.clear()


# 3 -------------------------------------------------------------------------------------------


async def test_redis_killed_and_restarted_during_writes(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """kill -9 of Redis during 10,000 writes from 16 coroutines, restarted midway: 0
    acknowledged writes missing from PostgreSQL, every operation succeeds, 0 stale reads."""
    pg, rs = tiers
    async with make_hybrid(pg, rs, fleetmem_namespace) as store:
        acked: dict[str, int] = {}
        errors: list[BaseException] = []
        done = 0

        async def writer(w: int) -> None:
            nonlocal done
            for i in range(625):
                key = f"w{w}-{i % 50}"
                try:
                    await store.set(key, i)
                    acked[key] = i
                    if i % 5 == 0:
                        assert await store.get(key) is not None
                except BaseException as exc:
                    errors.append(exc)
                done += 1

        async def chaos() -> None:
            while done < 2500:
                await asyncio.sleep(0.01)
            rs.kill()
            while done < 5000:
                await asyncio.sleep(0.01)
            rs.start()

        await asyncio.gather(chaos(), *(writer(w) for w in range(16)))
        assert errors == []
        assert done == 10_000
        truth = await store.durable.get_many(list(acked))
        assert {k: v for k, v in acked.items() if truth.get(k) != v} == {}
        # Redis is back: nothing stale is read, through the cache or in it.
        assert await store.get_many(list(acked)) == acked
        for key, value in list(acked.items())[:200]:
            assert await store.get(key) == value
        assert await cache_mismatches(store, rs, list(acked)) == []
        await store.clear()


# 4 -------------------------------------------------------------------------------------------


async def test_redis_paused_under_load(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """Redis paused (SIGSTOP) for 5 s under a 50/50 read/write load: 0 errors raised to
    callers; p99 latency during the pause <= the cache deadline + 300 ms."""
    pg, rs = tiers
    deadline = 0.25
    async with make_hybrid(pg, rs, fleetmem_namespace, cache_deadline=deadline) as store:
        keys = [f"k{i}" for i in range(50)]
        await store.set_many(dict.fromkeys(keys, 0))
        errors: list[BaseException] = []
        during: list[float] = []
        paused = {"on": False}
        stop = asyncio.Event()

        async def client(c: int) -> None:
            rng = random.Random(c)
            while not stop.is_set():
                key = rng.choice(keys)
                start = time.monotonic()
                try:
                    if rng.random() < 0.5:
                        await store.get(key)
                    else:
                        await store.set(key, c)
                except BaseException as exc:
                    errors.append(exc)
                if paused["on"]:
                    during.append(time.monotonic() - start)
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(client(c)) for c in range(16)]
        await asyncio.sleep(1.0)
        rs.pause()
        paused["on"] = True
        await asyncio.sleep(5.0)
        paused["on"] = False
        rs.resume()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert errors == []
        assert len(during) > 100
        during.sort()
        p99 = during[int(len(during) * 0.99)]
        assert p99 <= deadline + 0.3, f"p99 during the pause was {p99 * 1000:.0f} ms"
        assert store.metrics.breaker_opened >= 1
        # After the pause the cache is coherent again.
        assert await cache_mismatches(store, rs, keys) == []
        await store.clear()


# 5 -------------------------------------------------------------------------------------------


def _fresh_reader(args: tuple[str, str, str, list[str]]) -> dict[str, Any]:
    """A process that never saw the outage reads every key once Redis is back."""
    dsn, url, namespace, keys = args

    async def read() -> dict[str, Any]:
        async with HybridStore.from_urls(dsn, url, namespace=namespace) as store:
            # Lone reads first: the one-round-trip read must see the restart by itself.
            singles = {k: await store.get(k) for k in keys[:50]}
            return await store.get_many(keys) | singles

    return asyncio.run(read())


async def test_redis_back_with_old_data_from_its_aof(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_factory: Callable[..., RedisServer],
    fleetmem_namespace: str,
) -> None:
    """Redis restarting with old data from its AOF after it missed invalidations: 0 reads of
    the old values, in this process and in one that never saw the outage."""
    pg = fleetmem_postgres_server
    rs = fleetmem_redis_factory(appendonly=True, appendfsync="always")
    keys = [f"k{i}" for i in range(100)]
    try:
        async with make_hybrid(pg, rs, fleetmem_namespace) as store:
            await store.set_many(dict.fromkeys(keys, "old"))
            assert await store.get_many(keys) == dict.fromkeys(keys, "old")  # cached, in the AOF
            for k in keys[:50]:
                assert await store.get(k) == "old"
            rs.kill()
            for k in keys:  # invalidations that Redis misses
                await store.set(k, "new")
            rs.start()  # back with the old cached values
            ctx = multiprocessing.get_context("spawn")
            loop = asyncio.get_running_loop()
            with ctx.Pool(1) as pool:
                fresh = await loop.run_in_executor(
                    None, pool.map, _fresh_reader, [(pg.dsn, rs.url, fleetmem_namespace, keys)]
                )
            assert fresh[0] == dict.fromkeys(keys, "new")
            assert await store.get_many(keys) == dict.fromkeys(keys, "new")
            for k in keys:
                assert await store.get(k) == "new"
            await store.clear()
    finally:
        rs.close()


# 6 -------------------------------------------------------------------------------------------


async def test_postgres_crash_during_writes(
    fleetmem_postgres_factory: Callable[..., PostgresServer],
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """PostgreSQL stopped (immediate) during writes: every error within 2 s as
    BackendUnavailableError or OutcomeUnknownError, 0 cache entries for failed writes, first
    success <= 5 s after PostgreSQL is back; with allow_stale_reads, cached reads keep working."""
    pg = fleetmem_postgres_factory()
    rs = fleetmem_redis_server
    try:
        async with make_hybrid(pg, rs, fleetmem_namespace, allow_stale_reads=True) as store:
            await store.set_many({f"c{i}": i for i in range(20)})
            for i in range(20):
                assert await store.get(f"c{i}") == i  # cached
            failures: list[tuple[str, float, BaseException]] = []
            acked: dict[str, int] = {}
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    key = f"w{w}-{n}"
                    start = time.monotonic()
                    try:
                        await store.set(key, n)
                        acked[key] = n
                    except BaseException as exc:
                        failures.append((key, time.monotonic() - start, exc))
                        await asyncio.sleep(0.05)
                    n += 1

            tasks = [asyncio.create_task(writer(w)) for w in range(4)]
            await asyncio.sleep(0.5)
            pg.stop("immediate")
            await asyncio.sleep(2.0)
            # Cached reads keep working during the outage (allow_stale_reads=True).
            for i in range(20):
                assert await store.get(f"c{i}") == i
            stop.set()
            await asyncio.gather(*tasks)
            assert failures, "no write failed while PostgreSQL was down"
            for key, took, exc in failures:
                assert isinstance(exc, (BackendUnavailableError, OutcomeUnknownError)), exc
                assert took <= 2.0, f"{key} failed after {took:.2f} s"
            failed_keys = [k for k, _, _ in failures if k not in acked]
            pg.start()
            back = time.monotonic()
            while True:
                try:
                    await store.set("after", 1)
                    break
                except BackendUnavailableError:
                    assert time.monotonic() - back <= 5.0, "no success within 5 s"
                    await asyncio.sleep(0.05)
            assert time.monotonic() - back <= 5.0
            client = aioredis.from_url(rs.url)
            try:
                cached = [
                    k
                    for k in failed_keys
                    if await client.exists(f"fmh:{{{fleetmem_namespace}}}:k:{k}")
                ]
            finally:
                await client.aclose()
            assert cached == []
            await store.clear()
    finally:
        pg.close()


async def test_postgres_down_reads_raise_without_stale_reads(
    fleetmem_postgres_factory: Callable[..., PostgresServer],
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    pg = fleetmem_postgres_factory()
    try:
        async with make_hybrid(pg, fleetmem_redis_server, fleetmem_namespace) as store:
            await store.set("k", 1)
            assert await store.get("k") == 1
            pg.stop("immediate")
            with pytest.raises(BackendUnavailableError):
                await store.set("k", 2)
            with pytest.raises(BackendUnavailableError):
                await store.get("k")  # known down, and stale reads are not allowed
            pg.start()
            for _ in range(100):
                try:
                    assert await store.get("k") == 1
                    break
                except BackendUnavailableError:
                    await asyncio.sleep(0.05)
            await store.clear()
    finally:
        pg.close()


# 7 -------------------------------------------------------------------------------------------


async def test_single_flight_on_a_cold_cache(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """Cold cache, 500 concurrent gets of one key: at most one PostgreSQL read per process."""
    pg, rs = tiers
    async with make_hybrid(pg, rs, fleetmem_namespace) as store:
        await store.set("popular", {"v": 1})
        durable = store.kv.durable
        original = durable.get_entries_ttl
        reads = 0

        async def counting_read(keys: list[str]) -> dict[str, tuple[Entry, int | None]]:
            nonlocal reads
            reads += 1
            return await original(keys)

        durable.get_entries_ttl = counting_read  # type: ignore[method-assign]
        results = await asyncio.gather(*(store.get("popular") for _ in range(500)))
        assert results == [{"v": 1}] * 500
        assert reads == 1
        await store.clear()


# Cancellation ---------------------------------------------------------------------------------


async def test_cancelled_lone_reads_leave_no_stray_reply(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """A lone read cancelled while its two commands are in flight drops its connection: the
    replies that arrive later are nobody's, and every read after it gets its own answer."""
    pg, rs = tiers
    async with make_hybrid(pg, rs, fleetmem_namespace) as store:
        items = {f"k{i}": f"value-{i}" for i in range(50)}
        await store.set_many(items)
        for key, value in items.items():
            assert await store.get(key) == value  # cached
        hits = store.metrics.hits
        rs.pause()
        try:
            for key in ("k1", "k2"):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(store.get(key), 0.05)  # under the cache deadline
        finally:
            rs.resume()
        for _ in range(10):
            assert await store.get("k3") == "value-3"
            assert await store.exists("absent") is False
        for i in range(200):  # cancelled at every step of the read
            task = asyncio.ensure_future(store.get(f"k{i % 50}"))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            if i % 2:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                assert await task == f"value-{i % 50}"
        assert await asyncio.gather(*(store.get(k) for k in items)) == list(items.values())
        assert store.metrics.hits > hits  # served by the cache all along
        await store.clear()


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru", "volatile-lru"])
async def test_a_full_cache_serves_fresh_values_without_writing_the_epoch(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_factory: Callable[..., RedisServer],
    fleetmem_namespace: str,
    policy: str,
) -> None:
    """Issue 14: with a full cache Redis, reads turned into writes of the PostgreSQL epoch row
    (400 increments for 500 reads). Now: every read right, the durable epoch written at most
    once per eviction of its bookkeeping keys (never under noeviction or volatile-lru)."""
    rs = fleetmem_redis_factory(
        extra_args=["--maxmemory", "2mb", "--maxmemory-policy", policy, "--maxmemory-samples", "3"]
    )
    client = aioredis.from_url(rs.url)
    try:
        async with make_hybrid(fleetmem_postgres_server, rs, fleetmem_namespace) as store:
            values = {f"k{i:03d}": {"i": i, "pad": "x" * 2000} for i in range(500)}
            await store.set_many(values)
            assert await store.get("k000") == values["k000"]  # the namespace's epoch published
            epoch_name = f"epoch/{fleetmem_namespace}"
            epochs = store.kv.durable.reserved_view("_fleetmem.hybrid")
            before = (await epochs.get_many([epoch_name])).get(epoch_name, 0)
            # Fill Redis to its limit with keys of its own (as other users of a shared Redis).
            filler = "f" * 4096
            with contextlib.suppress(aioredis.ResponseError):
                for i in range(2000):
                    await client.set(f"filler:{i}", filler)
            wrong = 0
            for _round in range(2):
                for key, value in values.items():
                    wrong += await store.get(key) != value
            after = (await epochs.get_many([epoch_name])).get(epoch_name, 0)
            assert wrong == 0
            # Under allkeys-lru Redis may evict the epoch key and its run_id key together:
            # that cannot be told from a restart that lost them, so the next resync raises the
            # epoch once (1-3 times a run here). Not one write per read, as it was.
            bound = 10 if policy.startswith("allkeys") else 1
            assert after - before <= bound, f"{after - before} epoch writes for 1,000 reads"
            await store.set("k000", "new")
            assert await store.get("k000") == "new"
            await store.clear()
    finally:
        await client.aclose()


# Interleavings that once let a read that started after an acknowledged write return the value
# it replaced. Each is made deterministic by delaying one step of a real store (the servers are
# real); each failed before its fix.


class _SlowConfirmation:
    """The reader's view of the epoch namespace: ``get_many`` takes its snapshot, then its
    answer is held back (a slow network), once, when armed."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.armed = inner, delay, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_many(self, keys: list[str]) -> Any:
        found = await self.inner.get_many(keys)
        if self.armed:
            self.armed = False
            await asyncio.sleep(self.delay)
        return found


class _SlowHit:
    """The lone cache read of a store: Redis answers, then the answer is held back once."""

    def __init__(self, store: HybridStore, delay: float) -> None:
        self.original, self.delay, self.armed = store.kv._hit_or_lease, delay, False

    async def __call__(self, *args: Any) -> Any:
        item = await self.original(*args)
        if self.armed:
            self.armed = False
            await asyncio.sleep(self.delay)
        return item


async def test_a_late_confirmation_is_not_joined_after_an_acknowledged_write(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """A background confirmation of the epoch, sent before a cut-off writer's bump and
    answered after its acknowledgement, must not be what a later read trusts."""
    pg, rs = tiers
    writer = make_hybrid(pg, rs, fleetmem_namespace, trust_window=0.5, breaker_cooldown=60)
    reader = make_hybrid(pg, rs, fleetmem_namespace, trust_window=0.5)
    async with writer, reader:
        await writer.set("k", "old")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old" and reader.metrics.hits >= 1
        slow = _SlowConfirmation(reader.kv._epochs, 2.0)
        reader.kv._epochs = slow  # type: ignore[assignment]
        trust = reader.kv._state.trust[fleetmem_namespace]
        await asyncio.sleep(max(0.0, trust.refresh_at - time.monotonic()) + 0.01)
        slow.armed = True
        assert await reader.get("k") == "old"  # starts the background confirmation
        await asyncio.sleep(0.05)  # which took its snapshot: epoch E, no bypass mark
        writer.kv._state.breaker.failure()  # the writer cannot reach Redis
        writer.kv._state.breaker.failure()
        await writer.set("k", "new")  # mark, bump, wait one window, acknowledge
        assert writer.metrics.bypasses == 1
        assert await reader.get("k") == "new"


async def test_clear_retires_reads_that_started_while_it_ran(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """A read concurrent with clear() may see the old value; a read after clear() returned
    must not, even by joining that one."""
    pg, rs = tiers
    store = make_hybrid(pg, rs, fleetmem_namespace, trust_window=5)
    async with store:
        await store.set("k", "old")
        assert await store.get("k") == "old"
        assert await store.get("k") == "old" and store.metrics.hits >= 1
        hit = _SlowHit(store, 1.0)
        store.kv._hit_or_lease = hit  # type: ignore[method-assign, assignment]
        real = store.kv._epochs
        concurrent: list[asyncio.Task[Any]] = []

        class Epochs:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            async def incr(self, *args: Any) -> Any:
                hit.armed = True
                concurrent.append(asyncio.create_task(store.get("k")))
                await asyncio.sleep(0.05)
                return await real.incr(*args)

        store.kv._epochs = Epochs()  # type: ignore[assignment]
        await store.clear()
        store.kv._epochs = real
        assert await store.get("k") is None
        await asyncio.gather(*concurrent)


async def test_a_read_does_not_join_one_sent_before_another_processs_write(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """Single flight within a process must not carry an answer across a write another process
    acknowledged between that answer's request and this read's start."""
    pg, rs = tiers
    writer = make_hybrid(pg, rs, fleetmem_namespace)
    reader = make_hybrid(pg, rs, fleetmem_namespace)
    async with writer, reader:
        await writer.set("k", "old")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old"
        hit = _SlowHit(reader, 0.5)
        reader.kv._hit_or_lease = hit  # type: ignore[method-assign, assignment]
        hit.armed = True
        first = asyncio.create_task(reader.get("k"))
        await asyncio.sleep(0.05)  # it read "old" from Redis; its answer is slow
        await writer.set("k", "new")  # deleted from Redis, acknowledged
        assert await reader.get("k") == "new"
        assert await first in ("old", "new")


async def test_a_cancelled_write_that_committed_is_retired(
    tiers: tuple[PostgresServer, RedisServer], fleetmem_namespace: str
) -> None:
    """A caller's timeout after COMMIT (here while Redis holds writes back) cancels the write;
    its invalidation runs to its end all the same."""
    pg, rs = tiers
    writer = make_hybrid(pg, rs, fleetmem_namespace)
    reader = make_hybrid(pg, rs, fleetmem_namespace)
    admin = aioredis.from_url(rs.url)
    try:
        async with writer, reader:
            await writer.set("k", "old")
            assert await reader.get("k") == "old"
            assert await reader.get("k") == "old"
            await admin.client_pause(400, all=False)  # writes held back 400 ms
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(writer.set("k", "new"), 0.15)
            await asyncio.sleep(0.5)
            assert await reader.durable.get("k") == "new"
            assert await reader.get("k") == "new"
    finally:
        await admin.aclose()


async def test_stale_reads_survive_a_missed_invalidation_then_postgres_down(
    fleetmem_postgres_factory: Callable[..., PostgresServer],
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    fleetmem_proxy: Any,
) -> None:
    """One invalidation slower than the cache deadline (a busy host), then PostgreSQL stops:
    with allow_stale_reads the cached values are still served. This once failed
    test_postgres_crash_during_writes under load: the read resynced the namespace first,
    which needs PostgreSQL."""
    pg = fleetmem_postgres_factory()
    rs = fleetmem_redis_server
    proxy = await fleetmem_proxy(rs.host, rs.port)
    host, port = proxy.address
    try:
        store = HybridStore.from_urls(
            pg.dsn,
            f"redis://{host}:{port}/0",
            namespace=fleetmem_namespace,
            allow_stale_reads=True,
        )
        async with store:
            await store.set_many({f"c{i}": i for i in range(20)})
            assert [await store.get(f"c{i}") for i in range(20)] == list(range(20))
            proxy.set_latency(0.3)  # over the 0.25 s cache deadline
            await store.set("w", 1)  # committed; its DEL timed out: a missed invalidation
            proxy.heal()
            assert store.metrics.invalidations_missed == 1
            pg.stop("immediate")
            assert [await store.get(f"c{i}") for i in range(20)] == list(range(20))
            assert store.metrics.stale_reads >= 20
            with pytest.raises(BackendUnavailableError):
                await store.get("never-cached")  # a miss still needs PostgreSQL
    finally:
        pg.close()
