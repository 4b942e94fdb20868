"""``fleetmem.integrations.langgraph``: the machinery of :class:`FleetmemStore`, in process.

The import rule (``import fleetmem`` never imports LangGraph), the event loops (a store bound
to the loop it was adopted on, calls from other loops handed to it, sync calls from threads,
the deadlock guard on the home loop, the private loop thread of a sync-only adapter and its
end), the lifecycle of :meth:`FleetmemStore.from_url` (no I/O until first use, context
managers, owned vs adopted stores, durability on a SQLite file), validation before any I/O,
many concurrent calls, and the key mapping (round trip, namespace prefixes). Memory and SQLite
only; a LangGraph graph on SQLite and PostgreSQL is in
``tests/integration/test_langgraph_graph.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmem import (
    InMemoryStore,
    InvalidArgumentError,
    InvalidKeyError,
    StoreClosedError,
)
from fleetmem.backends.sqlite import SQLiteStore
from fleetmem.protocol import Entry
from fleetmem.store import Store

pytest.importorskip("langgraph")

from langgraph.store.base import (
    GetOp,
    ListNamespacesOp,
    PutOp,
    SearchOp,
    TTLConfig,
)

from fleetmem.integrations.langgraph import (
    FleetmemStore,
    item_key,
    split_item_key,
)

THREAD_NAME = "fleetmem-langgraph"


def _loop_threads() -> set[threading.Thread]:
    """The adapter loop threads alive now (compared before/after: other tests may own some)."""
    return {t for t in threading.enumerate() if t.name == THREAD_NAME}


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


class LoopRecordingStore(InMemoryStore):
    """An in-memory store that records the event loop each read and write ran on."""

    def __init__(self) -> None:
        super().__init__(namespace="lgloops")
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def get_entry(self, key: str) -> Entry | None:
        self.loops.append(asyncio.get_running_loop())
        return await super().get_entry(key)

    async def set(self, key: str, value: Any, **options: Any) -> Entry:
        self.loops.append(asyncio.get_running_loop())
        return await super().set(key, value, **options)


def _state(adapter: FleetmemStore) -> str:
    """``unopened``, ``open`` or ``closed``: the fleetmem store under ``adapter``."""
    store = adapter.store
    if store is None:
        return "unopened"
    return "closed" if store.closed else "open"


async def _sqlite(tmp_path: Path, namespace: str = "lg") -> SQLiteStore:
    return await SQLiteStore(tmp_path / "fleetmem.db", namespace=namespace).connect()


# ------------------------------------------------------------------------------- import


def test_import_fleetmem_does_not_import_langgraph() -> None:
    """``import fleetmem`` and ``import fleetmem.integrations`` leave LangGraph unimported
    (and the adapter module too); importing the adapter does import it, so the check sees."""
    loaded = _modules_after("import fleetmem\nimport fleetmem.integrations")
    assert "fleetmem.integrations" in loaded
    assert sorted(m for m in loaded if m == "langgraph" or m.startswith("langgraph.")) == []
    assert "fleetmem.integrations.langgraph" not in loaded

    with_adapter = _modules_after("import fleetmem.integrations.langgraph")
    assert {"langgraph", "langgraph.store.base"} <= with_adapter


# -------------------------------------------------------------------------------- loops


async def test_adopted_store_binds_the_running_loop_and_other_loops_are_handed_to_it() -> None:
    """Created inside a running loop, the adapter runs every store call on that loop: async
    calls made from a second event loop (``asyncio.run`` in another thread) work and their
    reads and writes run on the home loop, not on the caller's."""
    inner = LoopRecordingStore()
    home = asyncio.get_running_loop()
    adapter = FleetmemStore(inner)
    await adapter.aput(("users", "u1"), "home", {"from": "home"})

    def other_loop() -> tuple[
        Any, Any, list[Any], list[tuple[str, ...]], asyncio.AbstractEventLoop
    ]:
        async def calls() -> tuple[Any, Any, list[Any], list[tuple[str, ...]]]:
            await adapter.aput(("users", "u1"), "away", {"from": "away"})
            mine = await adapter.aget(("users", "u1"), "away")
            theirs = await adapter.aget(("users", "u1"), "home")
            found = await adapter.asearch(("users",))
            spaces = await adapter.alist_namespaces()
            return mine, theirs, found, spaces

        loop = asyncio.new_event_loop()
        try:
            return (*loop.run_until_complete(calls()), loop)
        finally:
            loop.close()

    mine, theirs, found, spaces, away_loop = await asyncio.to_thread(other_loop)
    assert away_loop is not home
    assert mine is not None and mine.value == {"from": "away"}
    assert theirs is not None and theirs.value == {"from": "home"}
    assert sorted(item.key for item in found) == ["away", "home"]
    assert spaces == [("users", "u1")]
    assert inner.loops, "the recording store saw no call"
    assert all(loop is home for loop in inner.loops)
    # The other loop is closed now: nothing of the adapter was left bound to it.
    got = await adapter.aget(("users", "u1"), "away")
    assert got is not None and got.value == {"from": "away"}
    await adapter.aclose()


