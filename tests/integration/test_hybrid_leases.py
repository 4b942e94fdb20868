"""HybridStore's leases, fenced writes and agents: they live in the durable tier (PostgreSQL),
which decides every fence; the cache stays coherent around a write it refused.

Most tests run twice: on PostgreSQL (what the hybrid is for) and on an in-memory durable tier
(the reference implementation of fences), which shows the hybrid's own part apart from
PostgreSQL's. A "direct" store reads the durable tier without the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from fleetmem import LeaseLostError
from fleetmem.backends.hybrid import HybridStore
from fleetmem.backends.hybrid.kv import cache_client_options
from fleetmem.backends.memory import InMemoryStore
from fleetmem.backends.redis import RedisStore
from fleetmem.protocol import Lease
from fleetmem.store import Store
from fleetmem.testing.servers import PostgresServer, RedisServer, find_free_port

pytestmark = [pytest.mark.hybrid, pytest.mark.redis]

_DURABLES = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("memory", marks=pytest.mark.memory),
]


@dataclass
class Tiers:
    """Builds hybrid stores of one namespace on one durable tier, and a direct store on it."""

    kind: str
    namespace: str
    redis_url: str
    dsn: str | None
    stack: contextlib.AsyncExitStack
    memory: InMemoryStore | None = None
    direct: Store[Any] = field(init=False)
    stores: list[HybridStore] = field(default_factory=list)

    async def hybrid(self, redis_url: str | None = None, **options: Any) -> HybridStore:
        """A connected hybrid store (``redis_url``: its cache, the shared Redis by default)."""
        url = redis_url or self.redis_url
        options.setdefault("namespace", self.namespace)
        if self.dsn is not None:
            store = HybridStore.from_urls(self.dsn, url, **options)
        else:
            assert self.memory is not None
            cache = RedisStore.from_url(
                url, namespace=self.namespace, **cache_client_options(0.25, None)
            )
            self.stack.push_async_callback(cache.close)
            store = HybridStore(self.memory, cache, **options)
        await store.connect()
        self.stack.push_async_callback(store.close)
        self.stores.append(store)
        return store


@pytest.fixture(params=_DURABLES)
async def tiers(
    request: pytest.FixtureRequest,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> AsyncIterator[Tiers]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgres":
            pg: PostgresServer = request.getfixturevalue("fleetmem_postgres_server")
            from fleetmem.backends.postgres import PostgresStore

            t = Tiers("postgres", fleetmem_namespace, fleetmem_redis_server.url, pg.dsn, stack)
            direct: Store[Any] = PostgresStore.from_url(pg.dsn, namespace=fleetmem_namespace)
            await direct.connect()
            stack.push_async_callback(direct.close)
        else:
            memory = InMemoryStore(namespace=fleetmem_namespace)
            t = Tiers("memory", fleetmem_namespace, fleetmem_redis_server.url, None, stack)
            t.memory = direct = memory
        t.direct = direct
        try:
            yield t
        finally:
            if t.stores:  # the first one's cache is the shared Redis: leave nothing there
                await t.stores[0].clear()
            await direct.clear()


@pytest.fixture
async def raw_redis(fleetmem_redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(fleetmem_redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def _dead_redis() -> str:
    return f"redis://127.0.0.1:{find_free_port()}/0"  # nothing listens there


async def cached(client: aioredis.Redis, store: HybridStore, key: str) -> bytes | None:
    """The raw cached value of ``key`` if it is a live copy (of the published epoch)."""
    prefix: Any = await client.get(f"fmh:{{{store.namespace}}}:E")
    raw: Any = await client.get(f"fmh:{{{store.namespace}}}:k:{key}")
    if raw is None or prefix is None or not raw.startswith(prefix):
        return None
    return bytes(raw)


async def stale_and_live(store: HybridStore) -> tuple[Lease, Lease]:
    """A lease that was released (its token no longer holds) and the live one granted after."""
    old = await store.leases.acquire("job", owner="paused-agent", ttl=30)
    assert old is not None
    assert await store.leases.release(old)
    new = await store.leases.acquire("job", owner="new-agent", ttl=30)
    assert new is not None and new.token > old.token
    return old, new


Op = Callable[[HybridStore, Lease], Awaitable[Any]]


async def _cas(store: HybridStore, fence: Lease) -> Any:
    entry = await store.get_entry("k")
    assert entry is not None
    return await store.compare_and_set("k", "new", version=entry.version, fence=fence)


#: name -> (the values before, the write, the values after the write is accepted).
_WRITES: dict[str, tuple[dict[str, Any], Op, dict[str, Any]]] = {
    "set": ({"k": "old"}, lambda s, f: s.set("k", "new", fence=f), {"k": "new"}),
    "set_many": (
        {"k": "old", "k2": None},
        lambda s, f: s.set_many({"k": "new", "k2": "new2"}, fence=f),
        {"k": "new", "k2": "new2"},
    ),
    "set_if_absent": (
        {"k": None},
        lambda s, f: s.set_if_absent("k", "new", fence=f),
        {"k": "new"},
    ),
    "compare_and_set": ({"k": "old"}, _cas, {"k": "new"}),
    "incr": ({"k": 5}, lambda s, f: s.incr("k", 2, fence=f), {"k": 7}),
    "delete": ({"k": "old"}, lambda s, f: s.delete("k", fence=f), {"k": None}),
    "delete_many": (
        {"k": "old", "k2": "old2"},
        lambda s, f: s.delete_many(["k", "k2"], fence=f),
        {"k": None, "k2": None},
    ),
}


async def agree(tiers: Tiers, store: HybridStore, values: dict[str, Any]) -> None:
    """Reads through the hybrid and of the durable tier directly give ``values``."""
    for key, value in values.items():
        assert await store.get(key) == value, key
        assert await tiers.direct.get(key) == value, key
    assert await store.get_many(list(values)) == {k: v for k, v in values.items() if v is not None}


_COUNTED = ("invalidations", "invalidations_missed", "bypasses", "epoch_bumps", "misses")


@pytest.mark.parametrize("write", list(_WRITES))
async def test_a_refused_fenced_write_leaves_the_cache_coherent(
    tiers: Tiers, raw_redis: aioredis.Redis, write: str
) -> None:
    before, op, after = _WRITES[write]
    store = await tiers.hybrid()
    for key, value in before.items():
        if value is not None:
            await store.set(key, value)
    await agree(tiers, store, before)  # the misses fill the cache (absent keys as absent)
    copies = {key: await cached(raw_redis, store, key) for key in before}
    assert all(copy is not None for copy in copies.values()), copies
    stale, live = await stale_and_live(store)
    counted = {name: getattr(store.metrics, name) for name in _COUNTED}
    hits = store.metrics.hits + store.metrics.negative_hits

    with pytest.raises(LeaseLostError):
        await op(store, stale)

    # Nothing changed in the durable tier, nothing in the cache, nothing counted as a write.
    assert {key: await cached(raw_redis, store, key) for key in before} == copies
    assert {name: getattr(store.metrics, name) for name in _COUNTED} == counted
    await agree(tiers, store, before)
    assert store.metrics.misses == counted["misses"]  # every read above was a hit...
    assert store.metrics.hits + store.metrics.negative_hits > hits  # ...of the copies kept

    await op(store, live)  # the holder's write: accepted, and the copies it replaced retired
    assert store.metrics.invalidations > counted["invalidations"]
    await agree(tiers, store, after)
    # A second store (another process's cache view) agrees too.
    other = await tiers.hybrid()
    await agree(tiers, other, after)


async def test_a_refused_fenced_delete_neither_evicts_nor_alters_the_copy(
    tiers: Tiers, raw_redis: aioredis.Redis
) -> None:
    store = await tiers.hybrid()
    await store.set_many({"a": {"n": 1}, "b": [1, 2]}, ttl=60)
    assert await store.get_many(["a", "b"]) == {"a": {"n": 1}, "b": [1, 2]}
    keys = [f"fmh:{{{store.namespace}}}:k:{k}" for k in ("a", "b")]
    raw = [await raw_redis.get(k) for k in keys]
    ttls = [await raw_redis.pttl(k) for k in keys]
    assert all(r is not None for r in raw) and all(t > 0 for t in ttls)
    stale, _live = await stale_and_live(store)
    invalidations = store.metrics.invalidations
    with pytest.raises(LeaseLostError):
        await store.delete("a", fence=stale)
    with pytest.raises(LeaseLostError):
        await store.delete_many(["a", "b"], fence=stale)
    assert [await raw_redis.get(k) for k in keys] == raw  # byte for byte, epoch included
    for key, ttl in zip(keys, ttls, strict=True):
        assert 0 < await raw_redis.pttl(key) <= ttl
    assert store.metrics.invalidations == invalidations
    hits = store.metrics.hits
    assert await store.get("a") == {"n": 1}
    assert await store.exists("b")
    assert store.metrics.hits == hits + 2
    assert await tiers.direct.get_many(["a", "b"]) == {"a": {"n": 1}, "b": [1, 2]}


async def test_a_fill_in_flight_stands_after_a_refused_write_not_after_an_accepted_one(
    tiers: Tiers, raw_redis: aioredis.Redis
) -> None:
    """A reader missed, took its fill lease and read the durable tier; a fenced write lands
    before it fills. Refused: nothing changed, so the fill stands and is right. Accepted: the
    write deleted the lease, so the fill is voided and the next read sees the new value."""
    store = await tiers.hybrid()
    await store.set_many({"a": "old", "b": "old"})
    await store.get("warm-up")  # the epoch published, the scripts loaded
    stale, live = await stale_and_live(store)
    durable = store.kv.durable
    original = durable.get_entries_ttl
    write_meanwhile: list[Callable[[], Awaitable[None]]] = []

    async def racing(keys: list[str]) -> Any:
        found = await original(keys)  # read before the write...
        while write_meanwhile:
            await write_meanwhile.pop()()  # ...which lands before the fill
        return found

    async def refused() -> None:
        with pytest.raises(LeaseLostError):
            await store.set("a", "zombie", fence=stale)

    async def accepted() -> None:
        await store.set("b", "new", fence=live)

    durable.get_entries_ttl = racing  # type: ignore[method-assign]
    try:
        fills, voided = store.metrics.fills, store.metrics.fills_voided
        write_meanwhile.append(refused)
        assert await store.get("a") == "old"
        assert (store.metrics.fills, store.metrics.fills_voided) == (fills + 1, voided)
        assert await cached(raw_redis, store, "a") is not None
        write_meanwhile.append(accepted)
        assert await store.get("b") == "old"  # read before the write was acknowledged
        assert (store.metrics.fills, store.metrics.fills_voided) == (fills + 1, voided + 1)
        assert await cached(raw_redis, store, "b") is None
    finally:
        del durable.get_entries_ttl
    await agree(tiers, store, {"a": "old", "b": "new"})
    await agree(tiers, store, {"a": "old", "b": "new"})  # and from the cache


async def test_fenced_writes_with_redis_down_are_decided_by_the_durable_tier(
    tiers: Tiers,
) -> None:
    """The writer cannot reach Redis (a reader can): its leases and fences work as ever; an
    accepted write retires the readers' copies (the bypass of a missed invalidation), a
    refused one touches nothing and waits for nothing."""
    options: dict[str, Any] = {"trust_window": 0.1}
    reader = await tiers.hybrid(**options)
    writer = await tiers.hybrid(_dead_redis(), **options)
    await reader.set("k", "old")
    assert await reader.get("k") == "old"
    assert await reader.get("k") == "old"
    assert reader.metrics.hits >= 1
    stale, live = await stale_and_live(writer)  # leases need no Redis
    assert (await reader.leases.holder("job")) == live

    with pytest.raises(LeaseLostError):
        await writer.set("k", "zombie", fence=stale)
    with pytest.raises(LeaseLostError):
        await writer.delete("k", fence=stale)
    assert writer.metrics.invalidations_missed == 0 and writer.metrics.bypasses == 0
    bypassed = reader.metrics.bypassed_reads
    hits = reader.metrics.hits
    assert await reader.get("k") == "old"
    assert reader.metrics.hits == hits + 1  # still the cache: nobody bypassed it
    assert reader.metrics.bypassed_reads == bypassed
    assert await writer.get("k") == "old"
    assert await tiers.direct.get("k") == "old"

    await writer.set("k", "new", fence=live)
    assert writer.metrics.invalidations_missed == 1 and writer.metrics.bypasses == 1
    assert await reader.get("k") == "new"
    assert await writer.incr("n", 3, fence=live) == 3
    assert await reader.get("n") == 3
    assert await tiers.direct.get_many(["k", "n"]) == {"k": "new", "n": 3}
    # Through the bypass and after it, the reader never reads the old value again.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert await reader.get("k") == "new"
        await asyncio.sleep(0.05)


async def test_fenced_writes_while_redis_is_killed_and_back_with_old_copies(
    tiers: Tiers, fleetmem_redis_factory: Callable[..., RedisServer]
) -> None:
    """Redis killed -9 under two stores with warm caches, then started again from its AOF,
    holding the copies from before: the fenced writes made meanwhile are decided by the
    durable tier (the refused ones change nothing and miss no invalidation) and no copy from
    before them is ever read."""
    rs = fleetmem_redis_factory(appendonly=True)
    options: dict[str, Any] = {"trust_window": 0.1}
    writer = await tiers.hybrid(rs.url, **options)
    reader = await tiers.hybrid(rs.url, **options)
    await writer.set_many({"k": "old", "gone": "old"})
    for _ in range(2):
        assert await reader.get_many(["k", "gone"]) == {"k": "old", "gone": "old"}
        assert await writer.get_many(["k", "gone"]) == {"k": "old", "gone": "old"}
    assert reader.metrics.hits >= 2
    stale, live = await stale_and_live(writer)
    rs.kill()

    for refused in (
        writer.set("k", "zombie", fence=stale),
        writer.delete("gone", fence=stale),
        writer.set_many({"k": "zombie", "gone": "zombie"}, fence=stale),
    ):
        with pytest.raises(LeaseLostError):
            await refused
    assert writer.metrics.invalidations_missed == 0 and writer.metrics.bypasses == 0
    assert await tiers.direct.get_many(["k", "gone"]) == {"k": "old", "gone": "old"}

    await writer.set("k", "new", fence=live)
    assert await writer.delete("gone", fence=live)
    assert writer.metrics.invalidations_missed >= 1
    expected = {"k": "new"}
    assert await reader.get_many(["k", "gone"]) == expected
    assert await tiers.direct.get_many(["k", "gone"]) == expected

    rs.start()  # with the copies of "old" it held when killed
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for store in (reader, writer):
            assert await store.get("k") == "new"
            assert await store.get("gone") is None
            assert await store.get_many(["k", "gone"]) == expected
        await asyncio.sleep(0.05)
    with pytest.raises(LeaseLostError):
        await writer.set("k", "zombie", fence=stale)
    assert await reader.get("k") == "new"


async def test_leases_and_agents_live_in_the_durable_tier_not_in_redis(
    tiers: Tiers, raw_redis: aioredis.Redis
) -> None:
    store = await tiers.hybrid()
    assert type(store.leases.backend) is type(tiers.direct.leases.backend)
    lease = await store.leases.acquire("build/main", owner="agent-7", ttl=30)
    assert lease is not None and lease.namespace == store.namespace
    assert await tiers.direct.leases.holder("build/main") == lease
    agent = await store.agents.register("agent-7", info={"role": "tester"}, ttl=30)
    assert await tiers.direct.agents.get("agent-7") == agent
    assert [a.id for a in await store.agents.list()] == ["agent-7"]
    assert await store.agents.count() == 1
    # A lease granted by the durable store directly fences a write through the hybrid (one
    # lease space), and the reverse.
    await tiers.direct.leases.release(lease)
    other = await tiers.direct.leases.acquire("build/main", owner="agent-8", ttl=30)
    assert other is not None
    await store.set("status", "green", fence=other)
    with pytest.raises(LeaseLostError):
        await store.set("status", "red", fence=lease)
    assert await store.get("status") == "green"
    # Redis holds the namespace's cache only: nothing of a lease or an agent.
    found = [k async for k in raw_redis.scan_iter(match=f"*{store.namespace}*")]
    assert found  # the cache of "status" and the epoch
    for key in found:
        assert b"build/main" not in key and b"agent-7" not in key, key
        assert key.startswith(f"fmh:{{{store.namespace}}}:".encode()), key
    assert await store.agents.deregister("agent-7")
    assert await tiers.direct.agents.get("agent-7") is None


@pytest.mark.postgres
async def test_a_lease_wait_is_woken_through_postgresql_notify(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Two hybrid stores with pools of their own (two processes, as far as PostgreSQL can
    tell): a release by one wakes the other's waiting ``acquire`` through NOTIFY. The waiter's
    polling is slowed to 30 s, so only a notification can grant it within the wait."""
    urls = (fleetmem_postgres_server.dsn, fleetmem_redis_server.url)
    holder = HybridStore.from_urls(*urls, namespace=fleetmem_namespace)
    waiter = HybridStore.from_urls(*urls, namespace=fleetmem_namespace)
    async with holder, waiter:
        waiter.leases.backend.poll_interval = 30.0  # type: ignore[misc]
        held = await holder.leases.acquire("deploy", owner="a", ttl=60)
        assert held is not None
        task = asyncio.create_task(waiter.leases.acquire("deploy", owner="b", ttl=60, wait=20))
        await asyncio.sleep(0.5)  # the waiter tried once and waits
        assert not task.done()
        released = time.monotonic()
        assert await holder.leases.release(held)
        granted = await asyncio.wait_for(task, 25)
        woken_after = time.monotonic() - released
        assert granted is not None and granted.owner == "b" and granted.token > held.token
        assert woken_after < 10, woken_after  # well under the 30 s poll (and the 20 s wait)
        await waiter.leases.release(granted)
        await holder.clear()
