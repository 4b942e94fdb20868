"""Leases with fencing tokens: acquire, holder, renew, release, waiting, ``lock()``.

Every test uses the ``store`` fixture through ``store.leases`` only. Short TTLs are waited out
with a wide margin (``lease_ttl`` plus ``lease_expiry_margin``); nothing is asserted to be still
live after a short TTL. Wake-ups promised "within 100 ms" are checked against
``lease_wake_slack``, which is still well under the one-second fallback poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from datetime import datetime, timedelta

import pytest

from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    LeaseLostError,
    LeaseUnavailableError,
)
from fleetmem.leases import HeldLease
from fleetmem.protocol import Lease, MemoryStore
from fleetmem.testing.conformance._base import GOOD_KEYS, ConformanceBase, assert_utc, utcnow

#: Owners every backend must accept and return unchanged (at most 255 UTF-8 bytes).
GOOD_OWNERS: list[str] = ["o" * 255, "\u00e9" * 127 + "a", "agent-7 @ host-1 {pid 42}", "x"]

#: Timestamps of one lease read twice agree to this many seconds (a backend may round).
_SAME_MOMENT = 0.002


def assert_same_lease(actual: Lease | None, expected: Lease, what: str = "lease") -> None:
    """``actual`` is ``expected`` (same name, owner, token, namespace, times)."""
    assert actual is not None, f"{what}: expected {expected!r}, got None"
    assert (actual.name, actual.owner, actual.token, actual.namespace) == (
        expected.name,
        expected.owner,
        expected.token,
        expected.namespace,
    ), f"{what}: {actual!r} != {expected!r}"
    for field in ("acquired_at", "expires_at"):
        got: datetime = getattr(actual, field)
        want: datetime = getattr(expected, field)
        assert abs((got - want).total_seconds()) <= _SAME_MOMENT, f"{what}.{field}: {got} {want}"


def lease_span(lease: Lease) -> float:
    """Seconds from ``acquired_at`` to ``expires_at`` (both on the server's clock)."""
    return (lease.expires_at - lease.acquired_at).total_seconds()


class CoordinationBase(ConformanceBase):
    """Timing knobs of the lease, fence and agent tests (override in a subclass).

    ``lease_ttl``
        The short TTL (seconds) of leases and agents that a test lets expire.
    ``lease_expiry_margin``
        How much longer than ``lease_ttl`` a test sleeps before it counts on the expiry.
    ``lease_wake_slack``
        The bound (seconds) on "a waiter is granted within 100 ms of a release"; it must stay
        under one second, the fallback poll, to prove a notification.
    """

    lease_ttl: float = 0.3
    lease_expiry_margin: float = 0.5
    lease_wake_slack: float = 0.8

    async def wait_out_lease_ttl(self) -> None:
        """Sleep until leases and agents granted with ``lease_ttl`` before the call expired."""
        await asyncio.sleep(self.lease_ttl + self.lease_expiry_margin)


class LeasesConformance(CoordinationBase):
    """The lease rules of ``COORDINATION.md`` ("Leases and fencing tokens")."""

    pytestmark = [pytest.mark.asyncio]

    # ------------------------------------------------------------ acquire / holder / release

    async def test_lease_acquire_holder_release(self, store: MemoryStore) -> None:
        leases = store.leases
        assert await leases.holder("job") is None
        lease = await leases.acquire("job", owner="agent-7", ttl=30)
        assert lease is not None
        assert (lease.name, lease.owner, lease.namespace) == ("job", "agent-7", store.namespace)
        assert_same_lease(await leases.holder("job"), lease, "holder")
        assert await leases.holder("other") is None  # names are independent
        assert await leases.release(lease) is True
        assert await leases.holder("job") is None
        assert await leases.release(lease) is False  # twice: False the second time
        assert await leases.holder("job") is None
        again = await leases.acquire("job", owner="agent-8", ttl=30)
        assert again is not None and again.owner == "agent-8"
        assert again.token > lease.token
        assert_same_lease(await leases.holder("job"), again, "holder")

    async def test_lease_fields(self, store: MemoryStore) -> None:
        before = utcnow()
        lease = await store.leases.acquire("job", owner="agent-7", ttl=30)
        assert lease is not None
        assert isinstance(lease, Lease)
        assert type(lease.token) is int, f"token is {lease.token!r}"
        assert type(lease.name) is str and type(lease.owner) is str
        assert lease.namespace == store.namespace
        acquired = assert_utc(lease.acquired_at, "acquired_at")
        expires = assert_utc(lease.expires_at, "expires_at")
        assert expires > acquired
        assert abs(lease_span(lease) - 30) <= self.ttl_slack, lease
        skew = timedelta(seconds=self.clock_skew)
        assert before - skew <= acquired <= utcnow() + skew, acquired
        with pytest.raises(dataclasses.FrozenInstanceError):
            lease.token = 99  # type: ignore[misc]
        held = await store.leases.holder("job")
        assert held is not None
        assert_utc(held.acquired_at, "holder().acquired_at")
        assert_utc(held.expires_at, "holder().expires_at")
        # A timedelta is a TTL too.
        other = await store.leases.acquire("delta", owner="a", ttl=timedelta(minutes=2))
        assert other is not None
        assert abs(lease_span(other) - 120) <= self.ttl_slack, other

    async def test_lease_names_and_owners_round_trip(self, store: MemoryStore) -> None:
        leases = store.leases
        for index, name in enumerate(GOOD_KEYS):
            owner = GOOD_OWNERS[index % len(GOOD_OWNERS)]
            lease = await leases.acquire(name, owner=owner, ttl=30)
            assert lease is not None, f"{name!r} was not granted"
            assert (lease.name, lease.owner) == (name, owner)
            assert_same_lease(await leases.holder(name), lease, f"holder({name!r})")
        for name in GOOD_KEYS:
            held = await leases.holder(name)
            assert held is not None, f"{name!r} is not held"
            assert await leases.release(held) is True
            assert await leases.holder(name) is None

    async def test_lease_at_most_one_live_lease(self, store: MemoryStore) -> None:
        n = self.concurrency
        results = await asyncio.gather(
            *(store.leases.acquire("job", owner=f"agent-{i}", ttl=30) for i in range(n))
        )
        winners = [lease for lease in results if lease is not None]
        assert len(winners) == 1, f"{len(winners)} of {n} concurrent acquires were granted"
        assert_same_lease(await store.leases.holder("job"), winners[0], "holder")
        # Nobody else gets it while it is live, not even its owner.
        assert await store.leases.acquire("job", owner=winners[0].owner, ttl=30) is None
        assert await store.leases.acquire("job", owner="late", ttl=30) is None
        assert_same_lease(await store.leases.holder("job"), winners[0], "holder")

    async def test_lease_same_owner_is_refused_like_anyone_else(self, store: MemoryStore) -> None:
        first = await store.leases.acquire("job", owner="agent-7", ttl=30)
        assert first is not None
        assert await store.leases.acquire("job", owner="agent-7", ttl=30) is None
        assert await store.leases.acquire("job", owner="agent-7", ttl=60, wait=0) is None
        assert_same_lease(await store.leases.holder("job"), first, "holder")
        assert await store.leases.release(first) is True
        second = await store.leases.acquire("job", owner="agent-7", ttl=30)
        assert second is not None and second.token > first.token

    async def test_lease_tokens_grow_across_releases_and_expiries(self, store: MemoryStore) -> None:
        leases = store.leases
        tokens: list[int] = []
        for i in range(5):
            lease = await leases.acquire("job", owner=f"agent-{i}", ttl=30)
            assert lease is not None
            tokens.append(lease.token)
            assert await leases.release(lease) is True
        short = await leases.acquire("job", owner="short", ttl=self.lease_ttl)
        assert short is not None
        tokens.append(short.token)
        await self.wait_out_lease_ttl()
        assert await leases.holder("job") is None
        after_expiry = await leases.acquire("job", owner="next", ttl=30)
        assert after_expiry is not None
        tokens.append(after_expiry.token)
        assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
        # A renewal keeps the token.
        renewed = await leases.renew(after_expiry, ttl=60)
        assert renewed.token == after_expiry.token

    # ------------------------------------------------------------ renew

    async def test_lease_renew_extends_with_the_same_token(self, store: MemoryStore) -> None:
        leases = store.leases
        lease = await leases.acquire("job", owner="agent-7", ttl=10)
        assert lease is not None
        renewed = await leases.renew(lease, ttl=100)
        assert (renewed.name, renewed.owner, renewed.token, renewed.namespace) == (
            lease.name,
            lease.owner,
            lease.token,
            lease.namespace,
        )
        assert_utc(renewed.expires_at, "renewed expires_at")
        assert renewed.expires_at > lease.expires_at
        assert abs((renewed.acquired_at - lease.acquired_at).total_seconds()) <= _SAME_MOMENT
        # expires_at - acquired_at = time since the grant + the new TTL (server clock).
        assert 100 - self.ttl_slack <= lease_span(renewed) <= 100 + 5, renewed
        assert_same_lease(await leases.holder("job"), renewed, "holder after renew")
        # ttl=None: the TTL it was last renewed with (100), not the one it was granted with.
        again = await leases.renew(renewed)
        assert again.token == lease.token
        assert 100 - self.ttl_slack <= lease_span(again) <= 100 + 5, again
        assert again.expires_at >= renewed.expires_at
        # A timedelta works, and the old Lease object renews too (it carries the token).
        shorter = await leases.renew(lease, ttl=timedelta(seconds=50))
        assert 50 - self.ttl_slack <= lease_span(shorter) <= 50 + 5, shorter
        assert shorter.expires_at < again.expires_at  # a renewal may shorten the lease

    async def test_lease_renew_without_ttl_uses_the_granted_ttl(self, store: MemoryStore) -> None:
        lease = await store.leases.acquire("job", owner="agent-7", ttl=40)
        assert lease is not None
        renewed = await store.leases.renew(lease)
        assert 40 - self.ttl_slack <= lease_span(renewed) <= 40 + 5, renewed

    async def test_lease_renew_of_a_lost_lease_raises_and_changes_nothing(
        self, store: MemoryStore
    ) -> None:
        leases = store.leases
        # Released, nobody took it since.
        released = await leases.acquire("released", owner="a", ttl=30)
        assert released is not None
        assert await leases.release(released) is True
        with pytest.raises(LeaseLostError) as info:
            await leases.renew(released, ttl=30)
        assert isinstance(info.value, FleetmemError)
        with pytest.raises(LeaseLostError):
            await leases.renew(released)
        assert await leases.holder("released") is None  # not revived
        # Expired, nobody took it since.
        expired = await leases.acquire("expired", owner="a", ttl=self.lease_ttl)
        assert expired is not None
        # Taken by another holder after it expired.
        stale = await leases.acquire("taken", owner="a", ttl=self.lease_ttl)
        assert stale is not None
        await self.wait_out_lease_ttl()
        newer = await leases.acquire("taken", owner="b", ttl=30)
        assert newer is not None and newer.token > stale.token
        with pytest.raises(LeaseLostError):
            await leases.renew(expired, ttl=30)
        assert await leases.holder("expired") is None  # not revived
        with pytest.raises(LeaseLostError):
            await leases.renew(stale, ttl=300)
        assert_same_lease(await leases.holder("taken"), newer, "the new holder")
        # A lost lease stays lost: the next grant has a greater token.
        for name, old in (("released", released), ("expired", expired)):
            fresh = await leases.acquire(name, owner="c", ttl=30)
            assert fresh is not None and fresh.token > old.token, name
            with pytest.raises(LeaseLostError):
                await leases.renew(old)
            assert_same_lease(await leases.holder(name), fresh, name)

    # ------------------------------------------------------------ release

    async def test_lease_release_never_frees_another_holders_lease(
        self, store: MemoryStore
    ) -> None:
        leases = store.leases
        old = await leases.acquire("job", owner="a", ttl=self.lease_ttl)
        assert old is not None
        await self.wait_out_lease_ttl()
        assert await leases.release(old) is False  # expired: nothing to release
        current = await leases.acquire("job", owner="b", ttl=30)
        assert current is not None and current.token > old.token
        assert await leases.release(old) is False
        # Tokens never granted (one above, one below) release and renew nothing either.
        for token in (current.token + 1, current.token - 1):
            forged = dataclasses.replace(current, token=token)
            assert await leases.release(forged) is False, token
            with pytest.raises(LeaseLostError):
                await leases.renew(forged)
        # Tokens no backend can grant are refused before any I/O.
        for token in (0, -1):
            forged = dataclasses.replace(current, token=token)
            with pytest.raises(InvalidArgumentError):
                await leases.release(forged)
            with pytest.raises(InvalidArgumentError):
                await leases.renew(forged)
        assert_same_lease(await leases.holder("job"), current, "holder")
        assert await leases.release(current) is True
        assert await leases.holder("job") is None

    async def test_lease_expiry_frees_the_name(self, store: MemoryStore) -> None:
        leases = store.leases
        lease = await leases.acquire("job", owner="a", ttl=self.lease_ttl)
        assert lease is not None
        other_name = await leases.acquire("kept", owner="a", ttl=30)
        assert other_name is not None
        await self.wait_out_lease_ttl()
        assert await leases.holder("job") is None
        nxt = await leases.acquire("job", owner="b", ttl=30)  # no wait needed
        assert nxt is not None and nxt.token > lease.token
        assert nxt.acquired_at >= lease.expires_at - timedelta(seconds=_SAME_MOMENT)
        assert_same_lease(await leases.holder("kept"), other_name, "the other lease")

    # ------------------------------------------------------------ wait=

    async def test_lease_wait_is_granted_soon_after_a_release(self, store: MemoryStore) -> None:
        leases = store.leases
        loop = asyncio.get_running_loop()
        first = await leases.acquire("job", owner="a", ttl=30)
        assert first is not None
        waiter = asyncio.ensure_future(leases.acquire("job", owner="b", ttl=30, wait=20))
        try:
            # Release just after the waiter's first try: a waiter that only polled (at least
            # once a second) would then be granted about a second later, past the slack.
            await asyncio.sleep(0.1)
            assert not waiter.done(), "a waiter was granted a lease that is held"
            released_at = loop.time()
            assert await leases.release(first) is True
            granted = await asyncio.wait_for(asyncio.shield(waiter), 20)
            took = loop.time() - released_at
        finally:
            waiter.cancel()
        assert granted is not None, "the waiter was not granted"
        assert granted.owner == "b" and granted.token > first.token
        assert took < self.lease_wake_slack, f"granted {took:.3f} s after the release"
        assert_same_lease(await leases.holder("job"), granted, "holder")

    async def test_lease_wait_is_granted_after_an_expiry(self, store: MemoryStore) -> None:
        leases = store.leases
        loop = asyncio.get_running_loop()
        first = await leases.acquire("job", owner="a", ttl=self.lease_ttl)
        assert first is not None
        start = loop.time()
        granted = await leases.acquire("job", owner="b", ttl=30, wait=20)
        took = loop.time() - start
        assert granted is not None, "the waiter was not granted after the expiry"
        assert granted.token > first.token
        # Never while the first lease was live (server clock)...
        assert granted.acquired_at >= first.expires_at - timedelta(seconds=_SAME_MOMENT)
        # ...and within 100 ms + one poll (at most 1 s) of the expiry.
        bound = self.lease_ttl + 1.0 + self.lease_wake_slack
        assert took < bound, f"granted {took:.3f} s after a {self.lease_ttl} s lease"

    async def test_lease_wait_runs_out(self, store: MemoryStore) -> None:
        leases = store.leases
        loop = asyncio.get_running_loop()
        first = await leases.acquire("job", owner="a", ttl=30)
        assert first is not None
        for wait in (0.5, timedelta(milliseconds=500)):
            start = loop.time()
            assert await leases.acquire("job", owner="b", ttl=30, wait=wait) is None
            took = loop.time() - start
            assert 0.45 <= took < 0.5 + self.lease_wake_slack, f"wait={wait!r} took {took:.3f} s"
        start = loop.time()
        assert await leases.acquire("job", owner="b", ttl=30, wait=0) is None
        assert loop.time() - start < self.lease_wake_slack
        assert_same_lease(await leases.holder("job"), first, "holder")

    async def test_lease_waiters_take_turns(self, store: MemoryStore) -> None:
        """Many waiting lockers: each gets the lease in turn, never two at once."""
        inside: list[int] = []
        tokens: list[int] = []
        overlap: list[int] = []

        async def worker(i: int) -> None:
            async with store.leases.lock("job", owner=f"agent-{i}", ttl=30, wait=30) as held:
                if inside:
                    overlap.append(i)
                inside.append(i)
                tokens.append(held.lease.token)
                await store.incr("count", fence=held)
                await asyncio.sleep(0.02)
                inside.remove(i)

        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(6))), 60)
        assert overlap == [], f"held by two at once: {overlap}"
        assert tokens == sorted(tokens) and len(set(tokens)) == 6, tokens
        assert await store.get("count") == 6
        assert await store.leases.holder("job") is None

    # ------------------------------------------------------------ lock()

    async def test_lease_lock_yields_a_held_lease_and_releases_on_exit(
        self, store: MemoryStore
    ) -> None:
        leases = store.leases
        async with leases.lock("job", owner="agent-7", ttl=30) as held:
            assert isinstance(held, HeldLease)
            assert isinstance(held.lease, Lease)
            assert (held.lease.name, held.lease.owner) == ("job", "agent-7")
            assert held.lease.namespace == store.namespace
            assert isinstance(held.lost, asyncio.Event) and not held.lost.is_set()
            assert_same_lease(await leases.holder("job"), held.lease, "holder")
            assert await leases.acquire("job", owner="other", ttl=30) is None
            await store.set("k", "v", fence=held)
            await store.set("k2", "v", fence=held.lease)
            token = held.lease.token
        assert await leases.holder("job") is None
        assert not held.lost.is_set()  # it was not lost while the body ran
        # Once given back, it fences nothing.
        with pytest.raises(LeaseLostError):
            await store.set("k", "after", fence=held)
        with pytest.raises(LeaseLostError):
            await store.set("k", "after", fence=held.lease)
        assert await store.get("k") == "v"
        nxt = await leases.acquire("job", owner="other", ttl=30)
        assert nxt is not None and nxt.token > token

    async def test_lease_lock_releases_on_exception_and_cancellation(
        self, store: MemoryStore
    ) -> None:
        leases = store.leases

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with leases.lock("job", owner="a", ttl=30):
                raise Boom
        assert await leases.holder("job") is None

        entered = asyncio.Event()

        async def body() -> None:
            async with leases.lock("job", owner="b", ttl=30):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(body())
        await asyncio.wait_for(entered.wait(), 20)
        held = await leases.holder("job")
        assert held is not None and held.owner == "b"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await leases.holder("job") is None

    async def test_lease_lock_unavailable(self, store: MemoryStore) -> None:
        leases = store.leases
        loop = asyncio.get_running_loop()
        first = await leases.acquire("job", owner="a", ttl=30)
        assert first is not None
        start = loop.time()
        with pytest.raises(LeaseUnavailableError) as info:
            async with leases.lock("job", owner="b", ttl=30):
                raise AssertionError("entered a lock that is held")
        assert isinstance(info.value, FleetmemError)
        assert loop.time() - start < self.lease_wake_slack  # at once without wait
        start = loop.time()
        with pytest.raises(LeaseUnavailableError):
            async with leases.lock("job", owner="b", ttl=30, wait=0.5):
                raise AssertionError("entered a lock that is held")
        took = loop.time() - start
        assert 0.45 <= took < 0.5 + self.lease_wake_slack, took
        assert_same_lease(await leases.holder("job"), first, "holder")

    async def test_lease_lock_waits_for_a_release(self, store: MemoryStore) -> None:
        leases = store.leases
        first = await leases.acquire("job", owner="a", ttl=30)
        assert first is not None

        async def release_later() -> None:
            await asyncio.sleep(0.3)
            assert await leases.release(first) is True

        releaser = asyncio.ensure_future(release_later())
        async with leases.lock("job", owner="b", ttl=30, wait=20) as held:
            assert held.lease.owner == "b" and held.lease.token > first.token
        await releaser
        assert await leases.holder("job") is None

    async def test_lease_lock_renews_in_the_background(self, store: MemoryStore) -> None:
        leases = store.leases
        # Renewed every 0.5 s: a stall of the machine under 1 s does not lose it.
        ttl = 1.5
        async with leases.lock("job", owner="a", ttl=ttl) as held:
            first = held.lease
            await asyncio.sleep(2 * ttl)  # well past the TTL: only renewals keep it
            assert not held.lost.is_set(), "a renewal failed"
            current = await leases.holder("job")
            assert current is not None and current.token == first.token
            assert held.lease.token == first.token
            assert held.lease.expires_at > first.expires_at
            await store.set("k", "written", fence=held)
            assert await leases.acquire("job", owner="b", ttl=30) is None
        assert await store.get("k") == "written"
        assert await leases.holder("job") is None

    async def test_lease_lock_lost_when_released_from_outside(self, store: MemoryStore) -> None:
        leases = store.leases
        await store.set("k", "before")
        async with leases.lock("job", owner="a", ttl=0.6) as held:
            assert await leases.release(held.lease) is True
            await asyncio.wait_for(held.lost.wait(), 10)  # the next renewal fails
            with pytest.raises(LeaseLostError):
                await store.set("k", "stale", fence=held)
            other = await leases.acquire("job", owner="b", ttl=30)
            assert other is not None and other.token > held.lease.token
            with pytest.raises(LeaseLostError):
                await store.set("k", "stale", fence=held.lease)
        assert held.lost.is_set()
        # The exit raised nothing and did not free the other holder's lease.
        assert_same_lease(await leases.holder("job"), other, "the other holder")
        assert await store.get("k") == "before"

    async def test_lease_lock_paused_past_its_ttl_cannot_write(self, store: MemoryStore) -> None:
        """A process that stops (GC, laptop lid) past its TTL wakes up fenced out."""
        leases = store.leases
        await store.set("k", "before")
        ttl = self.lease_ttl
        async with leases.lock("job", owner="a", ttl=ttl) as held:
            time.sleep(ttl + self.lease_expiry_margin)  # the pause itself: no renewal runs
            with pytest.raises(LeaseLostError):
                await store.set("k", "stale", fence=held)
            await asyncio.wait_for(held.lost.wait(), 10)
        assert await store.get("k") == "before"

    # ------------------------------------------------------------ namespaces

    async def test_lease_namespaces_are_separate(self, store: MemoryStore) -> None:
        async with self.sibling_namespaces(store, "x") as (other,):
            mine = await store.leases.acquire("job", owner="a", ttl=30)
            theirs = await other.leases.acquire("job", owner="b", ttl=30)
            assert mine is not None and theirs is not None, "a lease of another namespace"
            assert theirs.namespace == other.namespace
            assert_same_lease(await store.leases.holder("job"), mine, "this namespace")
            assert_same_lease(await other.leases.holder("job"), theirs, "the other namespace")
            # A lease of one namespace neither fences nor releases in another.
            with pytest.raises(InvalidArgumentError):
                await other.set("k", 1, fence=mine)
            with pytest.raises(InvalidArgumentError):
                await other.leases.release(mine)
            with pytest.raises(InvalidArgumentError):
                await other.leases.renew(mine)
            assert await other.get("k") is None
            assert await store.leases.release(mine) is True
            assert_same_lease(await other.leases.holder("job"), theirs, "the other namespace")
            # A view on the same namespace sees the same leases.
            same = store.with_namespace(store.namespace)
            try:
                assert_same_lease(await other.leases.holder("job"), theirs, "again")
                assert await same.leases.holder("job") is None
                again = await same.leases.acquire("job", owner="c", ttl=30)
                assert again is not None
                assert_same_lease(await store.leases.holder("job"), again, "through a view")
                await store.set("k", 1, fence=again)
            finally:
                await same.close()

    async def test_lease_and_key_spaces_are_separate(self, store: MemoryStore) -> None:
        ns = store.namespace
        async with self.sibling_namespaces(store, "x") as (other,):
            lease = await store.leases.acquire("x", owner="a", ttl=30)
            assert lease is not None
            held_elsewhere = await other.leases.acquire("x", owner="a", ttl=30)
            assert held_elsewhere is not None
            # A lease is no key: none appears, and a key of the same name is free.
            assert await store.keys() == []
            assert await store.exists("x") is False
            assert await store.search("*") == {}
            assert (await store.stats()).keys == 0
            assert await store.namespaces(ns) == []
            assert await store.set_if_absent("x", "key") is True
            assert await store.keys() == ["x"]
            assert await store.namespaces(ns) == [ns]  # only the key counts
            assert await store.delete("x") is True
            assert_same_lease(await store.leases.holder("x"), lease, "after the key's delete")
            # clear() clears key-value entries only.
            await store.set("x", 1)
            assert await store.clear() == 1
            assert_same_lease(await store.leases.holder("x"), lease, "after clear()")
            await store.set("y", 2, fence=lease)
            assert await store.get("y") == 2
            assert await store.leases.release(lease) is True
