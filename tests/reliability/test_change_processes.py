"""The change feed written by several OS processes, read by another and watched by one whose
connection the harness cuts (issue #19); and writers killed with SIGKILL mid-run.

Processes are ``change_worker.py`` (on the in-memory store, tasks of this process running the
same code). ``WRITERS`` writers make ``OPS`` writes each -- ``set``, ``set_many``,
``set_if_absent``, ``compare_and_set``, ``incr``, ``delete``, ``expire``, ``persist`` -- over
keys they all share, following :func:`change_worker.plan`, and print every write once it
returned. Every value carries a token of its own, so a change names the write it records; a
counter is only ever incremented by 1, so its value is its version. Meanwhile a reader pages
through the feed with ``read(since=...)`` (limits from 1 to 1000) and a watcher process follows
it with three watches (everything, a prefix, a partition). On PostgreSQL, Redis and the hybrid
(whose feed is PostgreSQL's) the watcher reaches its server through a :class:`TcpProxy` of this
test that resets its connections, blackholes them for a few seconds and heals; the writers pace
themselves so that the faults land while they write. On SQLite (one file) and a Redis Cluster
the watcher connects directly.

:func:`check_feed` then asserts the contract of ``docs/changes.md`` on what was printed:

* every acknowledged write has exactly one change (each item of a ``set_many``; a ``delete``,
  ``expire`` or ``persist`` that returned True one per key), with the version it returned, and
  a write that changed nothing (a lost ``set_if_absent``, a failed ``compare_and_set``, a
  ``delete`` of an absent key) has none: no change without its write;
* replaying the feed key by key: versions count up by one from 1 (again from 1 after a
  ``delete``), a ``ttl`` change keeps the version, ``delete`` and ``ttl`` only on live keys, the
  partition and the expiry are what the writes made them -- and the replay ends in exactly the
  store's final entries (value, version, partition, expiry);
* the writes of one process are in the feed in the order it made them (each waited for the one
  before): the feed's order is the order writes took effect;
* cursors strictly increase; the reader's pages chain (each page's ``since`` is the cursor the
  one before returned) and end at ``cursor()``; the watches yield exactly the reader's sequence
  (filtered), with the same cursors, across the faults; closing the watcher's store ends its
  watches normally.

In the fault test two of three writers die by SIGKILL while they write (large ``set_many``
batches most of the time): one kills itself a few milliseconds into a ``set_many`` (sometimes
before its request reached the server, sometimes after), the test kills the other at a random
moment. What they printed is there exactly once, the write each had in flight is there whole
or not at all (a ``set_many`` here has at most 20 items: one transaction on SQLite and
PostgreSQL, one script call on Redis, so all or nothing on every backend), nothing after it
is; and a watcher started afterwards with the cursor from before the writes (or from the
middle of the feed) gets everything since.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from change_worker import (
    COUNTERS,
    KEYS,
    LONG_TTL,
    Step,
    change_to_json,
    open_store,
    plan,
    run,
    value_of,
)
from lease_worker import store_spec

from fleetmem import Entry, InMemoryStore
from fleetmem.testing.proxy import TcpProxy

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("change_worker.py")
WRITERS = 3
#: Writes per writer in the main test, and how long a writer whose watcher is proxied spreads
#: them over (seconds), so that they go on through every fault of ``NEMESIS``.
OPS = 1500
WRITE_SECONDS = 6.0
#: (seconds after the start, fault) for the proxied watcher: ``reset`` aborts its connections
#: with an RST, ``blackhole`` swallows everything (requests hang, connections time out),
#: ``heal`` ends the blackhole and resets what it swallowed into.
NEMESIS = ((0.8, "reset"), (1.6, "reset"), (2.2, "blackhole"), (4.7, "heal"), (5.4, "reset"))
#: The watches of the watcher process: (pattern, partition); the first one sees everything.
WATCHES: tuple[tuple[str, str | None], ...] = (("*", None), ("k1*", None), ("*", "p1"))
#: The fault test: writes per writer, spread over KILL_SECONDS; writer 1 kills itself in the
#: middle of its first ``set_many`` after KILL_SELF of its writes, at most KILL_DELAY seconds
#: after the write began; the test kills writer 2 once it printed KILL_OTHER of them.
KILL_OPS = 600
KILL_SECONDS = 2.0
KILL_SELF = 0.3
KILL_DELAY = 0.004
KILL_OTHER = 0.6
#: The longest line a worker prints: a page of 1,000 changes of up to a few KiB each.
LINE_LIMIT = 1 << 26
#: The most a run may take on a loaded machine (seconds).
RUN_LIMIT = 90.0
#: The watcher's PostgreSQL timeouts: short, so that a blackholed connection times out (and
#: the watch reconnects into the blackhole, ...) within the blackhole (2.5 s, see NEMESIS), but
#: no shorter than that needs: after the heal the watcher reads pages of 1,000 changes through
#: the proxy, and on a loaded machine (another test run beside this one) a page could take
#: longer than a 1.5-s timeout every time, so that the watch retried it for good.
PG_WATCHER_OPTIONS = {"command_timeout": 2.4, "acquire_timeout": 2.4}

BACKENDS = [
    pytest.param("memory", marks=[pytest.mark.memory], id="memory"),
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
    pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.redis], id="redis-cluster"),
]


# ---------------------------------------------------------------- peers


class Peer:
    """A worker: a ``change_worker.py`` process, or (in-memory store) a task of this process;
    the events it printed, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self.killed = False

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def has(self, kind: str) -> bool:
        return any(event["event"] == kind for event in self.events)

    def ended(self) -> bool:
        raise NotImplementedError

    async def send(self, line: str) -> None:
        raise NotImplementedError

    async def failure(self) -> str:
        raise NotImplementedError

    async def finish(self) -> None:
        """Wait until it ended by itself; fail unless it ended well."""
        raise NotImplementedError


