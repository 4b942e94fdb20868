"""``fleetmem bench`` end to end on servers the harness owns: every workload, every target.

The benchmarks live in the checkout's ``bench/`` (the ``suite`` package ``bench/run.py`` runs),
not in the fleetmem package: this test loads them from the checkout it belongs to.

A smoke test of the command, not a timed test: it checks that each workload was measured on
both sides and that each performance target was computed, never what a figure is. So it
runs ``--smoke`` (every workload, subject and target of ``--quick`` with a tenth of its calls):
``--quick`` is ~200,000 round trips, CPU-bound on the machine that also runs both servers, 40 s
on an idle 2-vCPU VM and 60-90 s with the other core busy, which timed out at 120 s under load.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.hybrid]

#: Workloads measured on both sides (the prefix-scaling rows are fleetmem's alone).
PAIRED = [
    "postgres get p50",
    "postgres set p50",
    "postgres set_many 10k",
    "postgres get_many 10k",
    "postgres 64 coroutines get",
    "postgres 64 coroutines set",
    "postgres 64 coroutines mixed",
    "postgres namespaces(limit=100) p50",
    "redis get p50",
    "redis set p50",
    "redis set_many 10k",
    "redis get_many 10k",
    "redis 64 coroutines get",
    "redis 64 coroutines set",
    "redis 64 coroutines mixed",
    "redis bytes per entry",
    "hybrid get (cache hit) p50",
]

#: The lease section's workloads per backend and their subjects (beside fleetmem). Their
#: targets are recorded as notes, never asserted: a smoke run's figures mean nothing.
LEASE_WORKLOADS = {
    "lease acquire+release p50": ("raw",),
    "set fenced p50": ("unfenced",),
    "lease 64 coroutines 8 names": (),
}
LEASE_PEERS = {
    "lease acquire+release (with peers) p50": ("raw", "redis-py Lock"),
    "lease 64 coroutines 8 names": ("redis-py Lock", "redis-py Lock 1ms"),
}

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_main(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str] | None], int]:
    """``main`` of ``bench/run.py``: the ``suite`` package, imported from the checkout."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    from suite import main

    return main


