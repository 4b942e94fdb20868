"""The child process of the lease tests (``test_lease_processes.py``, ``test_lease_faults.py``).

Run as ``python lease_worker.py '<json spec>'``; it opens the store the spec names and talks
to the test through one JSON object per line on stdout, and lines on stdin. Two modes:

``race``
    Prints ``{"event": "ready"}`` once its store is open, waits for ``go`` on stdin, then for
    ``seconds`` (and until it has made ``min_increments`` fenced increments, at most ``cap``
    seconds) takes lease ``lease`` with ``store.leases.lock(...)`` and, holding it, reads the
    counter ``counter`` (``{"n": ..., "token": ..., "owner": ...}``), pauses up to ``pause``
    seconds and writes it back with ``n + 1`` and its own token as a fenced write (``set`` and
    ``compare_and_set`` in turn). With ``expiring``, it takes the lease with ``acquire()``
    instead (no renewal), so a long pause outlives the lease.
    Every turn is one record of ``done``: the token, the body's start and end on the machine's
    monotonic clock (shared by every process on Linux), what it read and wrote, and the error of
    the fenced write if it failed.

``hold``
    Takes lease ``lease`` with ``lock(ttl=...)``, makes one fenced write with it, writes the
    lease to the file ``lease_file`` (JSON) and prints ``held``; then prints ``renewed`` each
    time the background renewal moved the lease's expiry, until it is killed.

Both modes share :func:`open_spec_store` with the tests, so the parent opens exactly the store
its children open.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fleetmem import LeaseLostError, LeaseUnavailableError, VersionConflictError
from fleetmem.protocol import Lease

#: Seconds a child waits for ``go`` before it gives up (the parent died or hangs).
GO_TIMEOUT = 120.0


class WorkerProcess:
    """The test's side of one worker process: the JSON lines it prints, one event each."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def event(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            await self.proc.wait()
            raise AssertionError(
                f"worker {self.proc.pid} exited {self.proc.returncode}:\n{err.decode()}"
            )
        event: dict[str, Any] = json.loads(line)
        return event


def open_spec_store(spec: dict[str, Any]) -> Any:
    """The (not yet connected) store that ``spec`` names: ``backend`` is one of ``sqlite``
    (``path``), ``postgres`` (``dsn``), ``redis`` / ``cluster`` (``url``), ``hybrid`` (``dsn``
    and ``url``), in namespace ``namespace``."""
    backend = spec["backend"]
    namespace = spec["namespace"]
    if backend == "sqlite":
        from fleetmem.backends.sqlite import SQLiteStore

        return SQLiteStore(spec["path"], namespace=namespace)
    if backend == "postgres":
        from fleetmem.backends.postgres import PostgresStore

        return PostgresStore.from_url(spec["dsn"], namespace=namespace)
    if backend in ("redis", "cluster"):
        from fleetmem.backends.redis import RedisStore

        return RedisStore.from_url(spec["url"], namespace=namespace)
    if backend == "hybrid":
        from fleetmem.backends.hybrid import HybridStore

        return HybridStore.from_urls(spec["dsn"], spec["url"], namespace=namespace)
    raise ValueError(f"unknown backend {backend!r}")


def store_spec(
    backend: str, namespace: str, fixture: Callable[[str], Any], directory: Path
) -> dict[str, Any]:
    """The spec of ``backend`` in ``namespace``, on the servers the pytest fixtures give
    (``fixture`` is ``request.getfixturevalue``); a SQLite file goes in ``directory``."""
    spec: dict[str, Any] = {"backend": backend, "namespace": namespace}
    if backend == "sqlite":
        spec["path"] = str(directory / "leases.db")
    if backend in ("postgres", "hybrid"):
        spec["dsn"] = fixture("fleetmem_postgres_server").dsn
    if backend in ("redis", "hybrid"):
        spec["url"] = fixture("fleetmem_redis_server").url
    if backend == "cluster":
        spec["url"] = fixture("fleetmem_redis_cluster").url
    return spec


def lease_to_json(lease: Lease) -> dict[str, Any]:
    return {
        "name": lease.name,
        "owner": lease.owner,
        "token": lease.token,
        "acquired_at": lease.acquired_at.isoformat(),
        "expires_at": lease.expires_at.isoformat(),
        "namespace": lease.namespace,
    }


