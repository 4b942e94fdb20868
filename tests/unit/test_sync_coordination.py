"""``fleetmem.sync``: leases, fenced writes and agents through the blocking facade.

The same signatures as the async ``Leases`` and ``AgentRegistry``, the ``with`` lock whose
renewal runs on the store's loop thread while the calling thread blocks, ``held.lost`` read
from another thread, fenced writes refused after a takeover, mutual exclusion between threads,
and closing. The guarantees themselves are proven on every backend by the conformance suite.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fleetmem import (
    AgentGoneError,
    HeldLease,
    InvalidArgumentError,
    InvalidKeyError,
    Lease,
    LeaseLostError,
    LeaseUnavailableError,
    SerializationError,
    StoreClosedError,
)
from fleetmem.agents import AgentRegistry
from fleetmem.leases import Leases
from fleetmem.queues import Queue
from fleetmem.sync import (
    SyncAgents,
    SyncLeaseLock,
    SyncLeases,
    SyncQueue,
    SyncStore,
    open_store,
)

BACKENDS = [
    pytest.param("memory", marks=pytest.mark.memory, id="memory"),
    pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'sync.db'}"


@pytest.fixture
def store(url: str, fleetmem_namespace: str) -> Iterator[SyncStore]:
    with open_store(url, namespace=fleetmem_namespace) as opened:
        yield opened


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ------------------------------------------------------------------------- the same methods


def _public_methods(cls: type) -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and inspect.isfunction(member)
    )


@pytest.mark.parametrize(
    ("sync_cls", "async_cls", "twins"),
    [
        (SyncLeases, Leases, {"LeaseLock": "SyncLeaseLock"}),
        (SyncAgents, AgentRegistry, {}),
        (SyncQueue, Queue, {}),
    ],
)
def test_blocking_twins_have_the_async_signatures(
    sync_cls: type, async_cls: type, twins: dict[str, str]
) -> None:
    names = _public_methods(async_cls)
    assert names, async_cls
    assert _public_methods(sync_cls) == names
    for name in names:
        theirs = inspect.signature(getattr(async_cls, name))
        ours = getattr(sync_cls, name)
        mine = inspect.signature(ours)
        assert list(mine.parameters.values())[1:] == list(theirs.parameters.values())[1:], name
        returns = theirs.return_annotation
        assert mine.return_annotation == twins.get(returns, returns), name
        assert not inspect.iscoroutinefunction(ours), name
        assert f"{async_cls.__name__}.{name}`" in (ours.__doc__ or ""), name
    # The backend seam (``backend``) stays with the async store, as ``store.kv`` does.
    assert isinstance(inspect.getattr_static(sync_cls, "namespace"), property)
    assert not hasattr(sync_cls, "backend")


def test_the_accessors_need_no_io_and_are_cached(store: SyncStore) -> None:
    assert store.leases is store.leases
    assert store.agents is store.agents
    assert store.leases.namespace == store.agents.namespace == store.namespace
    assert store.namespace in repr(store.leases) and store.namespace in repr(store.agents)


# ------------------------------------------------------------------------- leases


def test_acquire_renew_release_holder(store: SyncStore) -> None:
    leases = store.leases
    lease = leases.acquire("build/main", owner="agent-7", ttl=30)
    assert isinstance(lease, Lease)
    assert (lease.name, lease.owner, lease.namespace) == ("build/main", "agent-7", store.namespace)
    assert lease.expires_at > lease.acquired_at
    assert leases.holder("build/main") == lease
    assert leases.acquire("build/main", owner="agent-8") is None
    assert leases.acquire("build/main", owner="agent-7") is None  # the holder too

    renewed = leases.renew(lease, ttl=timedelta(seconds=60))
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    assert leases.release(renewed) is True
    assert leases.release(renewed) is False
    assert leases.holder("build/main") is None
    with pytest.raises(LeaseLostError):
        leases.renew(lease)

    again = leases.acquire("build/main", owner="agent-8", ttl=30, wait=5)
    assert again is not None and again.token > lease.token


def test_acquire_with_wait_is_woken_by_a_release_from_another_thread(store: SyncStore) -> None:
    first = store.leases.acquire("slot", owner="a", ttl=60)
    assert first is not None
    releaser = threading.Timer(0.2, store.leases.release, args=(first,))
    releaser.start()
    try:
        # Woken by the release, long before the lease's 60 s TTL or the 30 s wait run out.
        second = store.leases.acquire("slot", owner="b", ttl=60, wait=30)
    finally:
        releaser.join()
    assert second is not None and second.owner == "b" and second.token > first.token


def test_bad_arguments_are_refused_before_any_io(store: SyncStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.leases.acquire("", owner="a")
    with pytest.raises(InvalidKeyError):
        store.leases.lock("x", owner="")  # at lock(), before the with block
    with pytest.raises(InvalidArgumentError):
        store.leases.lock("x", owner="a", ttl=0)
    with pytest.raises(InvalidArgumentError):
        store.leases.release("not a lease")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        store.set("k", 1, fence="not a lease")  # type: ignore[arg-type]
    assert store.leases.holder("x") is None
    assert store.keys() == []


def test_a_fenced_write_fails_once_another_agent_took_over(store: SyncStore) -> None:
    # The paused agent: its lease expires while it sleeps, another agent takes over and
    # writes; the late write of the first one is refused by the store.
    paused = store.leases.acquire("report", owner="paused", ttl=0.2)
    assert paused is not None
    assert store.set("report/status", "draft", fence=paused).version == 1
    assert _wait_for(lambda: store.leases.holder("report") is None)
    fresh = store.leases.acquire("report", owner="fresh", ttl=30)
    assert fresh is not None and fresh.token > paused.token
    store.set("report/status", "final", fence=fresh)

    late_writes: list[Callable[[], object]] = [
        lambda: store.set("report/status", "stale", fence=paused),
        lambda: store.set_many({"report/status": "stale", "other": 1}, fence=paused),
        lambda: store.set_if_absent("report/new", "stale", fence=paused),
        lambda: store.compare_and_set("report/status", "stale", version=2, fence=paused),
        lambda: store.incr("report/count", fence=paused),
        lambda: store.delete("report/status", fence=paused),
        lambda: store.delete_many(["report/status"], fence=paused),
    ]
    for write in late_writes:
        with pytest.raises(LeaseLostError):
            write()
    entry = store.get_entry("report/status")
    assert entry is not None and (entry.value, entry.version) == ("final", 2)
    assert store.keys() == ["report/status"]


def test_the_lock_is_renewed_on_the_loop_thread_while_the_caller_blocks(
    store: SyncStore,
) -> None:
    lock = store.leases.lock("build/main", owner="agent-7", ttl=2)
    assert isinstance(lock, SyncLeaseLock)
    with lock as held:
        assert isinstance(held, HeldLease)
        first = held.lease
        time.sleep(3)  # longer than the TTL: only the background renewal keeps it
        holder = store.leases.holder("build/main")
        assert holder is not None and holder.token == first.token
        assert held.lease.expires_at > first.expires_at
        assert held.lost.is_set() is False
        assert store.set("build/status", "green", fence=held).value == "green"
        assert store.incr("build/count", fence=held) == 1
    assert store.leases.holder("build/main") is None
    assert store.leases.acquire("build/main", owner="agent-8") is not None


def test_a_held_lock_is_unavailable_to_others(store: SyncStore) -> None:
    with store.leases.lock("res", owner="a", ttl=30):
        with pytest.raises(LeaseUnavailableError):
            store.leases.lock("res", owner="b", ttl=30).__enter__()
        started = time.monotonic()
        with pytest.raises(LeaseUnavailableError), store.leases.lock("res", owner="b", wait=0.3):
            pass
        assert time.monotonic() - started >= 0.29
    with store.leases.lock("res", owner="b", ttl=30) as held:
        assert held.lease.owner == "b"


def test_the_lock_is_released_when_the_body_raises(store: SyncStore) -> None:
    with pytest.raises(KeyError), store.leases.lock("res", owner="a", ttl=30):
        raise KeyError("boom")
    assert store.leases.holder("res") is None


def test_a_lost_lease_is_seen_from_the_calling_thread(store: SyncStore) -> None:
    with store.leases.lock("res", owner="a", ttl=0.6) as held:
        # Someone frees it from under us (an operator, a bug): the next renewal fails.
        assert store.leases.release(held.lease) is True
        assert _wait_for(held.lost.is_set)
        assert "lost" in repr(held)
        with pytest.raises(LeaseLostError):
            store.set("k", 1, fence=held)
        other = store.leases.acquire("res", owner="b", ttl=30)
        assert other is not None
    # The exit raised nothing and did not free the new holder's lease.
    assert store.leases.holder("res") == other
    assert store.keys() == []


def test_threads_take_turns_under_one_lock(store: SyncStore) -> None:
    n_threads, rounds = 6, 5
    inside = 0
    overlaps: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def work(i: int) -> None:
        nonlocal inside
        try:
            for _ in range(rounds):
                with store.leases.lock("counter", owner=f"t{i}", ttl=30, wait=60) as held:
                    with guard:
                        inside += 1
                        overlaps.append(inside)
                    value = store.get("count", 0)
                    time.sleep(0.001)
                    store.set("count", value + 1, fence=held)
                    with guard:
                        inside -= 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert max(overlaps) == 1
    assert store.get("count") == n_threads * rounds


def test_views_have_their_own_leases(store: SyncStore) -> None:
    view = store.with_namespace(store.namespace + ".view")
    lease = store.leases.acquire("res", owner="a", ttl=30)
    assert lease is not None
    assert view.leases.holder("res") is None
    theirs = view.leases.acquire("res", owner="b", ttl=30)
    assert theirs is not None and theirs.namespace == view.namespace
    with pytest.raises(InvalidArgumentError):
        view.set("k", 1, fence=lease)  # a lease fences writes of its own namespace only
    view.close()


def test_closing_the_store_while_a_lock_is_held(url: str, fleetmem_namespace: str) -> None:
    store = open_store(url, namespace=fleetmem_namespace)
    leases = store.leases
    with leases.lock("res", owner="a", ttl=30):
        store.close()  # cancels the renewal with the loop; the exit raises nothing
    for call in (
        lambda: leases.acquire("res", owner="a"),
        lambda: leases.holder("res"),
        lambda: leases.lock("res", owner="a").__enter__(),
        lambda: store.agents.count(),
    ):
        with pytest.raises(StoreClosedError):
            call()


def test_an_interrupted_wait_for_a_lock_takes_nothing() -> None:
    # Ctrl-C while waiting for a held lease: KeyboardInterrupt at once, and once the holder
    # lets go, the abandoned waiter does not take the lease behind the program's back.
    code = """
        import os, signal, threading, time
        import fleetmem.sync

        with fleetmem.sync.open_store("memory://") as store:
            other = store.leases.acquire("res", owner="other", ttl=60)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            started = time.monotonic()
            try:
                with store.leases.lock("res", owner="me", ttl=60, wait=30):
                    print("entered", flush=True)
            except KeyboardInterrupt:
                print("interrupted", time.monotonic() - started < 10, flush=True)
            print("released", store.leases.release(other), flush=True)
            time.sleep(0.5)
            print("holder", store.leases.holder("res"), flush=True)
            with store.leases.lock("res", owner="next", ttl=60) as held:
                print("next", held.lease.owner, held.lease.token > other.token, flush=True)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "interrupted True",
        "released True",
        "holder None",
        "next next True",
    ]


