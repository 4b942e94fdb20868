"""HybridStore on real PostgreSQL and Redis: what the cache does, seen from outside and in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from fleetmem import ConfigurationError, OutcomeUnknownError, StoreClosedError, open_store
from fleetmem.backends.hybrid import HybridStore
from fleetmem.backends.hybrid import kv as hkv
from fleetmem.testing import connected_store
from fleetmem.testing.servers import PostgresServer, RedisServer, find_free_port

pytestmark = [pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture
async def hybrid(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> AsyncIterator[HybridStore]:
    store = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, namespace=fleetmem_namespace
    )
    async with connected_store(store) as connected:
        yield connected


@pytest.fixture
async def raw_redis(fleetmem_redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fleetmem_redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def cache_key(store: HybridStore, key: str) -> str:
    return f"fmh:{{{store.namespace}}}:k:{key}"


def epoch_number(cached: bytes) -> int:
    """The epoch number a cached value or a published epoch starts with."""
    return int(cached[: len(cached) - len(cached.lstrip(b"0123456789"))])


async def cached_body(client: aioredis.Redis, store: HybridStore, key: str) -> bytes | None:
    """The live cached body of ``key`` (None when absent, leased or of an old epoch)."""
    prefix = await client.get(f"fmh:{{{store.namespace}}}:E")  # b"<epoch>.<nonce>|"
    raw: Any = await client.get(cache_key(store, key))
    if raw is None or prefix is None:
        return None
    return raw[len(prefix) :] if raw.startswith(prefix) else None


async def test_read_fills_and_hits(hybrid: HybridStore, raw_redis: aioredis.Redis) -> None:
    await hybrid.set("a", {"x": 1})
    assert await cached_body(raw_redis, hybrid, "a") is None  # writes never fill
    before = hybrid.metrics.snapshot()
    assert await hybrid.get("a") == {"x": 1}
    assert hybrid.metrics.misses == before["misses"] + 1
    body = await cached_body(raw_redis, hybrid, "a")
    assert body is not None and body.endswith(b'{"x":1}')
    assert await hybrid.get("a") == {"x": 1}
    assert hybrid.metrics.hits == before["hits"] + 1
    entry = await hybrid.get_entry("a")
    assert entry is not None
    assert entry.version == 1
    assert entry.partition == "default"


async def test_cache_hits_keep_every_number_exact(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    """A body orjson wrote whole is marked ``O`` and read back by orjson alone; one holding
    an integer beyond 64 bits is marked ``V`` and read by the exact decoder."""
    plain = {"n": 2**64 - 1, "f": 0.1, "digits": "1" * 40}
    big = {"n": 2**64, "m": -(2**70), "f": 1e300}
    await hybrid.set_many({"plain": plain, "big": big})
    for key, value, marker in (("plain", plain, b"O"), ("big", big, b"V")):
        assert await hybrid.get(key) == value  # the miss fills
        body = await cached_body(raw_redis, hybrid, key)
        assert body is not None and body[:1] == marker
        hits = hybrid.metrics.hits
        assert await hybrid.get(key) == value
        entry = await hybrid.get_entry(key)
        assert entry is not None and entry.value == value
        assert hybrid.metrics.hits == hits + 2
    assert type((await hybrid.get("big"))["n"]) is int
    assert type((await hybrid.get("big"))["f"]) is float


async def test_writes_invalidate_and_reads_see_them(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    await hybrid.set("k", 1)
    assert await hybrid.get("k") == 1
    await hybrid.set("k", 2)
    assert await cached_body(raw_redis, hybrid, "k") is None
    assert await hybrid.get("k") == 2
    assert await hybrid.incr("k", 5) == 7
    assert await hybrid.get("k") == 7
    entry = await hybrid.compare_and_set("k", 8, version=3)
    assert (await hybrid.get_entry("k")) == entry
    assert await hybrid.delete("k")
    assert await hybrid.get("k") is None
    assert not await hybrid.exists("k")


async def test_absent_keys_are_cached_negatively_until_written(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    assert await hybrid.get("nope") is None
    assert await cached_body(raw_redis, hybrid, "nope") == b"N"
    reads = hybrid.metrics.durable_reads
    assert await hybrid.get("nope", "dflt") == "dflt"
    assert hybrid.metrics.durable_reads == reads
    await hybrid.set("nope", "now")
    assert await hybrid.get("nope") == "now"


async def test_cache_ttl_never_outlives_the_entry(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    await hybrid.set("short", "v", ttl=0.4)
    assert await hybrid.get("short") == "v"
    pttl = await raw_redis.pttl(cache_key(hybrid, "short"))
    assert 0 < pttl <= 400
    await asyncio.sleep(0.5)
    assert await hybrid.get("short") is None


async def test_clear_retires_the_whole_namespace_cache(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    await hybrid.set_many({f"k{i}": i for i in range(20)})
    assert await hybrid.get_many([f"k{i}" for i in range(20)]) == {f"k{i}": i for i in range(20)}
    assert await cached_body(raw_redis, hybrid, "k3") is not None
    assert await hybrid.clear() == 20
    assert await cached_body(raw_redis, hybrid, "k3") is None
    assert await hybrid.get_many([f"k{i}" for i in range(20)]) == {}


async def _leftovers(
    client: aioredis.Redis, pg: PostgresServer, namespace: str
) -> tuple[list[bytes], list[str]]:
    """The cache keys of ``namespace`` in Redis, and its rows in ``_fleetmem.hybrid`` (expired
    ones included: what is physically there)."""
    keys = [key async for key in client.scan_iter(match=f"fmh:{{{namespace}}}:*")]
    conn = await asyncpg.connect(pg.dsn)
    try:
        rows = await conn.fetch(
            "SELECT key FROM fleetmem.entries WHERE namespace = '_fleetmem.hybrid'"
            " AND key IN ($1, $2)",
            f"epoch/{namespace}",
            f"bypass/{namespace}",
        )
    finally:
        await conn.close()
    return keys, [row[0] for row in rows]


async def test_clear_leaves_nothing_in_redis_and_only_the_epoch_row(
    hybrid: HybridStore,
    raw_redis: aioredis.Redis,
    fleetmem_postgres_server: PostgresServer,
    fleetmem_namespace: str,
) -> None:
    await hybrid.set_many({f"k{i}": i for i in range(20)})
    await hybrid.clear_partition("none")  # an epoch above 1
    assert await hybrid.get_many([f"k{i}" for i in range(30)]) == {f"k{i}": i for i in range(20)}
    keys, rows = await _leftovers(raw_redis, fleetmem_postgres_server, fleetmem_namespace)
    assert len(keys) > 20 and rows == [f"epoch/{fleetmem_namespace}"]  # copies, E, R; epoch
    assert await hybrid.clear() == 20
    # Nothing in Redis; in PostgreSQL only the epoch row, the namespace's coherence high-water
    # mark, which must outlive its data (see HybridKV._remove_cleared).
    kept: tuple[list[Any], list[str]] = ([], [f"epoch/{fleetmem_namespace}"])
    assert await _leftovers(raw_redis, fleetmem_postgres_server, fleetmem_namespace) == kept
    # The namespace works on as new: reads miss, fill, hit.
    assert await hybrid.get("k1") is None
    await hybrid.set("k1", "again")
    assert await hybrid.get("k1") == "again"
    assert await hybrid.get("k1") == "again"
    assert await cached_body(raw_redis, hybrid, "k1") is not None
    assert await hybrid.clear() == 1
    assert await _leftovers(raw_redis, fleetmem_postgres_server, fleetmem_namespace) == kept


async def test_a_store_trusting_the_old_epoch_reads_nothing_from_before_a_clear(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Two processes: ``a`` caches under epoch 3 and keeps trusting it (a long trust window);
    ``b`` clears and rewrites. Nothing ``a`` read before the clear may come back, and the
    durable epoch never goes back to a number ``a`` trusted."""
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 30.0}
    a = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    b = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    async with a, b:
        await b.set("k", "first")
        for _ in range(3):
            await b.clear_partition("none")  # epochs 1, 2, 3
        await a.set_many({"k": "old", "j": "old-j"})
        assert await a.get_many(["k", "j", "absent"]) == {"k": "old", "j": "old-j"}
        assert await a.get("k") == "old" and await a.get("j") == "old-j"
        assert a.metrics.hits >= 2  # cached, under the epoch a trusts
        trusted = a.kv._state.trust[fleetmem_namespace].epoch
        await b.clear()
        await b.set("k", "new")
        assert await b.get("k") == "new"
        assert await b.kv._epochs.get(f"epoch/{fleetmem_namespace}") > trusted
        assert await b.get("absent") is None
        for _ in range(3):
            assert await a.get("k") == "new"
            assert await a.get("j") is None
            assert await a.get_many(["k", "j", "absent"]) == {"k": "new"}
        await b.clear()


