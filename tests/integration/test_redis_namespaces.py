"""``RedisStore.namespaces()``: the namespace registry across processes, and its pruning.

Each ``RedisStore`` built from a URL has a connector of its own, so two of them stand for two
processes: what one registered, the other does not remember.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis import kv as redis_kv
from fleetmem.errors import BackendUnavailableError, FleetmemError

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")

REGISTRY, SUSPECTS = b"fm:{_fleetmem}:ns", b"fm:{_fleetmem}:nss"


@pytest.fixture
async def raw(fleetmem_redis_server: Any) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def short_registry(monkeypatch: pytest.MonkeyPatch) -> float:
    """Registrations trusted 0.1 s, suspicions forgotten after 0.3 s; returns the latter."""
    monkeypatch.setattr(redis_kv, "REGISTRATION_TRUST", 0.1)
    monkeypatch.setattr(redis_kv, "FORGET_AFTER_MS", 300)
    return 0.3


async def _store(server: Any, namespace: str) -> RedisStore:
    return await RedisStore.from_url(server.url, namespace=namespace).connect()


async def test_a_write_by_another_process_is_listed(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    ns = fleetmem_namespace
    writer = await _store(fleetmem_redis_server, ns + "w")
    lister = await _store(fleetmem_redis_server, ns + "l")
    try:
        assert await lister.namespaces(ns) == []
        await writer.set("k", 1)
        assert await lister.namespaces(ns) == [ns + "w"]
        await writer.clear()
        assert await lister.namespaces(ns) == []
    finally:
        await writer.close()
        await lister.close()


async def test_an_emptied_namespace_leaves_the_registry_once_its_suspicion_aged(
    fleetmem_redis_server: Any, fleetmem_namespace: str, raw: Any, short_registry: float
) -> None:
    name = fleetmem_namespace + "w"
    writer = await _store(fleetmem_redis_server, name)
    lister = await _store(fleetmem_redis_server, fleetmem_namespace + "l")
    try:
        await writer.set("k", 1)
        assert await raw.zscore(REGISTRY, name) == 0
        await writer.clear()
        assert await lister.namespaces(fleetmem_namespace) == []
        assert await raw.zscore(SUSPECTS, name) is not None  # suspected, still registered
        assert await raw.zscore(REGISTRY, name) == 0
        await asyncio.sleep(short_registry + 0.05)
        assert await lister.namespaces(fleetmem_namespace) == []
        assert await raw.zscore(REGISTRY, name) is None
        assert await raw.zscore(SUSPECTS, name) is None
    finally:
        await writer.close()
        await lister.close()


async def test_a_writer_whose_registration_may_be_forgotten_registers_again(
    fleetmem_redis_server: Any, fleetmem_namespace: str, raw: Any, short_registry: float
) -> None:
    name = fleetmem_namespace + "w"
    writer = await _store(fleetmem_redis_server, name)
    lister = await _store(fleetmem_redis_server, fleetmem_namespace + "l")
    try:
        await writer.set("k", 1)
        await writer.delete("k")
        assert await lister.namespaces(fleetmem_namespace) == []  # suspected
        await asyncio.sleep(short_registry + 0.05)
        assert await lister.namespaces(fleetmem_namespace) == []  # forgotten
        assert await raw.zscore(REGISTRY, name) is None
        # The writer registered long ago: it must not take its registration for granted.
        await writer.set("k", 2)
        assert await lister.namespaces(fleetmem_namespace) == [name]
    finally:
        await writer.close()
        await lister.close()


async def test_a_registration_lifts_a_suspicion(
    fleetmem_redis_server: Any, fleetmem_namespace: str, raw: Any, short_registry: float
) -> None:
    name = fleetmem_namespace + "w"
    first = await _store(fleetmem_redis_server, name)
    lister = await _store(fleetmem_redis_server, fleetmem_namespace + "l")
    try:
        await first.set("k", 1)
        await first.clear()
        assert await lister.namespaces(fleetmem_namespace) == []  # suspected
        # Another process writes and empties it again: its registration lifts the mark...
        second = await _store(fleetmem_redis_server, name)
        try:
            await second.set("k", 1)
            assert await raw.zscore(SUSPECTS, name) is None
            await second.delete("k")  # emptied without a clear(): no suspicion yet
        finally:
            await second.close()
        # ...so an empty namespace seen after the first mark aged is only suspected anew.
        await asyncio.sleep(short_registry + 0.05)
        assert await lister.namespaces(fleetmem_namespace) == []
        assert await raw.zscore(REGISTRY, name) == 0
        assert await raw.zscore(SUSPECTS, name) is not None
    finally:
        await first.close()
        await lister.close()


async def test_a_process_registers_a_namespace_once_per_trust_window(
    fleetmem_redis_server: Any, fleetmem_namespace: str, raw: Any
) -> None:
    store = await _store(fleetmem_redis_server, fleetmem_namespace)
    try:
        await store.set("k", 0)
        await raw.zrem(REGISTRY, fleetmem_namespace)  # what a registration would add back
        for i in range(20):
            await store.set("k", i)
        await asyncio.gather(*(store.set(f"k{i}", i) for i in range(50)))  # merged batches
        assert await raw.zscore(REGISTRY, fleetmem_namespace) is None
    finally:
        await store.clear()
        await store.close()


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="no CLOCK_BOOTTIME here")
def test_the_trust_is_measured_on_a_clock_that_counts_a_suspend() -> None:
    # time.monotonic() stops while Linux is suspended: a process woken after an hour would
    # still trust a registration the registry may have dropped meanwhile.
    # (On an idle machine that never slept the two clocks agree: check which one it is.)
    clock: Any = redis_kv._trust_clock
    assert clock is not time.monotonic
    assert getattr(clock, "func", None) is time.clock_gettime
    assert clock.args == (time.CLOCK_BOOTTIME,)
    assert abs(clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 5.0


MARKER = b"fm:{_fleetmem}:nsm"


async def _write(store: RedisStore, key: str, value: Any) -> None:
    """``store.set``, again while the connection to a restarted server is being replaced."""
    for _ in range(50):
        try:
            await store.set(key, value)
            return
        except FleetmemError:
            await asyncio.sleep(0.1)
    await store.set(key, value)


async def test_data_written_before_the_registry_existed_is_listed(
    fleetmem_redis_factory: Any,
) -> None:
    server = fleetmem_redis_factory()
    old = await _store(server, "legacy")
    lister = await _store(server, "lister")
    raw = aioredis.Redis.from_url(server.url)
    try:
        await old.set("k", 1)
        await old.with_namespace("legacy.two").set("k", 2, ttl=3600)
        # An entry key that looks like a counts key does not name a namespace.
        await old.with_namespace("legacy.two").set("x}:c", 3)
        # What an older fleetmem leaves: the entries, their index and counts; no registry.
        await raw.delete(REGISTRY, SUSPECTS, MARKER)
        assert await lister.with_namespace("legacy").get("k") == 1
        assert await lister.namespaces() == ["legacy", "legacy.two"]
        assert await raw.get(MARKER) is not None  # backfilled once per server run
    finally:
        await raw.aclose()
        await old.close()
        await lister.close()


async def test_a_write_after_a_restart_without_persistence_is_listed(
    fleetmem_redis_factory: Any,
) -> None:
    server = fleetmem_redis_factory()  # no AOF, no snapshot: a restart loses everything
    writer = await _store(server, "agents")
    lister = await _store(server, "lister")
    try:
        # The restart comes before any listing: the writer still trusts its registration.
        await writer.set("a", 1)
        server.restart()
        await _write(writer, "b", 2)
        assert await lister.with_namespace("agents").get("b") == 2
        assert await lister.namespaces() == ["agents"]
        # The restart comes between a listing (registry marked complete) and the write.
        server.restart()
        assert await _namespaces(lister) == []
        await _write(writer, "c", 3)
        assert await lister.namespaces() == ["agents"]
    finally:
        await writer.close()
        await lister.close()


async def _namespaces(store: RedisStore) -> list[str]:
    for _ in range(50):
        try:
            return await store.namespaces()
        except FleetmemError:
            await asyncio.sleep(0.1)
    return await store.namespaces()


async def test_a_registration_lost_by_a_failover_of_the_registry_is_found_again(
    fleetmem_redis_factory: Any,
) -> None:
    server = fleetmem_redis_factory()
    writer = await _store(server, "agents")
    lister = await _store(server, "lister")
    raw = aioredis.Redis.from_url(server.url)
    try:
        await writer.set("a", 1)
        assert await lister.namespaces() == ["agents"]
        # A failover of the registry's node (its own slot on a Cluster) that lost the
        # registration but not the entry: the marker replicated from the old primary names
        # the old primary's run_id.
        await raw.zrem(REGISTRY, "agents")
        await raw.set(MARKER, "0" * 40)
        await writer.set("b", 2)  # trusted: not registered again
        assert await lister.namespaces() == ["agents"]
    finally:
        await raw.aclose()
        await writer.close()
        await lister.close()


async def test_concurrent_listings_after_a_lost_registry_agree(
    fleetmem_redis_factory: Any,
) -> None:
    server = fleetmem_redis_factory()
    writer = await _store(server, "w")
    raw = aioredis.Redis.from_url(server.url)
    names = [f"n{i:03d}" for i in range(40)]
    try:
        await asyncio.gather(*(writer.with_namespace(n).set("k", 1) for n in names))
        await raw.delete(REGISTRY, SUSPECTS, MARKER)
        listers = [await _store(server, f"l{i}") for i in range(4)]
        try:
            answers = await asyncio.gather(*(lister.namespaces() for lister in listers))
        finally:
            for lister in listers:
                await lister.close()
        assert answers == [names] * 4
    finally:
        await raw.aclose()
        await writer.close()


async def test_clear_starts_a_suspicion_and_settles_aged_ones_without_a_listing(
    fleetmem_redis_factory: Any, short_registry: float
) -> None:
    server = fleetmem_redis_factory()
    runs = [await _store(server, f"run{i}") for i in range(4)]
    raw = aioredis.Redis.from_url(server.url)
    try:
        for run in runs:
            await run.set("k", 1)
        await runs[0].clear()
        await runs[1].clear()
        # Suspected at once, still registered: a writer may trust its registration.
        assert await raw.zscore(SUSPECTS, "run0") is not None
        assert await raw.zscore(REGISTRY, "run0") == 0
        await runs[1].set("k", 2)  # written again, trusting its registration
        await asyncio.sleep(short_registry + 0.05)
        # No listing anywhere: the next clear() settles the aged suspicions.
        await runs[2].clear()
        assert await raw.zscore(REGISTRY, "run0") is None  # still empty: dropped
        assert await raw.zscore(SUSPECTS, "run0") is None
        assert await raw.zscore(REGISTRY, "run1") == 0  # live again: kept, no longer suspected
        assert await raw.zscore(SUSPECTS, "run1") is None
        assert await raw.zscore(SUSPECTS, "run2") is not None  # just cleared: suspected
        assert await raw.zrange(REGISTRY, 0, -1) == [b"run1", b"run2", b"run3"]
        assert await runs[3].namespaces() == ["run1", "run3"]
    finally:
        await raw.aclose()
        for run in runs:
            await run.close()


async def test_a_write_stands_when_registering_after_it_fails(
    fleetmem_redis_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = fleetmem_redis_factory()
    store = await _store(server, "agents")
    monkeypatch.setattr(redis_kv, "REGISTRATION_TRUST", 0.0)  # register before and after
    calls = 0
    register = redis_kv.RedisKV._register

    async def fails_after_the_write(self: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % 2 == 0:
            raise BackendUnavailableError("Redis unavailable during FCALL")
        await register(self)

    monkeypatch.setattr(redis_kv.RedisKV, "_register", fails_after_the_write)
    try:
        # Applied and acknowledged by Redis: the caller is told so, not "unavailable".
        await store.set("k", 1)
        assert await store.incr("n") == 1
        assert calls == 4
        assert await store.get("k") == 1
        assert "was applied, but registering" in caplog.text
    finally:
        await store.close()


async def test_a_user_without_scan_or_info_still_lists_the_registered_names(
    fleetmem_redis_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = fleetmem_redis_factory()
    raw = aioredis.Redis.from_url(server.url)
    await raw.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all")
    await raw.execute_command("ACL", "SETUSER", "app", "-scan", "-info", "-config")
    store = await RedisStore.from_url(
        server.url, namespace="agents", username="app", password="pw", cluster=False
    ).connect()
    try:
        await store.set("k", 1)
        assert await store.namespaces() == ["agents"]
        assert "could not backfill the namespace registry" in caplog.text
    finally:
        await store.close()
        await raw.aclose()
