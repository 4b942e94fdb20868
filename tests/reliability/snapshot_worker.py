"""The child process of ``test_snapshot_faults.py``: snapshots taken from another process.

Run as ``python snapshot_worker.py '<json spec>'``: the store is the one the spec names (see
:func:`change_worker.open_store`); every line it prints is one JSON event, flushed at once.

``"mode": "stall"``
    Takes a snapshot and stalls in the middle of it, for the test to kill the process there.
    Hooks on the driver (installed before the store opens) count events of one kind while the
    create runs and block it for good at one of them, after printing ``{"event": "mid"}``;
    ``point`` chooses where:

    * ``"half"`` (SQLite): a progress handler on every connection counts the virtual
      machine's steps and blocks the create's thread halfway through them (mid-statement,
      inside the create's transaction);
    * ``"commit"`` (SQLite, PostgreSQL): the create's last ``COMMIT`` is blocked before it
      runs (SQLite's trace callback, called as a statement starts) or is sent (``asyncpg``'s
      ``execute``): every statement of the create has run, its transaction is still open;
    * ``"catalog"`` (Redis): ``execute_command`` blocks the create's last command but one
      (the calls that extend its lock not counted) -- its records are written, the catalog
      row (written last, before the lock is released) is not.

    The events are counted first: the worker takes a snapshot named ``probe`` with the hooks
    counting (``{"event": "probe", "steps": n, "keys": k, "bytes": b}``), deletes it -- the
    namespace's snapshots are as before -- and then creates ``name`` with the hook armed. If
    that create ever returns, it prints ``{"event": "created"}`` (the test then fails: the
    stall was not reached). On Redis the worker's snapshot lock lives ``lock_ttl_ms`` (given
    in the spec, short) so that the lock the killed process leaves expires soon.

``"mode": "churn"``
    Prints ``{"event": "ready"}`` once connected and waits for ``go`` on stdin; after its
    first create it waits for ``on`` (so that the test can make the workers' creates overlap
    for certain, whatever the machine's load). Then rounds
    ``r = 1 .. rounds`` of: set the worker's own keys ``<id>/k<r % 5>`` and ``m<id>`` to ``r``
    (no other process writes them), create the snapshot ``<id>-<r>`` and print what it saw of
    them (``{"event": "created", "name", "own", "keys", "began", "ended"}``: the create's
    start and end on the machine's monotonic clock, which every process shares); then delete
    its own snapshot of two rounds before, and every third round the oldest snapshot listed
    (either worker's), printing ``{"event": "deleted", "name", "ok"}``. At the end
    ``{"event": "done"}``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from typing import Any

from change_worker import open_store


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Hook:
    """Counts the driver's events of one kind while armed; blocks for good at ``block_at``."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.steps = 0
        self.block_at: int | None = None
        self.lock = threading.Lock()

    def start(self, kind: str, block_at: int | None) -> None:
        self.steps = 0
        self.block_at = block_at
        self.kind = kind

    def stop(self) -> int:
        self.kind = None
        return self.steps

    def tick(self, kind: str) -> bool:
        """One event of ``kind``; True when this is the one to block at (only once)."""
        with self.lock:
            if self.kind != kind:
                return False
            self.steps += 1
            if self.block_at is not None and self.steps >= self.block_at:
                self.kind = None
                return True
            return False


