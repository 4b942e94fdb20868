"""Consumers in four OS processes drain one work queue while some of them are killed, on every
backend processes can share: SQLite (one file), PostgreSQL, Redis, the hybrid, a Redis Cluster.

The test puts ``JOBS`` jobs (``put_many``, payload ``{"n": n}``) while four processes
(``queue_worker.py``, mode ``consume``) of ``CONSUMERS`` coroutines each claim them
(``claim(wait=...)``, a ``LEASE`` of 2 s) and ack them. Meanwhile:

* two whole processes are killed with SIGKILL while they hold claims (one after a fifth of the
  jobs was acked, one after nearly half), and a new process takes the place of each;
* one job in fifty is *abandoned* by its first claimer (claimed, never acked while the run
  lasts) and acked with that old claim once every job is finished: long superseded;
* one job in fifty is *stalled*: acked only after its lease ran out (by then another consumer
  may have claimed it, or not);
* the jobs numbered ``DEAD_FROM`` to ``DEAD_TO`` have ``max_attempts=1``: those abandoned,
  stalled or held by a killed process go to the dead letter instead of coming back.

Every process prints each claim (id, token, attempts, number) and each ack (id, token, what it
returned) as it happens; an ack's result names the claim that made it (``{"token", "proc"}``).
The checks, from those records and from ``stats()``, ``result()`` and ``dead()``:

* every job is done (acked) or dead, none is lost, none is left ready, delayed or claimed;
* no job was acked successfully twice, and every successful ack is the one the server kept
  (its token and process); a done job no process reported acking was acked by a killed
  process just before it died (its line was never printed);
* a job is claimed with a new token each time, its attempts counting up;
* the jobs a killed process held came back (attempts >= 2, a greater token) and were acked by
  another process (or died, when they had one attempt); the killed claims, rebuilt by the
  test, ack and nack nothing any more;
* every late ack of a superseded claim returned ``False`` and changed nothing; the dead are
  exactly jobs of one attempt whose claim was lost.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from lease_worker import WorkerProcess, open_spec_store, store_spec
from queue_worker import fate

from fleetmem import Job, JobResult, QueueStats

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("queue_worker.py")
QUEUE = "work"
PROCESSES = 4
CONSUMERS = 16
#: Jobs put. 20,000 on every backend, SQLite included: its consumers share one file's write
#: lock, yet the run takes about 15 s on two cores (PostgreSQL about 25 s, Redis about 7 s).
JOBS = 20_000
#: Jobs per put_many call.
CHUNK = 1000
#: Jobs numbered DEAD_FROM <= n < DEAD_TO are put with max_attempts=1.
DEAD_FROM = 5000
DEAD_TO = 6000
#: The consumers' lease, their claim's wait (seconds), and the most a job is worked on.
LEASE = 2.0
WAIT = 1.0
WORK = 0.003
#: (share of the jobs acked, index of the process killed then).
KILLS = [(0.2, 1), (0.45, 2)]
#: The most the run may take on a loaded machine (seconds), and the test as a whole.
RUN_LIMIT = 90.0
TEST_LIMIT = 180.0
#: Concurrent result() calls of the final check.
READERS = 8


class Consumer(WorkerProcess):
    """A ``consume`` worker: its claims and acks as they are printed, read in the background."""

    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        super().__init__(proc)
        self.index = index
        self.claims: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.done: dict[str, Any] | None = None
        self.killed = False
        self.ready = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # the half-printed line of a killed process
            event: dict[str, Any] = json.loads(line)
            kind = event.pop("event")
            event["proc"] = self.index
            if kind == "claim":
                self.claims.append(event)
            elif kind == "ack":
                self.acks.append(event)
            elif kind == "ready":
                self.ready.set()
            elif kind == "done":
                self.done = event
            else:
                raise AssertionError(f"process {self.index}: unexpected line {line!r}")

    @property
    def acked(self) -> int:
        return sum(1 for ack in self.acks if ack["ok"])

    def outstanding(self) -> set[tuple[str, int]]:
        """Claims it printed and has not printed an ack of."""
        acked = {(ack["id"], ack["token"]) for ack in self.acks}
        return {(c["id"], c["token"]) for c in self.claims} - acked

    async def failure(self) -> str:
        """Why this process ended (its exit status and stderr)."""
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        await self.proc.wait()
        return f"consumer process {self.index} exited {self.proc.returncode}:\n{err.decode()}"

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()


Spawn = Callable[[dict[str, Any], int], Any]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(spec, index)`` starts a consumer process; each is killed afterwards."""
    children: list[Consumer] = []

    async def start(spec: dict[str, Any], index: int) -> Consumer:
        child_spec = {
            **spec,
            "mode": "consume",
            "index": index,
            "queue": QUEUE,
            "consumers": CONSUMERS,
            "lease": LEASE,
            "wait": WAIT,
            "work": WORK,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(child_spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        children.append(Consumer(proc, index))
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()
            child.reader.cancel()


BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
    pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.redis], id="redis-cluster"),
]


