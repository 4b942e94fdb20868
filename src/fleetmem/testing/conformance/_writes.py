"""Writes: versions, entries, set_many, set_if_absent, compare_and_set and incr."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    NotANumberError,
    SerializationError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, MemoryStore
from fleetmem.testing.conformance._base import ConformanceBase, assert_utc, utcnow

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


async def _entry(store: MemoryStore, key: str) -> Entry:
    entry = await store.get_entry(key)
    assert entry is not None, f"{key!r} is missing"
    return entry


class WriteConformance(ConformanceBase):
    """Versions, entry metadata and the atomic write operations."""

    # ------------------------------------------------------------------ versions and entries

    async def test_every_write_kind_adds_one_to_the_version(self, store: MemoryStore) -> None:
        assert (await store.set("k", 1)).version == 1
        assert (await store.set("k", 2)).version == 2
        assert await store.set_many({"k": 3, "other": 0}) == 2
        assert (await _entry(store, "k")).version == 3
        assert await store.set_if_absent("k", 4) is False
        assert (await _entry(store, "k")).version == 3
        assert (await store.compare_and_set("k", 4, version=3)).version == 4
        assert await store.incr("k") == 5
        assert (await _entry(store, "k")).version == 5
        assert await store.expire("k", 60) is True
        assert (await _entry(store, "k")).version == 5
        assert await store.persist("k") is True
        assert (await _entry(store, "k")).version == 5
        assert (await store.set("k", 6, keep_ttl=True)).version == 6
        # Created again after a delete: version 1 on every write kind.
        for create in (
            lambda: store.set("k", 1),
            lambda: store.set_many({"k": 1}),
            lambda: store.set_if_absent("k", 1),
            lambda: store.compare_and_set("k", 1, version=0),
            lambda: store.incr("k"),
        ):
            assert await store.delete("k") is True
            await create()
            assert (await _entry(store, "k")).version == 1
        assert (await _entry(store, "other")).version == 1

    async def test_entry_fields(self, store: MemoryStore) -> None:
        before = utcnow() - timedelta(seconds=self.clock_skew)
        created = await store.set("k", (1, "a"), partition="p")
        after = utcnow() + timedelta(seconds=self.clock_skew)
        assert dataclasses.is_dataclass(created) and isinstance(created, Entry)
        with pytest.raises(dataclasses.FrozenInstanceError):
            created.version = 9  # type: ignore[misc]
        assert (created.key, created.value, created.partition, created.version) == (
            "k",
            [1, "a"],
            "p",
            1,
        )
        assert before <= assert_utc(created.created_at, "created_at") <= after
        assert before <= assert_utc(created.updated_at, "updated_at") <= after
        assert created.updated_at == created.created_at
        assert created.expires_at is None
        assert await store.get_entry("k") == created
        await asyncio.sleep(0.02)
        updated = await store.set("k", {"b": 2}, ttl=30)
        assert updated.created_at == created.created_at
        assert updated.updated_at > created.updated_at
        expires_at = assert_utc(updated.expires_at, "expires_at")
        seconds = (expires_at - updated.updated_at).total_seconds()
        assert abs(seconds - 30) <= self.ttl_slack, seconds
        assert await store.get_entry("k") == updated
        for write in (
            lambda: store.compare_and_set("k", 3, version=2),
            lambda: store.incr("k"),
            lambda: store.set_many({"k": 5}),
        ):
            await asyncio.sleep(0.01)
            previous = await _entry(store, "k")
            await write()
            current = await _entry(store, "k")
            assert current.created_at == created.created_at
            assert current.updated_at > previous.updated_at
            assert current.version == previous.version + 1
            assert_utc(current.updated_at)

    # ------------------------------------------------------------------ set_many

    async def test_set_many_writes_all_and_counts(self, store: MemoryStore) -> None:
        assert await store.set_many({}) == 0
        items = {f"k{i}": {"i": i} for i in range(20)}
        assert await store.set_many(items) == 20
        assert await store.get_many(list(items)) == items
        assert await store.set_many({"k0": "new", "k20": 20}, ttl=30, partition="p") == 2
        assert await store.get("k0") == "new"
        for key in ("k0", "k20"):
            entry = await _entry(store, key)
            assert entry.partition == "p" and entry.expires_at is not None
        left = await store.ttl("k20")
        assert left is not None and 30 - 1 < left <= 30 + self.ttl_slack
        assert await store.ttl("k1") is None

    async def test_set_many_is_all_or_nothing_on_bad_input(self, store: MemoryStore) -> None:
        await store.set("k0", "original")
        bad_key: Any = 7
        for items in (
            {"k0": 1, "k1": 1, "": 1},
            {"k0": 1, "k1": 1, bad_key: 1},
            {"k0": 1, "k1": {1, 2}, "k2": 2},
            {"k0": 1, "k1": 1, "k2": float("nan")},
            # Over one internal chunk: the bad item comes last.
            {**{f"big{i:05d}": i for i in range(6000)}, "k0": 1, "bad\x00": 1},
            {**{f"big{i:05d}": i for i in range(6000)}, "k0": 1, "last": object()},
        ):
            with pytest.raises((InvalidKeyError, SerializationError)):
                await store.set_many(items)
            assert await store.keys() == ["k0"]
        with pytest.raises(ValueError):
            await store.set_many({"k0": 1, "k1": 1}, ttl=0)
        with pytest.raises(InvalidKeyError):
            await store.set_many({"k0": 1, "k1": 1}, partition="")
        entry = await _entry(store, "k0")
        assert (entry.value, entry.version) == ("original", 1)

    async def test_set_many_100000_items(self, store: MemoryStore) -> None:
        count = 100_000
        items = {f"bulk/{i:06d}": i for i in range(count)}
        assert await store.set_many(items, partition="bulk") == count
        stats = await store.stats()
        assert stats.keys == count
        assert stats.partitions == {"bulk": count}
        probe = ["bulk/000000", "bulk/050000", "bulk/099999", "bulk/100000"]
        assert await store.get_many(probe) == {
            "bulk/000000": 0,
            "bulk/050000": 50_000,
            "bulk/099999": 99_999,
        }
        assert await store.keys("bulk/", limit=3, after="bulk/049998") == [
            "bulk/049999",
            "bulk/050000",
            "bulk/050001",
        ]
        entry = await _entry(store, "bulk/077777")
        assert (entry.value, entry.version, entry.partition) == (77_777, 1, "bulk")
        assert await store.clear_partition("bulk") == count

    # ------------------------------------------------------------------ set_if_absent

    async def test_set_if_absent(self, store: MemoryStore) -> None:
        assert await store.set_if_absent("k", "first", ttl=30, partition="p") is True
        assert await store.set_if_absent("k", "second") is False
        entry = await _entry(store, "k")
        assert (entry.value, entry.version, entry.partition) == ("first", 1, "p")
        assert entry.expires_at is not None
        await store.set("null", None)
        assert await store.set_if_absent("null", 1) is False
        assert await store.get("null", "default") is None

    # ------------------------------------------------------------------ compare_and_set

    async def test_compare_and_set(self, store: MemoryStore) -> None:
        created = await store.compare_and_set("k", "v1", version=0, partition="p")
        assert (created.value, created.version, created.partition) == ("v1", 1, "p")
        updated = await store.compare_and_set("k", "v2", version=1)
        assert (updated.value, updated.version, updated.partition) == ("v2", 2, "p")
        for wrong in (0, 1, 3, 100):
            with pytest.raises(VersionConflictError) as info:
                await store.compare_and_set("k", "bad", version=wrong)
            assert info.value.current_version == 2
            assert isinstance(info.value, FleetmemError)
        with pytest.raises(VersionConflictError) as info:
            await store.compare_and_set("missing", "bad", version=5)
        assert info.value.current_version == 0
        assert await store.exists("missing") is False
        entry = await _entry(store, "k")
        assert (entry.value, entry.version) == ("v2", 2)
        bad_versions: list[Any] = [-1, 1.0, "1", None, True]
        for version in bad_versions:
            with pytest.raises(ValueError):
                await store.compare_and_set("k", "bad", version=version)
        assert (await _entry(store, "k")).version == 2

    async def test_compare_and_set_versions_beyond_int64(self, store: MemoryStore) -> None:
        # Versions are signed 64-bit counters everywhere: the largest is a plain conflict, a
        # larger one no entry can have -- a bad argument (a ValueError, before any I/O), on a
        # live key and on a missing one alike, never a driver error.
        await store.set("k", "v")
        with pytest.raises(VersionConflictError) as info:
            await store.compare_and_set("k", "bad", version=INT64_MAX)
        assert info.value.current_version == 1
        for version in (INT64_MAX + 1, 2**64, 10**30):
            for key in ("k", "missing"):
                with pytest.raises(InvalidArgumentError) as refused:
                    await store.compare_and_set(key, "bad", version=version)
                assert isinstance(refused.value, ValueError)
        assert (await _entry(store, "k")).version == 1
        assert await store.exists("missing") is False
        assert (await store.compare_and_set("k", "w", version=1)).version == 2

    # ------------------------------------------------------------------ incr

    async def test_incr_counts(self, store: MemoryStore) -> None:
        assert await store.incr("n") == 1
        assert await store.incr("n") == 2
        assert await store.incr("n", 10) == 12
        assert await store.incr("n", -20) == -8
        assert await store.incr("n", 0) == -8
        value = await store.get("n")
        assert value == -8 and type(value) is int
        result = await store.incr("m", 5, ttl=30, partition="p")
        assert result == 5 and type(result) is int
        entry = await _entry(store, "m")
        assert (entry.partition, entry.version) == ("p", 1) and entry.expires_at is not None

    async def test_incr_is_exact_in_int64(self, store: MemoryStore) -> None:
        await store.set("n", INT64_MAX - 10)
        result = await store.incr("n", 9)
        assert result == INT64_MAX - 1 and type(result) is int
        assert await store.incr("n") == INT64_MAX
        assert await store.get("n") == INT64_MAX
        for amount in (1, 2**40, INT64_MAX):
            with pytest.raises(ValueError):
                await store.incr("n", amount)
        entry = await _entry(store, "n")
        assert (entry.value, entry.version) == (INT64_MAX, 3)
        await store.set("low", INT64_MIN + 1)
        assert await store.incr("low", -1) == INT64_MIN
        with pytest.raises(ValueError):
            await store.incr("low", -1)
        assert await store.get("low") == INT64_MIN
        assert await store.incr("fresh", INT64_MAX) == INT64_MAX
        # An amount outside signed 64 bits is refused, and writes nothing.
        for amount in (2**63, -(2**63) - 1, 2**100):
            with pytest.raises(ValueError):
                await store.incr("none", amount)
        assert await store.exists("none") is False
        # A stored integer beyond 64 bits cannot be incremented either.
        await store.set("huge", 2**64)
        with pytest.raises(ValueError):
            await store.incr("huge")
        assert await store.get("huge") == 2**64

    async def test_incr_with_floats(self, store: MemoryStore) -> None:
        result = await store.incr("f", 0.5)
        assert result == 0.5 and type(result) is float
        result = await store.incr("f", 1.25)
        assert result == 1.75 and type(result) is float
        result = await store.incr("f", 1)
        assert result == 2.75 and type(result) is float
        assert await store.incr("whole", 0.5) == 0.5
        result = await store.incr("whole", 0.5)
        assert result == 1.0 and type(result) is float
        await store.set("i", 2)
        result = await store.incr("i", 1.5)
        assert result == 3.5 and type(result) is float
        await store.set("g", 2.5)
        result = await store.incr("g")
        assert result == 3.5 and type(result) is float
        assert float(await store.get("g")) == 3.5
        for amount in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ValueError):
                await store.incr("g", amount)
        assert float(await store.get("g")) == 3.5
        # A float result that overflows is refused as such (not as a 64-bit overflow).
        await store.set("max", 1.7e308)
        with pytest.raises(ValueError, match="overflow a float"):
            await store.incr("max", 1e308)
        await store.set("n64", 2**63 - 1)
        with pytest.raises(ValueError, match="64-bit"):
            await store.incr("n64", 1)
        assert await store.get("max") == 1.7e308

    async def test_incr_on_large_stored_floats_is_float_arithmetic(
        self, store: MemoryStore
    ) -> None:
        # Floats of 1e16 and more have no fractional digits; they must stay floats on every
        # backend (not become integers that overflow or add exactly).
        for stored in (1e300, -1e300, 1e17, 2.0**64):
            await store.set("big", stored)
            assert await store.get("big") == stored
            result = await store.incr("big", 1)
            assert type(result) is float
            assert result == stored + 1.0
            assert float(await store.get("big")) == stored + 1.0

    async def test_incr_refuses_non_numbers(self, store: MemoryStore) -> None:
        values: list[Any] = ["12", True, False, {"a": 1}, [1], None, ""]
        for index, value in enumerate(values):
            key = f"k{index}"
            await store.set(key, value)
            for amount in (1, 1.5):
                with pytest.raises(NotANumberError) as info:
                    await store.incr(key, amount)
                assert isinstance(info.value, TypeError)
                assert isinstance(info.value, FleetmemError)
            entry = await _entry(store, key)
            assert_value = entry.value
            assert type(assert_value) is type(value) and assert_value == value
            assert entry.version == 1
        bad_amounts: list[Any] = ["1", None, [1]]
        for amount in bad_amounts:
            with pytest.raises((TypeError, ValueError)):
                await store.incr("n", amount)
        assert await store.exists("n") is False