async def test_no_copy_from_before_a_clear_is_served_while_it_deletes_the_copies(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The published epoch is gone, the copies not yet (the clear paused before deleting
    them): another process resyncs and publishes again. The copies must stay dead: the new
    publication raises the durable epoch first and carries a new nonce."""
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.5}
    a = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    b = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    async with a, b:
        await a.set_many({"k": "old", "j": "old-j"})
        assert await b.get("k") == "old" and await b.get("j") == "old-j"
        assert await b.get_many(["k", "j"]) == {"k": "old", "j": "old-j"}
        assert b.metrics.hits >= 2  # cached, under epoch 1 (the namespace never left it)
        assert b.kv._state.trust[fleetmem_namespace].epoch == 1
        seen: list[Any] = []
        delete_copies = a.kv._delete_copies

        async def paused() -> None:
            seen.append(await a.durable.get("k"))  # the clear committed
            for _ in range(3):
                seen.extend([await b.get("k"), await b.get("j")])
                seen.append(await b.get_many(["k", "j"]))
            await delete_copies()

        monkeypatch.setattr(a.kv, "_delete_copies", paused)
        assert await a.clear() == 2
        assert b.metrics.epoch_bumps >= 1  # b resynced during the clear: a new epoch
        assert await b.kv._epochs.get(f"epoch/{fleetmem_namespace}") >= 2
        assert seen == [None] + [None, None, {}] * 3
        assert [await b.get("k"), await b.get("j")] == [None, None]


async def test_a_clear_whose_copies_cannot_be_deleted_serves_none_of_them(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deleting the copies fails after another process published the epoch again: once
    ``clear()`` returns, no process reads a copy from before it -- neither the one that
    republished nor one still trusting the old epoch."""
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.5}
    a = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    b = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    c = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    async with a, b, c:
        await a.set("k", "old")
        for store in (b, c):
            assert await store.get("k") == "old"
            assert await store.get("k") == "old"
            assert store.metrics.hits >= 1
        hits = c.metrics.hits

        async def failing() -> None:
            assert await b.get("other") is None  # b resyncs: publishes epoch 1 again
            raise hkv._CacheFailed

        monkeypatch.setattr(a.kv, "_delete_copies", failing)
        assert await a.clear() == 1
        assert b.metrics.epoch_bumps >= 1
        client = aioredis.from_url(fleetmem_redis_server.url)
        try:  # the copy is still there, under the number published now
            old: Any = await client.get(cache_key(a, "k"))
            published: Any = await client.get(f"fmh:{{{fleetmem_namespace}}}:E")
        finally:
            await client.aclose()
        assert old is not None and published is not None
        assert epoch_number(old) == 1 and epoch_number(published) >= 2
        for _ in range(3):
            assert [await b.get("k"), await c.get("k")] == [None, None]
            assert await b.get_many(["k"]) == {} and await c.get_many(["k"]) == {}
        assert c.metrics.hits == hits  # c read its old copy only before the clear
        await a.clear()


