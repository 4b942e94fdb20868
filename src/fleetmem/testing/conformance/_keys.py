"""Keys, namespaces and partitions: validation, reads, deletes, listing, paging, clearing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fleetmem.errors import FleetmemError, InvalidKeyError
from fleetmem.protocol import MemoryStore
from fleetmem.testing.conformance._base import (
    BAD_KEYS,
    BAD_PARTITIONS,
    GOOD_KEYS,
    GOOD_PARTITIONS,
    ConformanceBase,
    raises_each,
)

Call = tuple[str, Callable[[], Awaitable[object]]]


def _key_calls(store: MemoryStore, key: Any) -> list[Call]:
    """Every method that takes a key, called with ``key``."""
    k = repr(key)[:40]
    return [
        (f"get({k})", lambda: store.get(key)),
        (f"get_entry({k})", lambda: store.get_entry(key)),
        (f"get_many([{k}])", lambda: store.get_many(["ok", key])),
        (f"exists({k})", lambda: store.exists(key)),
        (f"set({k})", lambda: store.set(key, 1)),
        (f"set_many({{{k}: 1}})", lambda: store.set_many({"ok": 1, key: 1})),
        (f"set_if_absent({k})", lambda: store.set_if_absent(key, 1)),
        (f"compare_and_set({k})", lambda: store.compare_and_set(key, 1, version=0)),
        (f"incr({k})", lambda: store.incr(key)),
        (f"delete({k})", lambda: store.delete(key)),
        (f"delete_many([{k}])", lambda: store.delete_many(["ok", key])),
        (f"ttl({k})", lambda: store.ttl(key)),
        (f"expire({k})", lambda: store.expire(key, 10)),
        (f"persist({k})", lambda: store.persist(key)),
    ]


def _partition_calls(store: MemoryStore, partition: Any) -> list[Call]:
    """Every method that takes a partition, called with ``partition``."""
    p = repr(partition)[:40]
    return [
        (f"set(partition={p})", lambda: store.set("k", 1, partition=partition)),
        (f"set_many(partition={p})", lambda: store.set_many({"k": 1}, partition=partition)),
        (f"set_if_absent(partition={p})", lambda: store.set_if_absent("k", 1, partition=partition)),
        (
            f"compare_and_set(partition={p})",
            lambda: store.compare_and_set("k", 1, version=0, partition=partition),
        ),
        (f"incr(partition={p})", lambda: store.incr("k", partition=partition)),
        (f"keys(partition={p})", lambda: store.keys(partition=partition)),
        (f"search(partition={p})", lambda: store.search("*", partition=partition)),
        (f"clear_partition({p})", lambda: store.clear_partition(partition)),
    ]


class KeyConformance(ConformanceBase):
    """Validation of keys, namespaces and partitions; key-level reads, deletes and listing."""

    # ------------------------------------------------------------------ validation

    async def test_bad_keys_are_refused_by_every_method(self, store: MemoryStore) -> None:
        await store.set("ok", "kept")
        for key in BAD_KEYS:
            await raises_each(InvalidKeyError, _key_calls(store, key))
        assert issubclass(InvalidKeyError, ValueError)
        # Nothing was written, and the entry written before is untouched.
        assert await store.keys() == ["ok"]
        entry = await store.get_entry("ok")
        assert entry is not None and entry.value == "kept" and entry.version == 1

    async def test_edge_keys_are_accepted_and_round_trip(self, store: MemoryStore) -> None:
        for index, key in enumerate(GOOD_KEYS):
            entry = await store.set(key, index)
            assert entry.key == key
        assert await store.get_many(GOOD_KEYS) == {k: i for i, k in enumerate(GOOD_KEYS)}
        for key in GOOD_KEYS:
            assert await store.exists(key), key
        assert await store.keys() == sorted(GOOD_KEYS)
        assert sorted(await store.search("*")) == sorted(GOOD_KEYS)
        assert await store.delete_many(GOOD_KEYS) == len(GOOD_KEYS)
        assert await store.keys() == []

    async def test_bad_partitions_are_refused(self, store: MemoryStore) -> None:
        for partition in BAD_PARTITIONS:
            await raises_each(InvalidKeyError, _partition_calls(store, partition))
        assert await store.keys() == []
        assert await store.partitions() == []

    async def test_edge_partitions_are_accepted(self, store: MemoryStore) -> None:
        for index, partition in enumerate(GOOD_PARTITIONS):
            entry = await store.set(f"k{index}", index, partition=partition)
            assert entry.partition == partition
            assert await store.keys(partition=partition) == [f"k{index}"]
        assert await store.partitions() == sorted(GOOD_PARTITIONS)
        for partition in GOOD_PARTITIONS:
            assert await store.clear_partition(partition) == 1
        assert await store.partitions() == []

    async def test_bad_namespaces_are_refused(self, store: MemoryStore) -> None:
        bad: list[Any] = ["", "a" * 65, "a b", "a:b", "a/b", "a*", "\u00e9", "a\x00", 1, None]
        # fleetmem's own state (the hybrid tier's epochs) lives under this reserved prefix.
        bad += ["_fleetmem", "_fleetmem.hybrid", "_fleetmem-x"]
        for namespace in bad:
            with pytest.raises(InvalidKeyError):
                store.with_namespace(namespace)
        for namespace in ["x" * 64, "A-z_0.9", "-", ".", "_fleetme", "x_fleetmem", "_Fleetmem"]:
            view = store.with_namespace(namespace)
            assert view.namespace == namespace
            await view.close()
        assert not store.closed

    # ------------------------------------------------------------------ reads

    async def test_get_missing_returns_default(self, store: MemoryStore) -> None:
        marker = object()
        assert await store.get("missing") is None
        assert await store.get("missing", marker) is marker
        assert await store.get("missing", default=5) == 5
        assert await store.get_entry("missing") is None
        assert await store.exists("missing") is False

    async def test_stored_none_is_not_missing(self, store: MemoryStore) -> None:
        await store.set("null", None)
        assert await store.get("null", "default") is None
        entry = await store.get_entry("null")
        assert entry is not None and entry.value is None
        assert await store.exists("null") is True
        assert await store.get_many(["null"]) == {"null": None}
        assert await store.search("nul?") == {"null": None}

    async def test_get_many_keeps_order_omits_missing_and_dedups(self, store: MemoryStore) -> None:
        await store.set_many({"c": 3, "a": 1, "b": 2})
        result = await store.get_many(["b", "missing", "c", "a", "b", "c"])
        assert list(result.items()) == [("b", 2), ("c", 3), ("a", 1)]
        result = await store.get_many(iter(["a", "c"]))
        assert list(result.items()) == [("a", 1), ("c", 3)]
        assert await store.get_many([]) == {}
        assert await store.get_many(["x", "y"]) == {}

    # ------------------------------------------------------------------ deletes

    async def test_delete_and_delete_many_count_existing(self, store: MemoryStore) -> None:
        await store.set_many({"a": 1, "b": 2, "c": 3, "d": 4})
        assert await store.delete("a") is True
        assert await store.delete("a") is False
        assert await store.get("a") is None
        assert await store.delete("never") is False
        assert await store.delete_many(["b", "b", "c", "never"]) == 2
        assert await store.delete_many(["b", "c"]) == 0
        assert await store.delete_many([]) == 0
        assert await store.keys() == ["d"]

    # ------------------------------------------------------------------ keys()

    async def test_keys_ascend_by_code_point(self, store: MemoryStore) -> None:
        keys = [
            "b",
            "a",
            "Z",
            "a/b",
            "a\u00e9",
            "\U0001f600",
            "B",
            "a-b",
            "a0",
            "\uff21",
            "\u00e9",
            "~",
            " ",
            "a b",
            "a",
            "aa",
            "A",
        ]
        await store.set_many(dict.fromkeys(keys, 1))
        expected = sorted(set(keys))  # Python sorts str by code point
        assert expected[:3] == [" ", "A", "B"]
        assert await store.keys() == expected
        assert list(await store.search("*")) == expected
        half = await store.keys(limit=len(expected) // 2)
        assert half == expected[: len(expected) // 2]
        rest = await store.keys(after=half[-1])
        assert half + rest == expected

    async def test_keys_prefix_is_literal(self, store: MemoryStore) -> None:
        keys = [
            "a%",
            "a%b",
            "a_b",
            "axb",
            "a*b",
            "a[b",
            "a\\b",
            "a?b",
            "ab",
            "A%b",
            "\u00e91",
            "\u00e92",
            "e1",
            "\U0001f600x",
            "b",
        ]
        await store.set_many(dict.fromkeys(keys, 1))
        assert await store.keys("a%") == ["a%", "a%b"]
        assert await store.keys("a_") == ["a_b"]
        assert await store.keys("a*") == ["a*b"]
        assert await store.keys("a[") == ["a[b"]
        assert await store.keys("a\\") == ["a\\b"]
        assert await store.keys("a?") == ["a?b"]
        assert await store.keys("A") == ["A%b"]
        assert await store.keys("\u00e9") == ["\u00e91", "\u00e92"]
        assert await store.keys("\U0001f600") == ["\U0001f600x"]
        assert await store.keys("ab") == ["ab"]
        assert await store.keys("zz") == []
        assert await store.keys("a") == sorted(k for k in keys if k.startswith("a"))
        assert await store.keys("") == sorted(keys)

    async def test_keys_paging_with_limit_and_after(self, store: MemoryStore) -> None:
        items = {f"page/{i:02d}": i for i in range(23)}
        await store.set_many(items)
        await store.set_many({"pag": 0, "pagf": 0, "page": 0, "page0": 0})
        await store.set_many(dict.fromkeys(list(items)[1::2], 1), partition="odd")
        expected = sorted(items)

        async def walk(partition: str | None) -> tuple[list[str], int]:
            seen: list[str] = []
            after: str | None = None
            for pages in range(50):
                page = await store.keys("page/", partition=partition, limit=5, after=after)
                if not page:
                    return seen, pages
                assert len(page) <= 5
                seen.extend(page)
                after = page[-1]
            raise AssertionError("paging did not end")

        assert await walk(None) == (expected, 5)
        assert await walk("odd") == (expected[1::2], 3)
        assert await walk("default") == (expected[0::2], 3)
        assert await store.keys("page/", after="page/05x") == expected[6:]
        assert await store.keys("page/", after="page/22") == []
        assert await store.keys("page/", after="a") == expected
        assert await store.keys("page/", limit=100) == expected
        assert await store.keys("page/", limit=1) == ["page/00"]
        assert await store.keys(limit=0) == []
        assert await store.keys(after="page/21", limit=1) == ["page/22"]

    async def test_negative_limit_is_refused(self, store: MemoryStore) -> None:
        await store.set("k", 1)
        for limit in (-1, -100):
            with pytest.raises(ValueError):
                await store.keys(limit=limit)
            with pytest.raises(ValueError):
                await store.search("*", limit=limit)
        assert await store.search("*", limit=0) == {}
        assert await store.keys(limit=0) == []

    # ------------------------------------------------------------------ partitions

    async def test_partition_default_keep_and_move(self, store: MemoryStore) -> None:
        entry = await store.set("k", 1)
        assert entry.partition == "default"
        assert (await store.set("k", 2, partition="p1")).partition == "p1"
        assert (await store.set("k", 3)).partition == "p1"  # None keeps
        await store.set_many({"k": 4, "new": 0})
        assert (await self._entry(store, "k")).partition == "p1"
        assert (await self._entry(store, "new")).partition == "default"
        assert (await store.compare_and_set("k", 5, version=4)).partition == "p1"
        await store.incr("n")
        assert (await self._entry(store, "n")).partition == "default"
        await store.incr("n", partition="p2")
        assert (await self._entry(store, "n")).partition == "p2"
        await store.incr("n")
        assert (await self._entry(store, "n")).partition == "p2"
        assert await store.set_if_absent("s", 1, partition="p3") is True
        assert (await self._entry(store, "s")).partition == "p3"
        assert await store.set_if_absent("s", 2, partition="p4") is False
        assert (await self._entry(store, "s")).partition == "p3"
        await store.set_many({"k": 6, "new": 1}, partition="p2")
        assert (await self._entry(store, "k")).partition == "p2"
        assert (await self._entry(store, "new")).partition == "p2"
        assert (await store.compare_and_set("k", 7, version=6, partition="p5")).partition == "p5"
        assert await store.partitions() == ["p2", "p3", "p5"]
        assert await store.keys(partition="p2") == ["n", "new"]
        assert await store.keys(partition="nothing") == []
        # Moving keeps the version sequence and the creation time.
        entry = await self._entry(store, "k")
        assert entry.version == 7

    async def test_partitions_list_live_partitions_ascending(self, store: MemoryStore) -> None:
        assert await store.partitions() == []
        await store.set("a", 1, partition="zeta")
        await store.set("b", 1, partition="Alpha")
        await store.set("c", 1, partition="\u00e9t\u00e9")
        await store.set("d", 1)
        assert await store.partitions() == ["Alpha", "default", "zeta", "\u00e9t\u00e9"]
        await store.delete("a")
        await store.set("b", 2, partition="zeta")  # moves the last entry out of Alpha
        assert await store.partitions() == ["default", "zeta", "\u00e9t\u00e9"]
        assert await store.clear_partition("\u00e9t\u00e9") == 1
        assert await store.partitions() == ["default", "zeta"]

    async def test_clear_partition_and_clear_counts(self, store: MemoryStore) -> None:
        await store.set_many({f"p{i}": i for i in range(5)}, partition="p")
        await store.set_many({f"q{i}": i for i in range(3)}, partition="q")
        await store.set_many({f"d{i}": i for i in range(2)})
        assert await store.clear_partition("nothing") == 0
        assert await store.clear_partition("p") == 5
        assert await store.clear_partition("p") == 0
        assert await store.keys() == ["d0", "d1", "q0", "q1", "q2"]
        assert await store.partitions() == ["default", "q"]
        assert await store.clear() == 5
        assert await store.clear() == 0
        assert await store.keys() == []
        assert (await store.stats()).keys == 0
        # The store is still usable, and a key created again starts at version 1.
        assert (await store.set("p0", 1)).version == 1

    @staticmethod
    async def _entry(store: MemoryStore, key: str) -> Any:
        entry = await store.get_entry(key)
        assert entry is not None, f"{key!r} is missing"
        return entry

    async def test_non_str_key_is_a_fleetmem_error(self, store: MemoryStore) -> None:
        bad: Any = 42
        with pytest.raises(InvalidKeyError) as info:
            await store.get(bad)
        assert isinstance(info.value, FleetmemError)
        assert isinstance(info.value, ValueError)
