"""Snapshots on Redis (standalone and Cluster): where ``RedisSnapshots`` keeps them, what a
create killed midway leaves and how the next one repairs it, and the lock that serialises the
creates and deletes of a namespace across processes.

The conformance suite (``SnapshotConformance``) checks the contract on every backend; these
tests look at Redis itself: the snapshot keys (``fm:{<ns>}:S*``) sit in the namespace's slot and
out of sight of ``keys``, ``search``, ``stats``, ``namespaces()``, the export, the change feed,
``clear()`` and ``clear_partition()``; a process killed in the middle of a create leaves no
snapshot, and the next create drops what it wrote (the usage counts show it); two processes
creating and deleting at once end with every snapshot exact and nothing leaked.

Run as a script (``python test_redis_snapshots.py '<json spec>'``) this file is the worker
process of those tests (see :func:`_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, SnapshotNotFoundError
from fleetmem._codec import encode_value
from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis import snapshots as snapshots_mod
from fleetmem.backends.redis.snapshots import RedisSnapshots
from fleetmem.backends.seam import SnapshotBackend, record_bytes
from fleetmem.protocol import Entry
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

#: The snapshot keys of a namespace: catalog, keys with records, records, usage, lock.
SUFFIXES = ("Sc", "Sk", "Sh", "Su", "Sl")
#: The most a step may take on a loaded machine (seconds).
LIMIT = 60.0
WORKER = Path(__file__)


def snapshot_keys(namespace: str) -> list[str]:
    return [f"fm:{{{namespace}}}:{suffix}" for suffix in SUFFIXES]


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def store(
    request: pytest.FixtureRequest, fleetmem_namespace: str
) -> AsyncIterator[RedisStore]:
    """A store on the session's Redis, and on its Redis Cluster; its snapshot keys are
    deleted afterwards (``clear()`` leaves them, by design)."""
    fixture = "fleetmem_redis_server" if request.param == "standalone" else "fleetmem_redis_cluster"
    server: Any = request.getfixturevalue(fixture)
    created = RedisStore.from_url(server.url, namespace=fleetmem_namespace)
    async with connected_store(created) as connected:
        try:
            yield connected
        finally:
            if not connected.closed:
                await raw(connected).delete(*snapshot_keys(fleetmem_namespace))


@pytest.fixture
async def standalone(fleetmem_redis_server: Any, fleetmem_namespace: str) -> AsyncIterator[Any]:
    """A store on the session's standalone Redis (whose URL the worker processes get)."""
    created = RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    async with connected_store(created) as connected:
        try:
            yield connected
        finally:
            if not connected.closed:
                await raw(connected).delete(*snapshot_keys(fleetmem_namespace))


def raw(store: RedisStore) -> Any:
    """The store's own redis-py client (standalone or Cluster), for looking at keys."""
    return store.kv.connector.client


def snaps(store: RedisStore) -> SnapshotBackend:
    return store.kv.snapshots()


async def entries(backend: SnapshotBackend, name: str, prefix: str = "") -> list[Entry]:
    async with contextlib.aclosing(backend.pages(name, prefix, None, 97)) as pages:
        return [entry async for page in pages for entry in page]


async def live(store: RedisStore) -> list[Entry]:
    async with contextlib.aclosing(store.kv.export_pages("", None, 97)) as pages:
        return [entry async for page in pages for entry in page]


def entry_bytes(entry: Entry) -> int:
    """What a record of ``entry`` counts (the stored JSON is the compact encoding)."""
    return record_bytes(entry.key, len(encode_value(entry.value)), entry.partition)


# ---------------------------------------------------------------- where snapshots live


