"""Atomicity: many coroutines racing on one key through the same store."""

from __future__ import annotations

import asyncio

from fleetmem.errors import VersionConflictError
from fleetmem.protocol import MemoryStore
from fleetmem.testing.conformance._base import ConformanceBase


class ConcurrencyConformance(ConformanceBase):
    """``incr``, ``compare_and_set``, ``set_if_absent`` and ``set`` under concurrency."""

    async def test_concurrent_incr_counts_exactly(self, store: MemoryStore) -> None:
        n = self.concurrency
        results = await asyncio.gather(*(store.incr("counter") for _ in range(n)))
        assert sorted(results) == list(range(1, n + 1))
        entry = await store.get_entry("counter")
        assert entry is not None and (entry.value, entry.version) == (n, n)
        floats = await asyncio.gather(*(store.incr("f", 0.5) for _ in range(n)))
        assert sorted(floats) == [0.5 * i for i in range(1, n + 1)]

    async def test_compare_and_set_retry_loop_loses_no_update(self, store: MemoryStore) -> None:
        n = self.concurrency
        conflicts = 0

        async def add_one() -> None:
            nonlocal conflicts
            for _ in range(10 * n):
                entry = await store.get_entry("cas")
                value, version = (0, 0) if entry is None else (entry.value, entry.version)
                try:
                    await store.compare_and_set("cas", value + 1, version=version)
                except VersionConflictError as exc:
                    conflicts += 1
                    assert exc.current_version != version
                    await asyncio.sleep(0)
                    continue
                return
            raise AssertionError("compare_and_set retry loop did not finish")

        await asyncio.gather(*(add_one() for _ in range(n)))
        entry = await store.get_entry("cas")
        assert entry is not None and (entry.value, entry.version) == (n, n)

    async def test_set_if_absent_has_one_winner(self, store: MemoryStore) -> None:
        n = self.concurrency
        wins = await asyncio.gather(*(store.set_if_absent("lock", i) for i in range(n)))
        assert wins.count(True) == 1
        entry = await store.get_entry("lock")
        assert entry is not None and entry.version == 1
        assert entry.value == wins.index(True)
        created = await asyncio.gather(
            *(store.compare_and_set("cas0", i, version=0) for i in range(n)),
            return_exceptions=True,
        )
        winners = [r for r in created if not isinstance(r, BaseException)]
        assert len(winners) == 1
        assert all(
            isinstance(r, VersionConflictError) and r.current_version == 1
            for r in created
            if isinstance(r, BaseException)
        )
        assert await store.get("cas0") == winners[0].value

    async def test_concurrent_sets_get_distinct_versions(self, store: MemoryStore) -> None:
        n = self.concurrency
        entries = await asyncio.gather(*(store.set("k", i) for i in range(n)))
        assert sorted(e.version for e in entries) == list(range(1, n + 1))
        final = await store.get_entry("k")
        assert final is not None and final.version == n
        last = next(e for e in entries if e.version == n)
        assert final.value == last.value

    async def test_mixed_set_and_delete_keep_versions_consistent(self, store: MemoryStore) -> None:
        n = self.concurrency

        async def writer(i: int) -> object:
            if i % 3 == 2:
                return await store.delete("k")
            return await store.set("k", i)

        await asyncio.gather(*(writer(i) for i in range(n)))
        current = await store.get_entry("k")
        assert current is None or current.version >= 1
        after = await store.set("k", "final")
        assert after.version == (1 if current is None else current.version + 1)
        assert await store.get("k") == "final"
        assert await store.delete("k") is True
        assert (await store.set("k", 1)).version == 1
