"""Clock skew: an application whose clock is 30 s off from its servers' (libfaketime).

The contract measures expiry on the server's clock (``now()`` in PostgreSQL, native TTLs in
Redis), never on the application's. Each test runs one client process under libfaketime
(``FAKETIME="-30s"`` or ``"+30s"``, as ``faketime -f -30s`` would) against servers the harness
owns, whose clocks are the machine's. The skewed process writes entries with a short TTL
through every write path that takes one and reads them back at once (for the hybrid that fills
the Redis cache, sized by the skewed process); once they have expired on the servers' clock,
both the skewed process and this one (a correct clock) must find them absent on every read
path, and absent for the writes that start from "absent" (``set_if_absent``, ``incr``,
``compare_and_set(version=0)``).

Issue 14, bug C: the hybrid sized its cache TTLs with ``datetime.now()`` of the application, so
with the application 30 s behind PostgreSQL every expired entry stayed visible for 30 s more,
to every process sharing the Redis; 30 s ahead, entries with less than 30 s to live were never
cached.

This file is also the skewed client: ``python test_clock_skew.py <backend> <postgres dsn>
<redis url> <namespace> <ttl>`` (see :func:`_child`), one JSON line per phase on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetmem import KeyNotFoundError, VersionConflictError
from fleetmem.testing.plugin import REQUIRE_ENV, REQUIRE_OPTION
from fleetmem.testing.servers import PostgresServer, RedisServer

#: The application's clock against the servers' (seconds): behind, as in the issue, and ahead.
SKEWS = (-30, 30)
#: The entries' TTL (seconds): long enough for the write phase on a loaded machine (it takes a
#: few hundred milliseconds), short enough to wait out.
TTL = 3.0
#: Waited past the expiry of the last entry written, on this machine's monotonic clock.
MARGIN = 0.5
PARTITION = "skew"
#: Entries per write path.
N = 10
#: The paths checked after expiry (both processes).
READ_PATHS = ("get", "get_entry", "get_many", "exists", "ttl", "keys", "search", "partitions")


def _keys() -> dict[str, list[str]]:
    """The keys the skewed process writes, by write path."""
    return {
        "set": [f"skew/set/{i:02d}" for i in range(N)],
        "set_many": [f"skew/many/{i:02d}" for i in range(N)],
        "expire": [f"skew/expire/{i:02d}" for i in range(N)],
        "incr": [f"skew/incr/{i:02d}" for i in range(N)],
        "set_if_absent": [f"skew/sia/{i:02d}" for i in range(N)],
        "compare_and_set": [f"skew/cas/{i:02d}" for i in range(N)],
    }


def _all_keys() -> list[str]:
    return sorted(key for keys in _keys().values() for key in keys)


def _open(backend: str, dsn: str, url: str, namespace: str) -> Any:
    if backend == "postgres":
        from fleetmem.backends.postgres import PostgresStore

        return PostgresStore.from_url(dsn, namespace=namespace)
    if backend == "redis":
        from fleetmem.backends.redis import RedisStore

        return RedisStore.from_url(url, namespace=namespace)
    from fleetmem.backends.hybrid import HybridStore

    return HybridStore.from_urls(dsn, url, namespace=namespace)


# -------------------------------------------------------------------------- both processes


async def _write(store: Any, ttl: float) -> None:
    """Every write path that takes a TTL, ``N`` keys each, all expiring ``ttl`` from now."""
    keys = _keys()
    for key in keys["set"]:
        await store.set(key, {"k": key}, ttl=ttl, partition=PARTITION)
    await store.set_many({key: [key] for key in keys["set_many"]}, ttl=ttl, partition=PARTITION)
    for key in keys["expire"]:
        await store.set(key, key, partition=PARTITION)
        assert await store.expire(key, ttl)
    for key in keys["incr"]:
        await store.incr(key, 5, ttl=ttl, partition=PARTITION)
    for key in keys["set_if_absent"]:
        assert await store.set_if_absent(key, 1.5, ttl=ttl, partition=PARTITION)
    for key in keys["compare_and_set"]:
        await store.compare_and_set(key, None, version=0, ttl=ttl, partition=PARTITION)


async def _visible(store: Any, keys: list[str]) -> dict[str, list[str]]:
    """Per read path, the keys of ``keys`` it shows (for the partition listing: the partition)."""
    missing = object()
    seen: dict[str, list[str]] = {path: [] for path in READ_PATHS}
    for key in keys:
        if await store.get(key, missing) is not missing:
            seen["get"].append(key)
        if await store.get_entry(key) is not None:
            seen["get_entry"].append(key)
        if await store.exists(key):
            seen["exists"].append(key)
        try:
            await store.ttl(key)
        except KeyNotFoundError:
            pass
        else:
            seen["ttl"].append(key)
    seen["get_many"] = sorted(await store.get_many(keys))
    seen["keys"] = await store.keys("skew/")
    seen["search"] = sorted(await store.search("skew/*"))
    seen["partitions"] = [p for p in await store.partitions() if p == PARTITION]
    return seen


async def _absent_for_writes(store: Any, index: int) -> list[str]:
    """The writes that start from "absent", on key ``index`` of their group; the ones that
    found the expired entry instead."""
    keys = _keys()
    wrong = []
    if not await store.set_if_absent(keys["set_if_absent"][index], "new"):
        wrong.append("set_if_absent")
    if await store.incr(keys["incr"][index]) != 1:
        wrong.append("incr")
    try:
        entry = await store.compare_and_set(keys["compare_and_set"][index], "new", version=0)
    except VersionConflictError:
        wrong.append("compare_and_set")
    else:
        if entry.version != 1:
            wrong.append("compare_and_set")
    return wrong


# -------------------------------------------------------------------------- the skewed process


async def _child_main(backend: str, dsn: str, url: str, namespace: str, ttl: float) -> None:
    def say(report: dict[str, Any]) -> None:
        print(json.dumps(report), flush=True)

    keys = _all_keys()
    async with _open(backend, dsn, url, namespace) as store:
        started = time.monotonic()
        await _write(store, ttl)
        written = time.monotonic()
        # Read everything back at once: the hybrid fills its cache here, with this clock.
        before = await _visible(store, keys)
        left = [await store.ttl(key) for key in keys]
        metrics = store.metrics.snapshot() if backend == "hybrid" else {}
        say(
            {
                "wall": time.time(),
                "monotonic": time.monotonic(),
                "started": started,
                "written": written,
                "read": time.monotonic(),
                "before": before,
                "ttl_left": left,
                "metrics": metrics,
            }
        )
        # Wait for the test to say that the entries expired on the servers' clock.
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "check":
            raise SystemExit(f"unexpected command {line!r}")
        after = await _visible(store, keys)
        writes = await _absent_for_writes(store, 1)
        say({"after": after, "writes": writes})


def _child(argv: list[str]) -> None:
    backend, dsn, url, namespace, ttl = argv
    asyncio.run(_child_main(backend, dsn, url, namespace, float(ttl)))


# -------------------------------------------------------------------------- the tests


#: Where distributions put libfaketime (Debian/Ubuntu: the ``faketime`` package's dependency).
_LIBFAKETIME = (
    "usr/lib/*/faketime/libfaketimeMT.so.1",
    "usr/lib/faketime/libfaketimeMT.so.1",
    "usr/lib64/faketime/libfaketimeMT.so.1",
    "usr/local/lib/faketime/libfaketimeMT.so.1",
)


def _libfaketime(config: pytest.Config) -> str:
    """The thread-safe libfaketime (asyncio resolves host names on threads), preloaded into the
    skewed client directly: the ``faketime`` wrapper stays the parent of the process it runs,
    and killing it would leave the client behind."""
    for pattern in _LIBFAKETIME:
        found = sorted(Path("/").glob(pattern))
        if found:
            return str(found[0])
    message = "libfaketime is not installed (apt-get install faketime)"
    if config.getoption(REQUIRE_OPTION, default=False) or os.environ.get(
        REQUIRE_ENV, ""
    ).strip().lower() in ("1", "true", "yes", "on"):
        pytest.fail(f"{message} ({REQUIRE_OPTION} / {REQUIRE_ENV}=1 is set)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def redis_server(fleetmem_redis_factory: Callable[..., RedisServer]) -> Iterator[RedisServer]:
    """A Redis of this module's own (the test reads the hybrid's cache keys on it)."""
    server = fleetmem_redis_factory()
    try:
        yield server
    finally:
        server.close()


class _Skewed:
    """The skewed client process: a JSON line per phase."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def report(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            await self.proc.wait()
            pytest.fail(f"the skewed client exited {self.proc.returncode}:\n{err.decode()}")
        report: dict[str, Any] = json.loads(line)
        return report

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()


