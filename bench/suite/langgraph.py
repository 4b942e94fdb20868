"""``--only langgraph``: LangGraph's store API through fleetmem's adapter against LangGraph's own
PostgreSQL store, and what the adapter adds to the fleetmem call beneath it.

Two stores on one PostgreSQL server (the run's), holding the same items:

* ``fleetmem``: :class:`~fleetmem.integrations.langgraph.FleetmemStore` adopting a
  ``PostgresStore.from_url(dsn, namespace="bench-langgraph")`` opened with its defaults (a pool
  of at most :data:`POOL` connections: the connector's default ``max_size``);
* ``langgraph``: ``AsyncPostgresStore.from_conn_string(dsn, pool_config={"min_size": n,
  "max_size": n})`` with ``n`` the fleetmem store's ``max_size``, after ``setup()``; its own
  table ``store``, as LangGraph creates it.

The items, as a LangGraph user's memories: :data:`USERS` namespaces ``("memories", user)``
(``bench-user-0000`` ...) of :data:`ITEMS` items each, keys ``mem-00`` ..., values small dicts
``{"text": ..., "kind": "fact" | "preference", "n": j}`` (half of each user's items are
facts). Both stores are loaded with the same ``abatch`` of ``PutOp`` s, then checked to give
the same answers (the same items for a get, the same keys for a search, with and without the
filter) before anything is timed.

Workloads (rows; medians over the repetitions, min and max in the JSON):

* ``langgraph 64 coroutines aget`` / ``aput`` / ``asearch`` / ``asearch filter`` (ops/s, with
  ``... p50`` and ``... p99`` in µs per call), subjects ``fleetmem`` and ``langgraph``: 64
  coroutines (:func:`~suite.timing.concurrent_load`, the subjects alternating which goes first
  repetition by repetition) calling ``aget(ns, key)`` of a random existing item, ``aput(ns,
  key, value)`` overwriting a random item with its own value, ``asearch(ns, limit=10)`` of a
  random user, and ``asearch(ns, filter={"kind": "fact"}, limit=10)``. The random picks are
  drawn once (seeded) and are the same for both subjects. Target: fleetmem ≥ 2x LangGraph.
* ``langgraph adapter aget`` / ``aput`` / ``asearch`` (``... p50`` in µs and ops/s), one call
  at a time, interleaved call by call in a random order each turn
  (:func:`~suite.timing.interleaved_latency`): subject ``fleetmem`` is the adapter's call,
  the others the bare fleetmem call it makes -- ``get_entry`` (``store.get_entry(item_key(ns,
  key))``), ``set`` (``store.set(item_key(ns, key), value, partition="default")``),
  ``entries_page`` (``store.kv.entries_page(prefix, None, 1000)``, the one statement an
  ``asearch`` of a user issues) and, for information, ``search`` (``store.search(prefix +
  "*")``, the nearest public call). Target: the adapter ≤ 1.15x the bare call's p50.
* ``langgraph 1 coroutine aget`` / ``aput`` / ``asearch`` (``... p50`` in µs and ops/s): the
  adapter against LangGraph's store one call at a time, interleaved the same way (a separate
  pass: a peer's calls between two fleetmem calls leave the next one colder).

Targets are notes with their figure and verdict, never assertions. With ``--no-peers`` only
the adapter's overhead is measured. The run leaves nothing behind: it clears the fleetmem
namespace ``bench-langgraph`` and deletes LangGraph's rows of the namespaces
``memories.bench-user-*`` (the tables ``setup()`` created stay, as LangGraph's migrations
expect).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from .timing import load_average
from .workloads import Bench, Op1, Op2

NAMESPACE = "bench-langgraph"
USERS = 200
ITEMS = 20
COROUTINES = 64
SEARCH_LIMIT = 10
SEARCH_PAGE = 1000
FILTER = {"kind": "fact"}
#: LangGraph's ``prefix`` column of the bench's namespaces (labels joined by ``.``).
LANGGRAPH_PREFIX_LIKE = "memories.bench-user-%"
#: fleetmem over LangGraph at 64 coroutines; the adapter over the bare call, one at a time.
THROUGHPUT_TARGET = 2.0
OVERHEAD_TARGET = 1.15
OPS = ("aget", "aput", "asearch", "asearch filter")
#: The bare fleetmem calls each adapter call is measured against (the first: the target's).
BARE = {"aget": ("get_entry",), "aput": ("set",), "asearch": ("entries_page", "search")}


def langgraph_steps() -> int:
    """Progress steps of the section (with the peer): the load, the four 64-coroutine loads,
    the three overhead passes and the three one-coroutine passes."""
    return 1 + len(OPS) + 2 * len(BARE)


def user(u: int) -> str:
    return f"bench-user-{u:04d}"


def item(j: int) -> str:
    return f"mem-{j:02d}"


def value(u: int, j: int) -> dict[str, Any]:
    """The value of user ``u``'s item ``j`` (about 100 bytes of JSON)."""
    return {
        "text": f"{user(u)} said: I prefer short answers and dark mode (memory {j})",
        "kind": "fact" if j % 2 == 0 else "preference",
        "n": j,
    }