def test_bench_measures_every_workload_and_computes_every_target(
    fleetmem_postgres_empty_database: str,
    fleetmem_redis_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bench_main: Callable[[list[str] | None], int],
) -> None:
    monkeypatch.setenv("FLEETMEM_BENCH_POSTGRES_URL", fleetmem_postgres_empty_database)
    monkeypatch.setenv("FLEETMEM_BENCH_REDIS_URL", fleetmem_redis_factory().url)
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    # Every section but queues (the default's fifth): it has a test of its own below, and
    # with it this run would take ~30 s more, near the suite's 120 s timeout on a busy machine.
    sections = "postgres,redis,hybrid,leases"
    args = ["--smoke", "-r", "1", "--only", sections, "--json", str(out), "--chart", str(chart)]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert chart.read_bytes().startswith(b"\x89PNG")

    data = json.loads(out.read_text())
    rows: dict[tuple[str, str], list[float]] = {
        (row["workload"], row["subject"]): row["values"] for row in data["rows"]
    }
    for workload in PAIRED:
        # The peers (the bench extra) run every workload they have a call for.
        peers = {"postgres": ("langgraph",), "redis": ("aiocache", "cashews")}.get(
            workload.split()[0], ()
        )
        if workload == "redis bytes per entry":
            peers = ()
        # Single calls: the target's pair alone, then a pass with the peers too.
        passes: list[tuple[str, tuple[str, ...]]] = [(workload, ("raw", "fleetmem"))]
        if peers and workload.endswith(" p50"):
            passes.append((workload.replace(" p50", " (with peers) p50"), ("raw", "fleetmem")))
        passes.append((passes[-1][0], peers))
        for name, subjects in passes:
            for subject in subjects:
                values = rows.get((name, subject))
                assert values is not None, (name, subject)
                assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0
    assert ("postgres get p50", "langgraph") not in rows
    for size in ("10,000", "100,000"):
        for what in ("keys(prefix)", "search(prefix*)"):
            for backend in ("postgres", "redis"):
                assert (f"{backend} {what} p50 @{size}", "fleetmem") in rows
    # namespaces(limit=100) on Redis has no peer (aiocache and cashews list no namespaces).
    for subject in ("raw", "fleetmem"):
        assert ("redis namespaces(limit=100) p50", subject) in rows
        assert ("redis namespaces(limit=100)", subject) in rows
    assert ("redis namespaces(limit=100) (with peers) p50", "aiocache") not in rows
    # A get through fleetmem.sync: one interleaved pass of the facade, the async store and raw.
    for subject in ("raw", "fleetmem", "async"):
        values = rows.get(("redis get via fleetmem.sync p50", subject))
        assert values is not None and len(values) == 1 and values[0] > 0, subject
    assert ("redis get via fleetmem.sync (with peers) p50", "async") not in rows
    assert ("postgres 64 coroutines get", "raw-merged") in rows
    assert ("redis 64 coroutines set", "raw-merged") in rows
    assert ("postgres 64 coroutines mixed", "raw-merged") in rows
    assert ("redis 64 coroutines mixed", "raw-merged") in rows
    # Leases: every backend measured, or skipped with a note while its leases are not built.
    for backend in ("memory", "sqlite", "postgres", "redis", "hybrid"):
        if f"{backend} leases skipped" in " ".join(data["notes"]):
            assert backend != "memory"
            continue
        for workload, others in LEASE_WORKLOADS.items():
            # The in-memory store has no driver beneath it: no raw side.
            subjects = ("fleetmem", *(s for s in others if backend != "memory" or s != "raw"))
            for subject in subjects:
                values = rows.get((f"{backend} {workload}", subject))
                assert values is not None, (backend, workload, subject)
                assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0
        if backend == "redis":
            for workload, peers in LEASE_PEERS.items():
                for subject in peers:
                    assert (f"redis {workload}", subject) in rows, (workload, subject)
    targets = data["targets"]
    assert len(targets) == 29
    assert all(math.isfinite(t["figure"]) and isinstance(t["met"], bool) for t in targets)
    assert "\ntargets:\n" in printed
    assert "note: smoke run (--smoke)" in printed

    # --from-json reports the saved run again without measuring.
    assert bench_main(["--from-json", str(out)]) == 0
    again = capsys.readouterr().out
    section = again[again.index("\ntargets:\n") + 1 :].splitlines()[1:]
    notes = [line for line in section if line.startswith("note: ")]  # after the targets
    assert notes == [f"note: {note}" for note in data["notes"]]
    verdicts = [line.split()[0] for line in section if line.strip() and line not in notes]
    assert verdicts == ["met" if t["met"] else "NOT" for t in targets]


def test_bench_only_namespaces_and_sync_runs_those_workloads_alone(
    fleetmem_postgres_empty_database: str,
    fleetmem_redis_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bench_main: Callable[[list[str] | None], int],
) -> None:
    """``--only namespaces,sync``: the ``namespaces()`` and ``fleetmem.sync`` rows, no others,
    and nothing of the run left on the servers."""
    monkeypatch.setenv("FLEETMEM_BENCH_POSTGRES_URL", fleetmem_postgres_empty_database)
    redis_url = fleetmem_redis_factory().url
    monkeypatch.setenv("FLEETMEM_BENCH_REDIS_URL", redis_url)
    out = tmp_path / "bench.json"
    args = ["--smoke", "--repetitions", "1", "--only", "namespaces,sync", "--json", str(out)]
    assert bench_main(args) == 0
    capsys.readouterr()
    rows = {(row["workload"], row["subject"]) for row in json.loads(out.read_text())["rows"]}
    expected = {
        (f"{backend} namespaces(limit=100){unit}", subject)
        for backend in ("postgres", "redis")
        for unit in (" p50", "")
        for subject in ("raw", "fleetmem")
    }
    expected |= {
        (f"postgres namespaces(limit=100) (with peers){unit}", subject)
        for unit in (" p50", "")
        for subject in ("raw", "fleetmem", "langgraph")
    }
    expected |= {
        (f"redis get via fleetmem.sync{unit}", subject)
        for unit in (" p50", "")
        for subject in ("raw", "fleetmem", "async")
    }
    assert rows == expected

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        # Only fleetmem's namespace registry may remain (the names it lists are checked live).
        leftover = [k for k in client.scan_iter(count=1000) if not k.startswith(b"fm:{_fleetmem}:")]
        assert leftover == []
    finally:
        client.close()


