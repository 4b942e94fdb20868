"""The in-process notifier: one release wakes one waiter, in arrival order, and a turn is never
lost with a waiter that leaves without using it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleetmem import InMemoryStore, StoreClosedError
from fleetmem._notify import Notifier


async def test_a_notification_wakes_the_longest_waiting_waiter_only() -> None:
    n = Notifier()
    with n.watch("k") as first, n.watch("k") as second:
        assert not first.queued_behind and second.queued_behind
        n.notify("k")
        assert await first.wait(0) is True
        assert await second.wait(0) is False


async def test_a_notification_before_the_wait_is_kept() -> None:
    n = Notifier()
    with n.watch("k") as w:
        n.notify("k")
        assert await w.wait(5) is True  # returns at once: the notification was kept
        assert await w.wait(0) is False  # and counted once


async def test_a_waiter_leaving_without_a_grant_passes_its_turn_on() -> None:
    n = Notifier()
    second = n.watch("k")
    with n.watch("other"), second:
        first = n.watch("k")
        # ``first`` arrived after ``second``: it is behind it.
        assert first.queued_behind
        with first:
            n.notify("k")  # the turn goes to ``second``
            assert await first.wait(0) is False
        # ``first`` left: nothing to pass on (it never had the turn), ``second`` still has it.
        assert await second.wait(0) is True
    third, fourth = n.watch("k"), n.watch("k")
    with fourth:
        with third:
            n.notify("k")
        # ``third`` left with the turn and without a grant: ``fourth`` has it now.
        assert await fourth.wait(0) is True


async def test_a_waiter_leaving_granted_passes_nothing_on() -> None:
    n = Notifier()
    with n.watch("k") as later:
        with n.watch("k"):  # arrives after ``later``, leaves without a grant
            pass
        assert later.queued_behind is False
        winner = n.watch("k")
        with winner:
            winner.granted = True
        assert await later.wait(0) is True  # the one that left without a grant passed a turn
        with n.watch("k") as granted:
            granted.granted = True
        assert await later.wait(0) is False


async def test_waiters_of_one_process_get_a_released_lease_in_arrival_order() -> None:
    store = InMemoryStore(namespace="fifo")
    holder = await store.leases.acquire("L", owner="holder", ttl=60)
    assert holder is not None
    order: list[str] = []

    async def wait_for_it(who: str) -> None:
        lease = await store.leases.acquire("L", owner=who, ttl=60, wait=30)
        assert lease is not None
        order.append(who)
        await asyncio.sleep(0.01)
        assert await store.leases.release(lease)

    tasks = []
    for who in ("a", "b", "c", "d"):
        tasks.append(asyncio.create_task(wait_for_it(who)))
        await asyncio.sleep(0.02)  # each is waiting before the next arrives
    assert await store.leases.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert order == ["a", "b", "c", "d"]


async def test_a_newcomer_does_not_take_the_lease_before_earlier_waiters() -> None:
    store = InMemoryStore(namespace="fifo")
    holder = await store.leases.acquire("L", owner="holder", ttl=60)
    assert holder is not None
    waiter = asyncio.create_task(store.leases.acquire("L", owner="waiter", ttl=60, wait=30))
    await asyncio.sleep(0.05)
    assert await store.leases.release(holder)
    # The releaser asks again at once, as a loop would: the waiter that was there first wins.
    again = asyncio.create_task(store.leases.acquire("L", owner="holder", ttl=60, wait=30))
    first = await asyncio.wait_for(waiter, 20)
    assert first is not None and first.owner == "waiter"
    assert not again.done()
    assert await store.leases.release(first)
    second = await asyncio.wait_for(again, 20)
    assert second is not None and first.token < second.token


async def test_a_waiting_acquire_stops_when_the_store_closes(tmp_path: Path) -> None:
    from fleetmem.backends.sqlite import SQLiteStore

    for store in (InMemoryStore(namespace="closing"), SQLiteStore(tmp_path / "c.db")):
        await store.connect()
        held = await store.leases.acquire("L", owner="a", ttl=60)
        assert held is not None
        waiter = asyncio.create_task(store.leases.acquire("L", owner="b", ttl=60, wait=30))
        await asyncio.sleep(0.1)
        await store.close()
        # No lease from a closed store (the in-memory one forgets its leases on close).
        with pytest.raises(StoreClosedError):
            await asyncio.wait_for(waiter, 10)


async def test_two_notifications_wake_two_waiters_even_before_either_ran() -> None:
    n = Notifier()
    with n.watch("q") as first, n.watch("q") as second:
        n.notify("q")
        n.notify("q")  # ``first`` has not used its wake-up yet: this one goes to ``second``
        assert await first.wait(0) is True
        assert await second.wait(0) is True


async def test_a_count_wakes_that_many_waiters_not_yet_awake() -> None:
    n = Notifier()
    with n.watch("q") as a, n.watch("q") as b, n.watch("q") as c, n.watch("q") as d:
        n.notify("q")
        n.notify("q", 2)
        assert [await w.wait(0) for w in (a, b, c, d)] == [True, True, True, False]


async def test_a_granted_waiter_leaving_with_an_unused_wake_up_passes_it_on() -> None:
    n = Notifier()
    first = n.watch("q")
    with n.watch("q") as second:
        with first:
            n.notify("q")
            assert await first.wait(0) is True  # it goes to claim
            n.notify("q")  # a second job arrives while its claim is in flight: goes to first
            first.granted = True  # it got the first job and leaves, not waiting again
        assert await second.wait(0) is True  # the second job's wake-up was passed on


async def test_two_puts_wake_two_waiting_claims_at_once() -> None:
    async with InMemoryStore() as store:
        q = store.queue("q")
        loop = asyncio.get_running_loop()
        waiters = [asyncio.create_task(q.claim(wait=30)) for _ in range(2)]
        await asyncio.sleep(0.05)  # both are waiting
        start = loop.time()
        await q.put(1)
        await q.put(2)
        jobs = await asyncio.wait_for(asyncio.gather(*waiters), 20)
        assert sorted(j.payload for j in jobs if j is not None) == [1, 2]
        # Woken by the puts, not by the once-a-second poll.
        assert loop.time() - start < 0.9


@pytest.mark.parametrize("ticks", [0, 1, 2])
def test_a_cancellation_as_the_wake_up_arrives_is_not_lost(ticks: int) -> None:
    """A waiter cancelled while its notification is being delivered ends cancelled (before
    Python 3.12, asyncio.wait_for returned the result instead and the waiter went on)."""

    async def run() -> None:
        notifier = Notifier()
        with notifier.watch("k") as watch:
            task = asyncio.create_task(watch.wait(30))
            await asyncio.sleep(0)
            notifier.notify("k")
            for _ in range(ticks):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    asyncio.run(run())
