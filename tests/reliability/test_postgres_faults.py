"""PostgresStore against a dedicated server that is restarted or killed under it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, OutcomeUnknownError

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore  # noqa: E402


@pytest.fixture(scope="module")
def pg_fault_server(fleetmem_postgres_factory: Callable[..., Any]) -> Any:
    """A server of this module's own (the shared one is never killed)."""
    return fleetmem_postgres_factory()


@pytest.fixture
def victim(pg_fault_server: Any) -> Iterator[Any]:
    yield pg_fault_server
    pg_fault_server.resume()
    pg_fault_server.start()


async def _mixed_ops(store: PostgresStore, count: int) -> None:
    for i in range(count):
        key = f"k{i % 7}"
        step = i % 5
        if step == 0:
            await store.set(key, {"i": i})
        elif step == 1:
            await store.get(key)
        elif step == 2:
            await store.incr("counter")
        elif step == 3:
            await store.get_many([key, "counter"])
        else:
            await store.exists(key)


async def _warm(store: PostgresStore, connections: int) -> None:
    # Several operations at once so that the pool opens several connections.
    await asyncio.gather(*(store.set(f"warm{i}", i) for i in range(connections * 3)))


@pytest.mark.parametrize("loop_blocked", [False, True], ids=["loop-running", "loop-blocked"])
async def test_restart_with_idle_pool_then_100_operations(
    victim: Any, fleetmem_namespace: str, loop_blocked: bool
) -> None:
    async with PostgresStore.from_url(
        victim.dsn, namespace=fleetmem_namespace, min_size=4, max_size=4
    ) as store:
        await _warm(store, 4)
        if loop_blocked:
            # The loop does not run during the restart: the pool learns of the dead
            # connections only when it uses them.
            victim.restart()
        else:
            await asyncio.to_thread(victim.restart)
        await _mixed_ops(store, 100)  # not one failure
        assert await store.get("counter") == 20
        await store.clear()


async def test_server_killed_during_writes(victim: Any, fleetmem_namespace: str) -> None:
    store = await PostgresStore.from_url(
        victim.dsn,
        namespace=fleetmem_namespace,
        max_size=4,
        acquire_timeout=1.0,
        command_timeout=2.0,
    ).connect()
    outcomes: list[tuple[float, BaseException | None]] = []
    stop = asyncio.Event()

    async def writer(index: int) -> None:
        i = 0
        while not stop.is_set() and i < 100_000:
            i += 1
            try:
                await store.set(f"w{index}/{i % 50}", i)
                outcomes.append((time.monotonic(), None))
            except Exception as exc:
                outcomes.append((time.monotonic(), exc))
                await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(writer(n)) for n in range(4)]
    try:
        await asyncio.sleep(0.5)
        assert any(exc is None for _, exc in outcomes), "no write succeeded before the kill"
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(2.0)
        after_kill = [(t, exc) for t, exc in outcomes if t >= killed_at]
        failures = [(t, exc) for t, exc in after_kill if exc is not None]
        assert failures, "no write failed within 2 s of the kill"
        assert failures[0][0] - killed_at < 2.0
        for _, exc in failures:
            # OutcomeUnknownError is a BackendUnavailableError: the write was in flight.
            assert isinstance(exc, BackendUnavailableError), repr(exc)
        assert not any(exc is None for t, exc in after_kill if t > failures[0][0] + 0.5), (
            "writes succeeded on a dead server"
        )
        kinds = {type(exc) for _, exc in failures}
        assert kinds <= {BackendUnavailableError, OutcomeUnknownError}, kinds

        await asyncio.to_thread(victim.start)
        back_at = time.monotonic()
        deadline = back_at + 5.0
        recovered_at = None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            recent = [exc for t, exc in outcomes if t > time.monotonic() - 0.3]
            if recent and all(exc is None for exc in recent):
                recovered_at = time.monotonic()
                break
        assert recovered_at is not None, "writes did not recover within 5 s of the restart"
        assert recovered_at - back_at < 5.0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Every key written after recovery reads back.
    await store.set("after", 1)
    assert await store.get("after") == 1
    await store.clear()
    await store.close()


async def test_health_reports_a_dead_server_without_raising(
    victim: Any, fleetmem_namespace: str
) -> None:
    async with PostgresStore.from_url(
        victim.dsn, namespace=fleetmem_namespace, acquire_timeout=1.0
    ) as store:
        assert (await store.health()).ok
        await asyncio.to_thread(victim.stop)
        health = await store.health()
        assert not health.ok
        with pytest.raises(BackendUnavailableError):
            await store.get("k")
        await asyncio.to_thread(victim.start)
        assert (await store.health()).ok
        assert await store.get("k") is None
