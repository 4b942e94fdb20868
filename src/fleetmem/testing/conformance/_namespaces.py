"""``namespaces()``: which namespaces of the backend hold a live entry, paging, validation.

Other namespaces may exist on the same backend (other tests, other runs): every test looks
only at the names that start with the fixture's namespace, which no other test uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fleetmem.errors import InvalidArgumentError, InvalidKeyError, StoreClosedError
from fleetmem.protocol import MemoryStore
from fleetmem.testing.conformance._base import ConformanceBase, raises_each

_BAD_NAMES: list[Any] = ["a b", "a/b", "a:b", "\u00e9", "x" * 65, "a\x00", 1, b"ns", 1.5]


class NamespacesConformance(ConformanceBase):
    async def test_namespaces_lists_those_holding_a_live_entry(self, store: MemoryStore) -> None:
        ns = store.namespace
        assert await store.namespaces(ns) == []  # the fixture's store is empty
        async with self.sibling_namespaces(store, "b", "a", "-c", ".d", "_e", "f") as views:
            b, a, c, d, e, f = views
            await store.set("k", 1)
            await a.set("k", 1)
            await b.set_many({"k": 1, "l": 2})
            await c.set("k", 1)
            await d.set("k", 1, ttl=3600)
            await e.set("k", 1)
            expected = sorted([ns, ns + "a", ns + "b", ns + "-c", ns + ".d", ns + "_e"])
            assert await store.namespaces(ns) == expected
            # A namespace is listed while it holds a live entry, whatever emptied it.
            await c.delete("k")
            await e.clear()
            await f.set("k", 1)
            await f.delete_many(["k"])
            expected = sorted([ns, ns + "a", ns + "b", ns + ".d"])
            assert await store.namespaces(ns) == expected
            # Every view, and the namespace's own store, gives the same answer.
            assert await a.namespaces(ns) == expected
            assert await store.namespaces(ns + "a") == [ns + "a"]
            await store.clear()
            assert await store.namespaces(ns) == sorted([ns + "a", ns + "b", ns + ".d"])

    async def test_namespaces_pages_with_limit_and_after(self, store: MemoryStore) -> None:
        ns = store.namespace
        async with self.sibling_namespaces(store, "1", "2", "3", "4", "10") as views:
            for view in views:
                await view.set("k", 1)
            expected = sorted(view.namespace for view in views)
            assert await store.namespaces(ns) == expected
            assert await store.namespaces(ns, limit=2) == expected[:2]
            assert await store.namespaces(ns, limit=0) == []
            assert await store.namespaces(ns, limit=2**64) == expected
            assert await store.namespaces(ns, after=expected[1]) == expected[2:]
            assert await store.namespaces(ns, after=expected[1], limit=2) == expected[2:4]
            assert await store.namespaces(ns, after=expected[-1]) == []
            # ``after`` below the prefix starts at the prefix; a name that is not listed works.
            assert await store.namespaces(ns + "1", after="A") == [ns + "1", ns + "10"]
            assert await store.namespaces(ns, after=ns + "0") == expected
            pages: list[str] = []
            cursor: str | None = None
            while True:
                page = await store.namespaces(ns, limit=2, after=cursor)
                if not page:
                    break
                pages += page
                cursor = page[-1]
            assert pages == expected

    async def test_namespaces_without_prefix_lists_every_one_in_order(
        self, store: MemoryStore
    ) -> None:
        async with self.sibling_namespaces(store, "x") as (view,):
            await view.set("k", 1)
            await store.set("k", 1)
            every = await store.namespaces()
            assert every == sorted(set(every)), "ascending, each once"
            assert store.namespace in every and view.namespace in every
            assert not [name for name in every if name.startswith("_fleetmem")]
            assert await store.namespaces(limit=1) == every[:1]

    async def test_an_expired_namespace_is_not_listed(self, store: MemoryStore) -> None:
        ns = store.namespace
        ttl = self.expiry_ttl
        async with self.sibling_namespaces(store, "gone", "mixed", "later") as views:
            gone, mixed, later = views
            await gone.set("k", 1, ttl=ttl)
            await gone.set_many({"a": 1, "b": 2}, ttl=ttl)
            await mixed.set("k", 1, ttl=ttl)
            await mixed.set("stays", 1)
            await mixed.set("z", 1, ttl=ttl)
            await later.set("k", 1, ttl=3600)
            await later.set("j", 1, ttl=ttl)
            # An entry given a TTL and made persistent again keeps its namespace listed.
            await store.set("k", 1, ttl=ttl)
            await store.persist("k")
            assert await store.namespaces(ns) == sorted(v.namespace for v in [store, *views])
            await self.wait_for_expiry()
            assert await store.namespaces(ns) == sorted([ns, ns + "later", ns + "mixed"])
            # Written again, it is listed again.
            await gone.incr("n")
            assert await store.namespaces(ns + "gone") == [ns + "gone"]

    async def test_every_write_lists_the_namespace(self, store: MemoryStore) -> None:
        ns = store.namespace
        writes: dict[str, Callable[[MemoryStore], Awaitable[object]]] = {
            "s": lambda v: v.set("k", 1),
            "m": lambda v: v.set_many({"k": 1}),
            "a": lambda v: v.set_if_absent("k", 1),
            "c": lambda v: v.compare_and_set("k", 1, version=0),
            "i": lambda v: v.incr("k"),
        }
        async with self.sibling_namespaces(store, *writes) as views:
            for view, write in zip(views, writes.values(), strict=True):
                await write(view)
            assert await store.namespaces(ns) == sorted(v.namespace for v in views)

    async def test_reserved_namespaces_are_never_listed(self, store: MemoryStore) -> None:
        await store.set("k", 1)
        assert await store.namespaces("_fleetmem") == []
        assert await store.namespaces("_fleetmem.hybrid") == []
        assert await store.namespaces("_") == [
            name for name in await store.namespaces("_") if not name.startswith("_fleetmem")
        ]

    async def test_namespaces_refuses_bad_arguments_before_any_io(self, store: MemoryStore) -> None:
        view = store.with_namespace(store.namespace + "v")
        await view.close()  # a closed view: a bad argument is reported before anything else
        for target in (store, view):
            await raises_each(InvalidKeyError, _bad_name_calls(target))
            await raises_each(
                InvalidArgumentError,
                [
                    (f"namespaces(limit={bad!r})", _call(target, limit=bad))
                    for bad in [-1, "1", 1.5, True]
                ],
            )
        with pytest.raises(StoreClosedError):
            await view.namespaces()


def _call(store: MemoryStore, *args: Any, **kwargs: Any) -> Callable[[], Awaitable[object]]:
    return lambda: store.namespaces(*args, **kwargs)


def _bad_name_calls(store: MemoryStore) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    return [(f"namespaces({bad!r})", _call(store, bad)) for bad in _BAD_NAMES] + [
        (f"namespaces(after={bad!r})", _call(store, after=bad)) for bad in [*_BAD_NAMES, ""]
    ]