def a_claim(queue: str, namespace: str, job_id: str, token: int, n: int) -> Job:
    """A claim another process made, rebuilt from its id and token (what ``ack``, ``nack`` and
    ``extend`` carry to the server); the other fields do not matter to them."""
    now = datetime.now(timezone.utc)
    return Job(
        id=job_id,
        queue=queue,
        payload={"n": n},
        priority=0,
        attempts=1,
        max_attempts=1,
        enqueued_at=now,
        ready_at=now,
        claimed_at=now,
        lease_expires_at=now,
        consumer="rebuilt",
        token=token,
        last_error=None,
        namespace=namespace,
    )


async def put_all(queue: Any, jobs: int) -> list[str]:
    """Put the jobs, ``CHUNK`` per ``put_many``; their ids by number."""
    ids: list[str] = []
    for start in range(0, jobs, CHUNK):
        numbers = range(start, min(start + CHUNK, jobs))
        max_attempts = 1 if DEAD_FROM <= start < DEAD_TO else None
        ids += await queue.put_many([{"n": n} for n in numbers], max_attempts=max_attempts)
    return ids


async def alive(children: list[Consumer]) -> None:
    """Fail at once when a process that was neither killed nor stopped has ended."""
    for child in children:
        if not child.killed and child.reader.done():
            child.reader.result()  # a line it should not have printed
            if child.done is None:
                raise AssertionError(await child.failure())


