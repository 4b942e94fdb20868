"""Four OS processes race for one lease on every backend that processes can share.

Each process (``lease_worker.py``, mode ``race``) loops for a few seconds: it takes lease ``L``
with ``store.leases.lock(...)`` and, inside, reads a counter and writes it back plus one as a
fenced write carrying its token (``set`` and ``compare_and_set`` in turn). Every body records
its start and end on the machine's monotonic clock (one clock for every process on Linux).

The checks are on order and counts, never on latencies:

* at most one holder at a time: no two bodies overlap (a body ends before its lease is
  released, and the next one starts after it is granted);
* tokens grow strictly in the order the lease was granted;
* no increment is lost: the successful writes carry ``n = 1, 2, 3, ...`` in token order, each
  read the previous one's value and token, and the final counter is their number;
* no fenced write failed (each body takes milliseconds of a TTL of seconds), and nobody holds
  the lease once every process is done.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lease_worker import WorkerProcess, open_spec_store, store_spec

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("lease_worker.py")
PROCESSES = 4
#: How long each process races (seconds), the least number of increments each must make, and
#: the most it may take to make them (a loaded machine).
SECONDS = 3.0
MIN_INCREMENTS = 2
CAP = 45.0
#: The lease's TTL and the wait of each lock(): seconds, far above a body's milliseconds.
TTL = 5.0
WAIT = 15.0
#: Bytes of one line a child prints (its whole record list).
LINE_LIMIT = 64 * 1024 * 1024


class Child(WorkerProcess):
    """One ``race`` worker process and its JSON lines."""

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """``await spawn(spec)`` starts a worker; every worker still running is killed afterwards."""
    children: list[Child] = []

    async def start(spec: dict[str, Any]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        child = Child(proc)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()


BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
    pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.redis], id="redis-cluster"),
]


def check_race(records: list[dict[str, Any]], final: Any, *, renewed: bool = True) -> list[str]:
    """Every violation of the lease and fencing contract the records and the final counter
    show (empty: none).

    ``renewed``: the turns held their lease throughout (lock()), so no two overlap, tokens grow
    in the order of the turns and no fenced write fails. Otherwise (leases expiring in the
    middle of turns) only the fence is checked: turns overlap, writes of expired leases fail
    with ``LeaseLostError``, and the writes that succeeded still form one unbroken chain.
    """
    problems: list[str] = []
    tokens = [r["token"] for r in records]
    if len(set(tokens)) != len(tokens):
        problems.append("a token was granted twice")
    if not renewed:
        problems.extend(
            f"{r['owner']} token {r['token']}: {r['error']}"
            for r in records
            if r["error"] is not None and not r["error"].startswith("LeaseLostError")
        )
        return problems + _check_chain(records, final)
    bodies = sorted(records, key=lambda r: r["start"])
    for before, after in itertools.pairwise(bodies):
        if after["start"] < before["end"]:
            problems.append(
                f"two holders at once: {before['owner']} (token {before['token']}) until "
                f"{before['end']:.4f}, {after['owner']} (token {after['token']}) from "
                f"{after['start']:.4f}"
            )
        if after["token"] <= before["token"]:
            problems.append(
                f"token did not grow: {before['owner']} got {before['token']}, then "
                f"{after['owner']} got {after['token']}"
            )
    for record in records:
        if record["error"] is not None:
            problems.append(f"{record['owner']} token {record['token']}: {record['error']}")
        if record["lost"]:
            problems.append(f"{record['owner']} token {record['token']}: lease lost in the body")
    return problems + _check_chain(records, final)


def _check_chain(records: list[dict[str, Any]], final: Any) -> list[str]:
    """The successful fenced writes, in token order, each read the previous one's value and
    wrote ``n + 1``; the final counter is the last of them (no increment lost)."""
    problems: list[str] = []
    written = sorted((r for r in records if r["error"] is None), key=lambda r: r["token"])
    previous: dict[str, Any] = {"n": 0, "token": 0, "owner": ""}
    for n, record in enumerate(written, start=1):
        if record["wrote"]["n"] != n:
            problems.append(f"write #{n} in token order wrote n={record['wrote']['n']}")
        if record["read"] != previous:
            problems.append(
                f"token {record['token']} read {record['read']}, not the previous write {previous}"
            )
        if record["read"]["token"] >= record["token"]:
            problems.append(
                f"token {record['token']} overwrote a value of token {record['read']['token']}"
            )
        previous = record["wrote"]
    if final != previous:
        problems.append(
            f"final counter {final}, expected {previous} after {len(written)} fenced increments"
        )
    return problems


async def run_race(
    store: Any, spec: dict[str, Any], spawn: Callable[[dict[str, Any]], Any], **options: Any
) -> tuple[list[dict[str, Any]], list[int], int]:
    """Run ``PROCESSES`` race workers to their end: every turn's record, the increments of
    each process, and the number of waits that ran out."""
    assert await store.leases.holder("L") is None
    children: list[Child] = []
    for i in range(PROCESSES):
        child_spec = {
            **spec,
            "mode": "race",
            "index": i,
            "lease": "L",
            "counter": "counter",
            "ttl": TTL,
            "wait": WAIT,
            "seconds": SECONDS,
            "min_increments": MIN_INCREMENTS,
            "cap": CAP,
            "pause": 0.003,
            **options,
        }
        children.append(await spawn(child_spec))
    for child in children:
        ready = await child.event(timeout=90.0)
        assert ready["event"] == "ready", ready
    for child in children:
        await child.send("go")
    dones = [await child.event(timeout=CAP + 30.0) for child in children]
    for child in children:
        assert await asyncio.wait_for(child.proc.wait(), 30.0) == 0
    records = [record for done in dones for record in done["records"]]
    increments = [done["increments"] for done in dones]
    return records, increments, sum(done["unavailable"] for done in dones)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_four_processes_race_for_one_lease(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Callable[[dict[str, Any]], Any],
) -> None:
    """lock() in four processes: one holder at a time, tokens in grant order, no lost
    increment."""
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    # The test opens the store first: a fresh database is migrated once, not by four children.
    async with open_spec_store(spec) as store:
        records, increments, unavailable = await run_race(store, spec, spawn)
        final = await store.get("counter")
        problems = check_race(records, final)
        summary = (
            f"{backend}: {len(records)} grants, increments per process {increments}, "
            f"{unavailable} waits ran out, final {final}"
        )
        print(summary)
        assert problems == [], f"{summary}\n" + "\n".join(problems[:20])
        assert all(n >= MIN_INCREMENTS for n in increments), summary
        assert final["n"] == sum(increments) == len(records)
        # Every process got the lease, and every lease was given back on exit.
        assert {r["owner"] for r in records} == {f"p{i}" for i in range(PROCESSES)}
        assert await store.leases.holder("L") is None
        await store.clear()


#: Leases that expire in the middle of turns: a 0.3 s TTL, never renewed, and pauses of up to
#: 0.6 s between a turn's read and its write.
SHORT_TTL = 0.3
LONG_PAUSE = 0.6


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fenced_writes_of_expired_leases_lose_no_increment(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Callable[[dict[str, Any]], Any],
) -> None:
    """acquire() without renewal in four processes, turns that outlive their lease: turns
    overlap (the next holder comes in after the expiry), yet every write of an expired lease
    is refused and the writes that succeed form one unbroken chain of increments."""
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    async with open_spec_store(spec) as store:
        records, increments, unavailable = await run_race(
            store, spec, spawn, ttl=SHORT_TTL, pause=LONG_PAUSE, expiring=True
        )
        final = await store.get("counter")
        problems = check_race(records, final, renewed=False)
        refused = [r for r in records if r["error"] is not None]
        bodies = sorted(records, key=lambda r: r["start"])
        overlaps = sum(1 for a, b in itertools.pairwise(bodies) if b["start"] < a["end"])
        summary = (
            f"{backend}: {len(records)} grants, {len(refused)} fenced writes refused, "
            f"{overlaps} overlapping turns, increments per process {increments}, "
            f"{unavailable} waits ran out, final {final}"
        )
        print(summary)
        assert problems == [], f"{summary}\n" + "\n".join(problems[:20])
        assert all(n >= MIN_INCREMENTS for n in increments), summary
        assert final["n"] == sum(increments) == len(records) - len(refused)
        # The scenario happened: leases expired in turns, and another holder came in.
        assert refused, summary
        assert overlaps, summary
        await store.clear()