class ProcessPeer(Peer):
    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        super().__init__(name)
        self.proc = proc
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # the half-printed line of a killed process
            self.events.append(json.loads(line))

    def ended(self) -> bool:
        return self.reader.done()

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def failure(self) -> str:
        """Why it ended (or stopped reading): its exit status, errors and stderr. A process
        still running (its output unreadable) is killed first, so nothing waits on it."""
        if self.reader.done() and not self.reader.cancelled() and self.reader.exception():
            reading = f" (reading its output failed: {self.reader.exception()!r})"
        else:
            reading = ""
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        await self.proc.wait()
        errors = [e["error"] for e in self.of("error")]
        return (
            f"{self.name} exited {self.proc.returncode}{reading} {errors}:\n{err.decode()[-5000:]}"
        )

    async def kill(self) -> None:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL
        await self.reader  # every line it printed before it died

    async def finish(self) -> None:
        await asyncio.wait_for(self.reader, RUN_LIMIT)
        code = await asyncio.wait_for(self.proc.wait(), 30.0)
        assert code == 0, await self.failure()


class TaskPeer(Peer):
    def __init__(self, name: str, store: Any, spec: dict[str, Any]) -> None:
        super().__init__(name)
        self.commands: asyncio.Queue[str] = asyncio.Queue()
        self.task = asyncio.create_task(run(store, spec, self.events.append, self.commands.get))

    def ended(self) -> bool:
        return self.task.done()

    async def send(self, line: str) -> None:
        self.commands.put_nowait(line)

    async def failure(self) -> str:
        return f"{self.name} ended: {self.task.exception()!r}"

    async def finish(self) -> None:
        await asyncio.wait_for(self.task, RUN_LIMIT)


Spawn = Callable[[str, dict[str, Any]], Any]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """``await spawn(name, spec)`` starts a worker process; each is killed afterwards."""
    children: list[ProcessPeer] = []

    async def start(name: str, spec: dict[str, Any]) -> ProcessPeer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        children.append(ProcessPeer(name, proc))
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()
            child.reader.cancel()


async def until(peers: list[Peer], done: Callable[[], bool], what: str, limit: float) -> None:
    """Wait until ``done()``; fail at once when a peer that was not killed ended early."""
    deadline = time.monotonic() + limit
    while not done():
        for peer in peers:
            if peer.ended() and not peer.killed and not peer.has("done") and not peer.has("end"):
                raise AssertionError(f"{what}: {await peer.failure()}")
        assert time.monotonic() < deadline, f"{what}: not within {limit} s; " + "; ".join(
            f"{peer.name}: {collections.Counter(e['event'] for e in peer.events)}, "
            f"last {peer.events[-1:]}"[:600]
            for peer in peers
        )
        await asyncio.sleep(0.01)