async def test_adopted_sqlite_store_serves_a_second_loop_in_another_thread(
    tmp_path: Path,
) -> None:
    """On SQLite, a whole ``asyncio.run`` in another thread writes, reads and batches
    through an adopted store (the batch's reads see the store before its write), and the home
    loop goes on using the store after that other loop is gone."""
    inner = await _sqlite(tmp_path)
    adapter = FleetmemStore(inner)
    await adapter.aput(("docs",), "a", {"n": 1})

    def other_loop() -> list[Any]:
        async def calls() -> list[Any]:
            await adapter.aput(("docs",), "b", {"n": 2})
            return await adapter.abatch(
                [
                    GetOp(("docs",), "a"),
                    GetOp(("docs",), "b"),
                    SearchOp(("docs",), filter={"n": {"$gte": 2}}),
                    PutOp(("docs",), "c", {"n": 3}),
                    GetOp(("docs",), "c"),
                ]
            )

        return asyncio.run(calls())

    a, b, search, put, before_put = await asyncio.to_thread(other_loop)
    assert a.value == {"n": 1}
    assert b.value == {"n": 2}
    assert [item.key for item in search] == ["b"]
    assert put is None
    assert before_put is None
    got = await adapter.aget(("docs",), "c")
    assert got is not None and got.value == {"n": 3}
    await adapter.aclose()
    assert not inner.closed  # adopted: the adapter leaves it open
    await inner.close()


async def test_sync_calls_from_threads_run_on_the_home_loop(tmp_path: Path) -> None:
    """Sync methods called from worker threads (while the home loop runs) work, several
    threads at once, and each sees the others' writes afterwards."""
    inner = await _sqlite(tmp_path)
    adapter = FleetmemStore(inner)

    def worker(n: int) -> Any:
        adapter.put(("t", f"w{n}"), "k", {"n": n})
        got = adapter.get(("t", f"w{n}"), "k")
        return None if got is None else got.value

    values = await asyncio.gather(*[asyncio.to_thread(worker, n) for n in range(8)])
    assert values == [{"n": n} for n in range(8)]
    spaces = await asyncio.to_thread(adapter.list_namespaces, prefix=("t",))
    assert sorted(spaces) == sorted(("t", f"w{n}") for n in range(8))
    found = await asyncio.to_thread(adapter.search, ("t",), limit=100)
    assert sorted(item.value["n"] for item in found) == list(range(8))
    await adapter.aclose()
    await inner.close()


SYNC_CALLS: dict[str, Callable[[Any], Any]] = {
    "get": lambda s: s.get(("g",), "k"),
    "put": lambda s: s.put(("g",), "k", {"v": 2}),
    "delete": lambda s: s.delete(("g",), "k"),
    "search": lambda s: s.search(("g",)),
    "list_namespaces": lambda s: s.list_namespaces(),
    "batch": lambda s: s.batch([PutOp(("g",), "k", {"v": 2})]),
}


