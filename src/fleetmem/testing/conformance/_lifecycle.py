"""Stats, health, closing, views, the error hierarchy and namespace isolation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import fleetmem
import fleetmem.errors
from fleetmem.errors import FleetmemError, KeyNotFoundError, StoreClosedError
from fleetmem.protocol import Health, MemoryStore, StoreStats
from fleetmem.testing.conformance._base import ConformanceBase

Call = tuple[str, Callable[[], Awaitable[object]]]


def _every_call(store: MemoryStore) -> list[Call]:
    """One call of every method except ``health`` and ``close``."""
    return [
        ("get", lambda: store.get("k")),
        ("get_entry", lambda: store.get_entry("k")),
        ("get_many", lambda: store.get_many(["k"])),
        ("exists", lambda: store.exists("k")),
        ("set", lambda: store.set("k", 1)),
        ("set_many", lambda: store.set_many({"k": 1})),
        ("set_if_absent", lambda: store.set_if_absent("k", 1)),
        ("compare_and_set", lambda: store.compare_and_set("k", 1, version=0)),
        ("incr", lambda: store.incr("k")),
        ("delete", lambda: store.delete("k")),
        ("delete_many", lambda: store.delete_many(["k"])),
        ("ttl", lambda: store.ttl("k")),
        ("expire", lambda: store.expire("k", 10)),
        ("persist", lambda: store.persist("k")),
        ("keys", lambda: store.keys()),
        ("search", lambda: store.search("k*")),
        ("partitions", lambda: store.partitions()),
        ("clear_partition", lambda: store.clear_partition("p")),
        ("clear", lambda: store.clear()),
        ("cleanup_expired", lambda: store.cleanup_expired()),
        ("stats", lambda: store.stats()),
    ]


async def _assert_closed(store: MemoryStore) -> None:
    assert store.closed is True
    for name, call in _every_call(store):
        with pytest.raises(FleetmemError):
            await call()
            raise AssertionError(f"{name} worked on a closed store")
    with pytest.raises(StoreClosedError):
        await store.get("k")
    health = await store.health()
    assert isinstance(health, Health) and health.ok is False


class LifecycleConformance(ConformanceBase):
    """Stats, health, close, views, errors and isolation between namespaces."""

    async def test_stats_fields(self, store: MemoryStore) -> None:
        empty = await store.stats()
        assert isinstance(empty, StoreStats)
        assert (empty.namespace, empty.keys, empty.partitions) == (store.namespace, 0, {})
        assert empty.backend == store.backend and isinstance(empty.backend, str)
        assert empty.expired_pending == 0 and empty.bytes >= 0
        await store.set_many({"a": "x" * 1000, "b": 2}, partition="p")
        await store.set("c", [1, 2, 3])
        stats = await store.stats()
        assert stats.namespace == store.namespace
        assert stats.keys == 3
        assert stats.partitions == {"default": 1, "p": 2}
        assert isinstance(stats.bytes, int) and stats.bytes > 0
        assert isinstance(stats.expired_pending, int) and stats.expired_pending >= 0
        await store.delete("a")
        stats = await store.stats()
        assert (stats.keys, stats.partitions) == (2, {"default": 1, "p": 1})

    async def test_health(self, store: MemoryStore) -> None:
        health = await store.health()
        assert isinstance(health, Health)
        assert health.ok is True
        assert health.backend == store.backend
        assert health.latency_ms is not None and health.latency_ms >= 0
        assert isinstance(health.details, dict)

    async def test_close_is_idempotent_and_closes_every_call(self, store: MemoryStore) -> None:
        assert store.closed is False
        await store.close()
        await store.close()
        await _assert_closed(store)
        with pytest.raises(FleetmemError):
            store.with_namespace(store.namespace + "x")

    async def test_closing_a_view_leaves_the_store_open(self, store: MemoryStore) -> None:
        view = store.with_namespace(store.namespace + "v")
        same = store.with_namespace(store.namespace)
        assert (view.namespace, same.namespace) == (store.namespace + "v", store.namespace)
        await store.set("k", "parent")
        assert await same.get("k") == "parent"  # a view of the same namespace shares the data
        await same.set("k2", "via view")
        assert await store.get("k2") == "via view"
        await view.set("k", "view")
        assert await view.clear() == 1
        await view.close()
        await view.close()
        await _assert_closed(view)
        await same.close()
        assert store.closed is False
        assert await store.get("k") == "parent"
        assert (await store.health()).ok is True
        # Closing the store closes its views.
        other = store.with_namespace(store.namespace + "w")
        assert await store.clear() == 2
        await store.close()
        assert other.closed is True
        with pytest.raises(FleetmemError):
            await other.get("k")

    async def test_async_with_closes(self, store: MemoryStore) -> None:
        async with store as entered:
            assert isinstance(entered, MemoryStore)
            assert entered.namespace == store.namespace
            await entered.set("k", 1)
            assert await store.get("k") == 1
            assert await entered.clear() == 1
        assert store.closed is True
        await store.close()
        assert (await store.health()).ok is False

    async def test_async_with_closes_on_error(self, store: MemoryStore) -> None:
        view = store.with_namespace(store.namespace + "e")
        with pytest.raises(RuntimeError):
            async with view:
                raise RuntimeError("boom")
        assert view.closed is True
        assert store.closed is False
        assert await store.exists("k") is False

    async def test_errors_hierarchy(self, store: MemoryStore) -> None:
        e = fleetmem.errors
        expected: dict[str, tuple[type[BaseException], ...]] = {
            "InvalidKeyError": (ValueError,),
            "InvalidPatternError": (ValueError,),
            "SerializationError": (TypeError,),
            "ValueTooLargeError": (e.SerializationError, TypeError),
            "KeyNotFoundError": (KeyError,),
            "VersionConflictError": (),
            "BackendUnavailableError": (ConnectionError,),
            "OutcomeUnknownError": (e.BackendUnavailableError, ConnectionError),
            "ConfigurationError": (),
            "MissingDependencyError": (ImportError,),
            "SchemaVersionError": (),
            "NotANumberError": (TypeError,),
            "StoreClosedError": (),
        }
        for name, bases in expected.items():
            cls = getattr(e, name)
            assert getattr(fleetmem, name) is cls, name
            assert issubclass(cls, FleetmemError), name
            for base in bases:
                assert issubclass(cls, base), f"{name} is not a {base.__name__}"
        assert fleetmem.FleetmemError is FleetmemError
        with pytest.raises(KeyNotFoundError) as info:
            await store.ttl("missing")
        assert isinstance(info.value, KeyError)
        await store.set("k", 1)
        with pytest.raises(fleetmem.VersionConflictError) as conflict:
            await store.compare_and_set("k", 2, version=0)
        assert conflict.value.current_version == 1

    async def test_namespaces_are_isolated(self, store: MemoryStore) -> None:
        """Nothing in a sibling namespace (``a`` vs ``ab`` vs ``a.b``) is ever reached."""
        ttl = self.expiry_ttl
        async with self.sibling_namespaces(store, "x", "xb", "x.b", "x_b", "x-b") as views:
            subject, *siblings = views
            others: list[MemoryStore] = [store, *siblings]
            for index, other in enumerate(others):
                await other.set_many({"k": f"other{index}", "shared": index}, partition="p")
                # Keys that would collide if namespace and key were naively concatenated.
                await other.set_many({"b:k": 1, ".b:k": 1, "b/k": 1, "x:k": 1, "xb:k": 1})
                await other.set("old", 1, ttl=ttl, partition="p")
            await subject.set_many({"k": "mine", "mine": 1}, partition="p")
            await subject.set("old", 1, ttl=ttl, partition="p")
            await self.wait_for_expiry()

            assert await subject.get("shared") is None
            assert await subject.get("k") == "mine"
            assert await subject.get_many(["k", "shared", "b:k"]) == {"k": "mine"}
            assert await subject.exists("b/k") is False
            assert await subject.get_entry("x:k") is None
            assert await subject.keys() == ["k", "mine"]
            assert await subject.search("*") == {"k": "mine", "mine": 1}
            assert await subject.search("*k") == {"k": "mine"}
            assert await subject.search("shared") == {}
            assert await subject.partitions() == ["p"]
            stats = await subject.stats()
            assert (stats.namespace, stats.keys, stats.partitions) == (
                subject.namespace,
                2,
                {"p": 2},
            )
            if self.exact_expiry_accounting:
                assert stats.expired_pending == 1
                assert await subject.cleanup_expired() == 1
            else:
                assert await subject.cleanup_expired() <= 1
            with pytest.raises(KeyNotFoundError):
                await subject.ttl("shared")
            assert await subject.expire("shared", 10) is False
            assert await subject.persist("shared") is False
            assert await subject.delete("shared") is False
            assert await subject.delete_many(["shared", "b:k", "k"]) == 1
            assert await subject.clear_partition("p") == 1
            assert await subject.incr("shared") == 1
            assert await subject.set_if_absent("b:k", "mine") is True
            await subject.compare_and_set("x:k", "mine", version=0)
            assert await subject.clear() == 3

            for index, other in enumerate(others):
                assert await other.get_many(["k", "shared", "b:k", "x:k"]) == {
                    "k": f"other{index}",
                    "shared": index,
                    "b:k": 1,
                    "x:k": 1,
                }, other.namespace
                entry = await other.get_entry("shared")
                assert entry is not None and entry.version == 1
                stats = await other.stats()
                assert (stats.keys, stats.partitions) == (7, {"default": 5, "p": 2})
                if self.exact_expiry_accounting:
                    assert stats.expired_pending == 1, other.namespace
                assert await other.keys() == sorted(
                    ["k", "shared", "b:k", ".b:k", "b/k", "x:k", "xb:k"]
                )
