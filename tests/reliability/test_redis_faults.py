"""RedisStore against a Redis that is paused, killed, restarted or loses its script cache.

Every test starts a dedicated server (``fleetmem_redis_factory``): the shared one is never
disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, OutcomeUnknownError
from fleetmem.backends.redis import RedisStore

pytestmark = [pytest.mark.redis, pytest.mark.slow]

DEADLINE = 0.5
#: Scheduling slack on a loaded 2-core machine.
SLACK = 0.5


@pytest.fixture
def server(fleetmem_redis_factory: Callable[..., Any]) -> Any:
    return fleetmem_redis_factory()


@pytest.fixture
async def store(server: Any) -> AsyncIterator[RedisStore]:
    created = await RedisStore.from_url(server.url, namespace="faults", timeout=DEADLINE).connect()
    try:
        yield created
    finally:
        await created.close()


async def _raises_within(
    call: Callable[[], Any], error: type[BaseException], seconds: float
) -> BaseException:
    start = time.monotonic()
    with pytest.raises(error) as info:
        await call()
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    return info.value


async def test_paused_server_gives_backend_unavailable_within_the_deadline(
    server: Any, store: RedisStore
) -> None:
    await store.set("k", "v")
    server.pause()
    try:
        for call in (
            lambda: store.get("k"),
            lambda: store.get_many(["k", "j"]),
            lambda: store.keys(),
            lambda: store.stats(),
        ):
            await _raises_within(call, BackendUnavailableError, DEADLINE + SLACK)
        # A write that reached the socket has an unknown outcome.
        await _raises_within(lambda: store.set("k", "w"), OutcomeUnknownError, DEADLINE + SLACK)
        health = await store.health()
        assert health.ok is False
    finally:
        server.resume()
    assert await store.get("k") in ("v", "w")
    assert (await store.health()).ok is True


async def test_cancelled_call_leaves_no_stray_reply(server: Any, store: RedisStore) -> None:
    await store.set_many({"a": "value-of-a", "b": "value-of-b"})
    server.pause()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.get("a"), 0.1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.set("c", "value-of-c"), 0.1)
    finally:
        server.resume()
    # The replies to the cancelled calls arrive now; nobody may read them as their own.
    for _ in range(20):
        assert await store.get("b") == "value-of-b"
        assert await store.exists("zz") is False
    assert await store.get("c") in (None, "value-of-c")
    entry = await store.set("b", "again")
    assert entry.version == 2


async def test_cancellation_storm_keeps_connections_in_step(store: RedisStore) -> None:
    await store.set_many({f"k{i}": i for i in range(50)})
    for i in range(200):
        task = asyncio.ensure_future(store.get(f"k{i % 50}"))
        await asyncio.sleep(0)
        if i % 2:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            assert await task == i % 50
    results = await asyncio.gather(*(store.get(f"k{i}") for i in range(50)))
    assert results == list(range(50))


async def test_killed_then_restarted_server_recovers(server: Any, store: RedisStore) -> None:
    await store.set("before", 1)
    server.kill()
    error = await _raises_within(
        lambda: store.get("before"), BackendUnavailableError, DEADLINE + SLACK
    )
    assert not isinstance(error, OutcomeUnknownError)
    # Nothing could be sent: a refused connection is not an unknown outcome.
    error = await _raises_within(
        lambda: store.set("x", 1), BackendUnavailableError, DEADLINE + SLACK
    )
    assert not isinstance(error, OutcomeUnknownError)
    server.start()
    # No persistence configured: the data is gone, the scripts too; the store works again.
    deadline = time.monotonic() + 10
    while True:
        try:
            entry = await store.set("after", 2)
            break
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert entry.version == 1
    assert await store.get("after") == 2
    assert await store.keys() == ["after"]
    assert (await store.stats()).keys == 1


async def test_restarted_server_with_aof_keeps_entries(
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    server = fleetmem_redis_factory(appendonly=True)
    async with RedisStore.from_url(server.url, namespace="aof", timeout=2.0) as store:
        await store.set_many({"a": 1, "b": 2}, partition="p")
        await store.incr("a", 10)
        server.restart()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await store.get("a") == 11
                break
            except BackendUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert await store.keys() == ["a", "b"]
        assert (await store.stats()).partitions == {"p": 2}
        assert (await store.set("b", 3)).version == 2


async def test_script_flush_is_survived(server: Any, store: RedisStore) -> None:
    import redis.asyncio as aioredis

    await store.set("k", 1)
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.script_flush()
        entry = await store.set("k", 2)
        assert entry.version == 2
        await admin.script_flush()
        assert await store.incr("k", 5) == 7
        await admin.script_flush()
        assert await store.keys() == ["k"]
        await admin.script_flush()
        assert (await store.get_entry("k")) is not None
    finally:
        await admin.aclose()