@pytest.mark.parametrize("call", list(SYNC_CALLS), ids=list(SYNC_CALLS))
async def test_sync_call_on_the_home_loop_raises_invalid_state(call: str) -> None:
    """A sync call on the adapter's own loop would block it (a deadlock): it raises
    ``asyncio.InvalidStateError`` at once, and a write in it did not happen."""
    inner = InMemoryStore(namespace="lghome")
    adapter = FleetmemStore(inner)
    await adapter.aput(("g",), "k", {"v": 1})
    with pytest.raises(asyncio.InvalidStateError):
        SYNC_CALLS[call](adapter)
    got = await adapter.aget(("g",), "k")
    assert got is not None and got.value == {"v": 1}
    await adapter.aclose()


# -------------------------------------------------------------------- sync-only from_url


def test_sync_only_from_url_runs_its_own_loop_thread_and_close_ends_it(tmp_path: Path) -> None:
    """With no running loop, ``from_url`` starts a loop thread on first use; put, get,
    search, list_namespaces and delete work; ``close`` stops that thread and closes the
    fleetmem store; a second close is fine; a call after close raises StoreClosedError."""
    before = _loop_threads()
    adapter = FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg")
    assert _state(adapter) == "unopened"
    assert _loop_threads() == before  # nothing started yet

    adapter.put(("users", "u1"), "a", {"n": 1})
    adapter.put(("users", "u1"), "b", {"n": 2})
    adapter.put(("users", "u2"), "a", {"n": 3})
    started = _loop_threads() - before
    assert len(started) == 1

    got = adapter.get(("users", "u1"), "a")
    assert got is not None and got.value == {"n": 1}
    found = adapter.search(("users", "u1"), filter={"n": 2})
    assert [(item.key, item.value) for item in found] == [("b", {"n": 2})]
    assert adapter.list_namespaces(prefix=("users",)) == [("users", "u1"), ("users", "u2")]
    adapter.delete(("users", "u1"), "a")
    assert adapter.get(("users", "u1"), "a") is None
    assert adapter.get(("users", "u1"), "b") is not None

    adapter.close()
    assert not (started & _loop_threads()), "the adapter's loop thread is still alive"
    assert _state(adapter) == "closed"
    adapter.close()  # idempotent
    with pytest.raises(StoreClosedError):
        adapter.get(("users", "u1"), "b")
    with pytest.raises(StoreClosedError):
        adapter.put(("users", "u1"), "c", {"n": 4})
    with pytest.raises(StoreClosedError):
        asyncio.run(adapter.aget(("users", "u1"), "b"))
    assert _loop_threads() <= before


def test_call_after_close_of_an_unused_adapter_starts_no_thread(tmp_path: Path) -> None:
    """An adapter closed before any use refuses a later sync call with StoreClosedError and
    leaves no loop thread running (nothing would ever stop it)."""
    before = _loop_threads()
    adapter = FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg")
    adapter.close()
    try:
        with pytest.raises(StoreClosedError):
            adapter.get(("users", "u1"), "a")
        leaked = _loop_threads() - before
        assert not leaked, f"a call after close started a loop thread: {leaked}"
    finally:
        adapter.close()  # stops such a thread, so that other tests do not see it
    assert not (tmp_path / "x.db").exists()


def test_with_from_url_opens_and_closes(tmp_path: Path) -> None:
    """``with FleetmemStore.from_url(...)`` opens the store on entry (the file exists
    before any item is written) and closes it and its loop thread on exit."""
    path = tmp_path / "x.db"
    before = _loop_threads()
    adapter = FleetmemStore.from_url(f"sqlite:///{path}", namespace="lg")
    assert not path.exists()
    with adapter as entered:
        assert entered is adapter
        assert _state(adapter) == "open"
        assert path.exists()
        adapter.put(("a",), "k", {"v": 1})
        got = adapter.get(("a",), "k")
        assert got is not None and got.value == {"v": 1}
    assert _state(adapter) == "closed"
    assert _loop_threads() <= before
    with pytest.raises(StoreClosedError):
        adapter.get(("a",), "k")


