"""``fleetmem.sync``: the blocking facade, on the memory and SQLite backends.

Every method, errors crossing from the loop thread with their class and traceback, several
threads at once, callers that run an event loop of their own, the deadlock guard, closing
(idempotent, final, with calls in flight, forgotten, at interpreter exit) and the import rules.
The same round of operations on every backend is in ``tests/integration/test_sync_backends.py``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import fleetmem
from fleetmem import (
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
    KeyNotFoundError,
    NotANumberError,
    SerializationError,
    StoreClosedError,
    VersionConflictError,
)
from fleetmem.backends.sqlite import SQLiteStore
from fleetmem.store import Store
from fleetmem.sync import SyncDeadlockError, SyncStore, open_store


def _loop_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("fleetmem-sync-")}


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _url(backend: str, tmp_path: Path) -> str:
    return "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'sync.db'}"


BACKENDS = [
    pytest.param("memory", marks=pytest.mark.memory, id="memory"),
    pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    backend: str = request.param
    return _url(backend, tmp_path)


@pytest.fixture
def store(url: str, fleetmem_namespace: str) -> Iterator[SyncStore]:
    with open_store(url, namespace=fleetmem_namespace) as opened:
        yield opened


# ------------------------------------------------------------------------- the same methods


def _public_async_methods() -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(Store)
        if not name.startswith("_")
        and inspect.iscoroutinefunction(member)
        and name != "connect"  # open_store() and wrap() connect
    )


def test_every_async_method_has_a_blocking_twin_with_its_signature() -> None:
    names = _public_async_methods()
    assert {"get", "set", "compare_and_set", "cleanup_expired", "close"} <= set(names)
    for name in [*names, "with_namespace"]:
        ours = getattr(SyncStore, name, None)
        assert ours is not None, f"SyncStore has no {name}()"
        theirs = inspect.signature(getattr(Store, name))
        mine = inspect.signature(ours)
        assert list(mine.parameters.values())[1:] == list(theirs.parameters.values())[1:], name
        returns = theirs.return_annotation
        if name == "with_namespace":
            returns = "SyncStore"
        assert mine.return_annotation == returns, name
        assert inspect.iscoroutinefunction(ours) is False, name
        if name not in ("close", "with_namespace"):
            assert f"MemoryStore.{name}`" in (ours.__doc__ or ""), name
    for prop in ("namespace", "backend", "closed", "max_value_bytes", "leases", "agents"):
        assert isinstance(inspect.getattr_static(SyncStore, prop), property), prop
    assert isinstance(inspect.getattr_static(Store, "leases"), property)
    assert isinstance(inspect.getattr_static(Store, "agents"), property)
    # Their methods are compared with Leases' and AgentRegistry's in test_sync_coordination.py.
    for prop, returns in (("leases", "SyncLeases"), ("agents", "SyncAgents")):
        getter = inspect.getattr_static(SyncStore, prop).fget
        assert inspect.signature(getter).return_annotation == returns, prop


def test_every_method_round_trips(store: SyncStore, fleetmem_namespace: str) -> None:
    assert store.namespace == fleetmem_namespace
    assert store.backend in ("memory", "sqlite")
    assert store.max_value_bytes > 0
    assert store.closed is False
    assert fleetmem_namespace in repr(store)

    first = store.set("plan/a", {"step": 1}, ttl=60, partition="plans")
    assert (first.key, first.value, first.partition, first.version) == (
        "plan/a",
        {"step": 1},
        "plans",
        1,
    )
    assert store.get("plan/a") == {"step": 1}
    assert store.get("missing", "fallback") == "fallback"
    entry = store.get_entry("plan/a")
    assert entry is not None and entry.version == 1 and entry.expires_at is not None
    assert store.get_entry("missing") is None
    assert store.exists("plan/a") is True
    assert store.exists("missing") is False
    left = store.ttl("plan/a")
    assert left is not None and 0 < left <= 60

    assert store.set_many({"plan/b": [1, 2], "note": "x"}, partition="plans") == 2
    assert store.get_many(["note", "missing", "plan/a"]) == {"note": "x", "plan/a": {"step": 1}}
    assert store.keys() == ["note", "plan/a", "plan/b"]
    assert store.keys("plan/", limit=1) == ["plan/a"]
    assert store.keys("plan/", after="plan/a") == ["plan/b"]
    assert store.search("plan/*") == {"plan/a": {"step": 1}, "plan/b": [1, 2]}
    assert store.search("*", partition="plans", limit=1) == {"note": "x"}
    assert store.namespaces(fleetmem_namespace) == [fleetmem_namespace]
    assert store.namespaces(fleetmem_namespace, after=fleetmem_namespace, limit=5) == []

    assert store.set_if_absent("note", "y") is False
    assert store.set_if_absent("fresh", "y", partition="other") is True
    assert store.partitions() == ["other", "plans"]
    swapped = store.compare_and_set("plan/a", {"step": 2}, version=1)
    assert swapped.version == 2 and store.get("plan/a") == {"step": 2}
    assert store.incr("counter") == 1
    assert store.incr("counter", 2.5, ttl=timedelta(minutes=1)) == 3.5

    assert store.persist("plan/a") is True
    assert store.ttl("plan/a") is None
    assert store.expire("plan/a", 30) is True
    assert store.expire("missing", 30) is False
    assert store.persist("missing") is False

    stats = store.stats()
    assert (stats.namespace, stats.keys, stats.backend) == (fleetmem_namespace, 5, store.backend)
    health = store.health()
    assert health.ok is True and health.backend == store.backend

    assert store.delete("fresh") is True
    assert store.delete("fresh") is False
    assert store.delete_many(["note", "missing"]) == 1
    assert store.clear_partition("plans") == 2
    store.set("short", 1, ttl=0.01)
    assert _wait_for(lambda: not store.exists("short"))
    assert store.cleanup_expired() in (0, 1)  # 0 where the read already freed it
    assert store.stats().expired_pending == 0
    assert store.clear() == 1  # counter
    assert store.keys() == []


def test_keep_ttl_and_timedelta_pass_through(store: SyncStore) -> None:
    store.set("k", 1, ttl=timedelta(seconds=90))
    store.set("k", 2, keep_ttl=True)
    left = store.ttl("k")
    assert left is not None and 60 < left <= 90


# ------------------------------------------------------------------------- errors


def _bad_calls() -> list[Any]:
    def conflict(s: SyncStore) -> object:
        s.set("k", 1)
        return s.compare_and_set("k", 2, version=5)

    def not_a_number(s: SyncStore) -> object:
        s.set("k", "text")
        return s.incr("k")

    cases: list[tuple[str, Callable[[SyncStore], object], type[FleetmemError]]] = [
        ("bad-key", lambda s: s.get(""), InvalidKeyError),
        ("bad-keys", lambda s: s.get_many("not-a-list"), InvalidKeyError),
        ("missing-ttl", lambda s: s.ttl("missing"), KeyNotFoundError),
        ("pattern", lambda s: s.search("[abc"), InvalidPatternError),
        ("value", lambda s: s.set("k", object()), SerializationError),
        ("ttl", lambda s: s.set("k", 1, ttl=-1), InvalidArgumentError),
        ("limit", lambda s: s.keys(limit=-1), InvalidArgumentError),
        ("conflict", conflict, VersionConflictError),
        ("not-a-number", not_a_number, NotANumberError),
    ]
    return [pytest.param(call, cls, id=name) for name, call, cls in cases]


@pytest.mark.parametrize(("call", "error"), _bad_calls())
def test_errors_keep_their_class_and_traceback(
    store: SyncStore, call: Callable[[SyncStore], object], error: type[FleetmemError]
) -> None:
    with pytest.raises(error) as caught:
        call(store)
    assert type(caught.value) is error
    frames = [Path(f.filename) for f in traceback.extract_tb(caught.value.__traceback__)]
    # The caller's frame, then the frames of the loop thread where the store raised it.
    assert frames[0] == Path(__file__)
    raised_in = [f for f in frames if "fleetmem" in f.parts and f.name != "sync.py"]
    assert raised_in, frames


def test_a_version_conflict_carries_the_current_version(store: SyncStore) -> None:
    store.set("k", 1)
    store.set("k", 2)
    with pytest.raises(VersionConflictError) as caught:
        store.compare_and_set("k", 3, version=1)
    assert (caught.value.expected, caught.value.current_version) == (1, 2)


# ------------------------------------------------------------------------- threads and loops


def test_threads_call_one_store_at_once(store: SyncStore) -> None:
    n_threads, rounds = 8, 50
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                store.incr("counter")
                store.set(f"t{i}/{r}", r)
                assert store.get(f"t{i}/{r}") == r
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert store.get("counter") == n_threads * rounds
    assert len(store.keys("t")) == n_threads * rounds


def test_a_thread_running_its_own_loop_can_call_it(store: SyncStore) -> None:
    # A Jupyter cell: the calling thread runs an event loop, the store's loop is another thread.
    results: list[object] = []

    async def cell() -> None:
        asyncio.get_running_loop()  # this thread's own loop is running
        store.set("from-loop", [1])
        results.append(store.get("from-loop"))
        results.append(await asyncio.sleep(0, "the loop still runs"))

    thread = threading.Thread(target=asyncio.run, args=(cell(),))
    thread.start()
    thread.join(60)
    assert results == [[1], "the loop still runs"]


async def test_a_coroutine_can_call_it(store: SyncStore) -> None:
    # This test runs on pytest-asyncio's loop, in the main thread.
    asyncio.get_running_loop()
    assert store.set("k", 1).version == 1
    assert store.incr("k") == 2
    with pytest.raises(KeyNotFoundError):
        store.ttl("missing")


def test_a_call_from_the_loop_thread_raises_instead_of_deadlocking(store: SyncStore) -> None:
    store.set("other", 1)

    class CallsBack(Mapping[str, object]):
        """A mapping that reads the store while ``set_many`` iterates it on the loop thread."""

        def __getitem__(self, key: str) -> object:
            return store.get("other")

        def __iter__(self) -> Iterator[str]:
            return iter(["k"])

        def __len__(self) -> int:
            return 1

    with pytest.raises(SyncDeadlockError, match="own event loop thread") as caught:
        store.set_many(CallsBack())
    assert isinstance(caught.value, FleetmemError)
    assert isinstance(caught.value, RuntimeError)
    assert store.get("k") is None  # nothing written
    assert store.get("other") == 1  # and the store still works


def test_a_generator_of_keys_may_call_the_store(store: SyncStore) -> None:
    store.set_many({"a": 1, "b": 2})
    # Drained in the calling thread, not on the loop thread where store.exists would deadlock.
    wanted = (k for k in ["a", "b", "c"] if store.exists(k))
    assert store.get_many(wanted) == {"a": 1, "b": 2}
    assert store.delete_many(k for k in ["a", "c"] if store.exists(k)) == 1


# ------------------------------------------------------------------------- closing


def _every_call() -> list[Any]:
    calls: dict[str, Callable[[SyncStore], object]] = {
        "get": lambda s: s.get("k"),
        "get_entry": lambda s: s.get_entry("k"),
        "get_many": lambda s: s.get_many(["k"]),
        "exists": lambda s: s.exists("k"),
        "ttl": lambda s: s.ttl("k"),
        "keys": lambda s: s.keys(),
        "search": lambda s: s.search("*"),
        "partitions": lambda s: s.partitions(),
        "namespaces": lambda s: s.namespaces(),
        "stats": lambda s: s.stats(),
        "set": lambda s: s.set("k", 1),
        "set_many": lambda s: s.set_many({"k": 1}),
        "set_if_absent": lambda s: s.set_if_absent("k", 1),
        "compare_and_set": lambda s: s.compare_and_set("k", 1, version=0),
        "incr": lambda s: s.incr("k"),
        "delete": lambda s: s.delete("k"),
        "delete_many": lambda s: s.delete_many(["k"]),
        "expire": lambda s: s.expire("k", 1),
        "persist": lambda s: s.persist("k"),
        "clear_partition": lambda s: s.clear_partition("p"),
        "clear": lambda s: s.clear(),
        "cleanup_expired": lambda s: s.cleanup_expired(),
        "with_namespace": lambda s: s.with_namespace("other"),
    }
    return [pytest.param(call, id=name) for name, call in calls.items()]


@pytest.mark.parametrize("call", _every_call())
def test_every_call_after_close_raises_store_closed(
    url: str, call: Callable[[SyncStore], object]
) -> None:
    store = open_store(url)
    store.close()
    with pytest.raises(StoreClosedError, match="is closed"):
        call(store)


def test_close_is_idempotent_final_and_ends_the_loop_thread(url: str) -> None:
    before = _loop_threads()
    store = open_store(url)
    store.set("k", 1)
    assert len(_loop_threads() - before) == 1
    store.close()
    store.close()
    assert store.closed is True
    assert _loop_threads() <= before  # joined, not left running
    health = store.health()  # never raises
    assert health.ok is False and health.details["error"] == "store is closed"


def test_the_context_manager_closes_also_on_error(url: str) -> None:
    before = _loop_threads()
    with pytest.raises(KeyNotFoundError), open_store(url) as store:
        assert store.set("k", 1).version == 1
        store.ttl("missing")
    assert store.closed is True
    assert _loop_threads() <= before


def test_closing_while_other_threads_call(url: str) -> None:
    store = open_store(url)
    outcomes: list[BaseException] = []
    calls = threading.Semaphore(0)

    def work(i: int) -> None:
        try:
            while True:
                store.set(f"k{i}", i)
                calls.release()
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):  # every thread is calling
        assert calls.acquire(timeout=30)
    store.close()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 4
    assert all(isinstance(e, StoreClosedError) for e in outcomes), outcomes


def test_concurrent_closes_all_return_once_closed(url: str) -> None:
    before = _loop_threads()
    store = open_store(url)
    done: list[bool] = []

    def close() -> None:
        store.close()
        done.append(True)

    closers = [threading.Thread(target=close) for _ in "abc"]
    for t in closers:
        t.start()
    for t in closers:
        t.join(60)
    assert done == [True, True, True]
    assert _loop_threads() <= before


def test_views_share_the_loop_and_close_alone(url: str, fleetmem_namespace: str) -> None:
    before = _loop_threads()
    store = open_store(url, namespace=fleetmem_namespace)
    view = store.with_namespace(f"{fleetmem_namespace}-v")
    assert len(_loop_threads() - before) == 1  # no second thread
    view.set("k", "in view")
    store.set("k", "in store")
    assert (view.get("k"), store.get("k")) == ("in view", "in store")
    view.close()
    view.close()
    assert view.closed is True and store.closed is False
    with pytest.raises(StoreClosedError):
        view.get("k")
    assert store.get("k") == "in store"

    other = store.with_namespace(f"{fleetmem_namespace}-w")
    store.close()
    assert other.closed is True
    with pytest.raises(StoreClosedError):
        other.get("k")
    other.close()  # closing a view of a closed store is a no-op
    assert other.health().ok is False
    assert _loop_threads() <= before


def test_wrap_runs_a_store_built_by_its_constructor(tmp_path: Path) -> None:
    inner = SQLiteStore(tmp_path / "wrapped.db", namespace="wrapped")
    with SyncStore.wrap(inner) as store:
        store.set("k", {"v": 1})
        assert store.get("k") == {"v": 1}
        assert store.backend == "sqlite"
    assert inner.closed is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param({"url": "nope://x"}, "unknown store URL scheme", id="scheme"),
        pytest.param({"url": "memory://", "no_such_option": 1}, "invalid option", id="option"),
        pytest.param(
            {"url": "memory://", "hybrid": ("postgresql://x", "redis://x")}, "not both", id="both"
        ),
    ],
)
def test_a_failed_open_raises_and_leaves_no_thread(args: dict[str, Any], message: str) -> None:
    before = _loop_threads()
    with pytest.raises(ConfigurationError, match=message):
        open_store(**args)
    assert _loop_threads() <= before


def test_a_bad_namespace_raises_the_async_error(url: str) -> None:
    with pytest.raises(InvalidKeyError):
        open_store(url, namespace="has space")


def _open_and_forget(url: str) -> None:
    store = open_store(url)
    store.set("k", 1)


def test_a_forgotten_store_is_closed_when_collected(url: str) -> None:
    before = _loop_threads()
    with pytest.warns(ResourceWarning, match="unclosed fleetmem.sync.SyncStore"):
        _open_and_forget(url)
        gc.collect()
    assert _wait_for(lambda: _loop_threads() <= before), _loop_threads() - before


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_interpreter_exit_closes_a_store_left_open(tmp_path: Path) -> None:
    db = tmp_path / "exit.db"
    done = _python(
        f"""
        import fleetmem.sync
        store = fleetmem.sync.open_store("sqlite:///{db}", namespace="exit")
        store.set("written", 42)
        view = store.with_namespace("exit-view")
        print("leaving")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "leaving\n"
    assert done.stderr == ""
    with open_store(f"sqlite:///{db}", namespace="exit") as store:
        assert store.get("written") == 42


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_gets_an_error_not_a_hang(tmp_path: Path) -> None:
    db = tmp_path / "fork.db"
    done = _python(
        f"""
        import os
        import fleetmem
        import fleetmem.sync
        store = fleetmem.sync.open_store("sqlite:///{db}", namespace="fork")
        store.set("k", 1)
        pid = os.fork()
        if pid == 0:
            try:
                store.get("k")
            except fleetmem.StoreClosedError as exc:
                print("child:", exc, store.closed, store.health().ok, flush=True)
                store.close()
                os._exit(0)
            os._exit(3)
        _, status = os.waitpid(pid, 0)
        print("parent:", os.waitstatus_to_exitcode(status), store.get("k"), flush=True)
        store.close()
        """
    )
    assert done.returncode == 0, done.stderr
    child, parent = done.stdout.splitlines()
    assert child.startswith("child: ") and "forked" in child and child.endswith("True False")
    assert parent == "parent: 0 1"