HOOK = Hook()
FOREVER = 3600.0
#: Where a stall blocks: (the kind of event counted, the event to block at given how many the
#: probe's create made).
POINTS: dict[str, tuple[str, Any]] = {
    "half": ("step", lambda n: max(1, n // 2)),  # SQLite: halfway through the VM's steps
    "commit": ("commit", lambda n: n),  # SQLite, PostgreSQL: the create's last COMMIT
    "catalog": ("command", lambda n: n - 1),  # Redis: the last command but one
}


def _is_commit(sql: str) -> bool:
    return sql.lstrip().upper().startswith("COMMIT")


def _renews(args: tuple[Any, ...]) -> bool:
    """Whether a Redis command calls the function that extends the snapshot lock."""
    name = args[1] if len(args) > 1 and args[0] in ("FCALL", b"FCALL") else b""
    return b"renew" in (name if isinstance(name, bytes) else str(name).encode())


def install(backend: str, spec: dict[str, Any]) -> None:
    """The hooks of ``backend``'s driver (see the module)."""
    if backend == "sqlite":
        connect = sqlite3.connect

        def progress() -> int:
            if HOOK.tick("step"):
                emit("mid", steps=HOOK.steps)
                time.sleep(FOREVER)  # the create's thread, inside its transaction
            return 0

        def trace(sql: str) -> None:  # called as a statement starts
            if _is_commit(sql) and HOOK.tick("commit"):
                emit("mid", steps=HOOK.steps)
                time.sleep(FOREVER)  # before the COMMIT runs

        def hooked(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn: sqlite3.Connection = connect(*args, **kwargs)
            conn.set_progress_handler(progress, 100)
            conn.set_trace_callback(trace)
            return conn

        sqlite3.connect = hooked  # type: ignore[assignment]
    elif backend == "postgres":
        import asyncpg

        execute = asyncpg.connection.Connection.execute

        async def hooked_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if _is_commit(query) and HOOK.tick("commit"):
                emit("mid", steps=HOOK.steps)
                await asyncio.sleep(FOREVER)  # the COMMIT is never sent
            return await execute(self, query, *args, **kwargs)

        asyncpg.connection.Connection.execute = hooked_execute
    elif backend == "redis":
        from redis.asyncio.client import Redis

        from fleetmem.backends.redis.snapshots import RedisSnapshots

        RedisSnapshots.lock_ttl_ms = int(spec["lock_ttl_ms"])
        execute_command: Any = Redis.execute_command

        async def hooked_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            # Not the calls that extend the lock: their number depends on timing.
            if not _renews(args) and HOOK.tick("command"):
                emit("mid", steps=HOOK.steps)
                await asyncio.sleep(FOREVER)  # this command is never sent
            return await execute_command(self, *args, **kwargs)

        Redis.execute_command = hooked_command  # type: ignore[method-assign]
    else:
        raise ValueError(f"no hook for {backend!r}")


async def stall(spec: dict[str, Any]) -> None:
    install(spec["backend"], spec)
    kind, block_at = POINTS[spec["point"]]
    async with open_store(spec) as store:
        snaps = store.snapshots
        await snaps.list()  # connected, schema checked: not counted
        HOOK.start(kind, None)
        probe = await snaps.create("probe")
        steps = HOOK.stop()
        assert await snaps.delete("probe") is True
        emit("probe", steps=steps, keys=probe.keys, bytes=probe.bytes)
        HOOK.start(kind, block_at(steps))
        await snaps.create(spec["name"])
        emit("created")


async def churn(spec: dict[str, Any]) -> None:
    me = spec["id"]
    own = {f"{me}/k{n}": 0 for n in range(5)}
    own[f"m{me}"] = 0
    async with open_store(spec) as store:
        snaps = store.snapshots
        await snaps.list()  # connected
        emit("ready")
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            return
        for r in range(1, spec["rounds"] + 1):
            own[f"{me}/k{r % 5}"] = r
            own[f"m{me}"] = r
            await store.set(f"{me}/k{r % 5}", r)
            await store.set(f"m{me}", r)
            name = f"{me}-{r:03d}"
            began = time.monotonic()
            snapshot = await snaps.create(name)
            emit(
                "created",
                name=name,
                own=dict(own),
                keys=snapshot.keys,
                began=began,
                ended=time.monotonic(),
            )
            if r == 1 and (await asyncio.to_thread(sys.stdin.readline)).strip() != "on":
                return  # the test holds every worker after its first create, then says on
            doomed = [f"{me}-{r - 2:03d}"] if r > 2 else []
            if r % 3 == 0:
                listed = await snaps.list()
                if listed:
                    doomed.append(listed[0].name)
            for victim in doomed:
                emit("deleted", name=victim, ok=await snaps.delete(victim))
    emit("done")


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    asyncio.run(stall(config) if config["mode"] == "stall" else churn(config))
