"""Export and import under concurrent writers and cut connections (issue #20), on the servers
the harness owns.

* **Consistency under concurrent writers** (PostgreSQL, SQLite, the hybrid, Redis):
  ``portability_worker.py`` processes write rounds over families of keys (``w<n>/a00`` ..
  ``w<n>/a99`` set to the round number, in ascending order, one ``set`` at a time) while this
  process exports. Pages are made small (``fleetmem.portability.EXPORT_PAGE``) and slow (the
  progress callback blocks this process between pages, while the writers go on), so an export
  spans many pages and several rounds. A point-in-time export (``consistency == "snapshot"``:
  PostgreSQL, SQLite, the hybrid) must show each family as one instant does: values
  non-increasing along the key order, differing by at most 1. On Redis (``"per-entry"``, no
  snapshot claim) each entry must be exact (a round the writer has written), the file valid,
  its count and checksum right. The writers must have advanced during the exports (else the
  test proved nothing); once stopped, an export shows every family at its last round.
* **Replace atomicity** (PostgreSQL): an ``import_from(mode="replace")`` of 2,500 entries goes
  through a :class:`~fleetmem.testing.proxy.TcpProxy` that is cut (its connections reset, new
  ones blackholed) from the progress callback once the first page, or the last one, has been
  handed to the transaction. The import must raise a ``BackendUnavailableError`` and leave the
  namespace exactly as it was (keys, values, versions, partitions, expiries, read directly);
  healed, the same import succeeds whole.
* **A failed export leaves no file** (PostgreSQL, Redis): the connection is cut the same way
  after the first page of an export to a path; the export raises, no file appears at the
  target (nor a temporary one beside it), and an existing file of that name is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from change_worker import open_store
from lease_worker import store_spec
from portability_worker import FAMILY_KEYS

import fleetmem.portability
from fleetmem import BackendUnavailableError
from fleetmem.testing.conformance._portability import (
    export_file,
    file_entry,
    read_export,
    state_of,
)
from fleetmem.testing.proxy import TcpProxy

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("portability_worker.py")
#: Writer processes, one family of keys each.
WRITERS = 2
#: Exports made while they write; entries per export page; how long the progress callback
#: holds this process after each page (the writers go on meanwhile).
EXPORTS = 4
PAGE = 16
PAGE_PAUSE = 0.02
#: The most a step may take on a loaded machine (seconds).
LIMIT = 60.0

BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
]


# ---------------------------------------------------------------- writer processes


class Writer:
    """A ``portability_worker.py`` process and what it printed."""

    def __init__(self, family: str, proc: asyncio.subprocess.Process) -> None:
        self.family = family
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def has(self, kind: str) -> bool:
        return any(event["event"] == kind for event in self.events)

    def round_at(self, moment: float) -> int:
        """The last round it had finished at ``moment`` (the monotonic clock)."""
        rounds = [e["r"] for e in self.events if e["event"] == "round" and e["t"] <= moment]
        return max(rounds, default=0)

    @property
    def round(self) -> int:
        """The last round it finished."""
        rounds = [event["r"] for event in self.events if event["event"] in ("round", "done")]
        return max(rounds, default=0)

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def failure(self) -> str:
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        await self.proc.wait()
        return f"writer {self.family} exited {self.proc.returncode}: {err.decode()[-3000:]}"


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[str, dict[str, Any]], Any]]:
    """``await spawn(family, spec)`` starts a writer; each is killed afterwards if need be."""
    children: list[Writer] = []

    async def start(family: str, spec: dict[str, Any]) -> Writer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps({**spec, "family": family}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        children.append(Writer(family, proc))
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()
            child.reader.cancel()


async def until(writers: list[Writer], done: Callable[[], bool], what: str) -> None:
    """Wait until ``done()``; fail at once when a writer ended early."""
    deadline = time.monotonic() + LIMIT
    while not done():
        for writer in writers:
            if writer.reader.done() and not writer.has("done"):
                raise AssertionError(f"{what}: {await writer.failure()}")
        assert time.monotonic() < deadline, f"{what}: not within {LIMIT} s"
        await asyncio.sleep(0.01)


def family_values(exported: Any, family: str) -> list[int]:
    """The values of ``family``'s keys in an export, in key order (every key must be there)."""
    lines = {entry["key"]: entry for entry in exported.entries}
    values = []
    for key in FAMILY_KEYS:
        entry = lines.get(family + key)
        assert entry is not None, f"{family}{key} is not in the export"
        assert type(entry["value"]) is int, entry
        values.append(entry["value"])
    return values


