"""The Coalescer that merges concurrent single-key calls into batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fleetmem._coalesce import Coalescer


class Backend:
    """An in-process stand-in for a server: every call takes one loop iteration."""

    def __init__(self) -> None:
        self.singles: list[str] = []
        self.batches: list[list[str]] = []
        self.log: list[str] = []

    async def single(self, item: str) -> str:
        self.singles.append(item)
        await asyncio.sleep(0)
        self.log.append(item)
        if item.startswith("bad"):
            raise ValueError(item)
        return item.upper()

    async def batch(self, items: list[str]) -> Sequence[str | BaseException]:
        self.batches.append(list(items))
        await asyncio.sleep(0)
        self.log.extend(items)
        return [ValueError(i) if i.startswith("bad") else i.upper() for i in items]


def make(backend: Backend, limit: int = 1) -> Coalescer[str, str]:
    return Coalescer(
        backend.single, backend.batch, key=lambda s: s.split("#")[0], max_inflight=limit
    )


async def test_a_lone_caller_goes_straight_through() -> None:
    backend = Backend()
    c = make(backend)
    assert await c.call("a") == "A"
    assert await c.call("b") == "B"
    assert backend.singles == ["a", "b"]
    assert backend.batches == []


async def test_concurrent_calls_are_merged_and_each_gets_its_result() -> None:
    backend = Backend()
    c = make(backend, limit=1)
    results = await asyncio.gather(*(c.call(f"k{i}") for i in range(50)))
    assert results == [f"K{i}" for i in range(50)]
    assert backend.singles == ["k0"]
    assert sum(len(b) for b in backend.batches) == 49
    assert len(backend.batches) < 49
    assert c.batches == len(backend.batches)


async def test_with_a_free_slot_callers_of_one_tick_share_one_batch() -> None:
    """Only a caller with nothing else in flight runs alone; the others of its tick leave
    together through the free slot, and so do the callers a finished batch wakes together."""
    backend = Backend()
    c = make(backend, limit=2)
    first = await asyncio.gather(*(c.call(f"a{i}") for i in range(10)))
    assert first == [f"A{i}" for i in range(10)]
    assert backend.singles == ["a0"]
    assert backend.batches == [[f"a{i}" for i in range(1, 10)]]

    async def caller(n: int) -> None:
        for i in range(5):
            await c.call(f"c{n}#{i}")

    backend.singles.clear()
    backend.batches.clear()
    await asyncio.gather(*(caller(n) for n in range(8)))
    # Only the very first call went alone. Callers that one batch woke leave together again:
    # c1..c7 stay one group in every round (c0, first served alone, keeps its own rhythm).
    assert backend.singles == ["c0#0"]
    groups = [
        sorted(x.split("#")[0] for x in b if not x.startswith("c0#")) for b in backend.batches
    ]
    assert [g for g in groups if g] == [[f"c{n}" for n in range(1, 8)]] * 5, backend.batches
    assert sum(len(b) for b in backend.batches) == 39


async def test_errors_reach_their_own_caller_only() -> None:
    backend = Backend()
    c = make(backend, limit=1)
    results = await asyncio.gather(
        *(c.call(x) for x in ["a", "b", "bad1", "c", "bad2"]), return_exceptions=True
    )
    assert results[:2] == ["A", "B"]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad1"
    assert results[3] == "C"
    assert isinstance(results[4], ValueError)


async def test_same_key_never_twice_in_a_batch_and_order_is_kept() -> None:
    backend = Backend()
    c = make(backend, limit=1)
    await asyncio.gather(*(c.call(f"k#{i}") for i in range(5)), c.call("other"))
    for batch in backend.batches:
        keys = [item.split("#")[0] for item in batch]
        assert len(keys) == len(set(keys))
    assert [x for x in backend.log if x.startswith("k#")] == [f"k#{i}" for i in range(5)]


async def test_a_cancelled_queued_caller_is_dropped_and_disturbs_nobody() -> None:
    backend = Backend()
    c = make(backend, limit=1)
    first = asyncio.ensure_future(c.call("a"))
    await asyncio.sleep(0)  # "a" is in flight, the next ones queue
    victim = asyncio.ensure_future(c.call("victim"))
    others = [asyncio.ensure_future(c.call(f"o{i}")) for i in range(3)]
    await asyncio.sleep(0)
    victim.cancel()
    assert await first == "A"
    assert await asyncio.gather(*others) == ["O0", "O1", "O2"]
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert all("victim" not in batch for batch in backend.batches)


async def test_cancelling_a_caller_of_a_running_batch_does_not_cancel_the_batch() -> None:
    gate = asyncio.Event()
    batch_started = asyncio.Event()
    sent: list[list[str]] = []

    async def single(item: str) -> str:
        await gate.wait()
        return item.upper()

    async def batch(items: list[str]) -> Sequence[str | BaseException]:
        sent.append(list(items))
        batch_started.set()
        await asyncio.sleep(0.01)
        return [i.upper() for i in items]

    c: Coalescer[str, str] = Coalescer(single, batch, key=lambda s: s, max_inflight=1)
    first = asyncio.ensure_future(c.call("a"))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(c.call(f"q{i}")) for i in range(3)]
    await asyncio.sleep(0)  # all three are queued behind "a"
    gate.set()
    assert await first == "A"
    await batch_started.wait()
    queued[0].cancel()  # its batch is already on the wire
    assert await asyncio.gather(*queued[1:]) == ["Q1", "Q2"]
    assert sent == [["q0", "q1", "q2"]]


async def test_a_failing_batch_fails_each_of_its_callers() -> None:
    async def single(item: str) -> str:
        await asyncio.sleep(0)
        return item

    async def batch(items: list[str]) -> Sequence[str | BaseException]:
        raise ConnectionError("server gone")

    c: Coalescer[str, str] = Coalescer(single, batch, key=lambda s: s, max_inflight=1)
    results = await asyncio.gather(*(c.call(f"k{i}") for i in range(4)), return_exceptions=True)
    assert results[0] == "k0"
    assert all(isinstance(r, ConnectionError) for r in results[1:])