def check_run(
    ids: list[str],
    claims: list[dict[str, Any]],
    acks: list[dict[str, Any]],
    results: dict[str, JobResult | None],
    dead: list[Job],
    held: dict[int, set[tuple[str, int]]],
) -> tuple[list[str], collections.Counter[str]]:
    """Every violation of the queue's contract the records show (empty: none), and counts of
    what happened."""
    problems: list[str] = []
    seen: collections.Counter[str] = collections.Counter()
    number = {job_id: n for n, job_id in enumerate(ids)}
    killed = set(held)
    if len(number) != len(ids) or ids != sorted(ids):
        problems.append("put_many ids are not unique and ascending")

    # Claims: the right payload; a new token, one more attempt, every time.
    by_job: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    claim_of: dict[tuple[str, int], dict[str, Any]] = {}
    for claim in claims:
        by_job[claim["id"]].append(claim)
        claim_of[(claim["id"], claim["token"])] = claim
        if number.get(claim["id"]) != claim["n"]:
            problems.append(f"claim of {claim['id']} carried job number {claim['n']}")
    for job_id, job_claims in by_job.items():
        ordered = sorted(job_claims, key=lambda c: c["token"])
        tokens = [c["token"] for c in ordered]
        attempts = [c["attempts"] for c in ordered]
        if len(set(tokens)) != len(tokens) or attempts != sorted(set(attempts)):
            problems.append(f"{job_id}: claims with tokens {tokens}, attempts {attempts}")
    seen["claims"] = len(claims)
    seen["jobs claimed again"] = sum(1 for c in by_job.values() if len(c) > 1)

    # Every job finished: done or dead, and nothing else.
    done = {i for i, r in results.items() if r is not None and r.status == "done"}
    dead_ids = {i for i, r in results.items() if r is not None and r.status == "dead"}
    lost = set(ids) - done - dead_ids
    if lost:
        problems.append(f"{len(lost)} jobs neither done nor dead, e.g. {sorted(lost)[:5]}")
    if {job.id for job in dead} != dead_ids:
        problems.append("dead() and result() disagree on the dead jobs")
    for job in dead:
        if not DEAD_FROM <= number[job.id] < DEAD_TO:
            problems.append(f"job {number[job.id]} ({job.id}) of 5 attempts is dead: {job}")
        if job.attempts != 1 or job.max_attempts != 1:
            problems.append(f"dead job {job.id}: attempts {job.attempts}/{job.max_attempts}")
        if job.payload != {"n": number[job.id]}:
            problems.append(f"dead job {job.id} has payload {job.payload}")
    seen["done"] = len(done)
    seen["dead"] = len(dead_ids)

    # Acks: at most one success per job, and it is the one the server kept.
    successes: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for ack in acks:
        seen[f"ack {ack['kind']} {ack['ok']}"] += 1
        result = results.get(ack["id"])
        if ack["ok"]:
            successes[ack["id"]].append(ack)
            acked_claim = claim_of.get((ack["id"], ack["token"]))
            if result is None or result.status != "done":
                problems.append(f"ack of {ack['id']} returned True, the job is {result}")
            elif result.value != {
                "token": ack["token"],
                "proc": ack["proc"],
                "consumer": acked_claim["consumer"] if acked_claim else None,
            }:
                problems.append(f"ack {ack} returned True, but the server kept {result.value}")
            elif acked_claim is None or result.attempts != acked_claim["attempts"]:
                problems.append(f"ack {ack}: result attempts {result.attempts}, {acked_claim}")
        elif (
            result is not None and result.status == "done" and result.value["token"] == ack["token"]
        ):
            problems.append(f"ack {ack} returned False, but the server kept it")
        if ack["kind"] == "late" and ack["ok"]:
            problems.append(f"a late ack of an abandoned claim succeeded: {ack}")
        if ack["kind"] == "stall" and DEAD_FROM <= number[ack["id"]] < DEAD_TO and ack["ok"]:
            problems.append(f"a stalled ack of a job of one attempt succeeded: {ack}")
    for job_id, oks in successes.items():
        if len(oks) > 1:
            problems.append(f"{job_id} acked successfully {len(oks)} times: {oks}")
    for job_id in done - set(successes):
        value = results[job_id].value  # type: ignore[union-attr]
        if value["proc"] not in killed:
            problems.append(f"{job_id} is done by {value}, yet no process reported that ack")
        seen["acked just before a kill, unreported"] += 1

    # Abandoned and stalled jobs of one attempt died; the other abandoned ones came back.
    for claim in claims:
        if claim["proc"] in killed:
            continue
        what = fate(claim["n"], claim["attempts"])
        result = results.get(claim["id"])
        one_attempt = DEAD_FROM <= claim["n"] < DEAD_TO
        if what in ("abandon", "stall") and one_attempt:
            if result is None or result.status != "dead":
                problems.append(f"{what}ed job {claim['id']} of one attempt is {result}")
        elif what == "abandon" and (
            result is None
            or result.status != "done"
            or result.attempts < 2
            or result.value["token"] <= claim["token"]
        ):
            problems.append(f"abandoned claim {claim} did not come back: {result}")
        if what != "work":
            seen[f"{what}ed"] += 1

    # What the killed processes held came back to others (or died, of one attempt).
    for victim, claims_held in held.items():
        for job_id, token in claims_held:
            result = results.get(job_id)
            if result is None:
                continue  # reported as lost above
            if result.status == "dead":
                seen["held at a kill, dead"] += 1
            elif result.value["token"] == token and result.value["proc"] == victim:
                seen["held at a kill, acked before it"] += 1
            elif result.value["token"] > token and result.attempts >= 2:
                seen["held at a kill, came back"] += 1
            else:
                problems.append(f"{job_id} held by killed {victim} (token {token}): {result}")
    return problems, seen


async def all_results(queue: Any, ids: list[str]) -> dict[str, JobResult | None]:
    """``result()`` of every job, ``READERS`` at a time."""
    results: dict[str, JobResult | None] = {}

    async def read(part: list[str]) -> None:
        for job_id in part:
            results[job_id] = await queue.result(job_id)

    await asyncio.gather(*(read(ids[i::READERS]) for i in range(READERS)))
    return results


async def all_dead(queue: Any) -> list[Job]:
    dead: list[Job] = []
    while page := await queue.dead(limit=500, after=dead[-1].id if dead else None):
        dead += page
    return dead


