"""``fleetmem bench``: fleetmem against the raw drivers (and peers), measured in one run.

The command line (``python bench/run.py``, ``fleetmem bench``): find or start the servers, run
the selected sections, print the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .changes import bench_changes, change_steps
from .hybrid import bench_hybrid
from .langgraph import bench_langgraph, langgraph_steps
from .leases import bench_leases, lease_steps
from .metrics import bench_metrics, metrics_steps
from .portability import bench_portability, portability_steps
from .postgres import bench_postgres
from .primitives import bench_primitives
from .queues import bench_queues, queue_steps
from .redis import bench_redis
from .report import chart, format_report, load_report, targets
from .results import Progress, Report
from .scaling import bench_scaling
from .service import bench_service, service_steps
from .snapshots import bench_snapshots, snapshot_steps
from .workloads import FULL, QUICK, SMOKE, Bench


@contextlib.asynccontextmanager
async def _servers(need_pg: bool, need_redis: bool) -> AsyncIterator[tuple[str | None, str | None]]:
    """Find the servers (``FLEETMEM_BENCH_*_URL``) or start them from the local binaries."""
    pg_url = os.environ.get("FLEETMEM_BENCH_POSTGRES_URL")
    redis_url = os.environ.get("FLEETMEM_BENCH_REDIS_URL")
    started: list[Any] = []
    try:
        if (need_pg and not pg_url) or (need_redis and not redis_url):
            from fleetmem.testing import servers

            if need_pg and not pg_url:
                # fsync stays on: the durable upsert figures must pay for durability.
                pg = servers.start_local_postgres(durable=True)
                started.append(pg)
                pg_url = pg.dsn
            if need_redis and not redis_url:
                rs = servers.start_local_redis()
                started.append(rs)
                redis_url = rs.url
        yield (pg_url if need_pg else None, redis_url if need_redis else None)
    finally:
        for server in started:
            server.close()


def _bench_arguments(argv: list[str]) -> list[str]:
    """The arguments of the run: after ``bench`` for ``fleetmem [global options] bench ARGS``,
    all of them for ``python bench/run.py ARGS``."""
    rest = argv[1:]
    return rest[rest.index("bench") + 1 :] if "bench" in rest else rest


async def run(args: argparse.Namespace) -> Report:
    """Run the selected workloads and return the report."""
    only = set(args.only.split(",")) if args.only else {"postgres", "redis", "hybrid", "leases"}
    report = Report(
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, Python "
        f"{platform.python_version()}",
        command="fleetmem bench " + " ".join(_bench_arguments(sys.argv)),
    )
    # Workloads of each section; each prefix-scaling section also has two loading steps.
    steps = (
        (10 if "postgres" in only else 0)
        + (12 if "redis" in only else 0)
        + (1 if "hybrid" in only else 0)
        + (1 if "namespaces" in only and "postgres" not in only else 0)
        + (1 if "namespaces" in only and "redis" not in only else 0)
        + (1 if "sync" in only and "redis" not in only else 0)
        + (lease_steps(pg=True, rs=True) if "leases" in only else 0)
        + (queue_steps(pg=True, rs=True) if "queues" in only else 0)
        + (change_steps(pg=True, rs=True) if "changes" in only else 0)
        + (portability_steps(pg=True, rs=True) if "portability" in only else 0)
        + (snapshot_steps(pg=True, rs=True) if "snapshots" in only else 0)
        + (service_steps(pg=True, rs=True) if "service" in only else 0)
        + (metrics_steps(pg=True, rs=True) if "metrics" in only else 0)
        + (langgraph_steps() if "langgraph" in only else 0)
    )
    progress = Progress(steps)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.smoke:
        report.notes.append("smoke run (--smoke): too few calls for the figures to mean anything")
    bench = Bench(report, progress, args.repetitions, args.quick, not args.no_peers, sizes)
    # SIGTERM (a CI timeout, `kill`) cancels the run like Ctrl-C: the servers it started stop.
    task = asyncio.current_task()
    if task is not None:
        # Event loops without signal handlers (Windows: NotImplementedError) or a run outside the
        # main thread (RuntimeError) keep the default SIGTERM; Ctrl-C still stops the servers.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    need_pg = bool(
        only & {"postgres", "hybrid", "namespaces", "leases", "queues", "changes", "portability"}
        or bool(only & {"snapshots", "service", "metrics", "langgraph"})
    )
    need_redis = bool(
        only
        & {"redis", "hybrid", "namespaces", "sync", "leases", "queues", "changes", "portability"}
        or bool(only & {"snapshots", "service", "metrics"})
    )
    async with _servers(need_pg, need_redis) as (pg, rs):
        if "postgres" in only and pg:
            await bench_postgres(bench, pg)
        if "redis" in only and rs:
            await bench_redis(bench, rs)
        if "hybrid" in only and pg and rs:
            try:
                await bench_hybrid(bench, pg, rs)
            except ImportError as exc:
                report.notes.append(f"hybrid skipped: {exc}")
        # Alone: the postgres and redis sections end with these workloads.
        await bench_primitives(
            bench, None if "postgres" in only else pg, None if "redis" in only else rs, only
        )
        if "leases" in only:
            await bench_leases(bench, pg, rs)
        if "queues" in only:
            await bench_queues(bench, pg, rs)
        if "changes" in only:
            await bench_changes(bench, pg, rs)
        if "portability" in only:
            await bench_portability(bench, pg, rs)
        if "snapshots" in only:
            await bench_snapshots(bench, pg, rs)
        if "service" in only:
            await bench_service(bench, pg, rs)
        if "metrics" in only:
            await bench_metrics(bench, pg, rs)
        if "langgraph" in only:
            await bench_langgraph(bench, pg)
        await bench_scaling(
            bench, pg if "postgres" in only else None, rs if "redis" in only else None
        )
    progress.finish()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetmem bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        help="comma-separated: postgres,redis,hybrid,leases,queues,changes,portability,"
        "snapshots,service (the sections; the first four by default, queues (about 20 minutes), "
        "changes (the change feed, about 5 minutes), portability (export and import, about 10 "
        "minutes), snapshots (create, restore and the bytes stored) and service (the HTTP "
        "service's KV GET/PUT against the library, about 6 minutes) only when named; leases, "
        "queues, changes, portability, snapshots and service run on memory and SQLite too), "
        "metrics (the cost of instrumentation on a get, every backend; only when named), "
        "langgraph (FleetmemStore against LangGraph's AsyncPostgresStore and the adapter's "
        "overhead, PostgreSQL; only when named), "
        "namespaces, sync (the "
        "namespaces() "
        "and fleetmem.sync workloads alone, which the postgres and redis sections also run)",
    )
    parser.add_argument("--repetitions", "-r", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer calls; 100k instead of 1M")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tenth of --quick's calls, every workload still measured: checks the command "
        "end to end (its tests); the figures mean nothing",
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip LangGraph/aiocache/cashews/redis-py Lock/procrastinate/saq/arq",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart of the ratios here")
    parser.add_argument(
        "--from-json", type=Path, help="do not measure: report (and chart) a saved --json file"
    )
    args = parser.parse_args(argv)
    try:
        report = load_report(args.from_json) if args.from_json else asyncio.run(run(args))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("\nfleetmem bench: interrupted; the servers it started are stopped", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": report.started,
                    "machine": report.machine,
                    "command": report.command,
                    "rows": [
                        {
                            "workload": r.workload,
                            "subject": r.subject,
                            "unit": r.unit,
                            "values": r.values,
                        }
                        for r in report.rows
                    ],
                    "targets": [
                        {"target": text, "figure": value, "met": ok}
                        for text, value, ok in targets(report)
                    ],
                    "notes": report.notes,
                },
                indent=2,
            )
        )
    if args.chart:
        chart(report, args.chart)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