async def test_async_with_from_url_opens_and_closes(tmp_path: Path) -> None:
    """``async with FleetmemStore.from_url(...)`` opens the store on the running loop (no
    loop thread of its own) and closes it on exit; later calls raise StoreClosedError."""
    path = tmp_path / "x.db"
    before = _loop_threads()
    adapter = FleetmemStore.from_url(f"sqlite:///{path}", namespace="lg")
    assert not path.exists()
    async with adapter as entered:
        assert entered is adapter
        assert _state(adapter) == "open"
        assert path.exists()
        await adapter.aput(("a",), "k", {"v": 1})
        got = await adapter.aget(("a",), "k")
        assert got is not None and got.value == {"v": 1}
        assert _loop_threads() == before
    assert _state(adapter) == "closed"
    with pytest.raises(StoreClosedError):
        await adapter.aget(("a",), "k")
    await adapter.aclose()  # idempotent


def test_from_url_does_no_io(tmp_path: Path) -> None:
    """``from_url`` opens nothing: a file in a directory that does not exist yet is not an
    error until first use, and no file is created."""
    missing = tmp_path / "not-yet" / "x.db"
    adapter = FleetmemStore.from_url(f"sqlite:///{missing}", namespace="lg")
    assert _state(adapter) == "unopened"
    assert not missing.parent.exists()
    adapter.close()
    assert not missing.parent.exists()


def test_items_survive_into_a_second_adapter_on_the_same_file(tmp_path: Path) -> None:
    """What one ``from_url`` adapter wrote (then closed) a second adapter on the same SQLite
    file reads back: items, values, namespaces and search."""
    url = f"sqlite:///{tmp_path}/x.db"
    with FleetmemStore.from_url(url, namespace="lg") as first:
        first.put(("users", "u1"), "prefs", {"theme": "dark", "n": [1, 2]})
        first.put(("users", "u2"), "prefs", {"theme": "light"})
    with FleetmemStore.from_url(url, namespace="lg") as second:
        got = second.get(("users", "u1"), "prefs")
        assert got is not None and got.value == {"theme": "dark", "n": [1, 2]}
        assert second.list_namespaces() == [("users", "u1"), ("users", "u2")]
        found = second.search(("users",), filter={"theme": "light"})
        assert [(item.namespace, item.key) for item in found] == [(("users", "u2"), "prefs")]
    with FleetmemStore.from_url(url, namespace="other") as third:
        assert third.get(("users", "u1"), "prefs") is None  # the fleetmem namespace counts


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("namespace", ["bad ns", "", "a" * 1000])
def test_from_url_refuses_a_bad_fleetmem_namespace(tmp_path: Path, namespace: str) -> None:
    """A bad fleetmem namespace is an InvalidKeyError from ``from_url`` itself, before any
    I/O (no file is created)."""
    with pytest.raises(InvalidKeyError):
        FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace=namespace)
    assert not (tmp_path / "x.db").exists()


BAD_TTL_CONFIGS: list[Any] = [
    {"default_ttl": 5, "bogus": 1},
    {"refresh_on_read": "yes"},
    {"refresh_on_read": 1},
    {"default_ttl": 0},
    {"default_ttl": -1.5},
    {"default_ttl": float("nan")},
    "not a config",
]


@pytest.mark.parametrize("ttl", BAD_TTL_CONFIGS, ids=[repr(t) for t in BAD_TTL_CONFIGS])
def test_bad_ttl_config_is_refused_before_io(tmp_path: Path, ttl: Any) -> None:
    """An unknown TTLConfig field, a non-bool ``refresh_on_read``, a ``default_ttl`` that is
    not more than 0 (or not a TTLConfig at all) is an InvalidArgumentError from ``from_url``
    and from the adopting constructor, before any I/O."""
    with pytest.raises(InvalidArgumentError):
        FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg", ttl=ttl)
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(InvalidArgumentError):
        FleetmemStore(InMemoryStore(namespace="lg"), ttl=ttl)


def test_good_ttl_config_is_kept() -> None:
    """A valid TTLConfig is accepted and exposed as ``ttl_config`` (the contrast to the
    refusals above: the check is not refusing everything)."""
    config = TTLConfig(default_ttl=5, refresh_on_read=False)
    adapter = FleetmemStore(InMemoryStore(namespace="lg"), ttl=config)
    assert adapter.ttl_config == config