class _Items:
    """The bench's items, their fleetmem keys, and the random picks of the workloads."""

    def __init__(self, item_key: Callable[[tuple[str, ...], str], str]) -> None:
        self.namespaces = [("memories", user(u)) for u in range(USERS)]
        self.values = {(u, j): value(u, j) for u in range(USERS) for j in range(ITEMS)}
        self.full = {
            (u, j): item_key(self.namespaces[u], item(j))
            for u in range(USERS)
            for j in range(ITEMS)
        }
        # The key of item "" is the namespace's prefix and "/": a search reads the prefix.
        self.prefix = [item_key(ns, "")[:-1] for ns in self.namespaces]

    def picks(self, n: int, seed: int) -> list[tuple[int, int]]:
        """``n`` random (user, item) pairs, the same for every subject."""
        rng = random.Random(seed)
        return [(rng.randrange(USERS), rng.randrange(ITEMS)) for _ in range(n)]


async def bench_langgraph(bench: Bench, dsn: str | None) -> None:
    """The section on the run's PostgreSQL server (skipped with a note without one)."""
    notes = bench.report.notes
    if dsn is None:
        notes.append("langgraph skipped: no PostgreSQL server")
        return
    try:
        from fleetmem.backends.postgres import PostgresStore
        from fleetmem.integrations.langgraph import FleetmemStore, item_key
    except ImportError as exc:
        notes.append(f"langgraph skipped: {exc} (pip install -e '.[bench,langgraph]')")
        return
    items = _Items(item_key)
    load_before = load_average()
    store = await PostgresStore.from_url(dsn, namespace=NAMESPACE).connect()
    try:
        adapter = FleetmemStore(store)
        pool = store.kv.connector.max_size
        async with contextlib.AsyncExitStack() as stack:
            peer = await _langgraph(bench, dsn, pool, stack) if bench.peers else None
            _setup_note(bench, pool, peer is not None)
            bench.progress.step("langgraph: loading both stores")
            try:
                await _load(items, adapter, peer, dsn)
                await _check_same_answers(items, adapter, peer)
            except Exception as exc:  # fleetmem's, asyncpg's or psycopg's errors alike
                notes.append(f"langgraph stopped while loading: {type(exc).__name__}: {exc}")
                return
            if peer is not None:
                await _guarded(bench, "64 coroutines", _concurrent(bench, items, adapter, peer))
            await _guarded(bench, "adapter overhead", _overhead(bench, items, adapter, store))
            if peer is not None:
                await _guarded(bench, "1 coroutine", _one_coroutine(bench, items, adapter, peer))
            _verdicts(bench)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        with contextlib.suppress(Exception):
            await _delete_langgraph_rows(dsn)
        await store.close()
    if load_before:
        notes.append(
            f"langgraph: 1-minute load average {load_before} before the section, "
            f"{load_average()} after"
        )


