"""TTL validation, ttl()/expire()/persist(), keep_ttl, and expiry on every path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from fleetmem.errors import FleetmemError, KeyNotFoundError, VersionConflictError
from fleetmem.protocol import Entry, MemoryStore
from fleetmem.testing.conformance._base import ConformanceBase

#: TTLs refused with a ``ValueError``.
BAD_TTLS: list[Any] = [
    0,
    0.0,
    -1,
    -0.5,
    0.0005,
    0.000999,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    timedelta(0),
    timedelta(seconds=-1),
    timedelta(microseconds=500),
    101 * 365 * 24 * 3600,  # over 100 years
    10**400,  # too large for a float: refused, not an OverflowError
    -(10**400),
]


def _ttl_calls(store: MemoryStore, ttl: Any) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """Every method that takes a ttl, called with ``ttl``."""
    return [
        ("set", lambda: store.set("new", 1, ttl=ttl)),
        ("set existing", lambda: store.set("k", 2, ttl=ttl)),
        ("set_many", lambda: store.set_many({"new": 1, "k": 2}, ttl=ttl)),
        ("set_if_absent", lambda: store.set_if_absent("new", 1, ttl=ttl)),
        ("compare_and_set", lambda: store.compare_and_set("k", 2, version=1, ttl=ttl)),
        ("incr", lambda: store.incr("k", ttl=ttl)),
        ("expire", lambda: store.expire("k", ttl)),
    ]


async def _entry(store: MemoryStore, key: str) -> Entry:
    entry = await store.get_entry(key)
    assert entry is not None, f"{key!r} is missing"
    return entry


class ExpiryConformance(ConformanceBase):
    """The TTL and expiry rules."""

    async def test_bad_ttls_are_refused(self, store: MemoryStore) -> None:
        await store.set("k", 1)
        for ttl in BAD_TTLS:
            for name, call in _ttl_calls(store, ttl):
                with pytest.raises(ValueError):
                    await call()
                    raise AssertionError(f"{name} accepted ttl={ttl!r}")
        with pytest.raises(ValueError):
            await store.set("k", 2, ttl=10, keep_ttl=True)
        with pytest.raises(ValueError):
            await store.set("new", 2, ttl=timedelta(seconds=10), keep_ttl=True)
        assert await store.keys() == ["k"]
        entry = await _entry(store, "k")
        assert (entry.value, entry.version, entry.expires_at) == (1, 1, None)

    async def test_ttl_reports_seconds_left(self, store: MemoryStore) -> None:
        await store.set("persistent", 1)
        assert await store.ttl("persistent") is None
        await store.set("seconds", 1, ttl=30)
        await store.set("float", 1, ttl=12.5)
        await store.set("delta", 1, ttl=timedelta(minutes=1))
        await store.set("ms", 1, ttl=0.001 * 5000)
        for key, ttl in (("seconds", 30.0), ("float", 12.5), ("delta", 60.0), ("ms", 5.0)):
            left = await store.ttl(key)
            assert isinstance(left, float), f"ttl({key}) is {left!r}"
            assert ttl - 1 < left <= ttl + self.ttl_slack, f"ttl({key}) is {left!r}"
            entry = await _entry(store, key)
            assert entry.expires_at is not None
            span = (entry.expires_at - entry.updated_at).total_seconds()
            assert abs(span - ttl) <= self.ttl_slack, f"{key}: {span}"
        with pytest.raises(KeyNotFoundError) as info:
            await store.ttl("missing")
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, FleetmemError)
        # One millisecond is the smallest TTL, and is accepted.
        await store.set("tiny", 1, ttl=0.001)
        await store.set("tiny-delta", 1, ttl=timedelta(milliseconds=1))
        await asyncio.sleep(0.05)
        assert await store.get_many(["tiny", "tiny-delta"]) == {}

    async def test_expire_and_persist(self, store: MemoryStore) -> None:
        original = await store.set("k", 1)
        await asyncio.sleep(0.01)
        assert await store.expire("k", 60) is True
        left = await store.ttl("k")
        assert left is not None and 59 < left <= 60 + self.ttl_slack
        entry = await _entry(store, "k")
        assert entry.version == original.version
        assert entry.updated_at == original.updated_at
        assert entry.expires_at is not None
        assert await store.expire("k", timedelta(seconds=90)) is True
        left = await store.ttl("k")
        assert left is not None and 89 < left <= 90 + self.ttl_slack
        assert await store.persist("k") is True
        assert await store.ttl("k") is None
        assert await store.persist("k") is True  # already persistent, still existed
        entry = await _entry(store, "k")
        assert (entry.version, entry.updated_at, entry.expires_at, entry.value) == (
            original.version,
            original.updated_at,
            None,
            1,
        )
        assert await store.expire("missing", 10) is False
        assert await store.persist("missing") is False
        assert await store.exists("missing") is False

    async def test_set_without_ttl_makes_persistent_unless_keep_ttl(
        self, store: MemoryStore
    ) -> None:
        await store.set("k", 1, ttl=30)
        assert (await store.set("k", 2)).expires_at is None
        assert await store.ttl("k") is None
        await store.set("p", 1)
        assert (await store.set("p", 2, ttl=30)).expires_at is not None
        assert (await store.set("p", 3, keep_ttl=True)).expires_at is not None
        assert (await store.set("new", 1, keep_ttl=True)).expires_at is None
        assert await store.ttl("new") is None
        await store.set("q", 1)
        assert (await store.set("q", 2, keep_ttl=True)).expires_at is None

    async def test_keep_ttl_incr_and_compare_and_set_keep_the_expiry(
        self, store: MemoryStore
    ) -> None:
        originals = {}
        for key in ("keep", "incr", "cas", "incr-float"):
            originals[key] = await store.set(key, 1, ttl=30)
        await asyncio.sleep(0.25)  # a reset expiry would move by this much
        await store.set("keep", 2, keep_ttl=True)
        await store.incr("incr")
        await store.incr("incr-float", 0.5)
        await store.compare_and_set("cas", 2, version=1)
        for key, original in originals.items():
            entry = await _entry(store, key)
            assert entry.version == 2, key
            assert entry.expires_at is not None, f"{key} lost its expiry"
            assert original.expires_at is not None
            moved = abs((entry.expires_at - original.expires_at).total_seconds())
            assert moved <= self.ttl_slack, f"{key}: expiry moved by {moved} s"
            left = await store.ttl(key)
            assert left is not None and left <= 30 - 0.25 + self.ttl_slack, (key, left)
        # With a ttl they set a new expiry.
        await store.incr("incr", ttl=100)
        await store.compare_and_set("cas", 3, version=2, ttl=100)
        for key in ("incr", "cas"):
            left = await store.ttl(key)
            assert left is not None and 99 < left <= 100 + self.ttl_slack, (key, left)

    async def test_expired_entry_is_invisible_on_every_read_path(self, store: MemoryStore) -> None:
        ttl = self.expiry_ttl
        await store.set("live", "here", partition="live-part")
        await store.set("gone", "bye", ttl=ttl, partition="gone-part")
        await store.set("gone/2", "bye", ttl=ttl, partition="live-part")
        await store.set_many({"gone/many": 1}, ttl=ttl)
        await store.set_if_absent("gone/sia", 1, ttl=ttl, partition="gone-part")
        await store.incr("gone/incr", ttl=ttl, partition="gone-part")
        await store.set("gone/cas", 1)
        await store.compare_and_set("gone/cas", 2, version=1, ttl=ttl)
        await store.set("gone/expire", 1)
        await store.expire("gone/expire", ttl)
        gone = ["gone", "gone/2", "gone/many", "gone/sia", "gone/incr", "gone/cas", "gone/expire"]
        assert list(await store.get_many(gone)) == gone  # all written
        await self.wait_for_expiry()

        for key in gone:
            assert await store.get(key, "default") == "default", key
            assert await store.get_entry(key) is None, key
            assert await store.exists(key) is False, key
            with pytest.raises(KeyNotFoundError):
                await store.ttl(key)
        assert await store.get_many(["live", *gone]) == {"live": "here"}
        assert await store.keys() == ["live"]
        assert await store.keys("gone") == []
        assert await store.keys(partition="gone-part") == []
        assert await store.keys(after="a") == ["live"]
        assert await store.search("*") == {"live": "here"}
        assert await store.search("gone*") == {}
        assert await store.search("gone") == {}
        assert await store.search("gone", partition="gone-part") == {}
        assert await store.search("*", partition="live-part") == {"live": "here"}
        assert await store.partitions() == ["live-part"]
        stats = await store.stats()
        assert stats.keys == 1
        assert stats.partitions == {"live-part": 1}
        assert stats.expired_pending >= 0
        assert await store.expire("gone", 10) is False
        assert await store.persist("gone/2") is False
        assert await store.exists("gone") is False
        assert await store.delete("gone/many") is False
        assert await store.delete_many(["gone/sia", "gone/incr", "live"]) == 1

    async def test_expired_entry_is_absent_for_writes(self, store: MemoryStore) -> None:
        ttl = self.expiry_ttl
        for key in ("sia", "cas0", "cas-old", "incr", "set", "keep", "many", "set-part"):
            await store.set(key, 41, ttl=ttl, partition="old")
            await store.set(key, 41, keep_ttl=True)  # version 2
        assert len(await store.keys()) == 8
        await self.wait_for_expiry()

        assert await store.set_if_absent("sia", "new") is True
        entry = await _entry(store, "sia")
        assert (entry.value, entry.version, entry.partition, entry.expires_at) == (
            "new",
            1,
            "default",
            None,
        )
        with pytest.raises(VersionConflictError) as info:
            await store.compare_and_set("cas-old", "new", version=2)
        assert info.value.current_version == 0
        created = await store.compare_and_set("cas0", "new", version=0)
        assert (created.version, created.partition, created.expires_at) == (1, "default", None)
        assert await store.incr("incr") == 1
        entry = await _entry(store, "incr")
        assert (entry.value, entry.version, entry.partition, entry.expires_at) == (
            1,
            1,
            "default",
            None,
        )
        entry = await store.set("set", "new")
        assert (entry.version, entry.partition) == (1, "default")
        entry = await store.set("set-part", "new", partition="fresh")
        assert (entry.version, entry.partition) == (1, "fresh")
        entry = await store.set("keep", "new", keep_ttl=True)
        assert (entry.version, entry.expires_at) == (1, None)
        assert await store.set_many({"many": "new"}) == 1
        entry = await _entry(store, "many")
        assert (entry.version, entry.partition, entry.expires_at) == (1, "default", None)
        assert await store.partitions() == ["default", "fresh"]

    async def test_counts_exclude_expired_entries(self, store: MemoryStore) -> None:
        ttl = self.expiry_ttl
        await store.set_many({"p/live1": 1, "p/live2": 2}, partition="p")
        await store.set_many({"p/old1": 1, "p/old2": 2}, partition="p", ttl=ttl)
        await store.set("q/old", 1, partition="q", ttl=ttl)
        await store.set("r/live", 1, partition="r")
        await store.set("r/old", 1, partition="r", ttl=ttl)
        await store.set_many({"d/old1": 1, "d/old2": 2, "d/old3": 3}, partition="d", ttl=ttl)
        await self.wait_for_expiry()

        stats = await store.stats()
        assert (stats.keys, stats.partitions) == (3, {"p": 2, "r": 1})
        if self.exact_expiry_accounting:
            assert stats.expired_pending == 7
        assert await store.partitions() == ["p", "r"]
        # Deleting expired entries deletes nothing live.
        assert await store.delete_many(["d/old1", "d/old2"]) == 0
        assert await store.delete("d/old3") is False
        assert await store.clear_partition("q") == 0
        assert await store.clear_partition("r") == 1
        assert await store.clear() == 2
        stats = await store.stats()
        assert (stats.keys, stats.partitions) == (0, {})
        assert stats.expired_pending == 0
        assert await store.cleanup_expired() == 0

    async def test_cleanup_expired_frees_only_expired_entries(self, store: MemoryStore) -> None:
        self.require_exact_expiry_accounting()
        ttl = self.expiry_ttl
        assert await store.cleanup_expired() == 0
        await store.set_many({f"old{i}": i for i in range(3)}, ttl=ttl, partition="o")
        await store.set_many({"live": 1, "later": 2})
        await store.expire("later", 60)
        await self.wait_for_expiry()
        assert (await store.stats()).expired_pending == 3
        assert await store.cleanup_expired() == 3
        assert await store.cleanup_expired() == 0
        stats = await store.stats()
        assert (stats.keys, stats.expired_pending, stats.partitions) == (2, 0, {"default": 2})
        assert await store.get_many(["live", "later"]) == {"live": 1, "later": 2}
        left = await store.ttl("later")
        assert left is not None and left > 50