async def test_snapshot_keys_sit_in_the_namespace_slot_out_of_sight(
    store: RedisStore, fleetmem_namespace: str
) -> None:
    ns = fleetmem_namespace
    key_slot = pytest.importorskip("redis.crc").key_slot
    await store.changes.enable()
    big = {"n": 2**70 + 1, "f": 0.1, "s": "é{x}"}
    await store.set("a", big)
    await store.set("b", [1, 2], partition="p1")
    await store.set("c", "ttl", ttl=3600)
    head = (await store.changes.read()).cursor
    backend = snaps(store)
    row = await backend.create("s1")
    taken = await live(store)
    assert row.keys == 3
    assert row.bytes == sum(entry_bytes(e) for e in taken)
    assert await entries(backend, "s1") == taken  # every field exact, big integers too
    assert (await entries(backend, "s1"))[0].value == big

    client = raw(store)
    slot = key_slot(f"fm:{{{ns}}}:e:a".encode())
    for key in snapshot_keys(ns)[:4]:  # the lock is gone once the create is done
        assert await client.exists(key) == 1, key
        assert key_slot(key.encode()) == slot
    assert await client.exists(snapshot_keys(ns)[4]) == 0

    # Out of sight of every read, count and listing of the namespace, and of its feed.
    assert await store.keys() == ["a", "b", "c"]
    assert sorted(await store.search("*")) == ["a", "b", "c"]
    assert (await store.stats()).keys == 3
    assert await store.kv.partitions() == ["default", "p1"]
    assert [e.key for e in await live(store)] == ["a", "b", "c"]
    assert (await store.changes.read(head)).changes == []

    # clear_partition() and clear() leave the snapshots alone; a namespace holding only
    # snapshots is not listed.
    before = await backend.usage()
    await store.clear_partition("p1")
    await store.clear()
    assert await store.keys() == []
    assert (await store.stats()).keys == 0
    assert ns not in await store.namespaces(ns)
    for key in snapshot_keys(ns)[:4]:
        assert await client.exists(key) == 1, key
    assert await backend.usage() == before
    assert [r.name for r in await backend.list()] == ["s1"]
    assert await entries(backend, "s1") == taken

    # And a create on the emptied namespace: nothing live, every record closed, none added.
    row2 = await backend.create("s2")
    assert (row2.keys, row2.bytes) == (0, 0)
    assert await entries(backend, "s2") == []
    assert await entries(backend, "s1") == taken
    assert await backend.delete("s1") is True
    assert await backend.usage() == (0, 0)
    assert await client.hlen(f"fm:{{{ns}}}:Sh") == 0
    assert await client.zcard(f"fm:{{{ns}}}:Sk") == 0
    assert await client.exists(f"fm:{{{ns}}}:Su") == 0  # no hash of zeros left behind


async def test_pages_read_by_prefix_and_partition_in_key_order(store: RedisStore) -> None:
    await store.set_many({f"k/{i:03d}": i for i in range(250)})
    await store.set_many({f"k/{i:03d}x": i for i in range(0, 250, 7)}, partition="odd")
    await store.set("l", "other")
    backend = snaps(store)
    await backend.create("s")
    await store.set_many({f"k/{i:03d}": -i for i in range(0, 250, 3)})
    await store.delete("l")
    taken = {e.key: e for e in await entries(backend, "s")}
    assert len(taken) == 250 + 36 + 1
    assert list(taken) == sorted(taken)
    for prefix, partition in [("k/1", None), ("k/", "odd"), ("", "default"), ("zz", None)]:
        async with contextlib.aclosing(backend.pages("s", prefix, partition, 10)) as pages:
            got = [page async for page in pages]
        assert all(0 < len(page) <= 10 for page in got)
        want = [
            e
            for k, e in taken.items()
            if k.startswith(prefix) and (partition is None or e.partition == partition)
        ]
        assert [e for page in got for e in page] == want


