"""Snapshots under faults: a process killed in the middle of a create, and two processes
creating and deleting snapshots of one namespace at once (issue #20), on a SQLite file and on
the servers the harness owns.

* **A create killed midway** (SQLite, PostgreSQL, Redis): a namespace of a few thousand
  entries has a snapshot ``base``, then changes (entries changed, deleted, added). A
  ``snapshot_worker.py`` process takes a snapshot and stalls inside it -- SQLite halfway
  through the virtual machine's steps of its transaction, or with every statement run and
  its ``COMMIT`` not yet run; PostgreSQL with every statement run and its ``COMMIT`` not sent;
  Redis with its records written and its catalog row not -- and is killed there with
  SIGKILL. Then: no snapshot of that name is visible, the
  catalog holds ``base`` alone and ``base`` exports exactly as before; on SQLite and
  PostgreSQL (one transaction) nothing of the killed create is stored, on Redis some of its
  records are (the next create repairs them, below); the same create made
  again (it waits for the dead process's lock, which lives 1.5 s on Redis) holds the live
  entries exactly, stores exactly what the worker's complete create of the same state stored
  (its bytes, and one record per changed or added entry on top of ``base``'s: what the killed
  create left was rolled back or repaired), and restores exactly.
* **Concurrent creates and deletes** (SQLite, PostgreSQL, Redis): two worker processes each
  write keys of their own, create a snapshot, and delete snapshots (their own and the oldest
  listed, the other's included), round after round, at the same time. Afterwards the catalog
  is exactly the snapshots created and not deleted, and each one exports what its creator saw
  (its own keys and marker as it had just written them, the shared entries unchanged, as many
  entries as the create counted); the oldest and the newest restore exactly; deleting them all
  frees every record.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from change_worker import open_store
from lease_worker import store_spec

from fleetmem.testing.conformance._portability import parse_moment, read_export
from fleetmem.testing.conformance._snapshots import export_snapshot, usage

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("snapshot_worker.py")
#: The most a step may take on a loaded machine (seconds).
LIMIT = 60.0
#: The killed worker's Redis snapshot lock (ms): what the next create waits for at most.
LOCK_TTL_MS = 1500
#: Entries of the namespace the killed create snapshots, and how it changes after ``base``.
ENTRIES = 4000
CHANGED = range(0, ENTRIES, 10)
DELETED = range(0, ENTRIES, 37)
ADDED = 150
#: Rounds of each churning worker; the shared entries they snapshot besides their own.
ROUNDS = 20
SHARED = 200

BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
]
#: (backend, where the killed create stalls: see snapshot_worker.py).
STALLS = [
    pytest.param("sqlite", "half", marks=[pytest.mark.sqlite], id="sqlite-half"),
    pytest.param("sqlite", "commit", marks=[pytest.mark.sqlite], id="sqlite-commit"),
    pytest.param("postgres", "commit", marks=[pytest.mark.postgres], id="postgres-commit"),
    pytest.param("redis", "catalog", marks=[pytest.mark.redis], id="redis-catalog"),
]


class Worker:
    """A ``snapshot_worker.py`` process and the events it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # the half-printed line of a killed process
            self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    async def failure(self) -> str:
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        await self.proc.wait()
        return f"worker exited {self.proc.returncode}: {self.events}\n{err.decode()[-5000:]}"

    async def until(self, kind: str) -> dict[str, Any]:
        """The first event ``kind``; fails when the worker ends first or takes too long."""
        deadline = time.monotonic() + LIMIT
        while not self.of(kind):
            if self.reader.done():
                raise AssertionError(f"no {kind!r} event: {await self.failure()}")
            assert time.monotonic() < deadline, f"no {kind!r} within {LIMIT} s: {self.events}"
            await asyncio.sleep(0.01)
        return self.of(kind)[0]

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self) -> None:
        await asyncio.wait_for(self.reader, LIMIT)
        code = await asyncio.wait_for(self.proc.wait(), LIMIT)
        assert code == 0, await self.failure()


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """``await spawn(spec)`` starts a worker; each is killed afterwards if need be."""
    children: list[Worker] = []

    async def start(spec: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
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


async def drop_snapshots(store: Any) -> None:
    for snapshot in await store.snapshots.list():
        await store.snapshots.delete(snapshot.name)


async def live_state(store: Any) -> dict[str, tuple[str, str, Any]]:
    """Each live key's value (sorted JSON), partition and absolute expiry (an export)."""
    buffer = io.BytesIO()
    await store.export_to(buffer)
    return exported_state(read_export(buffer.getvalue()))


def exported_state(exported: Any) -> dict[str, tuple[str, str, Any]]:
    """Each exported key's value (sorted JSON), partition and absolute expiry."""
    return {
        line["key"]: (
            json.dumps(line["value"], sort_keys=True),
            line["partition"],
            None if line["expires_at"] is None else parse_moment(line["expires_at"], "expiry"),
        )
        for line in exported.entries
    }


def assert_same_state(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """The same keys, values and partitions; expiries to the millisecond."""
    assert sorted(got) == sorted(want), f"{what}: {len(got)} keys vs {len(want)}"
    for key, (value, partition, expires) in want.items():
        other = got[key]
        assert other[:2] == (value, partition), f"{what} {key!r}: {other} vs {want[key]}"
        if expires is None:
            assert other[2] is None, f"{what} {key!r}: {other}"
        else:
            assert other[2] is not None, f"{what} {key!r}: {other}"
            assert abs((other[2] - expires).total_seconds()) <= 0.001, (what, key, other)


# ---------------------------------------------------------------- a create killed midway


@pytest.mark.parametrize(("backend", "point"), STALLS)
async def test_a_create_killed_midway_leaves_no_snapshot(
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Callable[[dict[str, Any]], Any],
    backend: str,
    point: str,
) -> None:
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    async with open_store(spec) as store:
        snaps = store.snapshots
        try:
            await store.set_many(
                {f"k/{i:05d}": {"i": i, "big": 2**70 + i, "pad": "x" * 40} for i in range(ENTRIES)},
                partition="p",
            )
            await store.set_many({f"t/{i:03d}": f"\u00e9 {i}" for i in range(100)}, ttl=3600)
            await snaps.create("base")
            base = await export_snapshot(store, "base")
            assert len(base.entries) == ENTRIES + 100
            await store.set_many({f"k/{i:05d}": {"changed": i} for i in CHANGED})
            assert await store.delete_many(f"k/{i:05d}" for i in DELETED) == len(DELETED)
            await store.set_many({f"n/{i:03d}": [i, None] for i in range(ADDED)}, partition="q")
            live = len(await store.keys())
            changed_live = len(set(CHANGED) - set(DELETED))
            stored = await usage(store)

            worker = await spawn(
                {
                    **spec,
                    "mode": "stall",
                    "point": point,
                    "name": "victim",
                    "lock_ttl_ms": LOCK_TTL_MS,
                }
            )
            probe = await worker.until("probe")
            assert probe["keys"] == live, probe
            await worker.until("mid")
            assert not worker.of("created"), worker.events
            worker.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(worker.proc.wait(), LIMIT) == -signal.SIGKILL
            await worker.reader
            assert not worker.of("created"), "the create finished before the kill"

            # Nothing of the killed create is visible.
            assert await snaps.get("victim") is None
            assert [s.name for s in await snaps.list()] == ["base"]
            assert (await export_snapshot(store, "base")).entries == base.entries
            if backend == "redis":
                # Many calls, repaired by the next create: the kill must have come after some
                # records were written, or the repair is not tested.
                assert await usage(store) != stored, "the create was killed before it wrote"
            else:
                # One transaction: nothing of it is stored.
                assert await usage(store) == stored

            # The same create, made again, is whole and stores what a create of this state
            # stores (the worker's probe): nothing the killed one left is counted or held.
            victim = await asyncio.wait_for(snaps.create("victim"), LIMIT)
            assert (victim.keys, victim.bytes) == (probe["keys"], probe["bytes"]), (victim, probe)
            assert await usage(store) == (
                stored[0] + changed_live + ADDED,
                stored[1] + victim.bytes,
            )
            want = await live_state(store)
            assert_same_state(
                exported_state(await export_snapshot(store, "victim")), want, "victim"
            )
            assert (await export_snapshot(store, "base")).entries == base.entries

            await store.clear()
            await store.set("other", 1)
            assert await snaps.restore("victim") == live
            assert_same_state(await live_state(store), want, "restored")
        finally:
            await drop_snapshots(store)
            assert await usage(store) == (0, 0)
            await store.clear()


# ---------------------------------------------------------------- concurrent creates, deletes


@pytest.mark.parametrize("backend", BACKENDS)
async def test_creates_and_deletes_from_two_processes_leave_every_snapshot_exact(
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Callable[[dict[str, Any]], Any],
    backend: str,
) -> None:
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    ids = ("a", "b")
    async with open_store(spec) as store:
        snaps = store.snapshots
        try:
            shared = {f"shared/{i:03d}": {"i": i, "big": 2**65 + i} for i in range(SHARED)}
            await store.set_many(shared, partition="s")
            for me in ids:
                await store.set_many({f"{me}/k{n}": 0 for n in range(5)})
                await store.set(f"m{me}", 0)
            everything = set(await store.keys())
            total = SHARED + 6 * len(ids)
            assert len(everything) == total

            workers = [
                await spawn({**spec, "mode": "churn", "id": me, "rounds": ROUNDS}) for me in ids
            ]
            for worker in workers:
                await worker.until("ready")
            for worker in workers:
                await worker.send("go")
            # Each has created once before any creates again: their creates overlap for sure.
            for worker in workers:
                await worker.until("created")
            for worker in workers:
                await worker.send("on")
            for worker in workers:
                await worker.finish()
                assert worker.of("done"), worker.events
            # They ran at the same time: each began creating before the other had finished.
            spans = [(w.of("created")[0]["began"], w.of("created")[-1]["ended"]) for w in workers]
            assert max(b for b, _ in spans) < min(e for _, e in spans), spans

            created = {e["name"]: e for w in workers for e in w.of("created")}
            assert len(created) == ROUNDS * len(ids)
            gone = {e["name"] for w in workers for e in w.of("deleted") if e["ok"]}
            listed = await snaps.list()
            assert {s.name for s in listed} == set(created) - gone, (listed, gone)
            assert len(listed) >= 2, listed
            moments = [s.created_at for s in listed]
            assert moments == sorted(moments), listed

            for snapshot in listed:
                event = created[snapshot.name]
                me = snapshot.name.split("-")[0]
                other = next(i for i in ids if i != me)
                assert snapshot.keys == event["keys"] == total, (snapshot, event)
                values = {
                    line["key"]: line["value"]
                    for line in (await export_snapshot(store, snapshot.name)).entries
                }
                missing = everything - set(values)
                assert len(values) == total and not missing, (
                    f"{snapshot.name} of {[s.name for s in listed]}: {len(values)} entries, "
                    f"without {sorted(missing)}; deleted {sorted(gone)}"
                )
                assert {k: values[k] for k in shared} == shared, snapshot.name
                assert {k: values[k] for k in event["own"]} == event["own"], (
                    f"{snapshot.name}: not what its create saw"
                )
                theirs = [values[f"{other}/k{n}"] for n in range(5)] + [values[f"m{other}"]]
                assert all(type(v) is int and 0 <= v <= ROUNDS for v in theirs), theirs

            for snapshot in (listed[0], listed[-1]):
                want = exported_state(await export_snapshot(store, snapshot.name))
                await store.set("stray", "deleted by the restore")
                assert await snaps.restore(snapshot.name) == total
                assert_same_state(await live_state(store), want, snapshot.name)
        finally:
            await drop_snapshots(store)
            assert await usage(store) == (0, 0)
            await store.clear()
