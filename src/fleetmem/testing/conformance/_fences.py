"""Fenced writes: every key-value write with ``fence=`` is refused once the lease is lost.

A lost fence raises ``LeaseLostError`` and changes nothing: no value, version, TTL, partition
or existence moves, and it wins over whatever else the write would have said (a version
conflict, a value that is not a number, a key already there or already absent).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from fleetmem.errors import InvalidArgumentError, LeaseLostError
from fleetmem.leases import HeldLease
from fleetmem.protocol import Entry, Lease, MemoryStore
from fleetmem.testing.conformance._leases import CoordinationBase

Call = tuple[str, Callable[[], Awaitable[object]]]
FenceArg = Lease | HeldLease

_TTL = 3600


async def _prepare(store: MemoryStore) -> None:
    """The entries the fenced calls of :func:`_fenced_calls` touch."""
    await store.set("s", "old", ttl=_TTL, partition="p")
    await store.set("s", "old2", keep_ttl=True)  # version 2
    await store.set_many({"m1": 1, "m2": 2}, ttl=_TTL)
    await store.set("cas", 1, ttl=_TTL)
    await store.set("n", 5, ttl=_TTL)
    await store.set("f", 1.5)
    await store.set("text", "abc")
    await store.set_many({"d": 1, "dm1": 1, "dm2": 2}, partition="q")


async def _snapshot(store: MemoryStore) -> dict[str, Entry]:
    """Every live entry of the namespace, with its metadata."""
    out: dict[str, Entry] = {}
    for key in await store.keys():
        entry = await store.get_entry(key)
        if entry is not None:
            out[key] = entry
    return out


def _fenced_calls(store: MemoryStore, fence: FenceArg) -> list[Call]:
    """One fenced call of every write (and of the cases where it would change nothing)."""
    many = {f"bulk/{i:05d}": i for i in range(1500)}
    return [
        ("set", lambda: store.set("s", "new", fence=fence)),
        ("set keep_ttl", lambda: store.set("s", "new", keep_ttl=True, fence=fence)),
        ("set a new key", lambda: store.set("new", 1, ttl=60, fence=fence)),
        ("set_many", lambda: store.set_many({"m1": 10, "m3": 3}, fence=fence)),
        ("set_many (1500 keys)", lambda: store.set_many(many, fence=fence)),
        ("set_if_absent", lambda: store.set_if_absent("absent", 1, fence=fence)),
        ("set_if_absent on a key", lambda: store.set_if_absent("s", 1, fence=fence)),
        ("compare_and_set", lambda: store.compare_and_set("cas", 2, version=1, fence=fence)),
        (
            "compare_and_set, wrong version",
            lambda: store.compare_and_set("cas", 2, version=7, fence=fence),
        ),
        (
            "compare_and_set of an absent key, version 1",
            lambda: store.compare_and_set("absent", 2, version=1, fence=fence),
        ),
        (
            "compare_and_set creating",
            lambda: store.compare_and_set("absent", 2, version=0, fence=fence),
        ),
        ("incr", lambda: store.incr("n", 1, fence=fence)),
        ("incr a float", lambda: store.incr("f", 0.5, fence=fence)),
        ("incr a new key", lambda: store.incr("absent", 3, ttl=60, fence=fence)),
        ("incr a string", lambda: store.incr("text", fence=fence)),
        ("delete", lambda: store.delete("d", fence=fence)),
        ("delete an absent key", lambda: store.delete("absent", fence=fence)),
        ("delete_many", lambda: store.delete_many(["dm1", "dm2", "absent"], fence=fence)),
        ("delete_many of absent keys", lambda: store.delete_many(["absent"], fence=fence)),
    ]


async def _assert_all_refused(store: MemoryStore, fence: FenceArg) -> None:
    """Every fenced call raises ``LeaseLostError`` and changes nothing (all are tried; the
    failures are reported together)."""
    before = await _snapshot(store)
    assert set(before) == {"s", "m1", "m2", "cas", "n", "f", "text", "d", "dm1", "dm2"}
    ttl_before = await store.ttl("s")
    wrong: list[str] = []
    for name, call in _fenced_calls(store, fence):
        try:
            result = await call()
        except LeaseLostError:
            pass
        except Exception as exc:
            wrong.append(f"fenced {name} raised {type(exc).__name__}: {exc}")
        else:
            wrong.append(f"fenced {name} returned {result!r}")
        after = await _snapshot(store)
        assert after == before, f"fenced {name} changed the store: {before} -> {after}"
    assert not wrong, "with a lost lease, expected LeaseLostError:\n" + "\n".join(wrong)
    ttl_after = await store.ttl("s")
    assert ttl_before is not None and ttl_after is not None
    assert _TTL - 60 < ttl_after <= ttl_before, (ttl_before, ttl_after)
    assert await store.exists("absent") is False
    assert await store.keys("bulk/") == []


class FencedWritesConformance(CoordinationBase):
    """The rules of ``COORDINATION.md`` ("Fenced writes")."""

    pytestmark = [pytest.mark.asyncio]

    async def test_fenced_writes_with_a_live_lease(self, store: MemoryStore) -> None:
        lease = await store.leases.acquire("job", owner="a", ttl=30)
        assert lease is not None
        await _prepare(store)
        entry = await store.set("s", "new", fence=lease)
        assert (entry.value, entry.version, entry.partition) == ("new", 3, "p")
        assert entry.expires_at is None
        assert await store.set_many({"m1": 10, "m3": 3}, fence=lease) == 2
        assert await store.set_if_absent("absent", 1, fence=lease) is True
        assert await store.set_if_absent("absent", 2, fence=lease) is False
        entry = await store.compare_and_set("cas", 2, version=1, fence=lease)
        assert (entry.value, entry.version) == (2, 2)
        assert await store.incr("n", 2, fence=lease) == 7
        assert await store.incr("f", 0.5, fence=lease) == 2.0
        assert await store.delete("d", fence=lease) is True
        assert await store.delete("d", fence=lease) is False
        assert await store.delete_many(["dm1", "dm2", "none"], fence=lease) == 2
        assert await store.get_many(["s", "m1", "m3", "absent", "cas", "n", "d", "dm1"]) == {
            "s": "new",
            "m1": 10,
            "m3": 3,
            "absent": 1,
            "cas": 2,
            "n": 7,
        }
        # The fence guards writes to any key; the lease is untouched by them.
        holder = await store.leases.holder("job")
        assert holder is not None and holder.token == lease.token

    async def test_fenced_writes_with_a_held_lease(self, store: MemoryStore) -> None:
        async with store.leases.lock("job", owner="a", ttl=30) as held:
            assert (await store.set("k", 1, fence=held)).version == 1
            assert await store.set_many({"a": 1, "b": 2}, fence=held) == 2
            assert await store.set_if_absent("c", 3, fence=held) is True
            assert (await store.compare_and_set("k", 2, version=1, fence=held)).value == 2
            assert await store.incr("n", fence=held) == 1
            assert await store.delete("a", fence=held) is True
            assert await store.delete_many(["b", "c"], fence=held) == 2
        assert await store.get_many(["k", "n", "a", "b", "c"]) == {"k": 2, "n": 1}

    async def test_fenced_writes_after_a_release(self, store: MemoryStore) -> None:
        lease = await store.leases.acquire("job", owner="a", ttl=30)
        assert lease is not None
        await _prepare(store)
        assert await store.leases.release(lease) is True
        await _assert_all_refused(store, lease)
        assert await store.leases.holder("job") is None

    async def test_fenced_writes_after_an_expiry(self, store: MemoryStore) -> None:
        lease = await store.leases.acquire("job", owner="a", ttl=self.lease_ttl)
        assert lease is not None
        await _prepare(store)
        await self.wait_out_lease_ttl()
        await _assert_all_refused(store, lease)
        assert await store.leases.holder("job") is None

    async def test_fenced_writes_after_another_holder_took_over(self, store: MemoryStore) -> None:
        stale = await store.leases.acquire("job", owner="a", ttl=self.lease_ttl)
        assert stale is not None
        await _prepare(store)
        await self.wait_out_lease_ttl()
        current = await store.leases.acquire("job", owner="b", ttl=30)
        assert current is not None and current.token > stale.token
        await _assert_all_refused(store, stale)
        # Tokens never granted are refused too; the current holder's writes go through.
        for token, error in ((current.token + 1, LeaseLostError), (0, InvalidArgumentError)):
            forged = Lease(
                current.name,
                current.owner,
                token,
                current.acquired_at,
                current.expires_at,
                current.namespace,
            )
            with pytest.raises(error):  # 0 is no token at all: refused before any I/O
                await store.set("s", "forged", fence=forged)
        assert (await store.set("s", "current", fence=current)).version == 3
        assert await store.incr("n", fence=current) == 6
        holder = await store.leases.holder("job")
        assert holder is not None and holder.token == current.token

    async def test_fenced_writes_with_a_lost_held_lease(self, store: MemoryStore) -> None:
        await _prepare(store)
        async with store.leases.lock("job", owner="a", ttl=0.6) as held:
            assert await store.leases.release(held.lease) is True
            await _assert_all_refused(store, held)
            await store.set("ok", 1)  # writes without a fence still work
            await store.delete("ok")
        await _assert_all_refused(store, held)

    async def test_fenced_write_needs_the_lease_of_its_own_name(self, store: MemoryStore) -> None:
        """Each lease fences on its own: losing one does not refuse writes fenced by another."""
        one = await store.leases.acquire("one", owner="a", ttl=30)
        two = await store.leases.acquire("two", owner="a", ttl=30)
        assert one is not None and two is not None
        assert await store.leases.release(one) is True
        with pytest.raises(LeaseLostError):
            await store.set("k", 1, fence=one)
        await store.set("k", 2, fence=two)
        assert await store.get("k") == 2