# ---------------------------------------------------------------- consistency


@pytest.mark.parametrize("backend", BACKENDS)
async def test_export_under_concurrent_writers_in_other_processes(
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    tmp_path: Path,
    spawn: Callable[[str, dict[str, Any]], Any],
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    monkeypatch.setattr(fleetmem.portability, "EXPORT_PAGE", PAGE)
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    families = [f"w{n}/" for n in range(WRITERS)]
    async with open_store(spec) as store:
        try:
            await store.set("0-before", "a key before the families")
            await store.set("x-after", "a key after them")
            writers = [await spawn(family, spec) for family in families]
            await until(writers, lambda: all(w.has("ready") for w in writers), "ready")
            for writer in writers:
                await writer.send("go")
            # Every key of every family exists (round 1 is complete) before the first export.
            await until(writers, lambda: all(w.round >= 2 for w in writers), "two rounds")

            pages: list[int] = []

            def slow(phase: str, done: int) -> None:
                pages.append(done)
                time.sleep(PAGE_PAUSE)  # this process only: the writers go on

            exports: list[tuple[float, float, Any, Any]] = []
            for _ in range(EXPORTS):
                began = time.monotonic()
                buffer = io.BytesIO()
                pages.clear()
                report = await store.export_to(buffer, progress=slow)
                exports.append((began, time.monotonic(), report, buffer.getvalue()))
                assert len(pages) >= (2 + 100 * WRITERS) // PAGE, pages

            for writer in writers:
                await writer.send("stop")
            await until(writers, lambda: all(w.has("done") for w in writers), "done")
            advanced = 0
            for number, (began, ended, report, raw) in enumerate(exports):
                exported = read_export(raw)  # the format, count, sha256, keys ascending
                assert report.count == len(exported.entries) == 2 + 100 * WRITERS
                expected = "per-entry" if backend == "redis" else "snapshot"
                assert report.consistency == expected, report
                for writer in writers:
                    first, last = writer.round_at(began), writer.round_at(ended)
                    advanced += last - first
                    values = family_values(exported, writer.family)
                    # Exact entries: at least the round complete when the export began, at
                    # most the one begun when it ended.
                    assert all(first <= v <= last + 1 for v in values), (
                        f"export {number}: {writer.family} rounds {first}..{last}: {values}"
                    )
                    if report.consistency == "snapshot":
                        assert all(a >= b for a, b in itertools.pairwise(values)), (
                            f"export {number}: {writer.family} is not one instant: {values}"
                        )
                        assert values[0] - values[-1] <= 1, (number, writer.family, values)
            assert advanced >= 2, f"the writers did not write during the exports ({advanced})"

            _, final = await _export(store)
            for writer in writers:
                assert family_values(final, writer.family) == [writer.round] * 100
        finally:
            await store.clear()


async def _export(store: Any) -> tuple[Any, Any]:
    buffer = io.BytesIO()
    report = await store.export_to(buffer)
    return report, read_export(buffer.getvalue())


# ---------------------------------------------------------------- cut connections


def via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (user, database kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))


def cut(proxy: TcpProxy) -> None:
    """Reset every connection through ``proxy`` and swallow new ones (requests hang)."""
    proxy.reset_connections()
    proxy.blackhole(True)


#: The import of the replace test: 2,500 entries, i.e. three pages of the import.
IMPORT_KEYS = [f"k/{i:04d}" for i in range(2500)]