async def test_pages_of_a_missing_or_half_deleted_snapshot_are_not_found(
    store: RedisStore, fleetmem_namespace: str
) -> None:
    backend = snaps(store)
    with pytest.raises(SnapshotNotFoundError):
        await entries(backend, "nope")
    await store.set("k", 1)
    await backend.create("s")
    # A delete that marked the row and died: hidden, not found, its name free.
    catalog = f"fm:{{{fleetmem_namespace}}}:Sc"
    stored = json.loads(await raw(store).hget(catalog, "s"))
    await raw(store).hset(catalog, "s", json.dumps({**stored, "deleting": True}))
    assert await backend.get("s") is None
    assert await backend.list() == []
    with pytest.raises(SnapshotNotFoundError):
        await entries(backend, "s")
    # Pages being read when a delete begins end with the error, not quietly short.
    await raw(store).hset(catalog, "s", json.dumps(stored))
    await store.set_many({f"m{i:03d}": i for i in range(30)})
    await backend.create("t")
    async with contextlib.aclosing(backend.pages("t", "", None, 10)) as pages:
        assert len(await pages.__anext__()) == 10
        row_t = json.loads(await raw(store).hget(catalog, "t"))
        await raw(store).hset(catalog, "t", json.dumps({**row_t, "deleting": True}))
        with pytest.raises(SnapshotNotFoundError):
            async for _ in pages:
                pass
    await raw(store).hset(catalog, "s", json.dumps({**stored, "deleting": True}))
    await store.delete_many([f"m{i:03d}" for i in range(30)])
    # The next create finishes both deletes first (their records freed), then takes the name.
    await store.set("k", 2)
    row = await backend.create("s")
    assert [e.value for e in await entries(backend, "s")] == [2]
    assert await backend.usage() == (1, row.bytes)


# ---------------------------------------------------------------- the lock