def printed(peer: Peer, writes: float) -> Callable[[], bool]:
    """Whether ``peer`` has printed ``writes`` writes yet."""
    return lambda: len(peer.of("op")) >= writes


def via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (user, database kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))


# ---------------------------------------------------------------- the checker


@dataclass
class WriterLog:
    """What one writer printed: its ``op`` events, in order (``ops[i]`` is write ``i``)."""

    index: int
    ops: list[dict[str, Any]]
    planned: int
    killed: bool = False


@dataclass
class KeyState:
    """A key as the feed replayed so far has it."""

    live: bool = False
    version: int = 0
    value: Any = None
    partition: str = "default"
    expires_at: datetime | None = None
    history: list[str] = field(default_factory=list)


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass
class Attempt:
    """A write the feed may record: its step, and whether it returned (``ok``: what it
    returned) or was in flight when its process was killed (``ok`` None)."""

    writer: int
    i: int
    step: Step
    ok: bool | None
    out: dict[str, Any]


def attempts_of(writers: list[WriterLog], *, seed: int, mix: str) -> dict[tuple[int, int], Attempt]:
    """Every write the writers made or may have made: (writer, i) -> :class:`Attempt`."""
    out: dict[tuple[int, int], Attempt] = {}
    for log in writers:
        for i, event in enumerate(log.ops):
            assert event["i"] == i and event["w"] == log.index, (log.index, i, event)
            step = plan(log.index, i, seed=seed, mix=mix)
            assert event["op"] == step.op, (event, step)
            out[(log.index, i)] = Attempt(log.index, i, step, bool(event["ok"]), event)
        if log.killed and len(log.ops) < log.planned:
            i = len(log.ops)
            out[(log.index, i)] = Attempt(
                log.index, i, plan(log.index, i, seed=seed, mix=mix), None, {}
            )
    return out


