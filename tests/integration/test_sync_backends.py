"""``fleetmem.sync`` on every backend: a round of operations through the blocking facade,
then leases (the ``with`` lock renewed on the loop thread), fenced writes and agents.

The stores are opened as a user opens them, ``fleetmem.sync.open_store(url, namespace=...)``,
with the harness's servers (``hybrid=(dsn, redis_url)`` for the hybrid); one table of backends,
as in ``tests/conftest.py``. The facade's own behaviour (closing, the deadlock guard, garbage
collection, interpreter exit) is tested on memory and SQLite in ``tests/unit/test_sync.py`` and
``tests/unit/test_sync_coordination.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fleetmem import (
    AgentGoneError,
    BackendUnavailableError,
    InvalidKeyError,
    KeyNotFoundError,
    LeaseLostError,
    StoreClosedError,
    VersionConflictError,
)
from fleetmem.sync import SyncStore, open_store

Opener = Callable[[pytest.FixtureRequest, str], SyncStore]


def _memory(request: pytest.FixtureRequest, namespace: str) -> SyncStore:
    return open_store("memory://", namespace=namespace)


def _sqlite(request: pytest.FixtureRequest, namespace: str) -> SyncStore:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return open_store(f"sqlite:///{tmp_path / 'fleetmem.db'}", namespace=namespace)


def _postgres(request: pytest.FixtureRequest, namespace: str) -> SyncStore:
    dsn: str = request.getfixturevalue("fleetmem_postgres_database")
    return open_store(dsn, namespace=namespace)


def _redis(request: pytest.FixtureRequest, namespace: str) -> SyncStore:
    server = request.getfixturevalue("fleetmem_redis_server")
    return open_store(server.url, namespace=namespace)


def _hybrid(request: pytest.FixtureRequest, namespace: str) -> SyncStore:
    dsn: str = request.getfixturevalue("fleetmem_postgres_database")
    server = request.getfixturevalue("fleetmem_redis_server")
    return open_store(hybrid=(dsn, server.url), namespace=namespace)


#: name -> (opener, pytest marks), in the order and with the marks of tests/conftest.py.
BACKENDS: dict[str, tuple[Opener, tuple[pytest.MarkDecorator, ...]]] = {
    "memory": (_memory, (pytest.mark.memory,)),
    "sqlite": (_sqlite, (pytest.mark.sqlite,)),
    "redis": (_redis, (pytest.mark.redis,)),
    "postgres": (_postgres, (pytest.mark.postgres,)),
    "hybrid": (_hybrid, (pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis)),
}


@pytest.fixture(
    params=[pytest.param(name, marks=marks, id=name) for name, (_, marks) in BACKENDS.items()]
)
def sync_store(request: pytest.FixtureRequest, fleetmem_namespace: str) -> Iterator[SyncStore]:
    """A fresh store on each backend through the facade; emptied and closed afterwards."""
    store = BACKENDS[request.param][0](request, fleetmem_namespace)
    try:
        yield store
    finally:
        if not store.closed:
            store.clear()
        store.close()


def _loop_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("fleetmem-sync-")}


def test_a_round_of_operations(sync_store: SyncStore, fleetmem_namespace: str) -> None:
    store = sync_store
    assert store.namespace == fleetmem_namespace
    assert store.health().ok is True

    first = store.set("plan/1", {"step": 1, "agent": "a-7"}, partition="plans")
    assert (first.version, first.partition, first.expires_at) == (1, "plans", None)
    assert store.get("plan/1") == {"step": 1, "agent": "a-7"}
    assert store.get("missing", 0) == 0

    swapped = store.compare_and_set("plan/1", {"step": 2}, version=1)
    assert swapped.version == 2
    with pytest.raises(VersionConflictError) as conflict:
        store.compare_and_set("plan/1", {"step": 3}, version=1)
    assert conflict.value.current_version == 2
    assert store.get("plan/1") == {"step": 2}

    assert store.incr("runs") == 1
    assert store.incr("runs", 41) == 42

    store.set("lease", "a-7", ttl=timedelta(minutes=5))
    left = store.ttl("lease")
    assert left is not None and 0 < left <= 300
    assert store.persist("lease") is True
    assert store.ttl("lease") is None
    with pytest.raises(KeyNotFoundError):
        store.ttl("missing")

    assert store.set_many({"plan/2": [1], "plan/3": [2]}, partition="plans") == 2
    assert store.keys("plan/") == ["plan/1", "plan/2", "plan/3"]
    assert store.keys("plan/", after="plan/1", limit=1) == ["plan/2"]
    assert store.search("plan/[23]") == {"plan/2": [1], "plan/3": [2]}
    assert store.get_many(["plan/3", "nope", "runs"]) == {"plan/3": [2], "runs": 42}
    assert store.partitions() == ["default", "plans"]
    assert store.namespaces(fleetmem_namespace) == [fleetmem_namespace]
    assert store.stats().keys == 5

    with pytest.raises(InvalidKeyError):
        store.set("", 1)
    assert store.clear_partition("plans") == 3
    assert store.clear() == 2
    assert store.keys() == []


def test_threads_and_an_event_loop_share_one_store(sync_store: SyncStore) -> None:
    store = sync_store
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                store.incr("hits")
        except BaseException as exc:
            errors.append(exc)

    async def cell() -> None:  # a thread with an event loop of its own, as a notebook has
        for _ in range(25):
            store.incr("hits")
            await asyncio.sleep(0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    threads.append(threading.Thread(target=asyncio.run, args=(cell(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert store.get("hits") == 125


def _params(names: list[str]) -> list[Any]:
    return [pytest.param(name, marks=BACKENDS[name][1], id=name) for name in names]


@pytest.mark.parametrize("backend", _params(list(BACKENDS)))
def test_close_ends_the_thread_and_later_calls_raise(
    request: pytest.FixtureRequest, fleetmem_namespace: str, backend: str
) -> None:
    before = _loop_threads()
    store = BACKENDS[backend][0](request, fleetmem_namespace)
    with store:
        store.set("k", backend)
        view = store.with_namespace(f"{fleetmem_namespace}-v")
        view.set("k", "view")
        assert (store.get("k"), view.get("k")) == (backend, "view")
        view.clear()
        store.clear()
    assert store.closed and view.closed
    assert _loop_threads() <= before
    with pytest.raises(StoreClosedError):
        store.get("k")
    with pytest.raises(StoreClosedError):
        view.get("k")
    assert store.health().ok is False


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://127.0.0.1:1/0", marks=pytest.mark.redis, id="redis"),
        pytest.param(
            "postgresql://postgres@127.0.0.1:1/postgres", marks=pytest.mark.postgres, id="postgres"
        ),
    ],
)
def test_an_unreachable_server_raises_and_leaves_no_thread(url: str) -> None:
    before = _loop_threads()
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as caught:
        open_store(url, namespace="unreachable")
    assert "127.0.0.1" in str(caught.value) or "connect" in str(caught.value)
    assert _loop_threads() <= before
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("backend", _params(["sqlite", "redis", "postgres", "hybrid"]))
def test_two_stores_on_one_backend_see_each_other(
    request: pytest.FixtureRequest, fleetmem_namespace: str, backend: str
) -> None:
    # Two SyncStores, two loop threads, one backend: what one writes, the other reads.
    open_one = BACKENDS[backend][0]
    with open_one(request, fleetmem_namespace) as one, open_one(request, fleetmem_namespace) as two:
        one.set("shared", {"by": "one"})
        assert two.get("shared") == {"by": "one"}
        entry = two.compare_and_set("shared", {"by": "two"}, version=1)
        assert one.get_entry("shared") == entry
        assert two.clear() == 1


def test_leases_fences_and_agents_through_the_facade(sync_store: SyncStore) -> None:
    store = sync_store
    with store.leases.lock("build/main", owner="agent-7", ttl=2) as held:
        token = held.lease.token
        time.sleep(3)  # past the TTL: the renewal task on the loop thread keeps it
        holder = store.leases.holder("build/main")
        assert holder is not None and holder.token == token and not held.lost.is_set()
        assert store.set("build/status", "green", fence=held).version == 1
        assert store.leases.acquire("build/main", owner="agent-8") is None
    assert store.leases.holder("build/main") is None

    late = store.leases.acquire("report", owner="paused", ttl=0.3)
    assert late is not None
    assert _wait_for(lambda: store.leases.holder("report") is None)
    fresh = store.leases.acquire("report", owner="fresh", ttl=30)
    assert fresh is not None and fresh.token > late.token
    store.set("report/status", "final", fence=fresh)
    with pytest.raises(LeaseLostError):
        store.set("report/status", "stale", fence=late)
    assert store.get("report/status") == "final"
    assert store.leases.release(fresh) is True

    first = store.agents.register("agent-7", info={"role": "tester"}, ttl=30)
    assert store.agents.heartbeat("agent-7").generation == first.generation
    assert [a.id for a in store.agents.list()] == ["agent-7"]
    assert store.agents.deregister("agent-7") is True
    with pytest.raises(AgentGoneError):
        store.agents.heartbeat("agent-7")
    assert store.agents.register("agent-7").generation > first.generation
    assert store.agents.deregister("agent-7") is True


@pytest.mark.parametrize("backend", _params(["sqlite", "redis", "postgres", "hybrid"]))
def test_two_stores_take_turns_on_one_lease(
    request: pytest.FixtureRequest, fleetmem_namespace: str, backend: str
) -> None:
    # Two SyncStores (two loop threads, two connectors): a waiter in one is let in by a
    # release in the other, and the first one's late fenced write is refused.
    open_one = BACKENDS[backend][0]
    with open_one(request, fleetmem_namespace) as one, open_one(request, fleetmem_namespace) as two:
        lease = one.leases.acquire("shared", owner="one", ttl=60)
        assert lease is not None
        assert two.leases.acquire("shared", owner="two") is None
        releaser = threading.Timer(0.3, one.leases.release, args=(lease,))
        releaser.start()
        try:
            # Long before the lease's 60 s TTL: only the release can let it in.
            taken = two.leases.acquire("shared", owner="two", ttl=60, wait=30)
        finally:
            releaser.join()
        assert taken is not None and taken.token > lease.token
        with two.leases.lock("other", owner="two", ttl=30) as held:
            two.set("k", "two", fence=held)
            with pytest.raises(LeaseLostError):
                one.set("k", "one", fence=lease)
            holder = one.leases.holder("other")
            assert holder is not None and holder.token == held.lease.token
        assert one.get("k") == "two"
        assert two.leases.release(taken) is True
        two.clear()


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
