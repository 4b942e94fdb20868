"""The lease, fence and agent front ends refuse bad input before any I/O, changing nothing.

"Before any I/O" is shown the way a caller would see it: on a store whose server is unreachable
(never connected) every bad call raises its own error, while a good call raises
``BackendUnavailableError`` -- so the bad call never reached the network. On a closed store it
raises its own error rather than ``StoreClosedError``. On an open store it changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest

from fleetmem import InMemoryStore, MemoryStore
from fleetmem.backends.seam import Fence
from fleetmem.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    InvalidKeyError,
    LeaseLostError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
)
from fleetmem.leases import HeldLease
from fleetmem.protocol import Entry, Lease
from fleetmem.testing.conformance._base import BAD_KEYS
from fleetmem.testing.conformance._expiry import BAD_TTLS

Call = tuple[str, type[BaseException], Callable[[], Awaitable[object]]]

NS = "frontend-ns"

BAD_OWNERS: list[Any] = [*BAD_KEYS, "o" * 256, "\u00e9" * 128, "\u00e9" * 127 + "ab"]
BAD_WAITS: list[Any] = [
    -1,
    -0.001,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    "1",
    b"1",
    [1],
    timedelta(seconds=-1),
    101 * 365 * 24 * 3600,
    10**400,  # too large for a float: refused, not an OverflowError
    -(10**400),
]
BAD_LIMITS: list[Any] = [-1, -(2**70), 1.5, "1", True, [1]]
NOT_OBJECTS: list[Any] = [[1], "x", 1, 1.5, True, ("a", 1), b"{}"]
NOT_JSON: list[Any] = [
    {"a": {1, 2}},
    {"a": float("nan")},
    {"a": float("inf")},
    {1: "int key"},
    {"a": b"bytes"},
    {"a": object()},
    {"a": "\x00"},
]


def _lease(namespace: str = NS, name: str = "job", token: int = 7) -> Lease:
    now = datetime.now(timezone.utc)
    return Lease(name, "agent-7", token, now, now + timedelta(seconds=30), namespace)


def _lost(lease: Lease) -> HeldLease:
    held = HeldLease(lease)
    held.lost.set()
    return held


def _writes(store: MemoryStore, fence: Any) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """Every fenced write with ``fence``."""
    return [
        ("set", lambda: store.set("k", 1, fence=fence)),
        ("set_many", lambda: store.set_many({"k": 1, "l": 2}, fence=fence)),
        ("set_if_absent", lambda: store.set_if_absent("new", 1, fence=fence)),
        ("compare_and_set", lambda: store.compare_and_set("k", 2, version=1, fence=fence)),
        ("incr", lambda: store.incr("n", fence=fence)),
        ("delete", lambda: store.delete("k", fence=fence)),
        ("delete_many", lambda: store.delete_many(["k", "l"], fence=fence)),
    ]


def bad_calls(store: MemoryStore, lease: Lease) -> list[Call]:
    """Every bad call of the lease, fence and agent front ends, with the error it must raise.

    ``lease`` is a lease of ``store``'s namespace (live or not: it is never used for I/O here).
    """
    leases, agents = store.leases, store.agents
    # Wrong types on purpose: the checks are what is tested.
    calls: list[Call] = []

    def add(name: str, error: type[BaseException], call: Callable[[], Awaitable[object]]) -> None:
        calls.append((name, error, call))

    for i, bad in enumerate(BAD_KEYS):
        add(f"acquire(name #{i})", InvalidKeyError, partial(leases.acquire, bad, owner="o"))
        add(
            f"acquire(name #{i}, wait)",
            InvalidKeyError,
            partial(leases.acquire, bad, owner="o", wait=1),
        )
        add(f"holder(name #{i})", InvalidKeyError, partial(leases.holder, bad))
        add(f"register(id #{i})", InvalidKeyError, partial(agents.register, bad))
        add(f"heartbeat(id #{i})", InvalidKeyError, partial(agents.heartbeat, bad))
        add(f"deregister(id #{i})", InvalidKeyError, partial(agents.deregister, bad))
        add(f"agents.get(id #{i})", InvalidKeyError, partial(agents.get, bad))
        if bad is not None:  # after=None: no cursor
            add(f"agents.list(after #{i})", InvalidKeyError, partial(agents.list, after=bad))
        if bad != "":
            add(f"agents.list(prefix #{i})", InvalidKeyError, partial(agents.list, bad))
    for i, bad in enumerate(BAD_OWNERS):
        add(f"acquire(owner #{i})", InvalidKeyError, partial(leases.acquire, "x", owner=bad))
    for i, bad in enumerate(BAD_TTLS):
        add(
            f"acquire(ttl #{i})",
            InvalidArgumentError,
            partial(leases.acquire, "x", owner="o", ttl=bad),
        )
        add(f"renew(ttl #{i})", InvalidArgumentError, partial(leases.renew, lease, ttl=bad))
        add(f"register(ttl #{i})", InvalidArgumentError, partial(agents.register, "a", ttl=bad))
        add(f"heartbeat(ttl #{i})", InvalidArgumentError, partial(agents.heartbeat, "a", ttl=bad))
    for i, bad in enumerate(BAD_WAITS):
        add(
            f"acquire(wait #{i})",
            InvalidArgumentError,
            partial(leases.acquire, "x", owner="o", wait=bad),
        )
    # Not a lease: refused as a fence and by renew/release.
    fence_tuple = Fence(lease.name, lease.token)
    now = datetime.now(timezone.utc)
    entry = Entry("k", 1, "default", 1, now, now, None)
    not_leases: list[Any] = ["job", 7, {"name": "job", "token": 7}, fence_tuple, entry, object()]
    for i, bad in enumerate(not_leases):
        for name, call in _writes(store, bad):
            add(f"{name}(fence=not a lease #{i})", InvalidArgumentError, call)
        add(f"renew(not a lease #{i})", InvalidArgumentError, partial(leases.renew, bad))
        add(f"release(not a lease #{i})", InvalidArgumentError, partial(leases.release, bad))
    # A lease (or a held lease) of another namespace.
    for foreign in (_lease("other-ns"), HeldLease(_lease("other-ns"))):
        for name, call in _writes(store, foreign):
            add(f"{name}(fence of another namespace)", InvalidArgumentError, call)
        add(
            "renew(lease of another namespace)",
            InvalidArgumentError,
            partial(leases.renew, foreign),
        )
        add(
            "release(lease of another namespace)",
            InvalidArgumentError,
            partial(leases.release, foreign),
        )
    # A Lease built by hand that no store can have granted (dataclasses.replace).
    bad_tokens: list[Any] = [0, -1, 2**63, 2**70, True, 1.0, "7", None]
    bad_names: list[Any] = ["", None, 7, "a\x00b", "k" * 1025]
    malformed: list[Any] = [replace(lease, token=bad) for bad in bad_tokens] + [
        replace(lease, name=bad) for bad in bad_names
    ]
    for i, bad in enumerate(malformed):
        for name, call in _writes(store, bad):
            add(f"{name}(fence=malformed lease #{i})", InvalidArgumentError, call)
        add(f"renew(malformed lease #{i})", InvalidArgumentError, partial(leases.renew, bad))
        add(f"release(malformed lease #{i})", InvalidArgumentError, partial(leases.release, bad))
    # A held lease whose renewal failed: refused before the store is asked.
    for name, call in _writes(store, _lost(lease)):
        add(f"{name}(fence=lost HeldLease)", LeaseLostError, call)
    # Agent info: not a JSON object, or not JSON.
    for i, bad in enumerate([*NOT_OBJECTS, *NOT_JSON]):
        add(f"register(info #{i})", SerializationError, partial(agents.register, "a", info=bad))
        add(f"heartbeat(info #{i})", SerializationError, partial(agents.heartbeat, "a", info=bad))
    huge = {"x": "a" * 8 * 1024 * 1024}  # over the default max_value_bytes once encoded
    add("register(info too large)", ValueTooLargeError, partial(agents.register, "a", info=huge))
    add("heartbeat(info too large)", ValueTooLargeError, partial(agents.heartbeat, "a", info=huge))
    for i, bad in enumerate(BAD_LIMITS):
        add(f"agents.list(limit #{i})", InvalidArgumentError, partial(agents.list, limit=bad))
    return calls


def bad_locks(store: MemoryStore) -> list[tuple[str, type[BaseException], Callable[[], object]]]:
    """``lock()`` checks its arguments when called, before it is entered."""
    lock = store.leases.lock
    out: list[tuple[str, type[BaseException], Callable[[], object]]] = []
    for i, bad in enumerate(BAD_KEYS):
        out.append((f"lock(name #{i})", InvalidKeyError, partial(lock, bad, owner="o")))
    for i, bad in enumerate(BAD_OWNERS):
        out.append((f"lock(owner #{i})", InvalidKeyError, partial(lock, "x", owner=bad)))
    for i, bad in enumerate(BAD_TTLS):
        out.append(
            (f"lock(ttl #{i})", InvalidArgumentError, partial(lock, "x", owner="o", ttl=bad))
        )
    for i, bad in enumerate(BAD_WAITS):
        out.append(
            (f"lock(wait #{i})", InvalidArgumentError, partial(lock, "x", owner="o", wait=bad))
        )
    return out


async def assert_refused(calls: list[Call]) -> None:
    """Every call raises its own error (or a subclass of it), never another one."""
    assert len(calls) > 300
    for name, error, call in calls:
        try:
            result = await call()
        except error:
            continue
        except Exception as exc:
            raise AssertionError(
                f"{name} raised {type(exc).__name__}: {exc}, expected {error.__name__}"
            ) from exc
        raise AssertionError(f"{name} returned {result!r}, expected {error.__name__}")


def assert_locks_refused(store: MemoryStore) -> None:
    for name, error, call in bad_locks(store):
        with pytest.raises(error):
            call()
            raise AssertionError(f"{name} was accepted")


# ---------------------------------------------------------------------------- stores


def _unreachable(kind: str) -> MemoryStore:
    if kind == "redis":
        pytest.importorskip("redis.asyncio")
        from fleetmem.backends.redis import RedisStore

        return RedisStore.from_url("redis://127.0.0.1:1/0", namespace=NS)
    if kind == "postgres":
        pytest.importorskip("asyncpg")
        from fleetmem.backends.postgres import PostgresStore

        return PostgresStore.from_url("postgresql://u@127.0.0.1:1/db", namespace=NS)
    pytest.importorskip("redis.asyncio")
    pytest.importorskip("asyncpg")
    from fleetmem.backends.hybrid import HybridStore

    return HybridStore.from_urls(
        "postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0", namespace=NS
    )


@pytest.fixture(params=["redis", "postgres", "hybrid"])
async def unreachable(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore]:
    """A store whose server refuses every connection, never connected."""
    store = _unreachable(request.param)
    try:
        yield store
    finally:
        await store.close()


async def test_bad_input_never_reaches_the_server(unreachable: MemoryStore) -> None:
    store = unreachable
    lease = _lease()
    # Good calls of the same shapes do reach it (and fail there).
    good: list[Callable[[], Awaitable[object]]] = [
        lambda: store.leases.acquire("x", owner="o", ttl=30),
        lambda: store.leases.holder("x"),
        lambda: store.leases.renew(lease),
        lambda: store.leases.release(lease),
        lambda: store.agents.register("a", info={"k": 1}),
        lambda: store.agents.heartbeat("a"),
        lambda: store.agents.list(limit=1),
        lambda: store.set("k", 1, fence=lease),
        lambda: store.set("k", 1, fence=HeldLease(lease)),
    ]
    for call in good:
        with pytest.raises(BackendUnavailableError):
            await call()
    await assert_refused(bad_calls(store, lease))
    assert_locks_refused(store)


async def test_bad_input_is_refused_before_the_closed_check() -> None:
    store = InMemoryStore(namespace=NS)
    lease = _lease()
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.leases.acquire("x", owner="o")
    with pytest.raises(StoreClosedError):
        await store.agents.count()
    with pytest.raises(StoreClosedError):
        await store.set("k", 1, fence=lease)
    await assert_refused(bad_calls(store, lease))
    assert_locks_refused(store)


async def test_bad_input_changes_nothing() -> None:
    async with InMemoryStore(namespace=NS) as store:
        live = await store.leases.acquire("job", owner="agent-7", ttl=60)
        assert live is not None
        other = await store.leases.acquire("x", owner="o", ttl=60)
        assert other is not None
        agent = await store.agents.register("a", info={"v": 1}, ttl=60)
        await store.set_many({"k": 1, "l": 2, "n": 5})
        before = {key: await store.get_entry(key) for key in await store.keys()}

        await assert_refused(bad_calls(store, live))
        assert_locks_refused(store)

        assert await store.leases.holder("job") == live
        assert await store.leases.holder("x") == other
        assert await store.leases.holder("new") is None
        assert await store.agents.get("a") == agent
        assert await store.agents.count() == 1
        assert {key: await store.get_entry(key) for key in await store.keys()} == before
        # The live lease still fences: nothing above consumed or changed it.
        await store.set("k", 10, fence=live)
        assert await store.get("k") == 10