def check_feed(
    feed: list[dict[str, Any]],
    writers: list[WriterLog],
    final: dict[str, Entry | None],
    *,
    seed: int,
    mix: str,
) -> tuple[list[str], collections.Counter[str]]:
    """Every violation of the feed's contract that the feed, what the writers printed and the
    final entries show (empty: none), and counts of what happened."""
    problems: list[str] = []
    seen: collections.Counter[str] = collections.Counter()
    attempts = attempts_of(writers, seed=seed, mix=mix)

    cursors = [change["cursor"] for change in feed]
    for a, b in itertools.pairwise(cursors):
        if not a < b:
            problems.append(f"cursors not strictly increasing: {a!r} then {b!r}")

    # Which write each change records. Tokens: (writer, i, j) -> feed index.
    token_at: dict[tuple[int, int, int], int] = {}
    incr_of: dict[tuple[str, int], tuple[int, int]] = {}
    for attempt in attempts.values():
        if attempt.step.op == "incr" and attempt.ok:
            incr_of[(attempt.step.keys[0], attempt.out["value"])] = (attempt.writer, attempt.i)
    incr_at: dict[tuple[int, int], int] = {}
    writes_of: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # w -> (idx, i)
    states: dict[str, KeyState] = collections.defaultdict(KeyState)
    deletes: collections.Counter[str] = collections.Counter()
    ttls: collections.Counter[str] = collections.Counter()

    for idx, change in enumerate(feed):
        op, key = change["op"], change["key"]
        seen[f"change {op}"] += 1
        where = f"change #{idx} {change}"
        at = _dt(change["at"])
        if at is None or at.utcoffset() != timedelta(0):
            problems.append(f"{where}: at is not a time in UTC")
        if key not in KEYS and key not in COUNTERS:
            problems.append(f"{where}: no writer writes that key (op {op})")
            continue
        state = states[key]
        state.history.append(f"{op}:{change['version']}")
        if op == "set":
            version = (state.version if state.live else 0) + 1
            if change["version"] != version:
                problems.append(f"{where}: version {change['version']}, the replay has {version}")
            expires = _dt(change["expires_at"])
            if key in COUNTERS:
                writer_i = incr_of.get((key, change["value"]))
                if change["value"] != change["version"]:
                    problems.append(f"{where}: a counter's value is not its version")
                if writer_i is None:
                    # An incr whose answer nobody printed: the one a killed writer had in flight.
                    unknown = [
                        a
                        for a in attempts.values()
                        if a.ok is None and a.step.op == "incr" and a.step.keys == (key,)
                    ]
                    if not unknown:
                        problems.append(f"{where}: no acknowledged incr returned this value")
                    else:
                        seen["in-flight incr recorded"] += 1
                else:
                    incr_at[writer_i] = idx
                    writes_of[writer_i[0]].append((idx, writer_i[1]))
                if change["partition"] != "default" or expires is not None:
                    problems.append(f"{where}: a counter in another partition, or expiring")
                step_ttl: float | None = None
                keeps_ttl = True
                partition: str | None = None
            else:
                tok = change["value"].get("tok") if isinstance(change["value"], dict) else None
                parsed = _parse_token(tok)
                made = None if parsed is None else attempts.get(parsed[:2])
                if parsed is None or made is None:
                    problems.append(f"{where}: a value no writer wrote (phantom)")
                    state.live, state.version, state.value = (
                        True,
                        change["version"],
                        change["value"],
                    )
                    continue
                w, i, j = parsed
                step = made.step
                if (
                    step.op not in ("set", "set_many", "set_if_absent", "compare_and_set")
                    or j >= len(step.keys)
                    or step.keys[j] != key
                    or change["value"] != value_of(w, i, j)
                ):
                    problems.append(f"{where}: not what write {w}.{i} ({step}) wrote")
                if parsed in token_at:
                    problems.append(
                        f"{where}: write {tok} recorded twice (also #{token_at[parsed]})"
                    )
                token_at[parsed] = idx
                writes_of[w].append((idx, i))
                if made.ok is False:
                    problems.append(f"{where}: write {tok} returned {made.out}: it wrote nothing")
                elif made.ok is None:
                    seen["in-flight write recorded"] += 1
                returned = made.out.get("version")
                if made.ok and returned is not None and returned != change["version"]:
                    problems.append(f"{where}: the write returned version {returned}")
                if step.op == "set_if_absent" and state.live:
                    problems.append(f"{where}: set_if_absent wrote over a live key")
                if step.op == "compare_and_set" and made.ok:
                    expected = made.out["expected"]
                    if expected != (state.version if state.live else 0):
                        problems.append(f"{where}: compare_and_set of version {expected} wrote")
                step_ttl = step.ttl
                keeps_ttl = step.op == "compare_and_set"
                partition = step.partition
            expected_partition = partition or (state.partition if state.live else "default")
            if change["partition"] != expected_partition:
                problems.append(f"{where}: partition, the replay has {expected_partition!r}")
            if step_ttl is not None:
                if expires is None or abs(_ttl_left(change, expires) - step_ttl) > 30:
                    problems.append(f"{where}: expires_at, the write's ttl was {step_ttl}")
            elif keeps_ttl:
                if expires != (state.expires_at if state.live else None):
                    problems.append(f"{where}: expiry changed, the replay has {state.expires_at}")
            elif expires is not None:
                problems.append(f"{where}: expires, the write had no ttl")
            state.live = True
            state.version = change["version"]
            state.value = change["value"]
            state.partition = change["partition"]
            state.expires_at = expires
        elif op == "delete":
            deletes[key] += 1
            if not state.live:
                problems.append(f"{where}: a delete of a key the replay has not live")
            if change["version"] is not None or change["value"] is not None:
                problems.append(f"{where}: a delete with a version or value")
            if change["partition"] != state.partition:
                problems.append(f"{where}: partition, the replay has {state.partition!r}")
            state.live = False
        elif op == "ttl":
            ttls[key] += 1
            expires = _dt(change["expires_at"])
            if not state.live:
                problems.append(f"{where}: a ttl change of a key the replay has not live")
            if change["version"] != state.version or change["value"] is not None:
                problems.append(f"{where}: the replay has version {state.version}, no value")
            if change["partition"] != state.partition:
                problems.append(f"{where}: partition, the replay has {state.partition!r}")
            if expires is not None and abs(_ttl_left(change, expires) - LONG_TTL) > 30:
                problems.append(f"{where}: expires_at, the expire's ttl was {LONG_TTL}")
            state.expires_at = expires
        else:
            problems.append(f"{where}: an op no writer makes")

    # Every acknowledged write is there; the one in flight at a kill whole or not at all.
    ttl_acked: collections.Counter[str] = collections.Counter()
    delete_acked: collections.Counter[str] = collections.Counter()
    ttl_maybe: collections.Counter[str] = collections.Counter()
    delete_maybe: collections.Counter[str] = collections.Counter()
    for (w, i), attempt in attempts.items():
        step = attempt.step
        seen[f"{step.op} {attempt.ok}"] += 1
        if step.op in ("delete", "expire", "persist"):
            acked, maybe = (
                (delete_acked, delete_maybe) if step.op == "delete" else (ttl_acked, ttl_maybe)
            )
            if attempt.ok:
                acked[step.keys[0]] += 1
            elif attempt.ok is None:
                maybe[step.keys[0]] += 1
        elif step.op == "incr":
            if attempt.ok and (w, i) not in incr_at:
                problems.append(f"acknowledged incr {w}.{i} ({attempt.out}) has no change")
        elif attempt.ok is not False:
            there = [(w, i, j) in token_at for j in range(len(step.keys))]
            if attempt.ok and not all(there):
                problems.append(f"acknowledged write {w}.{i} ({step}) lacks changes: {there}")
            elif attempt.ok is None and any(there) and not all(there):
                problems.append(f"write {w}.{i} in flight at a kill half recorded: {there}")
            elif attempt.ok is None:
                seen[f"in flight at a kill: {step.op}, {'recorded' if any(there) else 'not'}"] += 1
    for key in sorted(set(deletes) | set(delete_acked)):
        if not delete_acked[key] <= deletes[key] <= delete_acked[key] + delete_maybe[key]:
            problems.append(
                f"{key}: {deletes[key]} delete changes, {delete_acked[key]} deletes returned "
                f"True (and {delete_maybe[key]} in flight at a kill)"
            )
    for key in sorted(set(ttls) | set(ttl_acked)):
        if not ttl_acked[key] <= ttls[key] <= ttl_acked[key] + ttl_maybe[key]:
            problems.append(
                f"{key}: {ttls[key]} ttl changes, {ttl_acked[key]} expire/persist returned "
                f"True (and {ttl_maybe[key]} in flight at a kill)"
            )

    # Each process's writes are in the feed in the order it made them.
    for w, placed in writes_of.items():
        placed.sort()
        for (idx_a, i_a), (idx_b, i_b) in itertools.pairwise(placed):
            if i_b < i_a:
                problems.append(
                    f"writer {w}: write {i_b} at #{idx_b} after write {i_a} at #{idx_a}, "
                    "yet it returned before the other began"
                )
                break

    # The replay ends in the store's entries.
    for key in KEYS + COUNTERS:
        entry, state = final.get(key), states.get(key, KeyState())
        if entry is None:
            if state.live:
                problems.append(f"{key}: the replay has it live ({state.history[-5:]}), it is not")
            continue
        got = (entry.value, entry.version, entry.partition, entry.expires_at)
        want = (state.value, state.version, state.partition, state.expires_at)
        if not state.live or got != want:
            problems.append(
                f"{key}: the store has {got}, the replay {want if state.live else None}"
            )
    seen["changes"] = len(feed)
    return problems, seen


