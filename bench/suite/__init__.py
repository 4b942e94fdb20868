"""``fleetmem bench``: fleetmem against the raw drivers (and peers), measured in one run.

Every workload runs the raw driver and fleetmem doing the same work in the same process,
alternating which goes first, for several repetitions; the report gives min/median/max per
subject and the ratio of medians. Peers (LangGraph's ``AsyncPostgresStore``, aiocache, cashews,
procrastinate, saq; arq when installed with ``pip install --no-deps arq``) run too when the
``bench`` extra is installed. Servers come from ``FLEETMEM_BENCH_POSTGRES_URL``
/ ``FLEETMEM_BENCH_REDIS_URL`` or are started from the local binaries by the test harness.

Benchmarks are not tests: nothing here fails on a figure. They live in the source checkout, not
in the package users install: ``python bench/run.py`` (or ``fleetmem bench`` from a checkout).

Modules: :mod:`.workloads` (the value stored, the call counts, how single calls, batches and
the 64-coroutine loads are run), :mod:`.timing`, :mod:`.results`, one module per section
(:mod:`.postgres`, :mod:`.redis`, :mod:`.hybrid`, :mod:`.leases`, :mod:`.queues` (with
procrastinate, saq and arq), :mod:`.scaling`;
:mod:`.primitives` runs the ``namespaces()`` and ``fleetmem.sync`` workloads alone),
:mod:`.report` and :mod:`.cli` (the command line).
"""

from __future__ import annotations

from .cli import main, run
from .results import Measurement

__all__ = ["Measurement", "main", "run"]