def lease_from_json(data: dict[str, Any]) -> Lease:
    return Lease(
        name=data["name"],
        owner=data["owner"],
        token=int(data["token"]),
        acquired_at=datetime.fromisoformat(data["acquired_at"]),
        expires_at=datetime.fromisoformat(data["expires_at"]),
        namespace=data["namespace"],
    )


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def _turn(
    store: Any, fence: Any, token: int, counter: str, owner: str, turn: int, pause: float
) -> dict[str, Any]:
    """One increment of ``counter`` fenced by ``fence`` (a HeldLease or a Lease of ``token``):
    read, pause, write back ``n + 1`` with ``set`` (odd turns) or ``compare_and_set``."""
    start = time.monotonic()
    entry = await store.get_entry(counter)
    current: dict[str, Any] = (
        entry.value if entry is not None else {"n": 0, "token": 0, "owner": ""}
    )
    # A pause between the read and the write: were two holders ever inside at once, one of
    # their increments would be lost, or their versions conflict.
    await asyncio.sleep(pause)
    value = {"n": current["n"] + 1, "token": token, "owner": owner}
    record: dict[str, Any] = {
        "owner": owner,
        "token": token,
        "read": current,
        "wrote": value,
        "path": "set" if turn % 2 else "compare_and_set",
        "error": None,
        "lost": False,
    }
    try:
        if turn % 2:
            await store.set(counter, value, fence=fence)
        else:
            version = entry.version if entry is not None else 0
            await store.compare_and_set(counter, value, version=version, fence=fence)
    except (LeaseLostError, VersionConflictError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["start"] = start
    record["end"] = time.monotonic()
    return record


async def _race(store: Any, spec: dict[str, Any]) -> None:
    index: int = spec["index"]
    owner = f"p{index}"
    name: str = spec["lease"]
    counter: str = spec["counter"]
    ttl: float = spec["ttl"]
    wait: float = spec["wait"]
    #: ``expiring``: acquire() and release() with no renewal, and pauses of up to
    #: ``pause`` seconds, so that leases expire in the middle of turns.
    expiring: bool = spec.get("expiring", False)
    max_pause: float = spec["pause"]
    rng = random.Random(index)
    # Open the connections (and the lease listener) before the start, so that the processes
    # start racing together rather than one after another as their connections open.
    await store.leases.holder(name)
    await store.get(counter)
    _emit("ready", pid=os.getpid())
    line = await asyncio.wait_for(_read_line(), GO_TIMEOUT)
    if line != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    started = time.monotonic()
    deadline = started + spec["seconds"]
    cap = started + spec["cap"]
    records: list[dict[str, Any]] = []
    unavailable = 0
    increments = 0
    turn = 0
    while time.monotonic() < cap and (
        time.monotonic() < deadline or increments < spec["min_increments"]
    ):
        turn += 1
        pause = rng.random() * max_pause
        if expiring:
            lease = await store.leases.acquire(name, owner=owner, ttl=ttl, wait=wait)
            if lease is None:
                unavailable += 1
                continue
            try:
                record = await _turn(store, lease, lease.token, counter, owner, turn, pause)
            finally:
                await store.leases.release(lease)
        else:
            try:
                async with store.leases.lock(name, owner=owner, ttl=ttl, wait=wait) as held:
                    token = held.lease.token
                    record = await _turn(store, held, token, counter, owner, turn, pause)
                    record["lost"] = held.lost.is_set()
            except LeaseUnavailableError:
                unavailable += 1
                continue
        records.append(record)
        if record["error"] is None:
            increments += 1
        # Let a waiter of another process in before this one asks again (fairness is not
        # promised, but a run where one process holds the lease throughout tests little).
        await asyncio.sleep(rng.random() * 0.02)
    _emit(
        "done",
        records=records,
        unavailable=unavailable,
        increments=increments,
        seconds=time.monotonic() - started,
    )


async def _hold(store: Any, spec: dict[str, Any]) -> None:
    name: str = spec["lease"]
    async with store.leases.lock(name, owner=spec["owner"], ttl=spec["ttl"]) as held:
        # The fence works while the holder is alive.
        await store.set(spec["key"], {"by": spec["owner"], "token": held.lease.token}, fence=held)
        lease_file = Path(spec["lease_file"])
        partial = lease_file.with_suffix(".partial")
        partial.write_text(json.dumps(lease_to_json(held.lease)))
        partial.replace(lease_file)
        _emit("held", lease=lease_to_json(held.lease), mono=time.monotonic())
        seen = held.lease.expires_at
        while True:
            await asyncio.sleep(0.005)
            if held.lost.is_set():
                _emit("lost", mono=time.monotonic())
                return
            if held.lease.expires_at != seen:
                seen = held.lease.expires_at
                _emit("renewed", lease=lease_to_json(held.lease), mono=time.monotonic())


async def main(spec: dict[str, Any]) -> None:
    async with open_spec_store(spec) as store:
        if spec["mode"] == "race":
            await _race(store, spec)
        elif spec["mode"] == "hold":
            await _hold(store, spec)
        else:
            raise ValueError(f"unknown mode {spec['mode']!r}")


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