@pytest.mark.parametrize("window", ["before the published epoch goes", "before the copies go"])
async def test_a_partition_cleared_during_a_clear_is_never_read_again(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    window: str,
) -> None:
    """While ``a`` clears, ``b`` clears a partition (an epoch bump) and reads: its own
    acknowledged write must hold. (When the clear deleted the epoch row, the bump recreated it
    at the number still published, was taken as published already, and retired nothing.)"""
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.5}
    a = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    b = HybridStore.from_urls(fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options)
    async with a, b:
        await a.set("k", "old", partition="p")
        assert await b.get("k") == "old"
        assert await b.get("k") == "old"
        assert b.metrics.hits >= 1
        seen: list[Any] = []

        async def b_clears_the_partition() -> None:
            seen.append(await a.durable.get("k"))  # the clear committed
            await b.clear_partition("p")
            seen.extend([await b.get("k"), await b.get("k"), await b.get_many(["k"])])

        if window == "before the published epoch goes":
            cache_call = a.kv._cache_call

            async def hooked(*args: Any) -> Any:
                if args and args[0] == "DEL" and not seen:
                    await b_clears_the_partition()
                return await cache_call(*args)

            monkeypatch.setattr(a.kv, "_cache_call", hooked)
        else:
            delete_copies = a.kv._delete_copies

            async def paused() -> None:
                await b_clears_the_partition()
                await delete_copies()

            monkeypatch.setattr(a.kv, "_delete_copies", paused)
        assert await a.clear() == 1
        assert seen == [None, None, None, {}]
        assert [await a.get("k"), await b.get("k")] == [None, None]