def _parse_token(tok: object) -> tuple[int, int, int] | None:
    if not isinstance(tok, str):
        return None
    parts = tok.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def _ttl_left(change: dict[str, Any], expires: datetime) -> float:
    """Seconds from the change's ``at`` to ``expires``."""
    at = _dt(change["at"])
    assert at is not None
    return (expires - at) / timedelta(seconds=1)


def check_pages(pages: list[dict[str, Any]], start: str, head: str) -> list[dict[str, Any]]:
    """The reader's pages chain from ``start`` to ``head``; the changes they hold, in order."""
    assert pages, "the reader read nothing"
    assert pages[0]["since"] == start, (pages[0]["since"], start)
    feed: list[dict[str, Any]] = []
    for before, page in zip([None, *pages], pages, strict=False):
        if before is not None:
            assert page["since"] == before["cursor"], (before["cursor"], page["since"])
        assert len(page["changes"]) <= page["limit"], page
        if page["changes"]:
            assert page["cursor"] == page["changes"][-1]["cursor"], page
            assert page["changes"][0]["cursor"] > page["since"], page
        else:
            assert page["cursor"] == page["since"], page
        feed += page["changes"]
    assert pages[-1]["cursor"] == head and not pages[-1]["changes"], (pages[-1], head)
    return feed