@pytest.fixture
async def spawn(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Any]]:
    library = _libfaketime(request.config)
    procs: list[asyncio.subprocess.Process] = []

    async def start(skew: int, *args: str) -> _Skewed:
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD")]))
        env["FAKETIME"] = f"{skew:+d}s"  # an offset from the real clock, which keeps running
        # The monotonic clock stays the machine's: the test compares it across the processes.
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        procs.append(proc)
        return _Skewed(proc)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _cache_pttls(server: RedisServer, namespace: str, keys: list[str]) -> dict[str, int]:
    """The hybrid cache's remaining TTL (ms, on Redis's clock) of each filled key."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(server.url)
    try:
        out = {}
        for key in keys:
            raw: Any = await client.get(f"fmh:{{{namespace}}}:k:{key}")
            if raw is not None and not raw.startswith(b"L:"):  # a value, not a lease
                px = int(await client.pttl(f"fmh:{{{namespace}}}:k:{key}"))
                if px != -2:  # -2: it expired in between
                    out[key] = px
        return out
    finally:
        await client.aclose()


BACKENDS = [
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("skew", SKEWS, ids=[f"app{s:+d}s" for s in SKEWS])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_expiry_follows_the_servers_clock_not_the_apps(
    backend: str,
    skew: int,
    spawn: Callable[..., Any],
    fleetmem_postgres_server: PostgresServer,
    redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Entries written with a 3 s TTL by an application 30 s off: live (and counted down from
    3 s) until they expire on the servers' clock, then absent on every path, to the skewed
    process and to one with a correct clock; the hybrid's cache never outlives them."""
    ns = fleetmem_namespace
    dsn, url = fleetmem_postgres_server.dsn, redis_server.url
    keys = _all_keys()
    child: _Skewed = await spawn(skew, backend, dsn, url, ns, str(TTL))
    first = await child.report()

    # The child's clock is really off by `skew` (the machine's monotonic clock is shared).
    real = time.time() - (time.monotonic() - first["monotonic"])
    assert abs(first["wall"] - real - skew) < 2.0, (first["wall"] - real, skew)

    # Before expiry: everything written is live, and its TTL is counted on the servers' clock.
    took = first["read"] - first["started"]
    assert took < TTL, f"the write phase took {took:.2f} s, longer than the TTL"
    for path in ("get", "get_entry", "get_many", "exists", "ttl", "keys", "search"):
        assert first["before"][path] == keys, path
    assert first["before"]["partitions"] == [PARTITION]
    assert all(0 < left <= TTL for left in first["ttl_left"]), first["ttl_left"]

    pttls: dict[str, int] = {}
    if backend == "hybrid":
        # The cache TTLs the skewed reads set (asserted below, after the contract's checks).
        pttls = await _cache_pttls(redis_server, ns, keys)

    # Expired on the servers' clock (their TTLs started before `written` ended).
    await asyncio.sleep(max(0.0, first["written"] + TTL + MARGIN - time.monotonic()))

    async with _open(backend, dsn, url, ns) as store:
        mine = await _visible(store, keys)
        await child.send("check")
        theirs = await child.report()
        mine_writes = await _absent_for_writes(store, 0)
        visible = {
            f"{who} {path}": f"{len(found)} of {len(keys)}"
            for who, seen in (("correct clock", mine), (f"app {skew:+d} s", theirs["after"]))
            for path, found in seen.items()
            if found
        }
        assert visible == {}, f"expired entries still visible on {len(visible)} paths: {visible}"
        assert theirs["writes"] == [], theirs["writes"]
        assert mine_writes == [], mine_writes
        await store.clear()
    if backend == "hybrid":
        # The skewed reads filled the cache, with TTLs no longer than what PostgreSQL had left
        # (its remaining TTL at fill time, capped by cache_ttl: 3 s, not 3 s -/+ the skew).
        assert first["metrics"]["cache_errors"] == 0, first["metrics"]
        assert pttls, f"nothing was cached (metrics {first['metrics']})"
        assert all(0 < px <= TTL * 1000 for px in pttls.values()), pttls


if __name__ == "__main__":
    _child(sys.argv[1:])