@pytest.mark.timeout(TEST_LIMIT)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_consumers_in_four_processes_finish_every_job_once_despite_kills(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """4 processes x 16 consumers, 20,000 jobs, two processes killed with SIGKILL while they
    hold claims: every job is acked exactly once or dead, and superseded claims finish
    nothing."""
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    if backend == "sqlite":
        spec["path"] = str(tmp_path / "queues.db")
    jobs = JOBS
    # The test opens the store first: a fresh database is migrated once, not by every child.
    async with open_spec_store(spec) as store:
        queue = store.queue(QUEUE)
        assert await queue.stats() == QueueStats(0, 0, 0, 0, 0)
        children: list[Consumer] = [await spawn(spec, i) for i in range(PROCESSES)]
        for child in children:
            await asyncio.wait_for(child.ready.wait(), 90.0)
            await alive(children)
        started = time.monotonic()
        putting = asyncio.create_task(put_all(queue, jobs))

        held: dict[int, set[tuple[str, int]]] = {}
        for share, victim_index in KILLS:
            while sum(child.acked for child in children) < share * jobs:
                assert time.monotonic() - started < RUN_LIMIT, "the consumers are stuck"
                await alive(children)
                await asyncio.sleep(0.01)
            victim = children[victim_index]
            while not victim.outstanding():  # kill it while it holds claims
                assert time.monotonic() - started < RUN_LIMIT, "the victim holds nothing"
                await alive(children)
                await asyncio.sleep(0.001)
            victim.killed = True
            victim.proc.send_signal(signal.SIGKILL)
            assert await victim.proc.wait() == -signal.SIGKILL
            await victim.reader  # every line it printed before it died
            held[victim.index] = victim.outstanding()
            children.append(await spawn(spec, len(children)))
        ids = await putting
        put_took = time.monotonic() - started

        while True:
            await alive(children)
            stats = await queue.stats()
            if stats.ready == stats.delayed == stats.claimed == 0:
                break
            assert time.monotonic() - started < RUN_LIMIT, f"not finished: {stats}"
            await asyncio.sleep(0.2)
        run_took = time.monotonic() - started
        for child in children:
            if not child.killed:
                await child.stop()
        for child in children:
            if not child.killed:
                await asyncio.wait_for(child.reader, 60.0)
                assert child.done is not None, await child.failure()
                assert await asyncio.wait_for(child.proc.wait(), 30.0) == 0

        checked = time.monotonic()
        claims = [claim for child in children for claim in child.claims]
        acks = [ack for child in children for ack in child.acks]
        results = await all_results(queue, ids)
        dead = await all_dead(queue)
        problems, seen = check_run(ids, claims, acks, results, dead, held)
        check_took = time.monotonic() - checked
        per_process = {child.index: (child.acked, child.killed) for child in children}
        summary = (
            f"{backend}: {jobs} jobs, puts done in {put_took:.1f} s, all finished in "
            f"{run_took:.1f} s, checked in {check_took:.1f} s; {stats}; held at the kills "
            f"{ {v: len(h) for v, h in held.items()} }; acks per process (acked, killed) "
            f"{per_process}; {dict(sorted(seen.items()))}"
        )
        print(summary)
        assert problems == [], f"{summary}\n" + "\n".join(problems[:30])
        assert stats.done + stats.dead == jobs, stats
        assert (stats.done, stats.dead) == (seen["done"], seen["dead"]), (stats, seen)
        # The scenario happened: killed claims came back, abandoned ones were refused late.
        assert all(held.values()), summary
        assert seen["held at a kill, came back"] >= 1, summary
        assert seen["ack late False"] >= 1, summary
        assert seen["dead"] >= 1, summary
        assert all(acked > 0 for acked, _ in per_process.values()), summary

        # The killed claims, rebuilt here from what their process printed: superseded (or
        # dead, or finished by that process), they finish and fail nothing.
        number = {job_id: n for n, job_id in enumerate(ids)}
        rebuilt = [
            a_claim(QUEUE, fleetmem_namespace, job_id, token, number[job_id])
            for claims_held in held.values()
            for job_id, token in claims_held
        ]
        for job in rebuilt:
            assert await queue.ack(job, {"zombie": True}) is False, job
            assert await queue.nack(job, retry_in=0, error="zombie") is False, job
        assert {job.id: results[job.id] for job in rebuilt} == {
            job.id: await queue.result(job.id) for job in rebuilt
        }
        assert await queue.stats() == stats
