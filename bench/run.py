"""Run fleetmem's benchmarks: ``python bench/run.py [--quick] [--only SECTIONS]``.

The same as ``fleetmem bench`` (which, from a source checkout, runs this file); see the
``suite`` package next to it for what is measured and how. The benchmarks are not part of the
fleetmem package: run them from a checkout, with ``pip install -e '.[bench]'`` for the peers.
"""

from __future__ import annotations

import contextlib
import sys

from suite import main as _suite_main

#: What ``--help`` adds after the options: which servers the run uses, how to give others.
SERVERS_HELP = """\
servers:
  The benchmarks measure PostgreSQL and Redis (the hybrid uses both). By default the run
  starts its own throwaway servers from the local binaries (initdb/postgres and
  redis-server, found on PATH or in the usual install directories; PostgreSQL with fsync
  on), and stops them when it ends. To measure other servers, set
    FLEETMEM_BENCH_POSTGRES_URL=postgresql://USER:PASSWORD@HOST:5432/DB
    FLEETMEM_BENCH_REDIS_URL=redis://HOST:6379/0
  or give fleetmem a URL: fleetmem --url postgresql://... bench, fleetmem --url
  redis://... bench, or fleetmem --url 'hybrid+postgresql://...?cache=redis://...' bench
  for both. The run writes there: it creates and truncates the table bench_raw,
  clears the namespaces bench, bench-hybrid and bench-ns-0000 to bench-ns-0999 (and
  aiocache's aio) and deletes the Redis keys raw:* and rawns:* it wrote; the leases
  section leaves the lease records of bench-leases and bench-leases-raw (a lease's last
  token is kept for good, by design); the queues section creates and drops the table
  bench_raw_queue and the schema bench_procrastinate, deletes the Redis keys rawq:*,
  saq:*bench-saq*, arq:*bench-* and bench-arq* it wrote, and leaves the jobs of the
  namespace bench-queues (an acked job's result is held for a day); the changes section
  creates and drops the schemas bench_changes_base, bench_changes_head and
  bench_changes_control (fleetmem before and after the change feed, each with its own
  tables), clears the namespaces bench-changes-* and disables their feeds, and deletes
  the Redis stream rawc:{bench}:changes; the snapshots section creates and drops the
  schema bench_snapshots, and clears the namespaces bench-snap-* and deletes their
  snapshots; the langgraph section runs LangGraph's AsyncPostgresStore.setup() (its
  tables store and store_migrations stay), deletes the rows memories.bench-user-* it
  wrote there and clears the namespace bench-langgraph: give it servers you can spare. The changes
  section takes fleetmem before the change feed from the checkout's git history (git
  archive, read-only).

needs: pip install -e '.[bench]' in the checkout (asyncpg, redis, the peers, matplotlib
for --chart); --from-json needs none of them."""


def main(argv: list[str] | None = None) -> int:
    """``fleetmem bench`` / ``python bench/run.py``: the suite's command line; ``--help`` also
    says which servers the run uses and how to point it at others."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        with contextlib.suppress(SystemExit):  # argparse exits after printing the help
            _suite_main(["--help"])
        print()
        print(SERVERS_HELP)
        return 0
    return _suite_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