async def test_a_clear_cut_off_from_redis_still_retires_the_copies(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """The clearing process cannot reach Redis: the clear is acknowledged once no process can
    read a copy from before it (the bypass of a missed invalidation), and the epoch row stays,
    above the epoch of the copies left in Redis."""
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.1}
    reader = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options
    )
    clearer = HybridStore.from_urls(fleetmem_postgres_server.dsn, dead, **options)
    async with reader, clearer:
        await reader.set("k", "old")
        await reader.clear_partition("none")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old"
        epochs = reader.kv._epochs
        before = await epochs.get(f"epoch/{fleetmem_namespace}")
        assert await clearer.clear() == 1
        assert clearer.metrics.invalidations_missed == 1
        assert await epochs.get(f"epoch/{fleetmem_namespace}") > before
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # through the bypass and after it
            assert await reader.get("k") is None
            await asyncio.sleep(0.02)
        await reader.clear()


async def test_get_many_mixes_hits_and_misses(hybrid: HybridStore) -> None:
    await hybrid.set_many({"a": 1, "b": 2, "c": 3})
    assert await hybrid.get("b") == 2
    hits = hybrid.metrics.hits
    assert await hybrid.get_many(["a", "b", "c", "zz"]) == {"a": 1, "b": 2, "c": 3}
    assert hybrid.metrics.hits == hits + 1
    assert await hybrid.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
    assert hybrid.metrics.hits == hits + 4


async def test_namespaces_do_not_share_cache_entries(hybrid: HybridStore) -> None:
    other = hybrid.with_namespace(hybrid.namespace + "b")
    try:
        await hybrid.set("k", "mine")
        await other.set("k", "theirs")
        assert await hybrid.get("k") == "mine"
        assert await other.get("k") == "theirs"
        await other.delete("k")
        assert await hybrid.get("k") == "mine"
    finally:
        await other.clear()
        await other.close()


