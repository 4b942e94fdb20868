"""A LangGraph ``StateGraph`` compiled with ``store=FleetmemStore(...)``, end to end on SQLite
(a file in ``tmp_path``) and PostgreSQL (the harness's server).

One node reads a user's memories from the store, appends one (a uuid key, a value holding the
count it saw) and returns that count. Run three times for one user and once for another, the
counts are 0, 1, 2 and 0; the items are in fleetmem under the documented mapping with their
values; the namespaces listed are exactly the two users'. Both ways a graph meets a store: an
async node run with ``ainvoke`` on an adopted store, and a sync node run with ``invoke`` on a
``from_url`` adapter with its own loop thread. A second process then runs the same graph on
the same database, and this process sees its write.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from langgraph.config import get_store
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore

import fleetmem.sync
from fleetmem import open_store
from fleetmem.integrations.langgraph import FleetmemStore, item_key

USERS = ("alice", "bob/ext")  # "/" in a label: written %2F in fleetmem's key


class MemoryState(TypedDict, total=False):
    user_id: str
    seen: int


async def remember_async(state: MemoryState, *, store: BaseStore) -> dict[str, Any]:
    """Read the user's memories, append one holding the count seen, return that count."""
    assert get_store() is store
    namespace = ("memories", state["user_id"])
    seen = len(await store.asearch(namespace, limit=100))
    await store.aput(namespace, uuid.uuid4().hex, {"count": seen, "user": state["user_id"]})
    return {"seen": seen}


def remember_sync(state: MemoryState, *, store: BaseStore) -> dict[str, Any]:
    """:func:`remember_async` with the store's sync methods."""
    assert get_store() is store
    namespace = ("memories", state["user_id"])
    seen = len(store.search(namespace, limit=100))
    store.put(namespace, uuid.uuid4().hex, {"count": seen, "user": state["user_id"]})
    return {"seen": seen}


def build_graph(node: Callable[..., Any], store: FleetmemStore) -> Any:
    builder = StateGraph(MemoryState)
    builder.add_node("remember", node)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", END)
    return builder.compile(store=store)