def test_a_lease_granted_as_the_wait_is_interrupted_is_released(
    store: SyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt arrives just after the loop granted the lease: ``with`` never calls
    # __exit__, so __enter__ itself must stop the renewal and release it.
    run = SyncStore._run
    granted: list[HeldLease] = []

    def run_then_interrupt(self: SyncStore, coro: Any) -> Any:
        result = run(self, coro)
        if isinstance(result, HeldLease):
            granted.append(result)
            raise KeyboardInterrupt
        return result

    lock = store.leases.lock("res", owner="a", ttl=30)
    monkeypatch.setattr(SyncStore, "_run", run_then_interrupt)
    with pytest.raises(KeyboardInterrupt), lock:
        pytest.fail("the body must not run")
    monkeypatch.undo()
    assert len(granted) == 1
    assert _wait_for(lambda: store.leases.holder("res") is None)
    taken = store.leases.acquire("res", owner="b", ttl=30)
    assert taken is not None and taken.token > granted[0].lease.token


# ------------------------------------------------------------------------- agents


def test_agents_register_heartbeat_list_and_go(store: SyncStore) -> None:
    agents = store.agents
    first = agents.register("agent-7", info={"role": "tester"}, ttl=30)
    assert (first.id, first.info, first.generation) == ("agent-7", {"role": "tester"}, 1)
    agents.register("agent-8", ttl=timedelta(seconds=30))
    beat = agents.heartbeat("agent-7", ttl=60, info={"role": "builder"})
    assert beat.generation == first.generation and beat.registered_at == first.registered_at
    assert beat.expires_at > first.expires_at and beat.info == {"role": "builder"}
    got = agents.get("agent-7")
    assert got is not None and got.info == {"role": "builder"}
    assert agents.get("nobody") is None
    assert [a.id for a in agents.list()] == ["agent-7", "agent-8"]
    assert [a.id for a in agents.list("agent-", limit=1, after="agent-7")] == ["agent-8"]
    assert agents.count() == 2

    assert agents.deregister("agent-7") is True
    assert agents.deregister("agent-7") is False
    with pytest.raises(AgentGoneError):
        agents.heartbeat("agent-7")
    again = agents.register("agent-7")
    assert again.generation > first.generation  # a restart, not the same run
    with pytest.raises(SerializationError):
        agents.register("agent-9", info=["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        agents.list(limit=-1)
    assert agents.count() == 2


def test_an_agent_that_stops_heartbeating_is_gone(store: SyncStore) -> None:
    store.agents.register("short", ttl=0.2)
    assert _wait_for(lambda: store.agents.get("short") is None)
    assert store.agents.list() == [] and store.agents.count() == 0
    with pytest.raises(AgentGoneError):
        store.agents.heartbeat("short")


def test_a_queue_round_trip_from_threads(store: SyncStore) -> None:
    queue = store.queue("work")
    assert isinstance(queue, SyncQueue)
    assert (queue.name, queue.namespace) == ("work", store.namespace)
    ids = queue.put_many(iter([{"n": 1}, {"n": 2}]), priority=1)
    urgent = queue.put({"n": 0}, priority=5, dedupe_key="urgent")
    assert queue.put({"n": 9}, dedupe_key="urgent") == urgent
    assert store.list_queues() == ["work"]
    got: list[Any] = []

    def consume() -> None:
        while (job := queue.claim(consumer="t", lease=5)) is not None:
            assert queue.ack(job, result=job.payload["n"] * 10)
            got.append(job.payload["n"])

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [0, 1, 2]
    result = queue.result(ids[1], wait=1)
    assert result is not None and (result.status, result.value) == ("done", 20)
    assert queue.stats().done == 3
    assert queue.dead() == [] and queue.retry_dead(iter([])) == 0 and queue.purge_dead() == 0


def test_a_bad_queue_name_is_refused_in_the_calling_thread(store: SyncStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.queue("")