async def test_open_store_builds_a_hybrid(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    async with open_store(
        hybrid=(fleetmem_postgres_server.dsn, fleetmem_redis_server.url),
        namespace=fleetmem_namespace,
        cache_ttl=60,
    ) as store:
        assert store.backend == "hybrid"
        await store.set("k", [1, 2])
        assert await store.get("k") == [1, 2]
        health = await store.health()
        assert health.ok
        assert health.details["cache"]["ok"] is True
        await store.clear()


async def test_settings_select_the_hybrid(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEETMEM_BACKEND", "hybrid")
    monkeypatch.setenv("FLEETMEM_POSTGRES_URL", fleetmem_postgres_server.dsn)
    monkeypatch.setenv("FLEETMEM_REDIS_URL", fleetmem_redis_server.url)
    monkeypatch.setenv("FLEETMEM_NAMESPACE", fleetmem_namespace)
    async with open_store() as store:
        assert store.backend == "hybrid"
        assert store.namespace == fleetmem_namespace


async def test_a_cache_url_that_can_never_work_is_refused_not_ridden_out(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    # A dead Redis is an outage the hybrid rides out on PostgreSQL; a database index the server
    # does not have is a mistake in the URL that no retry mends: opening says so.
    wrong_db = fleetmem_redis_server.url.rsplit("/", 1)[0] + "/99"
    with pytest.raises(ConfigurationError, match="no database 99"):
        await open_store(
            hybrid=(fleetmem_postgres_server.dsn, wrong_db), namespace=fleetmem_namespace
        )


async def test_health_reports_a_dead_cache_without_raising(
    fleetmem_postgres_server: PostgresServer, fleetmem_namespace: str
) -> None:
    from fleetmem.testing.servers import find_free_port

    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    store = HybridStore.from_urls(fleetmem_postgres_server.dsn, dead, namespace=fleetmem_namespace)
    async with store:
        await store.set("k", 1)
        assert await store.get("k") == 1  # served by PostgreSQL
        health = await store.health()
        assert health.ok  # the system of record is fine
        assert health.details["cache"]["ok"] is False
        assert "degraded" in health.details
        assert store.metrics.fallbacks > 0
        await store.clear()


@pytest.fixture
async def own_redis(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_factory: Any,
    fleetmem_namespace: str,
) -> AsyncIterator[tuple[HybridStore, aioredis.Redis]]:
    """A hybrid store whose cache is a Redis of its own (its command counts, its script cache
    are this test's), and a raw client of that Redis."""
    rs = fleetmem_redis_factory()
    client = aioredis.from_url(rs.url)
    try:
        store = HybridStore.from_urls(
            fleetmem_postgres_server.dsn, rs.url, namespace=fleetmem_namespace
        )
        async with connected_store(store) as connected:
            yield connected, client
    finally:
        await client.aclose()
        rs.close()


async def _commands_run(client: aioredis.Redis, call: Any) -> dict[str, int]:
    """Await ``call``; return how many times each Redis command ran meanwhile (the commands
    the scripts run inside count too; INFO is this helper's own)."""
    before: Any = await client.info("commandstats")
    await call
    after: Any = await client.info("commandstats")
    spent = {
        name: int(stats["calls"]) - int(before.get(name, {"calls": 0})["calls"])
        for name, stats in after.items()
        if name != "cmdstat_info"
    }
    return {name: n for name, n in spent.items() if n}


async def test_a_miss_costs_one_cache_read_one_durable_read_one_fill(
    own_redis: tuple[HybridStore, aioredis.Redis],
) -> None:
    store, client = own_redis
    await store.set("k", {"v": 1})
    await store.get("warm-up")  # loads the scripts and the epoch
    durable_reads = 0
    original = store.kv.durable.get_entries_ttl

    async def counting(keys: list[str]) -> Any:
        nonlocal durable_reads
        durable_reads += 1
        return await original(keys)

    store.kv.durable.get_entries_ttl = counting  # type: ignore[method-assign]
    got: list[Any] = []

    async def get() -> None:
        got.append(await store.get("k"))

    # A miss: one write of two commands (MGET epoch + run_id; SET NX GET, which leaves the
    # lease), then fill.lua (its GETs and its SET count too).
    spent = await _commands_run(client, get())
    assert spent == {"cmdstat_mget": 1, "cmdstat_set": 2, "cmdstat_evalsha": 1, "cmdstat_get": 2}
    assert durable_reads == 1
    # A hit: the same two commands (SET NX GET writes nothing), no script, no PostgreSQL.
    assert await _commands_run(client, get()) == {"cmdstat_mget": 1, "cmdstat_set": 1}
    assert durable_reads == 1
    assert got == [{"v": 1}, {"v": 1}]


async def test_a_published_epoch_ahead_of_the_durable_one_is_passed_never_trusted(
    own_redis: tuple[HybridStore, aioredis.Redis], fleetmem_namespace: str
) -> None:
    """The durable epoch went backwards (a restore from a backup): the resync raises it past
    the published one and publishes that; the published epoch never goes backwards."""
    store, client = own_redis
    await store.set("k", {"v": 1})
    assert await store.get("k") == {"v": 1}  # a miss: filled under the epoch
    epoch_key = f"fmh:{{{fleetmem_namespace}}}:E"
    published: Any = await client.get(epoch_key)
    assert published is not None and published.endswith(b"|")
    assert await cached_body(client, store, "k") is not None
    ahead = int(published.split(b".")[0]) + 1000  # Redis ahead of PostgreSQL's epoch
    await client.set(epoch_key, f"{ahead}.0|")
    assert await cached_body(client, store, "k") is None  # its fill is dead now
    await client.script_flush()  # as after a restart: the store resyncs
    assert await store.get("k") == {"v": 1}
    now: Any = await client.get(epoch_key)
    assert int(now.split(b".")[0]) > ahead  # passed, not moved back...
    durable = await store.kv._epochs.get(f"epoch/{fleetmem_namespace}")
    assert durable == int(now.split(b".")[0])  # ...and the durable epoch raised to match
    assert await store.get("k") == {"v": 1}
    assert await cached_body(client, store, "k") is not None  # filled under the new epoch


async def test_a_write_cut_off_from_redis_retires_the_copies_other_processes_read(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Issue 14 A: the writer cannot reach Redis, the readers can. Every read that starts
    after the write was acknowledged returns the new value: first from PostgreSQL (the writer
    marked the namespace bypassed), then from the cache again under a new epoch."""
    dead = f"redis://127.0.0.1:{find_free_port()}/0"  # nothing listens there
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.1}
    reader = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options
    )
    writer = HybridStore.from_urls(fleetmem_postgres_server.dsn, dead, **options)
    async with reader, writer:
        await reader.set("k", "old")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old"
        assert reader.metrics.hits >= 1  # cached
        started = time.monotonic()
        await writer.set("k", "new")  # acknowledged: committed, the cache retired
        assert writer.metrics.bypasses == 1 and writer.metrics.invalidations_missed == 1
        assert time.monotonic() - started >= 0.1  # it waited out the trust window
        seen = [await reader.get("k") for _ in range(50)]
        assert seen == ["new"] * 50
        assert reader.metrics.bypassed_reads > 0
        # A second write within the bypass does not wait again.
        started = time.monotonic()
        await writer.set("k", "newer")
        assert writer.metrics.bypasses == 1
        assert await reader.get("k") == "newer"
        # Once the bypass mark expires (10 trust windows), the cache serves again, fresh.
        deadline = time.monotonic() + 10
        hits = reader.metrics.hits
        while reader.metrics.hits == hits:
            assert time.monotonic() < deadline, "the cache was never used again"
            assert await reader.get("k") == "newer"
            await asyncio.sleep(0.05)
        await reader.clear()


async def test_a_restored_durable_epoch_never_revives_a_missed_invalidation(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Issue 14 B: the durable epoch goes back (its row deleted, as a restore from an older
    backup would), then a write misses its invalidation: the old copy is never served."""
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 0.1}
    reader = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, **options
    )
    writer = HybridStore.from_urls(fleetmem_postgres_server.dsn, dead, **options)
    async with reader, writer:
        for _ in range(3):  # a few epochs in
            await reader.set("k", "old")
            await reader.clear_partition("default")
        await reader.set("k", "old")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old"
        assert await reader.kv._epochs.delete(f"epoch/{fleetmem_namespace}")  # "restored"
        await writer.set("k", "new")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # through the bypass and after it
            assert await reader.get("k") == "new"
            await asyncio.sleep(0.02)
        assert reader.metrics.hits > 0
        await reader.clear()


async def test_each_cache_connection_knows_its_servers_run_id(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    raw_redis: aioredis.Redis,
    fleetmem_namespace: str,
) -> None:
    store = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, namespace=fleetmem_namespace
    )
    async with store:
        await store.set("k", 1)
        assert await store.get("k") == 1
        info: Any = await raw_redis.info("server")
        pool = store.kv._state.pool
        assert pool is not None  # lone reads take the one-round-trip path
        conns = list(pool._available_connections)
        assert conns and all(c.fleetmem_run_id == info["run_id"].encode() for c in conns)
        published = await raw_redis.get(f"fmh:{{{fleetmem_namespace}}}:R")
        assert published == info["run_id"].encode()
        await store.clear()


async def test_a_cold_get_many_reads_postgresql_once_per_call_and_fills(
    hybrid: HybridStore, raw_redis: aioredis.Redis
) -> None:
    items = {f"many/{i:04d}": {"i": i} for i in range(1200)}  # entries read by key array
    await hybrid.set_many(items)
    reads = hybrid.metrics.durable_reads
    assert await hybrid.get_many(list(items)) == items  # 3 cache chunks of up to 500 keys
    assert hybrid.metrics.durable_reads == reads + 3
    assert await cached_body(raw_redis, hybrid, "many/1199") is not None
    assert await hybrid.get_many(list(items)) == items  # now from the cache
    assert hybrid.metrics.durable_reads == reads + 3
    entry = await hybrid.get_entry("many/0042")
    assert entry is not None and entry.value == {"i": 42} and entry.version == 1


async def test_a_write_whose_outcome_is_unknown_still_retires_the_cached_copy(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    fleetmem_proxy: Any,
) -> None:
    """The connection dies after PostgreSQL committed but before its reply: the write raises
    OutcomeUnknownError, and the copy it replaced is retired all the same, so no process reads
    the old value once the new one is durable."""
    pg = fleetmem_postgres_server
    proxy = await fleetmem_proxy(pg.host, pg.port)
    host, port = proxy.address
    proxied = pg.dsn.replace(f"@{pg.host}:{pg.port}/", f"@{host}:{port}/")
    options: dict[str, Any] = {"namespace": fleetmem_namespace, "trust_window": 60.0}
    writer = HybridStore.from_urls(
        proxied,
        fleetmem_redis_server.url,
        postgres_options={"min_size": 1, "max_size": 1},
        **options,
    )
    reader = HybridStore.from_urls(pg.dsn, fleetmem_redis_server.url, **options)
    async with writer, reader:
        for _ in range(2):  # the statement prepared on the writer's one connection
            await writer.set("k", "old")
        assert await reader.get("k") == "old"
        assert await reader.get("k") == "old"
        assert reader.metrics.hits >= 1  # cached
        # Hold the row, let the write queue behind it, then cut the replies and let it go: the
        # write commits, and its answer never arrives.
        lock = await asyncpg.connect(pg.dsn)
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute(
                "SELECT 1 FROM fleetmem.entries WHERE namespace = $1 AND key = 'k' FOR UPDATE",
                fleetmem_namespace,
            )
            write = asyncio.create_task(writer.set("k", "new"))
            deadline = time.monotonic() + 30
            while not await lock.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ):
                assert time.monotonic() < deadline, "the write never queued behind the lock"
                await asyncio.sleep(0.01)
            proxy.cut_replies_after(0)
            await tx.rollback()
            with pytest.raises(OutcomeUnknownError):
                await write
        finally:
            await lock.close()
        proxy.heal()
        assert await reader.durable.get("k") == "new"  # it did commit
        assert await reader.get("k") == "new"  # and the old copy is gone
        await reader.clear()