@pytest.mark.postgres
@pytest.mark.parametrize("cut_after", [1000, 2500], ids=["first-page", "last-page"])
async def test_replace_is_atomic_when_the_postgres_connection_is_cut(
    fleetmem_postgres_server: Any,
    fleetmem_proxy: Callable[[str, int], Any],
    fleetmem_namespace: str,
    cut_after: int,
) -> None:
    from fleetmem.backends.postgres import PostgresStore

    server = fleetmem_postgres_server
    proxy: TcpProxy = await fleetmem_proxy(server.host, server.port)
    data = b"".join(
        export_file(
            file_entry(key, {"i": i, "big": 2**70 + i}, f"p{i % 3}", None)
            for i, key in enumerate(IMPORT_KEYS)
        )
    )
    direct = await PostgresStore.from_url(server.dsn, namespace=fleetmem_namespace).connect()
    proxied = await PostgresStore.from_url(
        via(server.dsn, proxy),
        namespace=fleetmem_namespace,
        command_timeout=2.0,
        acquire_timeout=2.0,
    ).connect()
    try:
        # Keys the import overwrites, keys it deletes (before, between and after its own).
        await direct.set_many(dict.fromkeys(IMPORT_KEYS[::7], "old"), partition="old")
        await direct.set_many({f"k/{i:04d}x": i for i in range(0, 2500, 11)}, ttl=3600)
        await direct.set_many({f"a-{i}": i for i in range(50)}, partition="a")
        await direct.set_many({f"z-{i}": i for i in range(50)})
        await direct.set("k/0007", "old, version 2", partition="old")
        before = await state_of(direct)
        assert len(before) == len(range(0, 2500, 7)) + len(range(0, 2500, 11)) + 100

        cuts: list[int] = []

        def cutter(phase: str, done: int) -> None:
            if phase == "import" and done >= cut_after and not cuts:
                cuts.append(done)
                cut(proxy)

        with pytest.raises(BackendUnavailableError):
            await proxied.import_from(io.BytesIO(data), mode="replace", progress=cutter)
        assert cuts, "the import never reached the cut"
        proxy.heal()
        assert await state_of(direct) == before, "a failed replace changed the namespace"

        # Healed, the same import succeeds whole.
        report = await proxied.import_from(io.BytesIO(data), mode="replace")
        assert (report.written, report.skipped_expired, report.skipped_existing) == (2500, 0, 0)
        assert await direct.keys() == IMPORT_KEYS
        entry = await direct.get_entry("k/0007")
        assert entry is not None and (entry.value, entry.partition, entry.version) == (
            {"i": 7, "big": 2**70 + 7},
            "p1",
            3,
        ), entry
    finally:
        proxy.heal()
        await proxied.close()
        await direct.clear()
        await direct.close()


async def _proxied_store(
    backend: str, request: pytest.FixtureRequest, factory: Any, namespace: str
) -> Any:
    """(direct store, store through a proxy, the proxy) on the harness's server."""
    direct: Any
    proxied: Any
    if backend == "postgres":
        from fleetmem.backends.postgres import PostgresStore

        server = request.getfixturevalue("fleetmem_postgres_server")
        proxy = await factory(server.host, server.port)
        direct = PostgresStore.from_url(server.dsn, namespace=namespace)
        proxied = PostgresStore.from_url(
            via(server.dsn, proxy), namespace=namespace, command_timeout=2.0, acquire_timeout=2.0
        )
    else:
        from fleetmem.backends.redis import RedisStore

        server = request.getfixturevalue("fleetmem_redis_server")
        proxy = await factory(server.host, server.port)
        direct = RedisStore.from_url(server.url, namespace=namespace)
        proxied = RedisStore.from_url(via(server.url, proxy), namespace=namespace, timeout=1.0)
    return await direct.connect(), await proxied.connect(), proxy


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
        pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    ],
)
async def test_a_failed_export_leaves_no_file(
    request: pytest.FixtureRequest,
    fleetmem_proxy: Callable[[str, int], Any],
    fleetmem_namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    monkeypatch.setattr(fleetmem.portability, "EXPORT_PAGE", 100)
    direct, proxied, proxy = await _proxied_store(
        backend, request, fleetmem_proxy, fleetmem_namespace
    )
    try:
        await direct.set_many({f"k/{i:04d}": {"i": i} for i in range(1000)}, ttl=3600)
        existing = tmp_path / "existing.jsonl"
        existing.write_bytes(b"an earlier export\n")
        for target in (tmp_path / "fresh.jsonl.gz", tmp_path / "fresh.jsonl", existing):
            cuts: list[int] = []

            def cutter(phase: str, done: int, cuts: list[int] = cuts) -> None:
                if not cuts:
                    cuts.append(done)
                    cut(proxy)

            with pytest.raises(BackendUnavailableError):
                await proxied.export_to(target, progress=cutter)
            proxy.heal()
            assert cuts and cuts[0] < 1000, cuts
            assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.jsonl"], (
                f"{target.name}: a failed export left {sorted(tmp_path.iterdir())}"
            )
            assert existing.read_bytes() == b"an earlier export\n"
        # Healed, the export succeeds and replaces the file whole.
        report = await proxied.export_to(existing)
        assert report.count == 1000
        assert read_export(existing.read_bytes()).keys == [f"k/{i:04d}" for i in range(1000)]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.jsonl"]
    finally:
        proxy.heal()
        with contextlib.suppress(Exception):
            await proxied.close()
        await direct.clear()
        await direct.close()