async def _guarded(bench: Bench, what: str, run: Awaitable[None]) -> None:
    """Run a group of workloads; a failure (a timeout on a saturated machine, a server that
    went away) is a note and the section goes on with the next group."""
    try:
        await run
    except Exception as exc:  # fleetmem's, asyncpg's or psycopg's errors alike
        bench.report.notes.append(f"langgraph: {what} stopped: {type(exc).__name__}: {exc}")


async def _langgraph(bench: Bench, dsn: str, pool: int, stack: contextlib.AsyncExitStack) -> Any:
    try:
        from langgraph.store.postgres import AsyncPostgresStore
    except ImportError as exc:
        bench.report.notes.append(
            f"langgraph: LangGraph's store not installed ({exc}): pip install -e '.[bench]'; "
            "only the adapter's overhead is measured"
        )
        return None
    peer = await stack.enter_async_context(
        AsyncPostgresStore.from_conn_string(dsn, pool_config={"min_size": pool, "max_size": pool})
    )
    await peer.setup()
    return peer


def _setup_note(bench: Bench, pool: int, peer: bool) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    versions = ", ".join(
        f"{name} {v(name)}"
        for name in ("fleetmem", "langgraph", "langgraph-checkpoint-postgres", "psycopg", "asyncpg")
    )
    bench.report.notes.append(
        f"langgraph: {USERS} namespaces ('memories', user) of {ITEMS} items (~100-byte dicts, "
        f"half kind=fact) in each store; fleetmem: FleetmemStore(PostgresStore.from_url(dsn)), "
        f"its default pool of at most {pool} connections"
        + (
            f"; LangGraph: AsyncPostgresStore.from_conn_string(dsn, pool_config={{'min_size': "
            f"{pool}, 'max_size': {pool}}}), same server"
            if peer
            else "; LangGraph's store not measured"
        )
        + f"; {COROUTINES} coroutines x {bench.sizes.per_worker} calls per load and repetition, "
        f"{bench.n_single} interleaved calls per subject for the one-at-a-time passes, "
        f"{bench.reps} repetitions; versions: {versions}"
    )


# --------------------------------------------------------------------------- loading


async def _load(items: _Items, adapter: Any, peer: Any, dsn: str) -> None:
    from langgraph.store.base import PutOp

    await adapter.store.clear()
    await _delete_langgraph_rows(dsn)
    ops = [
        PutOp(items.namespaces[u], item(j), items.values[(u, j)])
        for u in range(USERS)
        for j in range(ITEMS)
    ]
    for start in range(0, len(ops), 1000):
        chunk = ops[start : start + 1000]
        await adapter.abatch(chunk)
        if peer is not None:
            await peer.abatch(chunk)