async def test_an_injected_cache_store_may_sit_on_an_evicting_redis(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_factory: Any,
    fleetmem_namespace: str,
) -> None:
    """A RedisStore refuses a Redis that may evict its entries; as the hybrid's cache it must
    not (eviction is a miss there), also when the user built the RedisStore."""
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.backends.redis import RedisStore

    rs = fleetmem_redis_factory(extra_args=["--maxmemory-policy", "allkeys-lru"])
    store = HybridStore(
        PostgresStore.from_url(fleetmem_postgres_server.dsn, namespace=fleetmem_namespace),
        RedisStore.from_url(rs.url, namespace=fleetmem_namespace),
        owns_tiers=True,
    )
    async with store:
        await store.set("k", 1)
        assert [await store.get("k") for _ in range(3)] == [1, 1, 1]
        assert store.metrics.hits == 2 and store.metrics.cache_errors == 0
        await store.clear()


async def test_connect_degrades_when_redis_does_not_answer(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    fleetmem_proxy: Any,
) -> None:
    """A cache that never answers (blackholed) is tried for 3 s at connect, then the store
    starts degraded and works from PostgreSQL; a refusing one degrades at once."""
    proxy = await fleetmem_proxy(fleetmem_redis_server.host, fleetmem_redis_server.port)
    proxy.blackhole(True)
    host, port = proxy.address
    silent = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, f"redis://{host}:{port}/0", namespace=fleetmem_namespace
    )
    started = time.monotonic()
    async with silent:
        took = time.monotonic() - started
        assert 2.5 <= took <= 30, took
        assert silent.metrics.breaker_state == "open"
        await silent.set("k", 1)
        assert await silent.get("k") == 1
        await silent.clear()
    refused = HybridStore.from_urls(
        fleetmem_postgres_server.dsn,
        f"redis://127.0.0.1:{find_free_port()}/0",
        namespace=fleetmem_namespace,
    )
    started = time.monotonic()
    async with refused:
        assert refused.metrics.breaker_state == "open"
        assert await refused.get("k") is None
    assert time.monotonic() - started < took