def passes(change: dict[str, Any], pattern: str, partition: str | None) -> bool:
    if change["op"] == "clear":
        return True
    if partition is not None and change["partition"] != partition:
        return False
    return change["key"] is not None and change["key"].startswith(pattern.rstrip("*"))


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at #{n}: {x} != {y}"
    return (
        f"lengths {len(a)} and {len(b)}; the longer one goes on with {(a + b)[min(len(a), len(b))]}"
    )


# ---------------------------------------------------------------- the runs


async def read_all(store: Any, since: str | None) -> list[dict[str, Any]]:
    """Every change after ``since`` read by this process, 1000 a page."""
    out: list[dict[str, Any]] = []
    while True:
        batch = await store.changes.read(since=since, limit=1000)
        out += [change_to_json(change) for change in batch.changes]
        if not batch.changes:
            return out
        since = batch.cursor


async def final_entries(store: Any) -> dict[str, Entry | None]:
    return {key: await store.get_entry(key) for key in KEYS + COUNTERS}


def spec_of(
    backend: str, request: pytest.FixtureRequest, namespace: str, tmp_path: Path
) -> dict[str, Any]:
    if backend == "memory":
        return {"backend": "memory", "namespace": namespace}
    spec = store_spec(backend, namespace, request.getfixturevalue, tmp_path)
    if backend == "sqlite":
        spec["path"] = str(tmp_path / "changes.db")
    return spec


class Run:
    """The workers of one run: processes (or tasks on the in-memory ``store``)."""

    def __init__(self, spec: dict[str, Any], store: Any, spawn: Spawn) -> None:
        self.spec = spec
        self.store = store
        self.spawn = spawn
        self.peers: list[Peer] = []

    async def start(self, name: str, **fields: Any) -> Peer:
        spec = {**self.spec, **fields}
        if self.spec["backend"] == "memory":
            peer: Peer = TaskPeer(name, self.store, {**spec, "close_store": False})
        else:
            peer = await self.spawn(name, spec)
        self.peers.append(peer)
        return peer

    async def ready(self) -> None:
        await until(self.peers, lambda: all(p.has("ready") for p in self.peers), "ready", 90.0)


def writer_logs(writers: list[Peer], planned: int) -> list[WriterLog]:
    return [
        WriterLog(n, peer.of("op"), planned, killed=peer.killed) for n, peer in enumerate(writers)
    ]


@dataclass
class Fault:
    """A fault injected: when (seconds after the start), the changes the watcher's first
    watch had yielded by then, and the feed's head (read directly, not through the proxy)."""

    fault: str
    at: float
    watched: int
    head: str


async def nemesis(proxy: TcpProxy, watcher: Peer, store: Any, started: float) -> list[Fault]:
    """Inject ``NEMESIS`` into the watcher's connections."""
    log: list[Fault] = []
    for at, fault in NEMESIS:
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        if fault == "reset":
            proxy.reset_connections()
        elif fault == "blackhole":
            proxy.blackhole(True)
        else:
            proxy.heal()
            proxy.reset_connections()  # what the blackhole swallowed left them out of step
        watched = sum(1 for event in watcher.of("change") if event["watch"] == 0)
        head = await store.changes.cursor()
        log.append(Fault(fault, time.monotonic() - started, watched, head))
    return log