async def _check_same_answers(items: _Items, adapter: Any, peer: Any) -> None:
    """Both stores give the same items: what is timed is the same work. Raises RuntimeError."""
    expected_filter = sorted(item(j) for j in range(0, ITEMS, 2))
    for u in (0, USERS // 2, USERS - 1):
        ns = items.namespaces[u]
        stores = [("fleetmem", adapter)] + ([("langgraph", peer)] if peer is not None else [])
        for name, st in stores:
            got = await st.aget(ns, item(3))
            if got is None or got.value != items.values[(u, 3)]:
                raise RuntimeError(f"{name} aget of {ns} {item(3)} gave {got!r}")
            everything = await st.asearch(ns, limit=100)
            if sorted(i.key for i in everything) != [item(j) for j in range(ITEMS)]:
                raise RuntimeError(f"{name} asearch of {ns} found {len(everything)} items")
            facts = await st.asearch(ns, filter=FILTER, limit=100)
            if sorted(i.key for i in facts) != expected_filter:
                raise RuntimeError(f"{name} asearch of {ns} with {FILTER} found {len(facts)}")
            ten = await st.asearch(ns, limit=SEARCH_LIMIT)
            if len(ten) != SEARCH_LIMIT:
                raise RuntimeError(f"{name} asearch(limit={SEARCH_LIMIT}) found {len(ten)}")


async def _delete_langgraph_rows(dsn: str) -> None:
    """LangGraph's rows of the bench's namespaces (nothing when its table does not exist)."""
    try:
        import psycopg
    except ImportError:
        return
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        exists = await conn.execute("SELECT to_regclass('store') IS NOT NULL")
        row = await exists.fetchone()
        if row is not None and row[0]:
            await conn.execute("DELETE FROM store WHERE prefix LIKE %s", (LANGGRAPH_PREFIX_LIKE,))


# --------------------------------------------------------------------------- 64 coroutines


async def _concurrent(bench: Bench, items: _Items, adapter: Any, peer: Any) -> None:
    per = bench.sizes.per_worker
    picks = items.picks(COROUTINES * per, seed=22)
    users = [u for u, _ in picks]

    def call(pick: Callable[[int], Awaitable[Any]]) -> Op2:
        return lambda w, i: pick((w * per + i) % len(picks))

    def subjects(make: Callable[[Any], Op1]) -> dict[str, Op2]:
        return {"fleetmem": call(make(adapter)), "langgraph": call(make(peer))}

    def aget(st: Any) -> Op1:
        def op(k: int) -> Awaitable[Any]:
            u, j = picks[k]
            return st.aget(items.namespaces[u], item(j))  # type: ignore[no-any-return]

        return op

    def aput(st: Any) -> Op1:
        def op(k: int) -> Awaitable[Any]:
            u, j = picks[k]
            return st.aput(  # type: ignore[no-any-return]
                items.namespaces[u], item(j), items.values[(u, j)]
            )

        return op

    def asearch(st: Any) -> Op1:
        def op(k: int) -> Awaitable[Any]:
            return st.asearch(  # type: ignore[no-any-return]
                items.namespaces[users[k]], limit=SEARCH_LIMIT
            )

        return op

    def asearch_filter(st: Any) -> Op1:
        def op(k: int) -> Awaitable[Any]:
            return st.asearch(  # type: ignore[no-any-return]
                items.namespaces[users[k]], filter=FILTER, limit=SEARCH_LIMIT
            )

        return op

    store = adapter.store

    def bare_set(k: int) -> Awaitable[Any]:
        u, j = picks[k]
        return store.set(  # type: ignore[no-any-return]
            items.full[(u, j)], items.values[(u, j)], partition="default"
        )

    for name, make in (
        ("aget", aget),
        ("aput", aput),
        ("asearch", asearch),
        ("asearch filter", asearch_filter),
    ):
        chosen = subjects(make)
        if name == "aput":
            # The bare fleetmem write under the same load, for what the adapter costs and
            # what fleetmem's own write does against LangGraph's.
            chosen["set"] = call(bare_set)
        await bench.concurrent(f"langgraph {COROUTINES} coroutines {name}", chosen)


# --------------------------------------------------------------------------- one at a time


async def _overhead(bench: Bench, items: _Items, adapter: Any, store: Any) -> None:
    """The adapter against the bare fleetmem call it makes, interleaved call by call."""
    picks = items.picks(bench.n_single, seed=2022)
    kv = store.kv

    def at(i: int) -> tuple[int, int]:
        return picks[i % len(picks)]

    async def adapter_get(i: int) -> Any:
        u, j = at(i)
        return await adapter.aget(items.namespaces[u], item(j))

    async def bare_get(i: int) -> Any:
        return await store.get_entry(items.full[at(i)])

    async def adapter_put(i: int) -> Any:
        u, j = at(i)
        return await adapter.aput(items.namespaces[u], item(j), items.values[(u, j)])

    async def bare_put(i: int) -> Any:
        pick = at(i)
        return await store.set(items.full[pick], items.values[pick], partition="default")

    async def adapter_search(i: int) -> Any:
        return await adapter.asearch(items.namespaces[at(i)[0]], limit=SEARCH_LIMIT)

    async def bare_page(i: int) -> Any:
        return await kv.entries_page(items.prefix[at(i)[0]], None, SEARCH_PAGE)

    async def bare_search(i: int) -> Any:
        return await store.search(items.prefix[at(i)[0]] + "*")

    await bench.single(
        "langgraph adapter aget", {"fleetmem": adapter_get, "get_entry": bare_get}, paired=False
    )
    await bench.single(
        "langgraph adapter aput", {"fleetmem": adapter_put, "set": bare_put}, paired=False
    )
    await bench.single(
        "langgraph adapter asearch",
        {"fleetmem": adapter_search, "entries_page": bare_page, "search": bare_search},
        paired=False,
    )


async def _one_coroutine(bench: Bench, items: _Items, adapter: Any, peer: Any) -> None:
    """The adapter against LangGraph's store, one call at a time, interleaved."""
    picks = items.picks(bench.n_single, seed=2023)

    def at(i: int) -> tuple[int, int]:
        return picks[i % len(picks)]

    def subjects(make: Callable[[Any], Op1]) -> dict[str, Op1]:
        return {"fleetmem": make(adapter), "langgraph": make(peer)}

    def aget(st: Any) -> Op1:
        async def op(i: int) -> Any:
            u, j = at(i)
            return await st.aget(items.namespaces[u], item(j))

        return op

    def aput(st: Any) -> Op1:
        async def op(i: int) -> Any:
            u, j = at(i)
            return await st.aput(items.namespaces[u], item(j), items.values[(u, j)])

        return op

    def asearch(st: Any) -> Op1:
        async def op(i: int) -> Any:
            return await st.asearch(items.namespaces[at(i)[0]], limit=SEARCH_LIMIT)

        return op

    for name, make in (("aget", aget), ("aput", aput), ("asearch", asearch)):
        await bench.single(f"langgraph 1 coroutine {name}", subjects(make), paired=False)


# --------------------------------------------------------------------------- verdicts


def _verdicts(bench: Bench) -> None:
    report = bench.report
    notes = report.notes

    def median(workload: str, subject: str) -> float | None:
        row = report.get(workload, subject)
        return row.median if row is not None and row.values else None

    for op in OPS:
        w = f"langgraph {COROUTINES} coroutines {op}"
        mine, theirs = median(w, "fleetmem"), median(w, "langgraph")
        if mine is None or theirs is None:
            continue
        ratio = mine / theirs
        tails = ", ".join(
            f"{subject} p50 {median(w + ' p50', subject) or float('nan'):,.0f} µs "
            f"p99 {median(w + ' p99', subject) or float('nan'):,.0f} µs"
            for subject in ("fleetmem", "langgraph")
        )
        notes.append(
            f"langgraph target {COROUTINES} coroutines {op}: fleetmem ≥ {THROUGHPUT_TARGET:g}x "
            f"LangGraph's AsyncPostgresStore: {mine:,.0f} against {theirs:,.0f} ops/s, "
            f"{ratio:.2f}x ({'met' if ratio >= THROUGHPUT_TARGET else 'NOT met'}); {tails}"
        )
    for op, bare in BARE.items():
        w = f"langgraph adapter {op} p50"
        mine = median(w, "fleetmem")
        if mine is None:
            continue
        for i, subject in enumerate(bare):
            theirs = median(w, subject)
            if theirs is None:
                continue
            ratio = mine / theirs
            if i == 0:
                verdict = "met" if ratio <= OVERHEAD_TARGET else "NOT met"
                notes.append(
                    f"langgraph target adapter {op} p50 ≤ {OVERHEAD_TARGET}x the bare {subject}: "
                    f"{mine:,.1f} against {theirs:,.1f} µs, {ratio:.3f}x "
                    f"({mine - theirs:+,.1f} µs; {verdict})"
                )
            else:
                notes.append(
                    f"langgraph adapter {op} p50 against {subject} (for information): "
                    f"{mine:,.1f} against {theirs:,.1f} µs, {ratio:.3f}x"
                )
    for op in BARE:
        w = f"langgraph 1 coroutine {op} p50"
        mine, theirs = median(w, "fleetmem"), median(w, "langgraph")
        if mine is not None and theirs is not None:
            notes.append(
                f"langgraph 1 coroutine {op} p50: fleetmem {mine:,.1f} µs, LangGraph "
                f"{theirs:,.1f} µs (LangGraph's / fleetmem's: {theirs / mine:.2f}x)"
            )