async def test_closing_a_hybrid_closes_the_tiers_it_made_for_good(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """from_urls tiers are closed with the store, and stay closed: nothing reopens a pool or
    makes a client behind a closed store's back."""
    store = HybridStore.from_urls(
        fleetmem_postgres_server.dsn, fleetmem_redis_server.url, namespace=fleetmem_namespace
    )
    async with store:
        await store.set("k", 1)
        assert await store.get("k") == 1
        durable = store.durable
        assert durable is store.durable  # one view, not a new store at every access
    assert store.closed and durable.closed
    with pytest.raises(StoreClosedError):
        await durable.get("k")
    with pytest.raises(StoreClosedError):
        await store.kv.durable.get("k")  # the backend itself: no new pool
    with pytest.raises(StoreClosedError):
        await store.kv.cache.connector.execute(False, "PING")  # no new client
    assert not durable.kv.connector.ready


def test_repr_shows_the_tier_stores_without_a_password() -> None:
    store = HybridStore.from_urls(  # no I/O until connect()
        "postgresql://app:s3cret@127.0.0.1:1/db", "redis://:s3cret@127.0.0.1:1/0", namespace="shown"
    )
    text = repr(store)
    assert text.startswith("<HybridStore namespace='shown' durable=<PostgresStore namespace=")
    assert "cache=<RedisStore namespace='shown'" in text
    assert "s3cret" not in text
    view = store.with_namespace("other")
    assert view.durable.namespace == "other" and view.durable is view.durable
    assert store.durable.namespace == "shown"