async def test_a_create_waits_for_the_lock_and_gives_up_at_its_deadline(
    store: RedisStore, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = f"fm:{{{fleetmem_namespace}}}:Sl"
    await store.set("k", 1)
    backend = snaps(store)
    await raw(store).set(lock, "another process", px=60_000)
    monkeypatch.setattr(RedisSnapshots, "lock_wait", 0.3)
    with pytest.raises(BackendUnavailableError, match="locked"):
        await backend.create("s")
    with pytest.raises(BackendUnavailableError, match="locked"):
        await backend.delete("s")
    assert await backend.list() == []
    assert await raw(store).get(lock) == b"another process"  # never taken nor released
    # A create waits (polling) while the lock is held, and goes ahead once it is free.
    monkeypatch.setattr(RedisSnapshots, "lock_wait", LIMIT)
    task = asyncio.create_task(backend.create("s"))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await backend.list() == []
    await raw(store).delete(lock)
    row = await asyncio.wait_for(task, LIMIT)
    assert row.keys == 1
    assert await raw(store).exists(lock) == 0  # released


async def test_a_create_that_loses_its_lock_stops_and_the_next_repairs(
    store: RedisStore, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = f"fm:{{{fleetmem_namespace}}}:Sl"
    await store.set_many({f"k{i:04d}": i for i in range(400)})
    backend = snaps(store)
    first = await backend.create("a")
    a = await entries(backend, "a")
    await store.set_many({f"k{i:04d}": -i for i in range(400)})
    monkeypatch.setattr(snapshots_mod, "_PAGE", 10)  # one write call per 10 keys
    flushed = asyncio.Event()
    original = RedisSnapshots._flush

    async def flush(self: RedisSnapshots, *args: Any) -> None:
        await original(self, *args)
        flushed.set()
        await asyncio.sleep(0.01)

    monkeypatch.setattr(RedisSnapshots, "_flush", flush)
    task = asyncio.create_task(backend.create("b"))
    await asyncio.wait_for(flushed.wait(), LIMIT)
    await raw(store).set(lock, "taken over", px=60_000)  # as if it had expired and been taken
    with pytest.raises(BackendUnavailableError, match="lost its lock"):
        await task
    assert await raw(store).get(lock) == b"taken over"  # not released by the loser
    assert [r.name for r in await backend.list()] == ["a"]
    records = (await backend.usage())[0]
    assert 400 < records < 800  # some records of "b" were written, invisible
    assert await entries(backend, "a") == a
    await raw(store).delete(lock)
    monkeypatch.setattr(RedisSnapshots, "_flush", original)
    second = await backend.create("b")
    assert await entries(backend, "b") == await live(store)
    assert await backend.usage() == (800, first.bytes + second.bytes)


async def test_a_delete_after_a_broken_create_repairs_before_it_frees(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create cut short (here cancelled) leaves records of seq 2; deleting snapshot 1 then
    makes the next snapshot seq 1 again: what the broken create wrote must not be taken for
    records of that one."""
    await store.set_many({f"k{i:04d}": i for i in range(300)})
    backend = snaps(store)
    await backend.create("a")
    await store.set_many({f"k{i:04d}": -i for i in range(300)})
    monkeypatch.setattr(snapshots_mod, "_PAGE", 10)
    flushes = 0
    original = RedisSnapshots._flush

    async def flush(self: RedisSnapshots, *args: Any) -> None:
        nonlocal flushes
        await original(self, *args)
        flushes += 1
        await asyncio.sleep(0.01)

    monkeypatch.setattr(RedisSnapshots, "_flush", flush)
    task = asyncio.create_task(backend.create("b"))
    while flushes < 3:
        assert not task.done()
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(RedisSnapshots, "_flush", original)
    assert (await backend.usage())[0] > 300
    assert await backend.delete("a") is True
    assert await backend.usage() == (0, 0)  # the broken create's records went too
    row = await backend.create("c")
    assert await entries(backend, "c") == await live(store)
    assert await backend.usage() == (300, row.bytes)


# ---------------------------------------------------------------- processes


class Worker:
    """A worker process of this file and the JSON lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def count(self, kind: str) -> int:
        return sum(event["event"] == kind for event in self.events)

    async def failure(self) -> str:
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        await self.proc.wait()
        return f"worker exited {self.proc.returncode}: {err.decode()[-3000:]}"


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """``await spawn(spec)`` starts a worker; each is killed afterwards if need be."""
    children: list[Worker] = []

    async def start(spec: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        children.append(Worker(proc))
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()
            child.reader.cancel()


async def until(workers: list[Worker], done: Callable[[], bool], what: str) -> None:
    """Wait until ``done()``; fail at once when a worker died unasked."""
    deadline = time.monotonic() + LIMIT
    while not done():
        for worker in workers:
            if worker.reader.done() and not worker.count("done"):
                raise AssertionError(f"{what}: {await worker.failure()}")
        assert time.monotonic() < deadline, f"{what}: not within {LIMIT} s"
        await asyncio.sleep(0.01)


async def test_a_create_killed_midway_leaves_no_snapshot_and_the_next_repairs(
    standalone: RedisStore,
    fleetmem_redis_server: Any,
    fleetmem_namespace: str,
    spawn: Callable[[dict[str, Any]], Any],
) -> None:
    store = standalone
    await store.set_many({f"k{i:04d}": {"i": i} for i in range(2000)})
    backend = snaps(store)
    first = await backend.create("a")
    a = await entries(backend, "a")
    await store.set_many({f"k{i:04d}": {"i": -i} for i in range(0, 2000, 5)})  # 400 changed
    await store.delete_many([f"k{i:04d}" for i in range(1, 2000, 20)])  # 100 gone
    await store.set_many({f"n{i:03d}": i for i in range(100)})  # 100 new

    worker = await spawn(
        {
            "url": fleetmem_redis_server.url,
            "namespace": fleetmem_namespace,
            "mode": "create",
            "name": "b",
            "lock_ttl_ms": 1000,
        }
    )
    await until([worker], lambda: worker.count("flushed") >= 3, "three write calls")
    worker.proc.kill()
    await worker.proc.wait()
    assert not worker.count("done")

    # Nothing of "b" is visible; "a" is exact; what the create wrote is there, unused.
    assert [r.name for r in await backend.list()] == ["a"]
    assert await backend.get("b") is None
    assert await entries(backend, "a") == a
    assert (await backend.usage())[0] > 2000
    # Keys the killed create has passed change once more: their records of it are stale.
    await store.set_many({f"k{i:04d}": "again" for i in range(0, 200, 5)})

    began = time.monotonic()
    second = await backend.create("b")  # waits for the dead process's lock to expire
    assert time.monotonic() - began < LIMIT
    assert second.keys == 2000
    assert await entries(backend, "b") == await live(store)
    assert await entries(backend, "a") == a
    # Exactly one record more per key changed or new since "a": nothing of the killed create.
    assert await backend.usage() == (2000 + 400 + 100, first.bytes + second.bytes)
    assert second.bytes == sum(
        entry_bytes(e)
        for e in await live(store)
        if e.key.startswith("n") or int(e.key[1:]) % 5 == 0
    )
    assert await backend.delete("a") is True
    assert await backend.usage() == (2000, sum(entry_bytes(e) for e in await live(store)))


async def test_creates_and_deletes_of_two_processes_are_serialised(
    standalone: RedisStore,
    fleetmem_redis_server: Any,
    fleetmem_namespace: str,
    spawn: Callable[[dict[str, Any]], Any],
) -> None:
    """Two processes each write their own keys, create a snapshot, and delete their snapshot
    of two rounds before, many times over. Every snapshot left must hold each process's keys
    as that process last wrote them before creating it, and the records must be exactly those
    the remaining snapshots hold (none leaked, none lost)."""
    store = standalone
    rounds = 12
    await store.set_many({f"shared/{i:03d}": i for i in range(300)})
    workers = [
        await spawn(
            {
                "url": fleetmem_redis_server.url,
                "namespace": fleetmem_namespace,
                "mode": "rounds",
                "who": who,
                "rounds": rounds,
            }
        )
        for who in ("p", "q")
    ]
    await until(workers, lambda: all(w.count("ready") for w in workers), "both ready")
    await store.set("go", True)  # both start at once: their rounds overlap
    await until(workers, lambda: all(w.count("done") for w in workers), "both done")
    await store.delete("go")

    backend = snaps(store)
    rows = await backend.list()
    names = sorted(r.name for r in rows)
    assert names == sorted(f"{who}-{j}" for who in ("p", "q") for j in (rounds - 2, rounds - 1))
    catalog = await raw(store).hgetall(f"fm:{{{fleetmem_namespace}}}:Sc")
    assert len({json.loads(v)["seq"] for v in catalog.values()}) == len(catalog) == 4
    held: dict[str, set[tuple[int, Any]]] = {}
    for row in sorted(rows, key=lambda r: r.created_at):
        who, j = row.name.split("-")
        got = {e.key: e for e in await entries(backend, row.name)}
        assert row.keys == len(got)
        assert all(f"shared/{i:03d}" in got for i in range(300))
        for i in range(5):
            assert got[f"{who}/{i}"].value == int(j)  # its own keys, as written before it
        for key, e in got.items():
            held.setdefault(key, set()).add((e.version, e.updated_at))
    # The records left are exactly the distinct entries the remaining snapshots hold.
    assert (await backend.usage())[0] == sum(len(v) for v in held.values())
    assert await raw(store).exists(f"fm:{{{fleetmem_namespace}}}:Sl") == 0


# ---------------------------------------------------------------- the worker process


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _worker(spec: dict[str, Any]) -> None:
    """``mode`` "create": create snapshot ``name`` slowly (a write call per 10 keys, each
    followed by ``{"event": "flushed"}`` and a pause), with a lock of ``lock_ttl_ms``; the test
    kills it midway. ``mode`` "rounds": print ``ready``, wait for the key ``go``, then
    ``rounds`` times: set ``<who>/0`` .. ``<who>/4`` to the round number, create
    ``<who>-<round>``, delete ``<who>-<round - 2>``."""
    if "lock_ttl_ms" in spec:
        RedisSnapshots.lock_ttl_ms = spec["lock_ttl_ms"]
    if spec["mode"] == "create":
        snapshots_mod._PAGE = 10
        original = RedisSnapshots._flush

        async def flush(self: RedisSnapshots, *args: Any) -> None:
            await original(self, *args)
            _emit({"event": "flushed"})
            await asyncio.sleep(0.1)

        RedisSnapshots._flush = flush  # type: ignore[method-assign,assignment]
    store = await RedisStore.from_url(spec["url"], namespace=spec["namespace"]).connect()
    try:
        backend = store.kv.snapshots()
        if spec["mode"] == "create":
            await backend.create(spec["name"])
        else:
            who = spec["who"]
            _emit({"event": "ready"})
            while not await store.exists("go"):
                await asyncio.sleep(0.005)
            for j in range(spec["rounds"]):
                await store.set_many({f"{who}/{i}": j for i in range(5)})
                await backend.create(f"{who}-{j}")
                if j >= 2:
                    assert await backend.delete(f"{who}-{j - 2}")
                _emit({"event": "round", "j": j})
    finally:
        await store.close()
    _emit({"event": "done", "pid": os.getpid()})


if __name__ == "__main__":
    asyncio.run(_worker(json.loads(sys.argv[1])))