def test_an_interrupted_call_raises_keyboard_interrupt_and_the_store_lives_on() -> None:
    # A notebook's stop button: SIGINT while the main thread waits for the loop thread.
    done = _python(
        """
        import os, signal, threading, time
        from collections.abc import Mapping
        import fleetmem.sync

        class Slow(Mapping):
            def __getitem__(self, key):
                time.sleep(0.05)  # runs on the loop thread, keeping the call in flight
                return 1
            def __iter__(self):
                return iter([f"k{i}" for i in range(100)])
            def __len__(self):
                return 100

        with fleetmem.sync.open_store("memory://") as store:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            started = time.monotonic()
            try:
                store.set_many(Slow())
            except KeyboardInterrupt:
                print("interrupted", time.monotonic() - started < 4, flush=True)
            store.set("after", 2)
            print("after", store.get("after"), flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["interrupted True", "after 2"]


def test_import_fleetmem_does_not_import_sync_which_needs_only_the_stdlib() -> None:
    done = _python(
        """
        import sys
        import fleetmem
        assert "fleetmem.sync" not in sys.modules, "import fleetmem imported fleetmem.sync"
        before = set(sys.modules)
        import fleetmem.sync
        added = {m.split(".")[0] for m in set(sys.modules) - before}
        print(sorted(m for m in added if m not in sys.stdlib_module_names and m != "fleetmem"))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    assert "sync" not in fleetmem.__all__