@pytest.mark.parametrize("inner", ["not a store", None, object()])
def test_adopting_something_else_than_a_store_is_refused(inner: Any) -> None:
    """``FleetmemStore(x)`` with anything but a fleetmem store raises InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError):
        FleetmemStore(inner)


def test_from_url_refuses_a_url_that_is_not_a_str() -> None:
    """A non-str URL is an InvalidArgumentError at once."""
    with pytest.raises(InvalidArgumentError):
        FleetmemStore.from_url(b"sqlite:///x.db")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ownership


async def test_aclose_leaves_an_adopted_store_open_and_closes_an_owned_one(
    tmp_path: Path,
) -> None:
    """Closing an adapter that adopted a store leaves that store open (its owner closes it);
    closing a ``from_url`` adapter closes the store it opened."""
    inner = await _sqlite(tmp_path)
    adopted = FleetmemStore(inner)
    await adopted.aput(("a",), "k", {"v": 1})
    await adopted.aclose()
    assert not inner.closed
    assert await inner.get(item_key(("a",), "k")) == {"v": 1}  # still usable

    owned = FleetmemStore.from_url(f"sqlite:///{tmp_path}/fleetmem.db", namespace="lg")
    got = await owned.aget(("a",), "k")
    assert got is not None and got.value == {"v": 1}
    assert owned.store is not None and owned.store is not inner
    await owned.aclose()
    assert _state(owned) == "closed"
    assert not inner.closed
    await inner.close()


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_concurrent_puts_then_gets_return_what_was_written(
    tmp_path: Path, backend: str
) -> None:
    """200 concurrent ``aput`` then 200 concurrent ``aget`` (merged into batches by the
    store) return exactly each item's own value; a search counts all 200."""
    inner: Store[Any] = (
        InMemoryStore(namespace="lgconc") if backend == "memory" else await _sqlite(tmp_path)
    )
    adapter = FleetmemStore(inner)
    spaces = [("conc", f"g{n % 7}") for n in range(200)]
    await asyncio.gather(
        *[adapter.aput(spaces[n], f"k{n}", {"n": n, "tag": f"v{n}"}) for n in range(200)]
    )
    items = await asyncio.gather(*[adapter.aget(spaces[n], f"k{n}") for n in range(200)])
    assert [None if item is None else item.value for item in items] == [
        {"n": n, "tag": f"v{n}"} for n in range(200)
    ]
    assert [None if item is None else (item.namespace, item.key) for item in items] == [
        (spaces[n], f"k{n}") for n in range(200)
    ]
    found = await adapter.asearch(("conc",), limit=1000)
    assert sorted(item.value["n"] for item in found) == list(range(200))
    assert len(await adapter.alist_namespaces(prefix=("conc",))) == 7
    await adapter.aclose()
    await inner.close()


# --------------------------------------------------------------------------------- keys

LABEL = st.text(min_size=1, max_size=12).filter(lambda s: "." not in s and "\x00" not in s)
NAMESPACE = st.lists(LABEL, min_size=1, max_size=4).map(tuple)
KEY = st.text(max_size=24)


@settings(max_examples=500, deadline=None)
@given(namespace=NAMESPACE, key=KEY)
def test_item_key_round_trips(namespace: tuple[str, ...], key: str) -> None:
    """``split_item_key(item_key(ns, key))`` gives back ``(ns, key)`` for every namespace
    LangGraph accepts (labels with ``/``, ``%``, control characters too) and every key."""
    full = item_key(namespace, key)
    assert split_item_key(full) == (namespace, key)


def _encoded_prefix(namespace: tuple[str, ...]) -> str:
    """The key prefix of every item under ``namespace``: what a search under it scans."""
    full = item_key(namespace, "")
    assert full.endswith("//")
    return full[:-1]


@settings(max_examples=500, deadline=None)
@given(namespace=NAMESPACE, other=NAMESPACE, key=KEY)
def test_namespace_prefix_matches_exactly_the_items_below_it(
    namespace: tuple[str, ...], other: tuple[str, ...], key: str
) -> None:
    """An item's key starts with a namespace's encoded prefix if and only if the item's
    namespace starts with that namespace label by label."""
    below = other[: len(namespace)] == namespace
    assert item_key(other, key).startswith(_encoded_prefix(namespace)) is below


