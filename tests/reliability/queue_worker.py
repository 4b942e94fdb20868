"""The child process of the work-queue tests (``test_queue_processes.py``,
``test_queue_faults.py``).

Run as ``python queue_worker.py '<json spec>'``; it opens the store the spec names (the specs of
``lease_worker.store_spec``, opened by the same :func:`~lease_worker.open_spec_store` as the
test's own store) and talks to the test through one JSON object per line on stdout, and lines on
stdin. Every line it prints is flushed at once, so a line the test read was printed before the
process was killed: an id printed after ``put`` returned is an acknowledged put. Three modes:

``consume``
    ``consumers`` coroutines, each claiming jobs of ``queue`` (``claim(wait=...)``, lease
    ``lease``) until ``stop`` arrives on stdin. Every claim prints ``claim`` (id, token,
    attempts, the payload's number ``n``, consumer); every ack prints ``ack`` (id, token, what
    ``ack`` returned, and its ``kind``). A job's number decides what its first claim does (see
    :func:`fate`): most are worked on for a few milliseconds and acked (``work``); some are
    *abandoned* (never acked while the run lasts; acked after ``stop``, kind ``late``, when
    their claim has long been superseded); some are *stalled*: acked only after their lease
    ran out (kind ``stall``), in a task of their own so the coroutine goes on claiming. The
    ack's result is ``{"token", "proc", "consumer"}``: the server's record of who finished it.
    After ``stop``: ``done`` with counts.

``produce``
    Puts jobs of ``queue`` in a loop (``put`` and ``put_many`` of ``batch`` in turn, payload
    ``{"n": n}`` with ``n`` counting up), printing ``put`` (ids and numbers) once each call
    returned; every ``ack_every`` calls it claims a job (lease ``lease``) and acks it with
    result ``{"n", "token"}``, printing ``claimed`` and ``acked``. A failing call prints
    ``error`` and the loop goes on (the server may be down). With ``kill_after``, the process
    kills itself with SIGKILL right after the put that brought the jobs it printed to that
    number: nothing of the store is closed or flushed. Otherwise it runs until it is killed.

``serve``
    Runs one command per stdin line (a JSON object, ``op`` one of ``put``, ``claim``,
    ``ack``) and prints its outcome with ``before`` / ``after``: ``time.monotonic()`` around
    the call (one clock for every process on Linux). Claimed jobs are kept by id, so ``ack``
    names a job by its id. Ends at the end of stdin.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from datetime import datetime
from typing import Any

from lease_worker import open_spec_store

from fleetmem import FleetmemError
from fleetmem.protocol import Job

#: The first claim of job ``n`` abandons it when ``n % FATE_MODULUS == ABANDON``, stalls it
#: when ``n % FATE_MODULUS == STALL``; the other jobs are worked on and acked.
FATE_MODULUS = 50
ABANDON = 7
STALL = 23
#: Seconds a stalled job is held past its lease before its ack.
STALL_PAST_LEASE = 0.3


def fate(n: int, attempts: int) -> str:
    """What a consumer does with job number ``n`` at claim ``attempts``: ``"abandon"``,
    ``"stall"`` (first claims only) or ``"work"``."""
    if attempts == 1 and n % FATE_MODULUS == ABANDON:
        return "abandon"
    if attempts == 1 and n % FATE_MODULUS == STALL:
        return "stall"
    return "work"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _from_iso(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def job_to_json(job: Job) -> dict[str, Any]:
    """Every field of ``job``; times as ISO 8601 text."""
    return {
        "id": job.id,
        "queue": job.queue,
        "payload": job.payload,
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "enqueued_at": job.enqueued_at.isoformat(),
        "ready_at": job.ready_at.isoformat(),
        "claimed_at": _iso(job.claimed_at),
        "lease_expires_at": _iso(job.lease_expires_at),
        "consumer": job.consumer,
        "token": job.token,
        "last_error": job.last_error,
        "namespace": job.namespace,
    }


def job_from_json(data: dict[str, Any]) -> Job:
    """The :class:`Job` that :func:`job_to_json` printed: a claim another process can use."""
    enqueued_at = datetime.fromisoformat(data["enqueued_at"])
    ready_at = datetime.fromisoformat(data["ready_at"])
    return Job(
        id=data["id"],
        queue=data["queue"],
        payload=data["payload"],
        priority=int(data["priority"]),
        attempts=int(data["attempts"]),
        max_attempts=int(data["max_attempts"]),
        enqueued_at=enqueued_at,
        ready_at=ready_at,
        claimed_at=_from_iso(data["claimed_at"]),
        lease_expires_at=_from_iso(data["lease_expires_at"]),
        consumer=data["consumer"],
        token=int(data["token"]),
        last_error=data["last_error"],
        namespace=data["namespace"],
    )


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    """One line of stdin (``""`` at its end), read off the event loop."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line


# ---------------------------------------------------------------- consume