#: The queue section's subjects per backend beside fleetmem (its two consumer loops): the raw
#: loop and the peers. Subject ``arq`` (its default 0.5 s poll) runs the latency workload only.
#: arq is measured only where it is installed (it is not in the ``bench`` extra: it declares
#: ``redis<6``); without it the section says it skipped it.
HAVE_ARQ = importlib.util.find_spec("arq") is not None
QUEUE_SUBJECTS = {
    "postgres": ("raw", "procrastinate"),
    "redis": ("raw", "saq", *(("arq poll 10ms",) if HAVE_ARQ else ())),
}
QUEUE_FLEETMEM = ("fleetmem", "fleetmem claim_many")


def test_bench_only_queues_measures_every_subject_exactly_once(
    fleetmem_postgres_empty_database: str,
    fleetmem_redis_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bench_main: Callable[[list[str] | None], int],
) -> None:
    """``--only queues``: both workloads for every subject on every backend whose queues are
    built, every job of every run claimed and acked exactly once, the peers' versions and the
    targets' verdicts in the notes, and nothing of the raw loops or the peers left behind."""
    dsn = fleetmem_postgres_empty_database
    monkeypatch.setenv("FLEETMEM_BENCH_POSTGRES_URL", dsn)
    redis_url = fleetmem_redis_factory().url
    monkeypatch.setenv("FLEETMEM_BENCH_REDIS_URL", redis_url)
    out = tmp_path / "bench.json"
    args = ["--smoke", "--repetitions", "1", "--only", "queues", "--json", str(out)]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows: dict[tuple[str, str], dict[str, Any]] = {
        (row["workload"], row["subject"]): row for row in data["rows"]
    }
    notes = data["notes"]
    joined = "\n".join(notes)

    assert not [n for n in notes if "NOT exactly once" in n or "failed and was dropped" in n]
    versions = next(n for n in notes if n.startswith("queues: ") and "versions: " in n)
    assert all(f"{d} " in versions for d in ("procrastinate", "saq"))
    if HAVE_ARQ:
        assert "arq " in versions
    else:
        assert "queues: peer arq skipped" in joined
    measured = set()
    for backend in ("postgres", "redis", "sqlite", "memory", "hybrid"):
        built = f"fleetmem on {backend} skipped" not in joined
        assert built or backend not in ("memory",)
        subjects = (QUEUE_FLEETMEM if built else ()) + QUEUE_SUBJECTS.get(backend, ())
        if not subjects:
            continue
        measured.add(backend)
        assert f"queues: {backend}: every subject claimed and acked each of its jobs" in joined
        latency_subjects = subjects + (("arq",) if backend == "redis" and HAVE_ARQ else ())
        for subject in subjects:
            row = rows.get((f"{backend} queue 16 consumers", subject))
            assert row is not None, (backend, subject)
            assert row["unit"] == "jobs/s"
        for subject in latency_subjects:
            p50 = rows.get((f"{backend} queue put to claim p50", subject))
            p99 = rows.get((f"{backend} queue put to claim p99", subject))
            assert p50 is not None and p99 is not None, (backend, subject)
            assert p50["unit"] == p99["unit"] == "ms"
            assert p99["values"][0] >= p50["values"][0]
        if built and backend in QUEUE_SUBJECTS:
            floor = {"postgres": "2,000", "redis": "5,000"}[backend]
            for mine in QUEUE_FLEETMEM:
                for text in (
                    "≥ 2x the best peer",
                    "≥ 0.7x the raw loop",
                    f"≥ {floor} jobs/s",
                    "put to claim p50 ≤ 5 ms",
                    "put to claim p99 ≤ 50 ms",
                ):
                    assert f"queue target {backend} {mine} {text}" in joined, (mine, text)
    assert ("redis queue 16 consumers", "arq") not in rows
    for (workload, _subject), row in rows.items():
        assert workload.split()[0] in measured
        values = row["values"]
        assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0
    assert "note: queues: " in printed

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        # fleetmem's queues keep their held results (no API removes a done job): only its keys
        # may remain; the raw loop's, saq's and arq's are gone.
        leftover = [k for k in client.scan_iter(count=1000) if not k.startswith(b"fm:{")]
        assert leftover == []
    finally:
        client.close()

    import asyncio

    import asyncpg

    async def leftovers() -> list[str]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables "
                "WHERE table_name = 'bench_raw_queue' OR table_schema = 'bench_procrastinate'"
            )
            return [r["name"] for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(leftovers()) == []


#: The change section's workloads per backend, by the subjects each is measured against beside
#: fleetmem: the same writes without a feed by fleetmem before the change feed and by fleetmem
#: in a third process (the control; a child process each), and with a feed (enabled, or
#: enabled and watched) against none.
CHANGE_NO_FEED = ("set no feed p50", "set no feed", "set_many 10k no feed")
CHANGE_FEED = (
    "set feed on p50",
    "set feed on",
    "set feed watched p50",
    "set feed watched",
    "set_many 10k feed on",
    "set_many 10k feed watched",
)


def test_bench_only_changes_measures_the_feed_on_every_backend(
    fleetmem_postgres_empty_database: str,
    fleetmem_redis_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bench_main: Callable[[list[str] | None], int],
) -> None:
    """``--only changes``: every workload on every backend whose feed is built (the others
    skipped with a note), each watcher seeing every change once and in order, the targets'
    verdicts in the notes, and nothing of the run left on the servers."""
    dsn = fleetmem_postgres_empty_database
    monkeypatch.setenv("FLEETMEM_BENCH_POSTGRES_URL", dsn)
    redis_url = fleetmem_redis_factory().url
    monkeypatch.setenv("FLEETMEM_BENCH_REDIS_URL", redis_url)
    out = tmp_path / "bench.json"
    args = ["--smoke", "--repetitions", "1", "--only", "changes", "--json", str(out)]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows: dict[tuple[str, str], dict[str, Any]] = {
        (row["workload"], row["subject"]): row for row in data["rows"]
    }
    notes = data["notes"]
    joined = "\n".join(notes)

    assert "NOT every" not in joined
    # fleetmem before the change feed comes from the checkout's git history: a shallow clone
    # may not have it, and the run says so.
    compared = "changes: no comparison with fleetmem before #19" not in joined
    measured = set()
    for backend in ("memory", "sqlite", "postgres", "redis", "hybrid"):
        if f"changes: {backend} stopped" in joined:  # a backend whose feed is being built
            assert backend != "memory"
            continue
        measured.add(backend)
        workloads = [(w, r) for w in CHANGE_NO_FEED for r in ("before #19", "control")]
        workloads = workloads if compared else []
        built = f"changes: {backend}: no change feed in this build" not in joined
        assert built or backend != "memory"
        if built:
            workloads += [(w, "no feed") for w in CHANGE_FEED]
            assert f"changes: {backend}: the watcher in " in joined
            assert f"changes: {backend} watch latency: every subject received each write" in joined
            assert f"changes target {backend} watch latency p99 ≤ 100 ms" in joined
            assert f"changes target {backend} set with a feed ≤ 1.3x without" in joined
            raw = ("raw",) if backend in ("postgres", "redis") else ()
            for subject in ("fleetmem", *raw):
                p50 = rows.get((f"{backend} watch latency p50", subject))
                p99 = rows.get((f"{backend} watch latency p99", subject))
                assert p50 is not None and p99 is not None, (backend, subject)
                assert p50["unit"] == p99["unit"] == "ms"
                assert p99["values"][0] >= p50["values"][0]
        for workload, reference in workloads:
            for subject in ("fleetmem", reference):
                row = rows.get((f"{backend} {workload}", subject))
                assert row is not None, (backend, workload, subject)
    assert "memory" in measured
    for (workload, _subject), row in rows.items():
        assert workload.split()[0] in measured
        values = row["values"]
        assert values and all(math.isfinite(v) and v > 0 for v in values)
    assert "note: changes: " in printed

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        # The raw stream is gone; fleetmem's keys stay (its registry, and a disabled feed's
        # last epoch, kept so that the cursors before it stay expired), its entries do not.
        leftover = [k for k in client.scan_iter(count=1000) if not k.startswith(b"fm:{")]
        assert leftover == []
    finally:
        client.close()

    import asyncio

    import asyncpg

    from fleetmem.backends.redis import RedisStore

    async def left_behind() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_changes%'"
            )
        finally:
            await conn.close()
        entries = []
        for suffix in ("base", "head", "control", "off", "on", "watched", "latency"):
            store = RedisStore.from_url(redis_url, namespace=f"bench-changes-{suffix}")
            async with store:
                entries += [f"{suffix}: {key}" for key in await store.keys()]
        return [r["nspname"] for r in found], entries

    assert asyncio.run(left_behind()) == ([], [])