@settings(max_examples=500, deadline=None)
@given(namespace=NAMESPACE, suffix=LABEL, rest=st.lists(LABEL, max_size=2), key=KEY)
def test_a_label_that_only_shares_a_string_prefix_is_not_matched(
    namespace: tuple[str, ...], suffix: str, rest: list[str], key: str
) -> None:
    """A namespace whose last label is a string prefix of another's label (``("a", "b")``
    vs ``("a", "bc", ...)``) never reaches that other namespace's items."""
    longer = (*namespace[:-1], namespace[-1] + suffix, *rest)
    assert not item_key(longer, key).startswith(_encoded_prefix(namespace))


def test_split_item_key_refuses_other_keys() -> None:
    """A fleetmem key the mapping did not make (no ``//``, or starting with it) is None."""
    assert split_item_key("plain-key") is None
    assert split_item_key("//k") is None
    assert split_item_key("a/b") is None


async def test_search_and_list_do_not_cross_label_prefixes() -> None:
    """Through the adapter: a search and a namespace listing under ``("a", "b")`` see none
    of ``("a", "bc")``'s or ``("a", "b/c")``'s items (labels whose text starts alike)."""
    inner = InMemoryStore(namespace="lgprefix")
    adapter = FleetmemStore(inner)
    await adapter.aput(("a", "b"), "k", {"v": "ab"})
    await adapter.aput(("a", "b", "x"), "k", {"v": "abx"})
    await adapter.aput(("a", "bc"), "k", {"v": "abc"})
    await adapter.aput(("a", "b/c"), "k", {"v": "a b/c"})
    await adapter.aput(("a", "b%"), "k", {"v": "a b%"})
    found = await adapter.asearch(("a", "b"), limit=100)
    assert sorted(item.value["v"] for item in found) == ["ab", "abx"]
    assert await adapter.alist_namespaces(prefix=("a", "b")) == [("a", "b"), ("a", "b", "x")]
    everything = await adapter.alist_namespaces(prefix=("a",))
    assert sorted(everything) == sorted(
        [("a", "b"), ("a", "b", "x"), ("a", "bc"), ("a", "b/c"), ("a", "b%")]
    )
    (listed,) = await adapter.abatch([ListNamespacesOp(match_conditions=None, max_depth=2)])
    assert isinstance(listed, list)
    assert sorted(cast("list[tuple[str, ...]]", listed)) == sorted(
        [("a", "b"), ("a", "bc"), ("a", "b/c"), ("a", "b%")]
    )
    await adapter.aclose()


# ----------------------------------------------------------------- review fixes


