"""Merging of concurrent single-key calls, on the real backends that merge."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from fleetmem import Entry

# The backends that merge concurrent calls, through the shared ``store`` fixture.
pytestmark = pytest.mark.parametrize(
    "store",
    [
        pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
        pytest.param("redis", marks=pytest.mark.redis, id="redis"),
        pytest.param(
            "hybrid",
            marks=(pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis),
            id="hybrid",
        ),
    ],
    indirect=True,
)


async def test_concurrent_sets_and_gets_keep_versions_exact(store: Any) -> None:
    keys = [f"hot{i}" for i in range(20)]
    writes: dict[str, int] = dict.fromkeys(keys, 0)
    problems: list[str] = []

    async def worker(w: int) -> None:
        rng = random.Random(w)
        for n in range(40):
            key = rng.choice(keys)
            entry: Entry = await store.set(key, {"w": w, "n": n})
            writes[key] += 1
            seen = await store.get_entry(key)
            if seen is None or seen.version < entry.version:
                problems.append(f"{key}: wrote v{entry.version}, then read {seen}")

    await asyncio.gather(*(worker(w) for w in range(64)))
    assert problems == []
    for key in keys:
        entry = await store.get_entry(key)
        assert entry is not None
        assert entry.version == writes[key]  # no lost or doubled write
    counts = store.merge_counts()
    assert counts["set"][0] > 0, counts  # merging really happened
    assert counts["get_entry"][0] > 0, counts


async def test_merged_gets_return_each_caller_its_own_key(store: Any) -> None:
    await store.set_many({f"k{i}": i for i in range(200)})
    results = await asyncio.gather(*(store.get(f"k{i % 250}") for i in range(1000)))
    assert results == [i % 250 if i % 250 < 200 else None for i in range(1000)]
    exists = await asyncio.gather(*(store.exists(f"k{i}") for i in range(190, 210)))
    assert exists == [i < 200 for i in range(190, 210)]
    deleted = await asyncio.gather(*(store.delete(f"k{i}") for i in range(195, 205)))
    assert deleted == [i < 200 for i in range(195, 205)]
    assert store.merge_counts()["get"][0] > 0


async def test_cancelled_callers_do_not_disturb_the_others(store: Any) -> None:
    await store.set_many({f"c{i}": i for i in range(100)})
    tasks = [asyncio.ensure_future(store.get(f"c{i}")) for i in range(100)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    outcome = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(outcome):
        if i % 2:
            assert result == i
        else:
            assert isinstance(result, asyncio.CancelledError) or result == i
    # The store is still in step: every key reads back right afterwards.
    assert await asyncio.gather(*(store.get(f"c{i}") for i in range(100))) == list(range(100))


async def test_a_lone_caller_is_never_batched(store: Any) -> None:
    before = store.merge_counts()
    for i in range(50):
        await store.set(f"solo{i}", i)
        assert await store.get(f"solo{i}") == i
    assert store.merge_counts() == before