@pytest.mark.parametrize("backend", BACKENDS)
async def test_writers_reader_and_a_cut_watcher_agree_on_every_write(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """Three writer processes make 1,500 mixed writes each; a reader pages through the feed
    and a watcher (through a proxy that resets and blackholes it) follows it all the while:
    every acknowledged write appears exactly once, with its version, nothing else does, per-key
    versions count up in feed order, and reader and watches saw the same sequence."""
    spec = spec_of(backend, request, fleetmem_namespace, tmp_path)
    seed = random.randrange(1 << 30)
    opened = (
        InMemoryStore(namespace=fleetmem_namespace) if backend == "memory" else open_store(spec)
    )
    async with opened as store:
        await store.changes.enable()
        start = await store.changes.cursor()
        proxy: TcpProxy | None = None
        watcher_spec: dict[str, Any] = {}
        if backend in ("postgres", "hybrid"):
            pg = urlsplit(spec["dsn"])
            assert pg.hostname is not None and pg.port is not None
            proxy = await TcpProxy(pg.hostname, pg.port).start()
            watcher_spec["dsn"] = via(spec["dsn"], proxy)
            options: dict[str, Any] = dict(PG_WATCHER_OPTIONS)
            watcher_spec["options"] = (
                {"postgres_options": options} if backend == "hybrid" else options
            )
        elif backend == "redis":
            rs = urlsplit(spec["url"])
            assert rs.hostname is not None and rs.port is not None
            proxy = await TcpProxy(rs.hostname, rs.port).start()
            watcher_spec["url"] = via(spec["url"], proxy)
        try:
            workers = Run(spec, store, spawn)
            writers = [
                await workers.start(
                    f"writer {n}",
                    mode="write",
                    index=n,
                    ops=OPS,
                    seed=seed,
                    mix="main",
                    seconds=WRITE_SECONDS if proxy is not None else 0.0,
                )
                for n in range(WRITERS)
            ]
            reader = await workers.start("reader", mode="read", since=start, seed=seed)
            watches = [{"pattern": p, "partition": q, "since": start} for p, q in WATCHES]
            watcher = await workers.start("watcher", mode="watch", watches=watches, **watcher_spec)
            await workers.ready()

            started = time.monotonic()
            for writer in writers:
                await writer.send("go")
            faults = (
                asyncio.create_task(nemesis(proxy, watcher, store, started))
                if proxy is not None
                else None
            )
            await until(
                workers.peers, lambda: all(w.has("done") for w in writers), "writing", RUN_LIMIT
            )
            wrote = time.monotonic() - started
            fault_log = await faults if faults is not None else []
            head = await store.changes.cursor()
            for peer in (reader, watcher):
                await peer.send(f"finish {head}")
            for peer in workers.peers:
                await peer.finish()
            caught_up = time.monotonic() - started
        finally:
            if proxy is not None:
                await proxy.close()

        checked = time.monotonic()
        feed = check_pages(reader.of("page"), start, head)
        assert await read_all(store, None) == feed, "read(since=None) differs from the reader's"
        logs = writer_logs(writers, OPS)
        problems, seen = check_feed(feed, logs, await final_entries(store), seed=seed, mix="main")
        check_took = time.monotonic() - checked
        watched = collections.defaultdict(list)
        for event in watcher.of("change"):
            watched[event["watch"]].append(event["change"])
        summary = (
            f"{backend} (seed {seed}): {len(feed)} changes, writes done in {wrote:.1f} s, "
            f"reader and watcher caught up at {caught_up:.1f} s, checked in {check_took:.1f} s; "
            f"{len(reader.of('page'))} pages; watches {[len(watched[n]) for n in range(3)]}; "
            f"{watcher.of('closed')}; {dict(sorted(seen.items()))}"
        )
        print(summary)
        for fault in fault_log:
            written = sum(1 for c in feed if c["cursor"] <= fault.head)
            print(
                f"    t={fault.at:.2f} s {fault.fault}: {written} changes written, "
                f"{fault.watched} watched"
            )
        assert problems == [], f"{summary}\n" + "\n".join(problems[:40])
        if fault_log:
            # The blackhole held the watcher: while it lasted, the watcher yielded at most
            # the page it had read before (the writers wrote more than that meanwhile).
            (black,) = (f for f in fault_log if f.fault == "blackhole")
            (heal,) = (f for f in fault_log if f.fault == "heal")
            during = sum(1 for c in feed if black.head < c["cursor"] <= heal.head)
            if during > 1200:
                assert heal.watched - black.watched < during, (black, heal, during)
        for n, (pattern, partition) in enumerate(WATCHES):
            wanted = [c for c in feed if passes(c, pattern, partition)]
            assert watched[n] == wanted, (
                f"watch {n} ({pattern!r}, {partition!r}) differs from the reader's: "
                + first_difference(watched[n], wanted)
            )
        if backend != "memory":
            (closed,) = watcher.of("closed")
            assert all(how.startswith("ended") for how in closed["ended"].values()), closed
        # The scenario happened: every kind of write, and writes that changed nothing.
        for kind in ("set", "set_many", "set_if_absent", "compare_and_set", "delete", "expire"):
            assert seen[f"{kind} True"] > 0, (kind, summary)
        for kind in ("set_if_absent", "compare_and_set", "delete"):
            assert seen[f"{kind} False"] > 0, (kind, summary)
        assert seen["change ttl"] > 0 and seen["change delete"] > 0, summary
        assert len(watched[1]) > 0 and len(watched[2]) > 0, summary
        await store.changes.disable()
        await store.clear()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "memory"])