def _deleting_keys(store: Store[Any]) -> list[str]:
    """Make the store's ``kv.keys`` delete the second key of its first answer right after
    answering -- a delete landing between the seam's ``keys`` and ``get_entries`` calls."""
    kv = store.kv
    original = kv.keys
    deleted: list[str] = []

    async def keys(
        prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        found: list[str] = await original(prefix, partition, limit, after)
        if not deleted and len(found) > 1:
            deleted.append(found[1])
            await kv.delete(found[1])
        return found

    kv.keys = keys
    return deleted


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_delete_between_keys_and_entries_does_not_end_a_search(
    tmp_path: Path, backend: str
) -> None:
    """The seam's default entries_page fills a page a concurrent delete shortened: a short
    page means the end, so a walk over 1,500 items must still reach all 1,499 left."""
    store: Store[Any] = (
        InMemoryStore(namespace="lg") if backend == "memory" else await _sqlite(tmp_path)
    )
    try:
        adapter = FleetmemStore(store)
        await adapter.abatch([PutOp(("n",), f"k{i:04}", {"i": i}) for i in range(1500)])
        deleted = _deleting_keys(store)
        found = await adapter.asearch(("n",), limit=2000)
        assert len(deleted) == 1
        assert len(found) == 1499
        assert {item.key for item in found} == {f"k{i:04}" for i in range(1500)} - {
            split_item_key(deleted[0])[1]  # type: ignore[index]
        }
    finally:
        await store.close()


async def test_entries_page_comes_back_short_only_at_the_end() -> None:
    store = InMemoryStore(namespace="lg")
    await store.set_many({f"p/{i:04}": i for i in range(30)})
    _deleting_keys(store)
    page = await store.kv.entries_page("p/", None, 10)
    assert [e.key for e in page] == [f"p/{i:04}" for i in (0, *range(2, 11))]


async def test_a_ttl_below_a_millisecond_is_refused_before_any_write() -> None:
    store = InMemoryStore(namespace="lg")
    adapter = FleetmemStore(store)
    await adapter.aput(("a",), "old", {"v": 1})
    with pytest.raises(InvalidArgumentError):
        await adapter.abatch(
            [PutOp(("a",), "old", None), PutOp(("a",), "new", {"v": 2}, ttl=0.001 / 60 / 2)]
        )
    assert (await adapter.aget(("a",), "old")) is not None
    assert (await adapter.aget(("a",), "new")) is None
    await adapter.aput(("a",), "edge", {"v": 3}, ttl=0.001 / 60)  # exactly one millisecond


@pytest.mark.parametrize("ttl", [1e-6, 10**400, float("inf")])
def test_ttls_fleetmem_cannot_hold_are_refused_when_built(ttl: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        FleetmemStore(InMemoryStore(namespace="lg"), ttl=cast(TTLConfig, {"default_ttl": ttl}))
    with pytest.raises(InvalidArgumentError):
        FleetmemStore(InMemoryStore(namespace="lg")).put(("a",), "k", {"v": 1}, ttl=ttl)


async def test_integers_beyond_a_float_filter_exactly() -> None:
    adapter = FleetmemStore(InMemoryStore(namespace="lg"))
    await adapter.aput(("a",), "big", {"n": 10**400})
    await adapter.aput(("a",), "bigger", {"n": 10**400 + 1})
    found = await adapter.asearch(("a",), filter={"n": {"$gt": 10**400}})
    assert [item.key for item in found] == ["bigger"]
    assert [i.key for i in await adapter.asearch(("a",), filter={"n": {"$lt": 10**401}})] != []


async def test_a_lone_surrogate_in_a_label_is_an_invalid_namespace() -> None:
    from fleetmem.integrations.langgraph import InvalidNamespaceError

    adapter = FleetmemStore(InMemoryStore(namespace="lg"))
    with pytest.raises(InvalidNamespaceError):
        await adapter.aput(("d\ud800",), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        await adapter.asearch(("d\udfff",))


async def test_keys_with_escapes_the_adapter_never_writes_are_not_items() -> None:
    store = InMemoryStore(namespace="lg")
    adapter = FleetmemStore(store)
    await adapter.aput(("a/b",), "k", {"v": 1})
    await store.set("x%41//k", {"v": 2})  # '%41' is 'A', which the adapter writes as is
    await store.set("a%2fb//k", {"v": 3})  # lowercase hex
    assert await adapter.alist_namespaces() == [("a/b",)]
    assert [(i.namespace, i.key) for i in await adapter.asearch(())] == [(("a/b",), "k")]


def test_a_call_handed_to_a_stopped_loop_raises_instead_of_hanging() -> None:
    home = asyncio.new_event_loop()
    try:
        adapter = home.run_until_complete(_adopt(InMemoryStore(namespace="lg")))
        home.run_until_complete(adapter.aput(("a",), "k", {"v": 1}))

        async def elsewhere() -> None:
            await asyncio.wait_for(adapter.aget(("a",), "k"), timeout=60)

        with pytest.raises(StoreClosedError):
            asyncio.run(elsewhere())
        with pytest.raises(StoreClosedError):
            adapter.get(("a",), "k")
    finally:
        home.close()


async def _adopt(store: Store[Any]) -> FleetmemStore:
    return FleetmemStore(store)


def test_close_while_threads_call_leaves_no_thread_waiting(tmp_path: Path) -> None:
    adapter = FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg")
    adapter.put(("a",), "k", {"v": 1})
    outcomes: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                adapter.get(("a",), "k")
            except StoreClosedError:
                outcomes.append("closed")
                return
        outcomes.append("stopped")

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    adapter.close()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(outcomes) == 3


def test_a_from_url_adapter_moves_to_the_next_asyncio_run(tmp_path: Path) -> None:
    """A script (or a test per event loop) calling asyncio.run twice: the store opened on
    the first loop is closed and a new one opens on the second; the file keeps the data."""
    adapter = FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg")
    asyncio.run(adapter.aput(("a",), "k", {"v": 1}))
    first = adapter.store
    item = asyncio.run(adapter.aget(("a",), "k"))
    assert item is not None and item.value == {"v": 1}
    assert first is not None and first.closed
    assert adapter.store is not first
    asyncio.run(adapter.aclose())
    assert adapter.store is not None and adapter.store.closed


def test_aclose_on_a_later_loop_closes_the_owned_store(tmp_path: Path) -> None:
    adapter = FleetmemStore.from_url(f"sqlite:///{tmp_path}/x.db", namespace="lg")
    asyncio.run(adapter.aput(("a",), "k", {"v": 1}))
    asyncio.run(adapter.aclose())
    assert adapter.store is not None and adapter.store.closed


def test_an_adopted_store_does_not_move_to_another_loop() -> None:
    home = asyncio.new_event_loop()
    adapter = home.run_until_complete(_adopt(InMemoryStore(namespace="lg")))
    home.close()
    with pytest.raises(StoreClosedError):
        asyncio.run(adapter.aget(("a",), "k"))


def test_a_dropped_sync_adapter_stops_its_thread(tmp_path: Path) -> None:
    import gc
    import time

    before = _loop_threads()
    adapter: FleetmemStore | None = FleetmemStore.from_url("memory://", namespace="lg")
    assert adapter is not None
    adapter.put(("a",), "k", {"v": 1})
    assert len(_loop_threads() - before) == 1
    adapter = None
    deadline = time.monotonic() + 30
    while _loop_threads() - before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not _loop_threads() - before


def test_search_items_are_built_as_langgraph_builds_them() -> None:
    """The search's item builder skips ``Item.__init__`` only while LangGraph's items have
    the slots it sets; the items must equal those LangGraph's constructor makes."""
    import datetime as dt

    from langgraph.store.base import SearchItem

    from fleetmem.integrations import langgraph as adapter_module

    when = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    entry = Entry("a/b//k", {"v": 1}, "default", 1, when, when, None)
    made = adapter_module._search_item(("a", "b"), "k", entry)
    expected = SearchItem(("a", "b"), "k", {"v": 1}, when, when)
    assert made == expected
    assert made.score is None and made.dict() == expected.dict()
    assert adapter_module._search_item is adapter_module._search_item_fast


class _WriteAfterRead(InMemoryStore):
    """Every get_entry is followed by a write of the same key: it lands between the
    adapter's read and its TTL refresh."""

    write_value: Any = None
    write_ttl: float | None = None

    async def get_entry(self, key: str) -> Entry | None:
        entry = await super().get_entry(key)
        if self.write_value is not None:
            await self.set(key, self.write_value, ttl=self.write_ttl, partition="default")
        return entry


async def test_a_refresh_keeps_the_expiry_of_a_write_after_the_read() -> None:
    """The read returns the version it saw; its refresh must not touch the later write: a
    persistent write stays persistent, a write with a shorter TTL keeps it."""
    store = _WriteAfterRead(namespace="lg")
    adapter = FleetmemStore(store)
    full = item_key(("a",), "k")
    await adapter.aput(("a",), "k", {"v": 1}, ttl=10)
    store.write_value, store.write_ttl = {"v": 2}, None
    item = await adapter.aget(("a",), "k")
    assert item is not None and item.value == {"v": 1}
    assert await store.ttl(full) is None

    store.write_value = None
    await adapter.aput(("a",), "k", {"v": 3}, ttl=10)
    kv = store.kv
    original = kv.entries_page

    async def page_then_write(prefix: str, after: str | None, limit: int) -> list[Entry]:
        page: list[Entry] = await original(prefix, after, limit)
        await store.set(full, {"v": 4}, ttl=3, partition="default")
        return page

    kv.entries_page = page_then_write  # type: ignore[method-assign]
    found = await adapter.asearch(("a",))
    assert [i.value for i in found] == [{"v": 3}]
    left = await store.ttl(full)
    assert left is not None and left <= 3  # the search's refresh did not push it to 10 min
