"""The LangGraph adapter's contract as pytest tests: :class:`LangGraphConformance`.

:class:`~fleetmem.integrations.langgraph.FleetmemStore` is LangGraph's ``BaseStore`` on a
fleetmem store; its behaviour is written in the docstrings of
:mod:`fleetmem.integrations.langgraph` and in ``docs/langgraph.md``, and LangGraph's own part
(ops, ``Item``, ``TTLConfig``) in ``langgraph.store.base``. This class checks it on the suite's
``store`` fixture (a fresh, empty fleetmem store in a namespace no other test uses), which each
test wraps in ``FleetmemStore(store)`` inside the test, so the adapter runs on the test's event
loop. The tests use only public APIs (the adapter's, LangGraph's ops and the fleetmem store's)
and never look at the backend's type: the same class runs on every backend.

LangGraph is an optional extra (``fleetmem[langgraph]``), so this module is not imported by
:mod:`fleetmem.testing.conformance`; import it by its own name::

    from fleetmem.testing.conformance.langgraph import LangGraphConformance

    class TestLangGraph(LangGraphConformance):
        pass  # with a ``store`` fixture in scope, as for StoreConformance

Importing this module without LangGraph installed raises fleetmem's
``MissingDependencyError`` (from the adapter). The tests write only in the fixture's namespace;
the fixture clears it afterwards. The expiry test waits for an item written with a TTL of a few
milliseconds to expire, polling up to ``langgraph_expiry_patience`` seconds (a class attribute).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, cast

import pytest
from langgraph.store.base import (
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    SearchItem,
    SearchOp,
)
from langgraph.store.base import InvalidNamespaceError as LangGraphNamespaceError

from fleetmem.errors import InvalidArgumentError, InvalidKeyError
from fleetmem.integrations.langgraph import (
    FleetmemStore,
    TTLConfig,
    UnsupportedFeatureWarning,
    item_key,
)
from fleetmem.store import Store
from fleetmem.testing.conformance._base import ConformanceBase, assert_same_json

Namespace = tuple[str, ...]

#: Labels that must round-trip exactly: path, glob and LIKE metacharacters, escapes written
#: literally, spaces, unicode and a control character.
ODD_LABELS: list[str] = [
    "a/b",
    "/",
    "*",
    "%",
    "_",
    "%2F",
    "%25",
    "caf\u00e9",
    "\U0001f600",
    "a b",
    " ",
    "\x01",
    "tab\there",
    "\x7f",
]

#: Item keys that must round-trip exactly (the key may hold ``/`` and be empty).
ODD_KEYS: list[str] = ["/", "//", "a//b", "%", "%2F", "", "x/y", "*", "\x01", "\u00fc"]

#: A namespace every test may use for its items.
NS: Namespace = ("users", "u1")


def _item(result: object) -> Item:
    assert isinstance(result, Item), f"expected an Item, got {result!r}"
    return result


def _short(key: str) -> str:
    return key if len(key) <= 40 else f"{key[:20]}...({len(key.encode())} bytes)"


def _keys(items: Sequence[Item]) -> list[str]:
    return [item.key for item in items]


def _pairs(items: Sequence[Item]) -> set[tuple[Namespace, str]]:
    return {(item.namespace, item.key) for item in items}


class LangGraphConformance(ConformanceBase):
    """The adapter's rules, as tests of ``FleetmemStore`` on the ``store`` fixture.

    ``langgraph_expiry_patience``
        How long (seconds) the expiry test waits for a millisecond-TTL item to expire.
    """

    pytestmark = [pytest.mark.asyncio]

    langgraph_expiry_patience: float = 10.0

    # ------------------------------------------------------------------ helpers

    def adapter(self, store: Store[Any], ttl: TTLConfig | None = None) -> FleetmemStore:
        """``FleetmemStore(store)`` (call it inside the test: it binds the running loop)."""
        return FleetmemStore(store, ttl=ttl)

    async def assert_ttl_near(self, store: Store[Any], key: str, seconds: float) -> None:
        left = await store.ttl(key)
        assert left is not None, f"{key!r} has no expiry, expected about {seconds} s"
        low = max(seconds / 2, seconds - 30)  # generous: a busy machine, a slow server
        assert low < left <= seconds + self.ttl_slack, f"ttl({key!r}) is {left}"

    async def assert_ttl_at_most(self, store: Store[Any], key: str, seconds: float) -> None:
        left = await store.ttl(key)
        assert left is not None, f"{key!r} lost its expiry"
        assert left <= seconds + self.ttl_slack, f"ttl({key!r}) is {left}, was refreshed"

    async def assert_entry_times(self, store: Store[Any], item: Item) -> None:
        entry = await store.get_entry(item_key(item.namespace, item.key))
        assert entry is not None, f"no entry under {item_key(item.namespace, item.key)!r}"
        assert item.created_at == entry.created_at
        assert item.updated_at == entry.updated_at

    # ------------------------------------------------------------ get, put, delete

    async def test_put_get_delete_round_trip(self, store: Store[Any]) -> None:
        """aput/aget/adelete round-trip an item whose fields are LangGraph's and whose times
        are the fleetmem entry's; a missing item is None and deleting it is no error."""
        lg = self.adapter(store)
        value = {
            "text": "caf\u00e9 \U0001f600",
            "n": 2**70,
            "x": 1.5,
            "flags": [True, False, None],
            "nested": {"a": {"b": [1, "two"]}},
        }
        assert await lg.aget(NS, "prefs") is None
        await lg.aput(NS, "prefs", value)
        item = _item(await lg.aget(NS, "prefs"))
        assert type(item.namespace) is tuple and item.namespace == NS
        assert item.key == "prefs"
        assert_same_json(item.value, value)
        assert isinstance(item.created_at, datetime) and item.created_at.tzinfo is not None
        assert item.created_at == item.updated_at
        await self.assert_entry_times(store, item)
        # The item lives in the fleetmem key the adapter documents.
        assert await store.keys() == [item_key(NS, "prefs")]
        assert item_key(NS, "prefs") == "users/u1//prefs"
        # Other namespaces and keys do not see it.
        assert await lg.aget(("users",), "prefs") is None
        assert await lg.aget(("users", "u1", "prefs"), "") is None
        assert await lg.aget(NS, "pref") is None
        await lg.adelete(NS, "prefs")
        assert await lg.aget(NS, "prefs") is None
        assert await store.keys() == []
        await lg.adelete(NS, "prefs")  # missing: nothing happens
        await lg.adelete(("never", "written"), "k")
        assert await lg.abatch([PutOp(("never",), "k", None)]) == [None]
        assert await store.keys() == []

    async def test_overwrite_keeps_created_at_and_moves_updated_at(self, store: Store[Any]) -> None:
        """A put over an item replaces its value, keeps created_at and moves updated_at; the
        times stay the fleetmem entry's, in aget and asearch alike."""
        lg = self.adapter(store)
        await lg.aput(NS, "k", {"v": 1, "old": True})
        first = _item(await lg.aget(NS, "k"))
        await asyncio.sleep(0.02)
        await lg.aput(NS, "k", {"v": 2})
        second = _item(await lg.aget(NS, "k"))
        assert second.value == {"v": 2}
        assert second.created_at == first.created_at
        assert second.updated_at > first.updated_at
        await self.assert_entry_times(store, second)
        (found,) = await lg.asearch(NS)
        assert isinstance(found, SearchItem)
        assert (found.namespace, found.key, found.value) == (NS, "k", {"v": 2})
        assert (found.created_at, found.updated_at) == (second.created_at, second.updated_at)
        assert found.score is None

    async def test_batch_put_none_deletes(self, store: Store[Any]) -> None:
        """A PutOp with value None deletes the item (and only it)."""
        lg = self.adapter(store)
        await lg.aput(NS, "a", {"v": 1})
        await lg.aput(NS, "b", {"v": 2})
        assert await lg.abatch([PutOp(NS, "a", None)]) == [None]
        assert await lg.aget(NS, "a") is None
        assert _item(await lg.aget(NS, "b")).value == {"v": 2}
        assert await store.keys() == [item_key(NS, "b")]

    # ------------------------------------------------------------- odd names

    async def test_odd_labels_and_keys_round_trip(self, store: Store[Any]) -> None:
        """Every label LangGraph allows and keys holding '/', '//', '%' or nothing come back
        exactly from aget, asearch and alist_namespaces, each in its own namespace only."""
        lg = self.adapter(store)
        written: dict[tuple[Namespace, str], dict[str, Any]] = {}
        for index, label in enumerate(ODD_LABELS):
            spaces: list[Namespace] = [(label,), ("x", label, "y")]
            for ns in spaces:
                for key in ODD_KEYS:
                    value = {"label": label, "key": key, "i": index}
                    await lg.aput(ns, key, value)
                    written[(ns, key)] = value
        for (ns, key), value in written.items():
            item = _item(await lg.aget(ns, key))
            assert (item.namespace, item.key, item.value) == (ns, key, value)
        for label in ODD_LABELS:
            found = await lg.asearch((label,), limit=1000)
            assert _pairs(found) == {((label,), key) for key in ODD_KEYS}, label
            for item in found:
                assert item.value == written[(item.namespace, item.key)]
            found = await lg.asearch(("x", label), limit=1000)
            assert _pairs(found) == {(("x", label, "y"), key) for key in ODD_KEYS}, label
        everything = await lg.asearch((), limit=10_000)
        assert _pairs(everything) == set(written)
        namespaces = await lg.alist_namespaces(limit=1000)
        assert sorted(namespaces) == sorted({ns for ns, _ in written})
        assert len(namespaces) == len(set(namespaces))
        for label in ODD_LABELS:
            if label == "*":  # a wildcard in a match path: every namespace of depth >= 1
                continue
            assert await lg.alist_namespaces(prefix=(label,)) == [(label,)]
            assert await lg.alist_namespaces(prefix=("x", label)) == [("x", label, "y")]
            assert await lg.alist_namespaces(suffix=(label,)) == [(label,)]
        assert await lg.alist_namespaces(prefix=("*",), limit=1000) == namespaces
        assert sorted(await lg.alist_namespaces(suffix=("*",), limit=1000)) == sorted(namespaces)
        # The fleetmem keys are the documented escapes.
        assert item_key(("a/b%c", "\u00fc"), "x/y") == "a%2Fb%25c/\u00fc//x/y"

    # ------------------------------------------------------------ prefix search

    async def test_search_prefix_respects_label_boundaries(self, store: Store[Any]) -> None:
        """A search under ("a", "b") finds ("a", "b") and ("a", "b", "c") but never
        ("a", "bc") or ("ab",); the empty prefix finds everything."""
        lg = self.adapter(store)
        spaces: list[Namespace] = [("a", "b"), ("a", "bc"), ("a", "b", "c"), ("ab",), ("a",)]
        for ns in spaces:
            await lg.aput(ns, "k", {"ns": list(ns)})
            await lg.aput(ns, "k2", {"ns": list(ns)})
        found = await lg.asearch(("a", "b"), limit=100)
        assert _pairs(found) == {(ns, k) for ns in spaces[0:3:2] for k in ("k", "k2")}
        found = await lg.asearch(("a",), limit=100)
        assert {item.namespace for item in found} == {
            ("a", "b"),
            ("a", "bc"),
            ("a", "b", "c"),
            ("a",),
        }
        found = await lg.asearch(("a", "b", "c"), limit=100)
        assert _pairs(found) == {(("a", "b", "c"), "k"), (("a", "b", "c"), "k2")}
        assert {item.namespace for item in await lg.asearch(("ab",))} == {("ab",)}
        assert await lg.asearch(("a", "b", "c", "d")) == []
        assert await lg.asearch(("b",)) == []
        assert _pairs(await lg.asearch((), limit=100)) == {
            (ns, k) for ns in spaces for k in ("k", "k2")
        }
        for item in found:
            assert item.value == {"ns": list(item.namespace)}

    # ------------------------------------------------------------ search order

    async def test_search_order_is_newest_first_then_key(self, store: Store[Any]) -> None:
        """Search returns items by updated_at, newest first (LangGraph's PostgreSQL store's
        order), ties by namespace and key; an overwrite moves an item to the front."""
        lg = self.adapter(store)
        for key in ("c", "a", "d", "b"):
            await lg.aput(NS, key, {"key": key})
            await asyncio.sleep(0.02)
        found = await lg.asearch(NS)
        assert _keys(found) == ["b", "d", "a", "c"]
        times = [item.updated_at for item in found]
        assert times == sorted(times, reverse=True) and len(set(times)) == 4
        await lg.aput(NS, "c", {"key": "c", "again": True})
        assert _keys(await lg.asearch(NS)) == ["c", "b", "d", "a"]
        # Items written by one batch (one call per TTL) may share updated_at: whatever the
        # backend's clock gives, the order is updated_at descending, then the item's key.
        batch = [PutOp(("t",), key, {"key": key}) for key in ("m", "k", "z", "l", "n")]
        await asyncio.sleep(0.02)
        await lg.abatch(batch)
        found = await lg.asearch((), limit=100)
        expected = sorted(
            found, key=lambda i: (-i.updated_at.timestamp(), item_key(i.namespace, i.key))
        )
        assert [(i.namespace, i.key) for i in found] == [(i.namespace, i.key) for i in expected]
        assert {i.key for i in found[:5]} == {"m", "k", "z", "l", "n"}  # the newest
        for item in found:
            await self.assert_entry_times(store, item)

    async def test_search_limit_and_offset(self, store: Store[Any]) -> None:
        """limit (default 10) and offset page through the ordered results; limit=0 is
        empty; a negative limit or offset is refused."""
        lg = self.adapter(store)
        keys = [f"k{i:02d}" for i in range(13)]
        for key in keys:
            await lg.aput(NS, key, {"key": key})
            await asyncio.sleep(0.005)
        newest_first = list(reversed(keys))
        everything = await lg.asearch(NS, limit=100)
        assert _keys(everything) == newest_first
        assert _keys(await lg.asearch(NS)) == newest_first[:10]  # the default limit
        assert _keys(await lg.asearch(NS, limit=3)) == newest_first[:3]
        assert _keys(await lg.asearch(NS, limit=3, offset=2)) == newest_first[2:5]
        assert _keys(await lg.asearch(NS, offset=10)) == newest_first[10:]
        assert _keys(await lg.asearch(NS, offset=12, limit=5)) == newest_first[12:]
        assert await lg.asearch(NS, limit=0) == []
        assert await lg.asearch(NS, offset=13) == []
        pages: list[str] = []
        for offset in range(0, 13, 4):
            pages += _keys(await lg.asearch(NS, limit=4, offset=offset))
        assert pages == newest_first
        (result,) = await lg.abatch([SearchOp(NS, limit=2, offset=1)])
        assert _keys(cast(list[SearchItem], result)) == newest_first[1:3]
        with pytest.raises(InvalidArgumentError):
            await lg.asearch(NS, limit=-1)
        with pytest.raises(InvalidArgumentError):
            await lg.asearch(NS, offset=-1)

    # ------------------------------------------------------------------ filters

    async def _filtered(self, lg: FleetmemStore, flt: dict[str, Any]) -> set[str]:
        return {item.key for item in await lg.asearch(NS, filter=flt, limit=1000)}

    async def test_filter_operators_compare_json_values(self, store: Store[Any]) -> None:
        """Plain values and $eq/$ne/$gt/$gte/$lt/$lte compare as JSON values: numbers as
        numbers (10 > 9, 9.5 < 10), strings with strings, true is not 1, $ne matches a
        missing field, an order operator skips fields of another kind, conditions AND."""
        lg = self.adapter(store)
        values: dict[str, dict[str, Any]] = {
            "ten": {"n": 10, "s": "x"},
            "nine": {"n": 9, "s": "y"},
            "nine.5": {"n": 9.5, "s": "x"},
            "text9": {"n": "9", "s": "x"},
            "true": {"n": True},
            "one": {"n": 1},
            "one.0": {"n": 1.0},
            "null": {"n": None},
            "missing": {"s": "x"},
            "list": {"n": [10]},
            "obj": {"n": {"v": 10}},
        }
        for key, value in values.items():
            await lg.aput(NS, key, value)
        every = set(values)
        cases: list[tuple[dict[str, Any], set[str]]] = [
            ({"n": {"$gt": 9}}, {"ten", "nine.5"}),
            ({"n": {"$gte": 9}}, {"ten", "nine", "nine.5"}),
            ({"n": {"$lt": 10}}, {"nine", "nine.5", "one", "one.0"}),
            ({"n": {"$lte": 9.5}}, {"nine", "nine.5", "one", "one.0"}),
            ({"n": {"$gt": 9.5}}, {"ten"}),
            ({"n": {"$gt": 9, "$lt": 10}}, {"nine.5"}),
            ({"n": {"$gte": 1, "$lte": 1}}, {"one", "one.0"}),
            ({"n": {"$gt": "8"}}, {"text9"}),
            ({"n": {"$lt": "9"}}, set()),
            ({"s": {"$gte": "x"}}, {"ten", "nine", "nine.5", "text9", "missing"}),
            ({"s": {"$gt": "x"}}, {"nine"}),
            ({"n": 10}, {"ten"}),
            ({"n": 10.0}, {"ten"}),
            ({"n": {"$eq": 9.5}}, {"nine.5"}),
            ({"n": 1}, {"one", "one.0"}),
            ({"n": True}, {"true"}),
            ({"n": {"$eq": True}}, {"true"}),
            ({"n": "9"}, {"text9"}),
            ({"n": 9}, {"nine"}),
            ({"n": None}, {"null"}),
            ({"n": [10]}, {"list"}),
            ({"n": {"v": 10}}, {"obj"}),
            ({"n": {"$ne": 1}}, every - {"one", "one.0"}),
            ({"n": {"$ne": True}}, every - {"true"}),
            ({"n": {"$ne": 10}}, every - {"ten"}),
            ({"s": {"$ne": "x"}}, every - {"ten", "nine.5", "text9", "missing"}),
            ({"n": {"$gt": 9}, "s": "x"}, {"ten", "nine.5"}),
            ({"n": {"$gte": 9}, "s": {"$ne": "x"}}, {"nine"}),
            ({"n": {"$gt": 100}, "s": "x"}, set()),
            ({"absent": {"$gt": 0}}, set()),
            ({"absent": {"$ne": 0}}, every),
            ({"absent": 0}, set()),
            ({}, every),
        ]
        for flt, expected in cases:
            assert await self._filtered(lg, flt) == expected, flt
        # A filter also works inside a batch, next to other ops.
        results = await lg.abatch(
            [SearchOp(NS, filter={"n": {"$gt": 9}}, limit=100), GetOp(NS, "ten")]
        )
        assert {i.key for i in cast(list[SearchItem], results[0])} == {"ten", "nine.5"}
        assert _item(results[1]).key == "ten"

    async def test_filter_big_integers_are_exact(self, store: Store[Any]) -> None:
        """Integers beyond a double's precision compare exactly: 2**63 + 1 > 2**63 and
        2**70 + 1 != 2**70, in equality and range filters alike."""
        lg = self.adapter(store)
        values = {"p63": 2**63, "q63": 2**63 + 1, "r70": 2**70, "s70": 2**70 + 1}
        for key, n in values.items():
            await lg.aput(NS, key, {"n": n})
        for key, n in values.items():
            assert_same_json(_item(await lg.aget(NS, key)).value, {"n": n})
        assert await self._filtered(lg, {"n": {"$gt": 2**63}}) == {"q63", "r70", "s70"}
        assert await self._filtered(lg, {"n": {"$lte": 2**63}}) == {"p63"}
        assert await self._filtered(lg, {"n": {"$lt": 2**70 + 1}}) == {"p63", "q63", "r70"}
        assert await self._filtered(lg, {"n": {"$gte": 2**70 + 1}}) == {"s70"}
        assert await self._filtered(lg, {"n": 2**70}) == {"r70"}
        assert await self._filtered(lg, {"n": 2**63 + 1}) == {"q63"}
        assert await self._filtered(lg, {"n": {"$ne": 2**70}}) == {"p63", "q63", "s70"}
        assert await self._filtered(lg, {"n": {"$gt": 2**63 + 0.5}}) == {"q63", "r70", "s70"}

    async def test_filter_nested_objects_and_arrays_by_members(self, store: Store[Any]) -> None:
        """A plain mapping (no $ member) or list must equal the field as a JSON value: objects
        by their members whatever the order, arrays element by element."""
        lg = self.adapter(store)
        await lg.aput(NS, "exact", {"meta": {"a": 1, "b": [1, {"c": True}]}, "tags": ["x", "y"]})
        await lg.aput(NS, "reordered", {"meta": {"b": [1, {"c": True}], "a": 1.0}})
        await lg.aput(NS, "more", {"meta": {"a": 1, "b": [1, {"c": True}], "d": 0}})
        await lg.aput(NS, "less", {"meta": {"a": 1}, "tags": ["y", "x"]})
        await lg.aput(NS, "truthy", {"meta": {"a": True, "b": [True, {"c": True}]}})
        await lg.aput(NS, "longer", {"tags": ["x", "y", "z"]})
        await lg.aput(NS, "scalar", {"meta": 1, "tags": "x"})
        wanted = {"meta": {"a": 1, "b": [1, {"c": True}]}}
        assert await self._filtered(lg, wanted) == {"exact", "reordered"}
        assert await self._filtered(lg, {"meta": {"$eq": wanted["meta"]}}) == {
            "exact",
            "reordered",
        }
        assert await self._filtered(lg, {"meta": {"a": 1}}) == {"less"}
        assert await self._filtered(lg, {"tags": ["x", "y"]}) == {"exact"}
        assert await self._filtered(lg, {"tags": ["y", "x"]}) == {"less"}
        assert await self._filtered(lg, {"tags": "x"}) == {"scalar"}
        assert await self._filtered(lg, {"meta": {"$ne": {"a": 1}}}) == {
            "exact",
            "reordered",
            "more",
            "truthy",
            "longer",
            "scalar",
        }

    async def test_bad_filters_are_refused_before_any_io(self, store: Store[Any]) -> None:
        """An unknown operator, or an order operator whose operand is not a finite number or
        a string, raises InvalidArgumentError and nothing of the batch is written."""
        lg = self.adapter(store)
        await lg.aput(NS, "kept", {"n": 1})
        bad_filters: list[dict[str, Any]] = [
            {"n": {"$regex": "a"}},
            {"n": {"$in": [1, 2]}},
            {"n": {"$gt": 1, "$exists": True}},
            {"n": {"$gt": None}},
            {"n": {"$gte": [1]}},
            {"n": {"$lt": {"a": 1}}},
            {"n": {"$lte": True}},
            {"n": {"$gt": float("nan")}},
            {"n": {"$lt": float("inf")}},
        ]
        for flt in bad_filters:
            with pytest.raises(InvalidArgumentError):
                await lg.asearch(NS, filter=flt)
            with pytest.raises(InvalidArgumentError):
                await lg.abatch(
                    [
                        PutOp(NS, "new", {"n": 2}),
                        PutOp(NS, "kept", None),
                        SearchOp(NS, filter=flt),
                    ]
                )
            assert await store.keys() == [item_key(NS, "kept")], flt
        assert _item(await lg.aget(NS, "kept")).value == {"n": 1}

    # ------------------------------------------------------------ vector search

    async def test_query_is_ignored_with_one_warning_per_adapter(self, store: Store[Any]) -> None:
        """A search query is ignored (same results as without it) with one
        UnsupportedFeatureWarning per adapter, however many queries follow."""
        lg = self.adapter(store)
        for key in ("a", "b", "c"):
            await lg.aput(NS, key, {"text": f"about {key}", "kind": key != "c"})
            await asyncio.sleep(0.005)
        plain = await lg.asearch(NS)
        filtered = await lg.asearch(NS, filter={"kind": True})
        with pytest.warns(UnsupportedFeatureWarning) as record:
            assert await lg.asearch(NS, query="about a") == plain
            assert await lg.asearch(NS, query="c", filter={"kind": True}) == filtered
            (batched,) = await lg.abatch([SearchOp(NS, query="b", limit=1)])
        assert len([w for w in record if w.category is UnsupportedFeatureWarning]) == 1
        assert _keys(cast(list[SearchItem], batched)) == _keys(plain)[:1]
        with pytest.warns(UnsupportedFeatureWarning) as record:
            assert await self.adapter(store).asearch(NS, query="again") == plain
        assert len(record) == 1
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            assert await lg.asearch(NS, query="once more") == plain
        assert quiet == []

    async def test_put_index_is_ignored_with_one_warning(self, store: Store[Any]) -> None:
        """A PutOp index list is ignored (the item is stored and found) with one
        UnsupportedFeatureWarning per adapter; index=False and index=None warn nothing."""
        lg = self.adapter(store)
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            await lg.aput(NS, "off", {"text": "t"}, index=False)
            await lg.aput(NS, "default", {"text": "t"}, index=None)
            await lg.abatch([PutOp(NS, "off2", {"text": "t"}, index=False)])
        assert quiet == []
        with pytest.warns(UnsupportedFeatureWarning) as record:
            await lg.aput(NS, "listed", {"text": "t"}, index=["text"])
            await lg.abatch([PutOp(NS, "listed2", {"text": "t"}, index=["text", "x"])])
        assert len([w for w in record if w.category is UnsupportedFeatureWarning]) == 1
        assert {i.key for i in await lg.asearch(NS, filter={"text": "t"})} == {
            "off",
            "default",
            "off2",
            "listed",
            "listed2",
        }
        with pytest.warns(UnsupportedFeatureWarning):
            await self.adapter(store).aput(NS, "other", {"text": "t"}, index=["text"])

    # ---------------------------------------------------------------------- TTL

    async def test_put_ttl_is_minutes(self, store: Store[Any]) -> None:
        """aput(ttl=minutes) gives the entry minutes * 60 seconds; ttl=None (and no
        TTLConfig) keeps it forever, also when it overwrites an item with a TTL."""
        lg = self.adapter(store)
        await lg.aput(NS, "ten", {"v": 1}, ttl=10)
        await lg.aput(NS, "half", {"v": 1}, ttl=0.5)
        await lg.aput(NS, "plain", {"v": 1})
        await lg.aput(NS, "none", {"v": 1}, ttl=None)
        await lg.abatch([PutOp(NS, "op", {"v": 1}, ttl=2)])
        await self.assert_ttl_near(store, item_key(NS, "ten"), 600)
        await self.assert_ttl_near(store, item_key(NS, "half"), 30)
        await self.assert_ttl_near(store, item_key(NS, "op"), 120)
        assert await store.ttl(item_key(NS, "plain")) is None
        assert await store.ttl(item_key(NS, "none")) is None
        await lg.aput(NS, "ten", {"v": 2}, ttl=None)
        assert await store.ttl(item_key(NS, "ten")) is None
        await lg.aput(NS, "plain", {"v": 2}, ttl=3)
        await self.assert_ttl_near(store, item_key(NS, "plain"), 180)
        bad_ttls: list[Any] = [0, -1, float("nan"), float("inf"), True, "5"]
        for bad in bad_ttls:
            with pytest.raises(InvalidArgumentError):
                await lg.aput(NS, "bad", {"v": 1}, ttl=bad)
        assert await lg.aget(NS, "bad") is None

    async def test_default_ttl_applies_when_no_ttl_is_given(self, store: Store[Any]) -> None:
        """TTLConfig default_ttl applies to a put that names no TTL; an explicit ttl=None
        (or another TTL) overrides it; a read refresh gives the default TTL back."""
        lg = self.adapter(store, ttl={"default_ttl": 5})
        await lg.aput(NS, "default", {"v": 1})
        await lg.aput(NS, "none", {"v": 1}, ttl=None)
        await lg.aput(NS, "own", {"v": 1}, ttl=1)
        await self.assert_ttl_near(store, item_key(NS, "default"), 300)
        assert await store.ttl(item_key(NS, "none")) is None
        await self.assert_ttl_near(store, item_key(NS, "own"), 60)
        await store.expire(item_key(NS, "default"), 5)
        assert _item(await lg.aget(NS, "default")).value == {"v": 1}
        await self.assert_ttl_near(store, item_key(NS, "default"), 300)
        await lg.aget(NS, "none")
        assert await store.ttl(item_key(NS, "none")) is None

    async def test_a_refresh_never_outlives_a_write_after_the_read(self, store: Store[Any]) -> None:
        """A read's TTL refresh applies only to the version it read: an item rewritten
        without a TTL between the read and the refresh stays persistent. The adapter's
        refresh is the backend's ``expire`` with the version read
        (``store.kv.expire(key, ttl_ms, version)``), which checks it atomically; the unit
        tests show the adapter passes the version it read."""
        lg = self.adapter(store)
        full = item_key(NS, "k")
        await lg.aput(NS, "k", {"v": 1}, ttl=10)
        old = await store.get_entry(full)
        assert old is not None
        await lg.aput(NS, "k", {"v": 2})  # persistent now, version + 1
        assert await store.kv.expire(full, 600_000, old.version) is False
        assert await store.ttl(full) is None
        assert await store.kv.expire(full, 5_000, old.version + 1) is True
        await self.assert_ttl_at_most(store, full, 5)
        assert await store.kv.expire(full, None, old.version + 1) is True
        assert await store.ttl(full) is None

    async def test_reads_refresh_the_ttl(self, store: Store[Any]) -> None:
        """aget, asearch and a GetOp give an item its whole TTL again by default; with
        refresh_ttl=False they leave its expiry alone; a persistent item stays persistent."""
        lg = self.adapter(store)
        full = item_key(NS, "k")
        await lg.aput(NS, "k", {"v": 1}, ttl=10)
        await lg.aput(NS, "forever", {"v": 1})

        async def shorten() -> None:
            assert await store.expire(full, 5) is True
            await self.assert_ttl_at_most(store, full, 5)

        await shorten()
        await lg.aget(NS, "k", refresh_ttl=False)
        await self.assert_ttl_at_most(store, full, 5)
        await lg.aget(NS, "k")
        await self.assert_ttl_near(store, full, 600)

        await shorten()
        assert _keys(await lg.asearch(NS, refresh_ttl=False, limit=100)) != []
        await self.assert_ttl_at_most(store, full, 5)
        await lg.asearch(NS, limit=100)
        await self.assert_ttl_near(store, full, 600)

        await shorten()
        await lg.abatch([GetOp(NS, "k", refresh_ttl=False), SearchOp(NS, refresh_ttl=False)])
        await self.assert_ttl_at_most(store, full, 5)
        await lg.abatch([GetOp(NS, "k")])
        await self.assert_ttl_near(store, full, 600)

        # A search refreshes only what it returns.
        await shorten()
        assert _keys(await lg.asearch(NS, filter={"v": 2})) == []
        await self.assert_ttl_at_most(store, full, 5)

        await lg.aget(NS, "forever")
        await lg.asearch(NS)
        assert await store.ttl(item_key(NS, "forever")) is None

    async def test_refresh_on_read_false_makes_reads_not_refresh(self, store: Store[Any]) -> None:
        """With TTLConfig refresh_on_read=False, aget and asearch leave the expiry alone
        unless the call asks for refresh_ttl=True."""
        lg = self.adapter(store, ttl={"refresh_on_read": False})
        full = item_key(NS, "k")
        await lg.aput(NS, "k", {"v": 1}, ttl=10)
        await store.expire(full, 5)
        assert _item(await lg.aget(NS, "k")).value == {"v": 1}
        assert len(await lg.asearch(NS)) == 1
        await self.assert_ttl_at_most(store, full, 5)
        await lg.aget(NS, "k", refresh_ttl=True)
        await self.assert_ttl_near(store, full, 600)
        await store.expire(full, 5)
        await lg.asearch(NS, refresh_ttl=True)
        await self.assert_ttl_near(store, full, 600)

    async def test_expired_items_are_never_returned(self, store: Store[Any]) -> None:
        """Once an item's TTL has run out, aget, asearch, alist_namespaces and a batch never
        return it, even with omit_expired=False and no sweeper; sweep_ttl counts freed
        entries; the sweeper methods are awaitable no-ops."""
        lg = self.adapter(store, ttl={"omit_expired": False})
        await lg.aput(("live",), "k", {"v": 1})
        await lg.aput(("gone",), "tiny", {"v": 1}, ttl=0.0005)  # 30 ms
        await lg.aput(("gone", "deep"), "short", {"v": 1}, ttl=10)
        assert _item(await lg.aget(("gone", "deep"), "short")).value == {"v": 1}
        assert await store.expire(item_key(("gone", "deep"), "short"), 0.05) is True
        gone = [item_key(("gone",), "tiny"), item_key(("gone", "deep"), "short")]
        deadline = time.monotonic() + self.langgraph_expiry_patience
        while await store.get_many(gone):
            assert time.monotonic() < deadline, "the short-TTL items did not expire"
            await asyncio.sleep(0.02)
        assert await lg.aget(("gone",), "tiny") is None
        assert await lg.aget(("gone", "deep"), "short") is None
        assert await lg.aget(("gone", "deep"), "short", refresh_ttl=False) is None
        assert _pairs(await lg.asearch(())) == {(("live",), "k")}
        assert await lg.asearch(("gone",)) == []
        assert await lg.alist_namespaces() == [("live",)]
        assert await lg.alist_namespaces(prefix=("gone",)) == []
        assert await lg.alist_namespaces(max_depth=1) == [("live",)]
        results = await lg.abatch(
            [
                GetOp(("gone",), "tiny"),
                SearchOp(("gone",)),
                ListNamespacesOp(),
            ]
        )
        assert results == [None, [], [("live",)]]
        sweeper = await lg.start_ttl_sweeper()
        await sweeper
        assert await lg.stop_ttl_sweeper() is True
        swept = await lg.sweep_ttl()
        assert type(swept) is int and 0 <= swept <= 2, swept
        assert await lg.aget(("gone",), "tiny") is None
        assert _item(await lg.aget(("live",), "k")).value == {"v": 1}

    # --------------------------------------------------------- list namespaces

    async def test_list_namespaces(self, store: Store[Any]) -> None:
        """alist_namespaces filters by prefix and suffix ('*' matches any one label), cuts
        to max_depth and deduplicates, pages with limit and offset, in one stable order,
        and lists only namespaces that hold a live item."""
        lg = self.adapter(store)
        spaces: list[Namespace] = [
            ("a", "b"),
            ("a", "b", "c"),
            ("a", "b", "d"),
            ("a", "b", "d", "e"),
            ("a", "c", "f"),
            ("users", "u1", "prefs"),
            ("users", "u2", "prefs"),
            ("x", "b"),
        ]
        for ns in spaces:
            await lg.aput(ns, "k", {"ns": list(ns)})
        await lg.aput(("a", "b", "c"), "k2", {"v": 2})
        assert await lg.alist_namespaces() == spaces  # ASCII letters: tuple order
        assert await lg.alist_namespaces() == spaces  # stable
        assert await lg.alist_namespaces(prefix=("a",)) == spaces[:5]
        assert await lg.alist_namespaces(prefix=("a", "b")) == spaces[:4]
        assert await lg.alist_namespaces(prefix=("a", "b", "d")) == spaces[2:4]
        assert await lg.alist_namespaces(prefix=("a", "*", "f")) == [("a", "c", "f")]
        assert await lg.alist_namespaces(prefix=("*", "b")) == [*spaces[:4], ("x", "b")]
        assert await lg.alist_namespaces(prefix=("a", "bc")) == []
        assert await lg.alist_namespaces(prefix=("users", "*", "prefs")) == spaces[5:7]
        assert await lg.alist_namespaces(suffix=("prefs",)) == spaces[5:7]
        assert await lg.alist_namespaces(suffix=("u1", "*")) == [("users", "u1", "prefs")]
        assert await lg.alist_namespaces(suffix=("b",)) == [("a", "b"), ("x", "b")]
        assert await lg.alist_namespaces(suffix=("*", "d")) == [("a", "b", "d")]
        assert await lg.alist_namespaces(prefix=("a",), suffix=("d",)) == [("a", "b", "d")]
        assert await lg.alist_namespaces(prefix=("*",), suffix=("*",)) == spaces
        assert await lg.alist_namespaces(prefix=("a", "b", "c", "d", "e")) == []
        # max_depth cuts and deduplicates; a namespace exactly that deep comes once.
        assert await lg.alist_namespaces(max_depth=2) == [
            ("a", "b"),
            ("a", "c"),
            ("users", "u1"),
            ("users", "u2"),
            ("x", "b"),
        ]
        assert await lg.alist_namespaces(max_depth=1) == [("a",), ("users",), ("x",)]
        assert await lg.alist_namespaces(prefix=("a", "b"), max_depth=3) == [
            ("a", "b"),
            ("a", "b", "c"),
            ("a", "b", "d"),
        ]
        assert await lg.alist_namespaces(prefix=("a", "b"), max_depth=2) == [("a", "b")]
        assert await lg.alist_namespaces(suffix=("prefs",), max_depth=1) == [("users",)]
        assert await lg.alist_namespaces(max_depth=10) == spaces
        # limit and offset page through the same order (with max_depth too).
        assert await lg.alist_namespaces(limit=3) == spaces[:3]
        assert await lg.alist_namespaces(limit=3, offset=3) == spaces[3:6]
        assert await lg.alist_namespaces(offset=6) == spaces[6:]
        assert await lg.alist_namespaces(limit=0) == []
        assert await lg.alist_namespaces(offset=100) == []
        assert await lg.alist_namespaces(max_depth=2, limit=2, offset=1) == [
            ("a", "c"),
            ("users", "u1"),
        ]
        pages: list[Namespace] = []
        for offset in range(0, len(spaces), 3):
            pages += await lg.alist_namespaces(limit=3, offset=offset)
        assert pages == spaces
        # Only namespaces with a live item are listed.
        await lg.adelete(("x", "b"), "k")
        await lg.adelete(("a", "b", "c"), "k")
        assert await lg.alist_namespaces() == spaces[:7]
        await lg.adelete(("a", "b", "c"), "k2")
        await lg.adelete(("a", "c", "f"), "k")
        assert await lg.alist_namespaces() == [spaces[0], *spaces[2:4], *spaces[5:7]]
        assert await lg.alist_namespaces(max_depth=2) == [
            ("a", "b"),
            ("users", "u1"),
            ("users", "u2"),
        ]
        with pytest.raises(InvalidArgumentError):
            await lg.alist_namespaces(max_depth=0)
        with pytest.raises(InvalidArgumentError):
            await lg.alist_namespaces(limit=-1)
        with pytest.raises(InvalidArgumentError):
            await lg.alist_namespaces(offset=-1)

    async def test_list_namespaces_order_is_the_key_order(self, store: Store[Any]) -> None:
        """The listing order is the documented one, the order of the namespaces' fleetmem
        keys: a label continued by a character below '/' (after escaping) sorts before its
        prefix, ("a-b",) before ("a",) before ("a", "b") before ("ab",)."""
        lg = self.adapter(store)
        spaces: list[Namespace] = [
            ("ab",),
            ("a", "b"),
            ("a",),
            ("a-b",),
            ("a b",),
            ("a%",),
            ("a/",),
            ("\u00e9",),
            ("a", "\x01"),
        ]
        for ns in spaces:
            await lg.aput(ns, "k", {"v": 1})
        expected = sorted(spaces, key=lambda ns: item_key(ns, ""))
        # "a//" (the items of ("a",)) sorts after "a/%01//" and "a-b//", before "a/b//".
        assert expected == [
            ("a b",),
            ("a%",),
            ("a/",),
            ("a-b",),
            ("a", "\x01"),
            ("a",),
            ("a", "b"),
            ("ab",),
            ("\u00e9",),
        ]
        listed = await lg.alist_namespaces()
        assert listed == expected
        assert await lg.alist_namespaces() == listed
        pages: list[Namespace] = []
        for offset in range(0, len(spaces), 2):
            pages += await lg.alist_namespaces(limit=2, offset=offset)
        assert pages == listed

    # -------------------------------------------------------------------- batch

    async def test_batch_results_in_op_order_reads_before_writes(self, store: Store[Any]) -> None:
        """abatch returns one result per op in op order; every read sees the store as it was
        before the batch's writes; then the writes apply."""
        lg = self.adapter(store)
        await lg.aput(NS, "old", {"v": "old"})
        results = await lg.abatch(
            [
                PutOp(NS, "new", {"v": "new"}),
                GetOp(NS, "old"),
                SearchOp(NS),
                ListNamespacesOp(),
                GetOp(NS, "new"),
                PutOp(NS, "old", None),
                GetOp(NS, "old"),
                PutOp(("other",), "k", {"v": 1}),
                ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("other",)),)),
                GetOp(("missing",), "k"),
            ]
        )
        assert len(results) == 10
        assert results[0] is None
        assert _item(results[1]).value == {"v": "old"}
        assert _keys(cast(list[SearchItem], results[2])) == ["old"]
        assert results[3] == [NS]
        assert results[4] is None
        assert results[5] is None
        assert _item(results[6]).value == {"v": "old"}
        assert results[7] is None
        assert results[8] == []
        assert results[9] is None
        assert await lg.aget(NS, "old") is None
        assert _item(await lg.aget(NS, "new")).value == {"v": "new"}
        assert await lg.alist_namespaces() == [("other",), NS]
        assert await lg.abatch([]) == []

    async def test_batch_last_write_of_a_key_wins(self, store: Store[Any]) -> None:
        """Several PutOps of one key in a batch: the last one wins, be it a put or a delete,
        whatever TTL the earlier ones had."""
        lg = self.adapter(store)
        await lg.aput(NS, "deleted", {"v": 0})
        await lg.abatch(
            [
                PutOp(NS, "twice", {"v": 1}),
                PutOp(NS, "twice", {"v": 2}),
                PutOp(NS, "deleted", {"v": 1}),
                PutOp(NS, "deleted", None),
                PutOp(NS, "revived", None),
                PutOp(NS, "revived", {"v": 3}),
                PutOp(NS, "ttl", {"v": 1}, ttl=10),
                PutOp(NS, "ttl", {"v": 4}),
                PutOp(NS, "ttl2", {"v": 1}),
                PutOp(NS, "ttl2", {"v": 5}, ttl=3),
            ]
        )
        assert _item(await lg.aget(NS, "twice")).value == {"v": 2}
        assert await lg.aget(NS, "deleted") is None
        assert _item(await lg.aget(NS, "revived")).value == {"v": 3}
        assert _item(await lg.aget(NS, "ttl")).value == {"v": 4}
        assert await store.ttl(item_key(NS, "ttl")) is None
        assert _item(await lg.aget(NS, "ttl2")).value == {"v": 5}
        await self.assert_ttl_near(store, item_key(NS, "ttl2"), 180)
        assert sorted(await store.keys()) == sorted(
            item_key(NS, k) for k in ("twice", "revived", "ttl", "ttl2")
        )

    async def test_invalid_namespace_in_a_batch_writes_nothing(self, store: Store[Any]) -> None:
        """An op with an invalid namespace (a label with '.', NUL or nothing, a non-str
        label, a non-tuple, an empty or 'langgraph'-rooted namespace for a put) raises an
        error that is both fleetmem's InvalidKeyError and LangGraph's InvalidNamespaceError,
        before any I/O: the batch's other writes do not happen."""
        lg = self.adapter(store)
        await lg.aput(NS, "kept", {"v": 1})
        bad_ops: list[Any] = [
            PutOp(("a.b",), "k", {"v": 1}),
            PutOp(("a", ""), "k", {"v": 1}),
            PutOp(("a", "b\x00"), "k", {"v": 1}),
            PutOp(("langgraph",), "k", {"v": 1}),
            PutOp(("langgraph", "x"), "k", {"v": 1}),
            PutOp((), "k", {"v": 1}),
            PutOp(cast(Any, ["a"]), "k", {"v": 1}),
            PutOp(cast(Any, "a"), "k", {"v": 1}),
            PutOp(cast(Any, ("a", 1)), "k", {"v": 1}),
            PutOp(("a.b",), "k", None),
            GetOp(("a.b",), "k"),
            GetOp(("",), "k"),
            GetOp(cast(Any, ["a"]), "k"),
            SearchOp(("x", "a.b")),
            SearchOp(("",)),
            ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("a.b",)),)),
            ListNamespacesOp(match_conditions=(MatchCondition("suffix", ("",)),)),
        ]
        for bad in bad_ops:
            for ops in ([PutOp(NS, "new", {"v": 2}), PutOp(NS, "kept", None), bad], [bad]):
                with pytest.raises(InvalidKeyError) as info:
                    await lg.abatch(cast(list[Op], ops))
                assert isinstance(info.value, LangGraphNamespaceError), bad
                assert await store.keys() == [item_key(NS, "kept")], bad
        # Reading under a 'langgraph' root is allowed (only writes are refused).
        assert await lg.abatch([GetOp(("langgraph",), "k")]) == [None]

    async def test_invalid_namespace_in_the_methods(self, store: Store[Any]) -> None:
        """aput, aget, adelete, asearch and alist_namespaces refuse an invalid namespace with
        an error that is both fleetmem's InvalidKeyError and LangGraph's
        InvalidNamespaceError, and write nothing."""
        lg = self.adapter(store)
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("aput dot", lambda: lg.aput(("a.b",), "k", {"v": 1})),
            ("aput empty label", lambda: lg.aput(("a", ""), "k", {"v": 1})),
            ("aput root", lambda: lg.aput(("langgraph",), "k", {"v": 1})),
            ("aput empty", lambda: lg.aput((), "k", {"v": 1})),
            ("aget dot", lambda: lg.aget(("a.b",), "k")),
            ("adelete dot", lambda: lg.adelete(("a.b",), "k")),
            ("asearch dot", lambda: lg.asearch(("a.b",))),
            ("asearch empty label", lambda: lg.asearch(("a", ""))),
            ("alist prefix dot", lambda: lg.alist_namespaces(prefix=("a.b",))),
            ("alist suffix empty", lambda: lg.alist_namespaces(suffix=("",))),
        ]
        failures = []
        for name, call in calls:
            with pytest.raises(LangGraphNamespaceError) as info:
                await call()
            if not isinstance(info.value, InvalidKeyError):
                error = type(info.value)
                failures.append(f"{name} raised {error.__module__}.{error.__qualname__}")
        assert await store.keys() == []
        assert failures == [], "; ".join(failures) + ": not fleetmem InvalidKeyErrors"

    async def test_key_over_1024_bytes_is_refused_before_any_io(self, store: Store[Any]) -> None:
        """An item whose whole fleetmem key passes 1024 UTF-8 bytes (escapes included) is
        refused with InvalidKeyError and nothing of its batch is written; 1024 is fine."""
        lg = self.adapter(store)
        ns = ("a",)  # "a//" + key
        longest = "k" * 1021
        await lg.aput(ns, longest, {"v": 1})
        assert _item(await lg.aget(ns, longest)).key == longest
        assert len(item_key(ns, longest).encode()) == 1024
        await lg.aput(ns, "kept", {"v": 1})
        too_long = [
            (ns, "k" * 1022),
            (ns, "\u00e9" * 511),  # 3 + 1022 bytes
            (ns, "%" * 341),  # escaped to %25: 3 + 1023 bytes
            (("/" * 341,), "k"),  # escaped to %2F: 1023 + 2 + 1 bytes
        ]
        assert all(len(item_key(n, k).encode()) > 1024 for n, k in too_long)
        before = sorted(await store.keys())
        for n, k in too_long:
            with pytest.raises(InvalidKeyError):
                await lg.aput(n, k, {"v": 1})
            for ttl in (None, 5):
                with pytest.raises(InvalidKeyError):
                    await lg.abatch(
                        [
                            PutOp(ns, "new", {"v": 2}),
                            PutOp(ns, "kept", None),
                            PutOp(n, k, {"v": 1}, ttl=ttl),
                        ]
                    )
                after = sorted(await store.keys())
                assert [_short(x) for x in after] == [_short(x) for x in before], (
                    f"a batch holding a {len(item_key(n, k).encode())}-byte key (ttl={ttl}) "
                    f"wrote: lost {[_short(x) for x in before if x not in after]}, "
                    f"gained {[_short(x) for x in after if x not in before]}"
                )

    # -------------------------------------------------------------------- sync

    async def test_sync_methods_work_from_a_worker_thread(self, store: Store[Any]) -> None:
        """put, get, search, list_namespaces, delete and batch called from a worker thread
        run on the adapter's loop and behave as their async forms."""
        lg = self.adapter(store)
        await asyncio.to_thread(lg.put, NS, "k", {"v": 1})
        await asyncio.to_thread(lambda: lg.put(NS, "t", {"v": 2}, ttl=5))
        item = _item(await asyncio.to_thread(lg.get, NS, "k"))
        assert (item.namespace, item.key, item.value) == (NS, "k", {"v": 1})
        await self.assert_entry_times(store, item)
        await self.assert_ttl_near(store, item_key(NS, "t"), 300)
        found = await asyncio.to_thread(lambda: lg.search(NS, filter={"v": 2}))
        assert _keys(found) == ["t"]
        assert await asyncio.to_thread(lg.list_namespaces) == [NS]
        results = await asyncio.to_thread(
            lg.batch, [GetOp(NS, "t"), PutOp(NS, "t", None), GetOp(NS, "missing")]
        )
        assert _item(results[0]).value == {"v": 2}
        assert results[1:] == [None, None]
        await asyncio.to_thread(lg.delete, NS, "k")
        assert await lg.aget(NS, "k") is None
        assert await lg.aget(NS, "t") is None
        assert await asyncio.to_thread(lg.get, NS, "k") is None
        assert await store.keys() == []

    async def test_sync_methods_on_the_loop_raise_invalid_state(self, store: Store[Any]) -> None:
        """A sync method called on the adapter's own event loop raises
        asyncio.InvalidStateError (it would block the loop it waits for) and does nothing."""
        lg = self.adapter(store)
        await lg.aput(NS, "k", {"v": 1})
        calls: list[Callable[[], object]] = [
            lambda: lg.put(NS, "new", {"v": 1}),
            lambda: lg.get(NS, "k"),
            lambda: lg.search(NS),
            lambda: lg.list_namespaces(),
            lambda: lg.delete(NS, "k"),
            lambda: lg.batch([PutOp(NS, "new", {"v": 1}), PutOp(NS, "k", None)]),
        ]
        for call in calls:
            with pytest.raises(asyncio.InvalidStateError):
                call()
        assert await store.keys() == [item_key(NS, "k")]
        assert _item(await lg.aget(NS, "k")).value == {"v": 1}
