"""PostgresStore against a dedicated server that is restarted, killed or full under it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, OutcomeUnknownError

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

asyncpg = pytest.importorskip("asyncpg")

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


# ---------------------------------------------------------------- the server at max_connections


@pytest.fixture(scope="module")
def pg_full_server(fleetmem_postgres_factory: Callable[..., Any]) -> Any:
    """A server of this module's own, filled up to max_connections by the tests."""
    return fleetmem_postgres_factory()


@contextlib.asynccontextmanager
async def _fill(server: Any) -> AsyncIterator[list[Any]]:
    """Take every connection slot the server has left (opening until it refuses: the
    harness's max_connections, whatever it is), and give them back on exit."""
    taken: list[Any] = []
    try:
        while True:
            try:
                taken.append(await asyncpg.connect(server.dsn, timeout=10))
            except asyncpg.TooManyConnectionsError:
                break
            assert len(taken) < 10_000, "the server never refused a connection"
        yield taken
    finally:
        for conn in taken:
            conn.terminate()


APP = "fleetmem-full-test"


@pytest.mark.parametrize("coalescing", [True, False], ids=["coalesced", "one-by-one"])
async def test_full_server_calls_wait_for_the_stores_idle_connection(
    pg_full_server: Any, fleetmem_namespace: str, coalescing: bool
) -> None:
    # Issue 14 (E): one healthy idle connection, the server full, 50 concurrent gets: 49 failed
    # within ~10 ms ("lost its connection") because opening a *second* connection was refused.
    async with PostgresStore.from_url(
        pg_full_server.dsn,
        namespace=fleetmem_namespace,
        min_size=1,
        max_size=10,
        acquire_timeout=5.0,
    ) as store:
        store.set_coalescing(coalescing)
        await store.set("k", "v")
        async with _fill(pg_full_server) as taken:
            assert taken, "the server had no free slot to fill"
            gets = await asyncio.gather(
                *(store.get("k") for _ in range(50)), return_exceptions=True
            )
            assert gets == ["v"] * 50, [g for g in gets if g != "v"][:3]
            incrs = await asyncio.gather(
                *(store.incr("n") for _ in range(50)), return_exceptions=True
            )
            failed = [i for i in incrs if not isinstance(i, int)]
            assert not failed, failed[:3]
            assert sorted(i for i in incrs if isinstance(i, int)) == list(range(1, 51))
            # Still the one connection: every call waited for it instead of failing.
            assert (await store.health()).details["pool_size"] == 1
        await store.clear()


async def test_full_server_an_injected_pool_waits_too(
    pg_full_server: Any, fleetmem_namespace: str
) -> None:
    from fleetmem.backends.postgres import init_connection

    pool = await asyncpg.create_pool(
        pg_full_server.dsn, min_size=1, max_size=10, init=init_connection
    )
    try:
        store = await PostgresStore(
            pool=pool, namespace=fleetmem_namespace, acquire_timeout=5.0
        ).connect()
        store.set_coalescing(False)
        await store.set("k", "v")
        async with _fill(pg_full_server) as taken:
            assert taken
            gets = await asyncio.gather(
                *(store.get("k") for _ in range(50)), return_exceptions=True
            )
            assert gets == ["v"] * 50, [g for g in gets if g != "v"][:3]
        await store.clear()
        await store.close()
    finally:
        await pool.close()


async def test_full_server_a_freed_slot_is_taken_by_a_waiting_call(
    pg_full_server: Any, fleetmem_namespace: str
) -> None:
    # The store has no connection at all: the waiting call keeps trying to open one (with
    # backoff) and gets the slot another client gives back, well before acquire_timeout.
    async with PostgresStore.from_url(
        pg_full_server.dsn,
        namespace=fleetmem_namespace,
        min_size=0,
        max_size=4,
        acquire_timeout=20.0,
        server_settings={"application_name": APP},
    ) as store:
        await store.set("k", "v")
        async with _fill(pg_full_server) as taken:
            await _drop_store_connections(taken[0], store)
            taken.append(await _take_last_slot(pg_full_server))
            started = time.monotonic()
            get = asyncio.create_task(store.get("k"))
            await asyncio.sleep(0.5)
            assert not get.done(), "the get did not wait for a connection"
            taken.pop().terminate()  # one slot free again
            assert await asyncio.wait_for(get, 15.0) == "v"
            assert time.monotonic() - started < 15.0


async def test_full_server_and_no_connection_a_clear_error_after_acquire_timeout(
    pg_full_server: Any, fleetmem_namespace: str
) -> None:
    timeout = 1.5
    async with PostgresStore.from_url(
        pg_full_server.dsn,
        namespace=fleetmem_namespace,
        min_size=1,
        max_size=4,
        acquire_timeout=timeout,
        server_settings={"application_name": APP},
    ) as store:
        await store.set("k", "v")
        async with _fill(pg_full_server) as taken:
            await _drop_store_connections(taken[0], store)
            taken.append(await _take_last_slot(pg_full_server))
            for call in (store.get("k"), store.set("k", "w")):
                started = time.monotonic()
                with pytest.raises(BackendUnavailableError) as info:
                    await call
                elapsed = time.monotonic() - started
                assert not isinstance(info.value, OutcomeUnknownError)  # nothing was sent
                message = str(info.value)
                assert "refused a new connection" in message, message
                assert "too many clients" in message, message
                assert "lost" not in message, message
                # Never before acquire_timeout (it waited), and not much after it.
                assert timeout * 0.9 <= elapsed < timeout + 10.0, elapsed
            # A store that connects to the full server: the same error from connect().
            fresh = PostgresStore.from_url(
                pg_full_server.dsn, namespace=fleetmem_namespace, acquire_timeout=timeout
            )
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError, match="refused a new connection"):
                await fresh.connect()
            assert timeout * 0.9 <= time.monotonic() - started < timeout + 10.0
            await fresh.close()
        # Once the server has room again, the same store works.
        assert await store.get("k") == "v"
        await store.clear()


async def _drop_store_connections(admin: Any, store: PostgresStore) -> None:
    """Terminate the store's server sessions (found by application name) from ``admin``, and
    let the store's idle connection see the server's goodbye."""
    pids = await admin.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        APP,
    )
    assert pids, "the store had no connection to drop"
    await asyncio.sleep(0.2)  # the server's goodbye reaches the store's connection


async def _take_last_slot(server: Any) -> Any:
    """The slot the store's dropped connection freed (the server exits the session async)."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return await asyncpg.connect(server.dsn, timeout=10)
        except asyncpg.TooManyConnectionsError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
