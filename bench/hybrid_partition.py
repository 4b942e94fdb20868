"""What the hybrid's coherence costs: ``python bench/hybrid_partition.py [--window 0.5]``.

Starts its own PostgreSQL and Redis from the local binaries (as ``fleetmem bench`` does) and
measures, in one run:

* a write with Redis reachable, against a write by a process cut off from Redis (it cannot
  delete its keys): the first write of an outage (it marks the namespace bypassed and waits one
  ``trust_window``) and the writes after it (the mark held);
* a read served from the cache against a read while a writer holds the bypass (PostgreSQL);
* how many PostgreSQL reads of the epoch a busy reader makes (one per window).

The writer cut off from Redis points at a port where nothing listens, which is what a writer
on the wrong side of a partition sees once its breaker is open.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fleetmem.backends.hybrid import HybridStore
from fleetmem.testing import servers


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1e6


def _row(name: str, values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"{name:<58} {len(values):>6} {p50:>12.0f} {p99:>12.0f}"


async def measure(dsn: str, url: str, window: float, calls: int) -> list[str]:
    dead = f"redis://127.0.0.1:{servers.find_free_port()}/0"
    options: dict[str, Any] = {"namespace": "bench-partition", "trust_window": window}
    reader = await HybridStore.from_urls(dsn, url, **options).connect()
    writer = await HybridStore.from_urls(dsn, url, **options).connect()
    cut = await HybridStore.from_urls(dsn, dead, **options).connect()
    rows: list[str] = []
    try:
        keys = [f"k{i:04d}" for i in range(calls)]
        await writer.set_many({key: {"v": 0} for key in keys})
        await reader.get_many(keys)  # cached
        hits: list[float] = []
        connected: list[float] = []
        first: list[float] = []
        after: list[float] = []
        bypassed: list[float] = []
        # Five rounds, each: cache hits and writes with Redis reachable, then an outage of the
        # cut-off writer (its first write waits one window; the mark then lives 10 windows).
        share = max(1, len(keys) // 5)
        for outage in range(5):
            part = keys[outage * share : (outage + 1) * share]
            await reader.get_many(part)  # cached
            hits += [await _timed(partial(reader.get, k)) for k in part]
            connected += [await _timed(partial(writer.set, k, {"v": 1})) for k in part]
            first.append(await _timed(partial(cut.set, "marker", {"outage": outage})))
            after += [await _timed(partial(cut.set, k, {"v": 2})) for k in part]
            bypassed += [await _timed(partial(reader.get, k)) for k in part]
            await asyncio.sleep(window * 11)  # the mark expires; the cache is used again
            assert await reader.get("marker") == {"outage": outage}
        confirmations = reader.metrics.epoch_confirmations
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 10 * window:
            await reader.get(keys[n % len(keys)])
            n += 1
        per_second = (reader.metrics.epoch_confirmations - confirmations) / (10 * window)
        rows += [
            f"{'what':<58} {'calls':>6} {'p50 us':>12} {'p99 us':>12}",
            _row("read, cache hit", hits),
            _row("read while a writer holds the bypass (PostgreSQL)", bypassed),
            _row("write, Redis reachable", connected),
            _row(f"write cut off from Redis, first of an outage (waits {window} s)", first),
            _row("write cut off from Redis, the following ones", after),
            f"epoch confirmations of a busy reader: {per_second:.1f} PostgreSQL reads/s "
            f"(trust_window {window} s; {n} reads in {10 * window:.0f} s)",
            f"bypasses started by the cut-off writer: {cut.metrics.bypasses}; reads bypassed: "
            f"{reader.metrics.bypassed_reads}",
        ]
        await reader.clear()
    finally:
        for store in (cut, writer, reader):
            await store.close()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=0.5, help="trust_window, seconds")
    parser.add_argument("--calls", type=int, default=1000, help="keys, and calls per row")
    args = parser.parse_args(argv)
    pg = servers.start_local_postgres(durable=True)
    rs = servers.start_local_redis()
    try:
        rows = asyncio.run(measure(pg.dsn, rs.url, args.window, args.calls))
    finally:
        rs.close()
        pg.close()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