#: The graph of this module, run once in a second process: argv url, namespace, user, mode.
_OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, sys, uuid
    from typing import TypedDict
    from langgraph.graph import END, START, StateGraph
    from langgraph.store.base import BaseStore
    from fleetmem.integrations.langgraph import FleetmemStore

    url, namespace, user, mode = sys.argv[1:5]

    class MemoryState(TypedDict, total=False):
        user_id: str
        seen: int

    def remember(state: MemoryState, *, store: BaseStore) -> dict:
        ns = ("memories", state["user_id"])
        seen = len(store.search(ns, limit=100))
        store.put(ns, uuid.uuid4().hex, {"count": seen, "user": state["user_id"]})
        return {"seen": seen}

    async def aremember(state: MemoryState, *, store: BaseStore) -> dict:
        ns = ("memories", state["user_id"])
        seen = len(await store.asearch(ns, limit=100))
        await store.aput(ns, uuid.uuid4().hex, {"count": seen, "user": state["user_id"]})
        return {"seen": seen}

    def build(node, store):
        builder = StateGraph(MemoryState)
        builder.add_node("remember", node)
        builder.add_edge(START, "remember")
        builder.add_edge("remember", END)
        return builder.compile(store=store)

    if mode == "sync":
        with FleetmemStore.from_url(url, namespace=namespace) as store:
            out = build(remember, store).invoke({"user_id": user})
    else:
        async def main():
            async with FleetmemStore.from_url(url, namespace=namespace) as store:
                return await build(aremember, store).ainvoke({"user_id": user})
        out = asyncio.run(main())
    print(json.dumps(out))
    """
)


def _run_other_process(url: str, namespace: str, user: str, mode: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, url, namespace, user, mode],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return out


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
        pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
    ]
)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fleetmem URL of the backend: a SQLite file, or the harness's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'langgraph.db'}"
    else:
        pytest.importorskip("asyncpg")
        yield request.getfixturevalue("fleetmem_postgres_server").dsn


def _counts(items: list[Any]) -> list[int]:
    return sorted(item.value["count"] for item in items)


# ------------------------------------------------------------------------- async


async def test_async_node_with_ainvoke(backend_url: str, fleetmem_namespace: str) -> None:
    """An async node on an adopted fleetmem store: counts 0, 1, 2 for one user and 0 for the
    other; the items are fleetmem entries under the mapping with the values written; the
    namespaces are exactly the two users'; a second process's run is seen here."""
    inner = await open_store(backend_url, namespace=fleetmem_namespace)
    adapter = FleetmemStore(inner)
    try:
        graph = build_graph(remember_async, adapter)
        first, second = USERS
        seen = [(await graph.ainvoke({"user_id": first}))["seen"] for _ in range(3)]
        assert seen == [0, 1, 2]
        assert (await graph.ainvoke({"user_id": second}))["seen"] == 0

        items = await adapter.asearch(("memories", first), limit=100)
        assert _counts(items) == [0, 1, 2]
        assert all(item.value["user"] == first for item in items)
        assert all(item.namespace == ("memories", first) for item in items)
        others = await adapter.asearch(("memories", second), limit=100)
        assert [(item.value, item.namespace) for item in others] == [
            ({"count": 0, "user": second}, ("memories", second))
        ]
        spaces = await adapter.alist_namespaces()
        assert sorted(spaces) == sorted(("memories", user) for user in USERS)
        assert len(spaces) == 2

        # The entries themselves, read from fleetmem (not through the adapter).
        for user, counts in ((first, [0, 1, 2]), (second, [0])):
            prefix = item_key(("memories", user), "")
            keys = await inner.keys(prefix)
            assert len(keys) == len(counts)
            values = await inner.get_many(keys)
            assert sorted(v["count"] for v in values.values()) == counts
            for item in await adapter.asearch(("memories", user), limit=100):
                assert keys.count(item_key(("memories", user), item.key)) == 1

        out = await asyncio.to_thread(
            _run_other_process, backend_url, fleetmem_namespace, first, "async"
        )
        assert out["seen"] == 3
        after = await adapter.asearch(("memories", first), limit=100)
        assert _counts(after) == [0, 1, 2, 3]
        assert (await graph.ainvoke({"user_id": first}))["seen"] == 4
        assert sorted(await adapter.alist_namespaces()) == sorted(spaces)
    finally:
        await adapter.aclose()
        assert not inner.closed  # adopted: still ours to clear and close
        await inner.clear()
        await inner.close()


# -------------------------------------------------------------------------- sync


def test_sync_node_with_invoke(backend_url: str, fleetmem_namespace: str) -> None:
    """A sync node on a ``from_url`` adapter used with no running loop (its own loop thread):
    the same counts, items and namespaces; a second process's run is seen here; after
    ``close`` the items are still there for a plain fleetmem store."""
    adapter = FleetmemStore.from_url(backend_url, namespace=fleetmem_namespace)
    first, second = USERS
    try:
        graph = build_graph(remember_sync, adapter)
        seen = [graph.invoke({"user_id": first})["seen"] for _ in range(3)]
        assert seen == [0, 1, 2]
        assert graph.invoke({"user_id": second})["seen"] == 0

        items = adapter.search(("memories", first), limit=100)
        assert _counts(items) == [0, 1, 2]
        assert all(item.value["user"] == first for item in items)
        others = adapter.search(("memories", second), limit=100)
        assert [item.value for item in others] == [{"count": 0, "user": second}]
        spaces = adapter.list_namespaces()
        assert sorted(spaces) == sorted(("memories", user) for user in USERS)
        assert len(spaces) == 2

        out = _run_other_process(backend_url, fleetmem_namespace, first, "sync")
        assert out["seen"] == 3
        assert _counts(adapter.search(("memories", first), limit=100)) == [0, 1, 2, 3]
        assert graph.invoke({"user_id": first})["seen"] == 4
    finally:
        adapter.close()
    assert adapter.store is not None and adapter.store.closed

    with fleetmem.sync.open_store(backend_url, namespace=fleetmem_namespace) as raw:
        try:
            for user, counts in ((first, [0, 1, 2, 3, 4]), (second, [0])):
                keys = raw.keys(item_key(("memories", user), ""))
                values = raw.get_many(keys)
                assert sorted(v["count"] for v in values.values()) == counts
                assert all(v["user"] == user for v in values.values())
        finally:
            raw.clear()