async def _consume(store: Any, spec: dict[str, Any]) -> None:
    queue = store.queue(spec["queue"])
    index: int = spec["index"]
    lease: float = spec["lease"]
    wait: float = spec["wait"]
    work: float = spec["work"]
    stop = asyncio.Event()
    abandoned: list[Job] = []
    stalls: set[asyncio.Task[None]] = set()
    counts = {"claims": 0, "acked": 0, "refused": 0}

    async def ack(job: Job, consumer: str, kind: str) -> None:
        result = {"token": job.token, "proc": index, "consumer": consumer}
        ok = await queue.ack(job, result)
        counts["acked" if ok else "refused"] += 1
        _emit("ack", id=job.id, token=job.token, ok=ok, kind=kind)

    async def stall(job: Job, consumer: str) -> None:
        await asyncio.sleep(lease + STALL_PAST_LEASE)
        await ack(job, consumer, "stall")

    async def consumer(number: int) -> None:
        name = f"p{index}-c{number}"
        rng = random.Random(index * 1000 + number)
        while not stop.is_set():
            job = await queue.claim(consumer=name, lease=lease, wait=wait)
            if job is None:
                continue
            counts["claims"] += 1
            n: int = job.payload["n"]
            _emit("claim", id=job.id, token=job.token, attempts=job.attempts, n=n, consumer=name)
            what = fate(n, job.attempts)
            if what == "abandon":
                abandoned.append(job)
            elif what == "stall":
                task = asyncio.create_task(stall(job, name))
                stalls.add(task)
                task.add_done_callback(stalls.discard)
            else:
                await asyncio.sleep(rng.random() * work)
                await ack(job, name, "work")

    async def stop_on_request() -> None:
        await _read_line()  # "stop", or the end of stdin: the test is gone
        stop.set()

    # Open the connections (and the listener) before the start, so that every process is
    # ready to claim when the test starts putting.
    await queue.stats()
    _emit("ready", pid=os.getpid())
    stopper = asyncio.create_task(stop_on_request())
    await asyncio.gather(*(consumer(number) for number in range(spec["consumers"])))
    await stopper
    while stalls:
        await asyncio.gather(*stalls)
    # Long after their lease: another consumer claimed (and finished) each of them since.
    for job in abandoned:
        await ack(job, job.consumer or "", "late")
    _emit("done", **counts, abandoned=len(abandoned))


# ---------------------------------------------------------------- produce


async def _produce(store: Any, spec: dict[str, Any]) -> None:
    queue = store.queue(spec["queue"])
    batch: int = spec["batch"]
    ack_every: int = spec["ack_every"]
    lease: float = spec["lease"]
    kill_after: int | None = spec.get("kill_after")
    await queue.stats()
    _emit("ready", pid=os.getpid())
    n = 0
    printed = 0
    calls = 0
    while True:
        calls += 1
        try:
            if calls % 2:
                numbers = [n]
                ids = [await queue.put({"n": n})]
            else:
                numbers = list(range(n, n + batch))
                ids = await queue.put_many([{"n": i} for i in numbers])
        except FleetmemError as exc:
            _emit("error", op="put", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
            continue
        n += len(numbers)
        printed += len(ids)
        _emit("put", ids=ids, ns=numbers)
        if kill_after is not None and printed >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if calls % ack_every:
            continue
        try:
            job = await queue.claim(consumer="producer", lease=lease)
            if job is None:
                continue
            _emit("claimed", job=job_to_json(job))
            ok = await queue.ack(job, {"n": job.payload["n"], "token": job.token})
            _emit("acked", id=job.id, token=job.token, ok=ok)
        except FleetmemError as exc:
            _emit("error", op="claim/ack", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------- serve


async def _serve(store: Any, spec: dict[str, Any]) -> None:
    queue = store.queue(spec["queue"])
    held: dict[str, Job] = {}
    await queue.stats()
    _emit("ready", pid=os.getpid())
    while line := await _read_line():
        command: dict[str, Any] = json.loads(line)
        op = command["op"]
        before = time.monotonic()
        if op == "put":
            job_id = await queue.put(command["payload"])
            _emit(op, id=job_id, before=before, after=time.monotonic())
        elif op == "claim":
            jobs = await queue.claim_many(
                command["n"], consumer=command["consumer"], lease=command["lease"]
            )
            after = time.monotonic()
            held.update((job.id, job) for job in jobs)
            _emit(op, jobs=[job_to_json(job) for job in jobs], before=before, after=after)
        elif op == "ack":
            ok = await queue.ack(held[command["id"]], command.get("result"))
            _emit(op, ok=ok, before=before, after=time.monotonic())
        else:
            raise ValueError(f"unknown op {op!r}")


async def main(spec: dict[str, Any]) -> None:
    async with open_spec_store(spec) as store:
        mode = spec["mode"]
        if mode == "consume":
            await _consume(store, spec)
        elif mode == "produce":
            await _produce(store, spec)
        elif mode == "serve":
            await _serve(store, spec)
        else:
            raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