async def test_writers_killed_mid_write_leave_whole_writes_and_a_late_watcher_gets_all(
    backend: str,
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    """Two of three writer processes are killed with SIGKILL while they write (large
    ``set_many`` batches most of the time): every write they printed is in the feed once, the
    one each had in flight is there whole or not at all, nothing after it; a watcher started
    afterwards from the cursor taken before the writes (or from the middle of the feed) gets
    every change since, then nothing more."""
    spec = spec_of(backend, request, fleetmem_namespace, tmp_path)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_at = next(
        i
        for i in range(int(KILL_SELF * KILL_OPS), KILL_OPS)
        if plan(1, i, seed=seed, mix="kill").op == "set_many"
    )
    kill_delay = rng.choice((0.0, rng.random() * KILL_DELAY))
    async with open_store(spec) as store:
        await store.changes.enable()
        start = await store.changes.cursor()
        workers = Run(spec, store, spawn)
        writers = [
            await workers.start(
                f"writer {n}",
                mode="write",
                index=n,
                ops=KILL_OPS,
                seed=seed,
                mix="kill",
                seconds=KILL_SECONDS,
                **({"kill_at": kill_at, "kill_delay": kill_delay} if n == 1 else {}),
            )
            for n in range(WRITERS)
        ]
        await workers.ready()
        started = time.monotonic()
        for writer in writers:
            await writer.send("go")
        suicide, victim = writers[1], writers[2]
        assert isinstance(suicide, ProcessPeer) and isinstance(victim, ProcessPeer)
        suicide.killed = True
        await until(workers.peers, printed(victim, KILL_OTHER * KILL_OPS), "writer 2", RUN_LIMIT)
        await asyncio.sleep(rng.random() * KILL_SECONDS / KILL_OPS)
        await victim.kill()
        assert await asyncio.wait_for(suicide.proc.wait(), RUN_LIMIT) == -signal.SIGKILL, (
            await suicide.failure()
        )
        await suicide.reader
        assert [e["i"] for e in suicide.of("killing")] == [kill_at], suicide.events[-3:]
        await until(workers.peers, lambda: writers[0].has("done"), "writing", RUN_LIMIT)
        await writers[0].finish()
        wrote = time.monotonic() - started

        head = await store.changes.cursor()
        feed = await read_all(store, start)
        assert (feed[-1]["cursor"] if feed else start) == head, (feed[-1:], head)
        middle = feed[len(feed) // 2]["cursor"]
        watches = [
            {"pattern": "*", "partition": None, "since": start},
            {"pattern": "*", "partition": None, "since": middle},
            {"pattern": "k0*", "partition": "p1", "since": start},
        ]
        late = await workers.start("late watcher", mode="watch", watches=watches)
        await workers.ready()
        await late.send(f"finish {head}")
        await late.finish()
        logs = writer_logs(writers, KILL_OPS)
        problems, seen = check_feed(feed, logs, await final_entries(store), seed=seed, mix="kill")
        watched = collections.defaultdict(list)
        for event in late.of("change"):
            watched[event["watch"]].append(event["change"])
        in_flight = {
            log.index: plan(log.index, len(log.ops), seed=seed, mix="kill").op
            for log in logs
            if log.killed
        }
        (killing,) = suicide.of("killing")
        summary = (
            f"{backend} (seed {seed}): {len(feed)} changes; writes printed per writer "
            f"{[len(log.ops) for log in logs]}, in flight at the kills {in_flight} (writer 1 "
            f"killed itself {kill_delay * 1000:.1f} ms into it: {killing}); done in "
            f"{wrote:.1f} s; late watches {[len(watched[n]) for n in range(len(watches))]}; "
            f"{dict(sorted(seen.items()))}"
        )
        print(summary)
        assert problems == [], f"{summary}\n" + "\n".join(problems[:40])
        expected = [feed, [c for c in feed if c["cursor"] > middle]]
        expected.append([c for c in feed if passes(c, "k0*", "p1")])
        for n, wanted in enumerate(expected):
            assert watched[n] == wanted, f"late watch {n}: " + first_difference(watched[n], wanted)
        (closed,) = late.of("closed")
        assert all(how.startswith("ended") for how in closed["ended"].values()), closed
        assert all(log.killed for log in logs[1:]) and len(logs[0].ops) == KILL_OPS
        await store.changes.disable()
        await store.clear()
