"""``fleetmem.copy_namespace`` between every ordered pair of the five backends (issue #20).

Each of the 25 pairs (a backend with itself too: two namespaces, two SQLite files, two
in-memory stores) copies a namespace holding TTLs of several lengths, several partitions,
integers beyond 64 bits, non-ASCII keys in an order where code points, UTF-16 and a locale
disagree, and values of every JSON shape, with ``verify=True``. Then the destination is checked
independently of the copy's own verification, through its public reads only: every key,
ascending; each entry's value (exactly: an integer stays an integer of the same value),
partition and absolute expiry; ``keys(partition=...)`` per partition; the versions the write
rules give. The mode cycles through ``merge``, ``missing`` and ``replace`` across the pairs, and
the destination starts with a key of its own and a key the source also has (read once, so that
the hybrid's cache holds it), so each mode shows what it keeps.

Real servers come from the harness (``fleetmem_postgres_server``, ``fleetmem_redis_server``);
each pair is marked with the markers of both its backends, so that a run with
``FLEETMEM_REQUIRE_SERVERS=1`` fails instead of skipping when a server cannot be had.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import fleetmem
from fleetmem import CopyReport, Entry
from fleetmem.store import Store
from fleetmem.testing import connected_store
from fleetmem.testing.conformance._base import assert_same_json

Opener = Callable[[pytest.FixtureRequest, str, str], Awaitable[Any]]


async def _memory(request: pytest.FixtureRequest, namespace: str, tag: str) -> Any:
    from fleetmem import InMemoryStore

    return InMemoryStore(namespace=namespace)


async def _sqlite(request: pytest.FixtureRequest, namespace: str, tag: str) -> Any:
    from fleetmem.backends.sqlite import SQLiteStore

    tmp_path: Path = request.getfixturevalue("tmp_path")
    return SQLiteStore(tmp_path / f"{tag}.db", namespace=namespace)


async def _postgres(request: pytest.FixtureRequest, namespace: str, tag: str) -> Any:
    from fleetmem.backends.postgres import PostgresStore

    server = request.getfixturevalue("fleetmem_postgres_server")
    return PostgresStore.from_url(server.dsn, namespace=namespace, min_size=1, max_size=4)


async def _redis(request: pytest.FixtureRequest, namespace: str, tag: str) -> Any:
    from fleetmem.backends.redis import RedisStore

    server = request.getfixturevalue("fleetmem_redis_server")
    return RedisStore.from_url(server.url, namespace=namespace)


async def _hybrid(request: pytest.FixtureRequest, namespace: str, tag: str) -> Any:
    from fleetmem.backends.hybrid import HybridStore

    pg = request.getfixturevalue("fleetmem_postgres_server")
    rs = request.getfixturevalue("fleetmem_redis_server")
    return HybridStore.from_urls(
        pg.dsn, rs.url, namespace=namespace, postgres_options={"min_size": 1, "max_size": 4}
    )


#: name -> (opener, marks): one table of backends, as in ``tests/conftest.py``.
BACKENDS: dict[str, tuple[Opener, tuple[pytest.MarkDecorator, ...]]] = {
    "memory": (_memory, (pytest.mark.memory,)),
    "sqlite": (_sqlite, (pytest.mark.sqlite,)),
    "postgres": (_postgres, (pytest.mark.postgres,)),
    "redis": (_redis, (pytest.mark.redis,)),
    "hybrid": (_hybrid, (pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis)),
}
MODES = ("merge", "missing", "replace")


def _pairs() -> list[Any]:
    params = []
    for index, (src, dst) in enumerate(itertools.product(BACKENDS, repeat=2)):
        marks = {mark.name: mark for mark in (*BACKENDS[src][1], *BACKENDS[dst][1])}
        params.append(
            pytest.param(
                src, dst, MODES[index % len(MODES)], marks=list(marks.values()), id=f"{src}-{dst}"
            )
        )
    return params


#: Seconds two backends' absolute expiries of one entry may differ by: both come from the same
#: machine's clock, kept to the millisecond; this covers a loaded machine.
EXPIRY_SLACK = 0.25

#: Keys whose code point order is neither a locale's (``B`` < ``_`` < ``a``) nor UTF-16's
#: (U+FFFF < U+1F600), a prefix family, the longest key, spaces and glob characters.
KEYS = [
    "B",
    "_",
    "a",
    "a b",
    "a/1",
    "a/10",
    "a/2",
    "\u00e9",
    "\u00e9t\u00e9/\u4e2d\u6587",
    "\u4e2d\u6587",
    "\uffff",
    "\U0001f600",
    "\U0001f600/x",
    "* ? [ ] \\ % _ { } :",
    "z" * 1024,
    "\u00e9" * 512,
]
VALUES: list[Any] = [
    2**100,
    -(2**70),
    10**40,
    {"big": 2**64, "list": [2**65, -(2**65), 1.5e300], "bool": [True, False]},
    'unicode \u00e9 \U0001f600 \u4e2d\u6587 \u2028 "q" \\',
    None,
    "",
    [],
    {},
    0.1,
    -2.5,
    True,
    False,
    0,
    [1, "a", None, True, 1.5, [], {"k": [2**80]}],
    {"\u00e9\U0001f600": "unicode dict key", "nested": {"a": {"b": [1, -1]}}},
]
PARTITIONS = ["default", "p1", "agent:7/run {1}", "\u00e9" * 127 + "a", "p" * 255]
TTLS: list[float | None] = [None, 600.0, 3600.0, 86_400.0, 7 * 86_400.0]


def dataset() -> list[tuple[str, Any, str, float | None]]:
    """(key, value, partition, ttl) of the source: the keys above and a page of plain ones."""
    keys = [*KEYS, *(f"k/{i:03d}" for i in range(44))]
    return [
        (key, VALUES[i % len(VALUES)], PARTITIONS[i % len(PARTITIONS)], TTLS[i % len(TTLS)])
        for i, key in enumerate(keys)
    ]


@contextlib.asynccontextmanager
async def opened(
    request: pytest.FixtureRequest, backend: str, namespace: str, tag: str
) -> AsyncIterator[Any]:
    store = await BACKENDS[backend][0](request, namespace, tag)
    async with connected_store(store) as connected:
        yield connected


async def entries_of(store: Any) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for key in await store.keys():
        entry = await store.get_entry(key)
        if entry is not None:
            out[key] = entry
    return out


def assert_expiry(actual: datetime | None, expected: datetime | None, what: str) -> None:
    if expected is None:
        assert actual is None, f"{what}: expected no expiry, got {actual}"
        return
    assert actual is not None, f"{what}: expected {expected}, got no expiry"
    gap = abs((actual - expected).total_seconds())
    assert gap <= EXPIRY_SLACK, f"{what}: {actual} is {gap:.6f} s from {expected}"


@pytest.mark.parametrize(("src_backend", "dst_backend", "mode"), _pairs())
async def test_copy_namespace_between_backends(
    request: pytest.FixtureRequest,
    fleetmem_namespace: str,
    src_backend: str,
    dst_backend: str,
    mode: str,
) -> None:
    data = dataset()
    async with (
        opened(request, src_backend, f"{fleetmem_namespace}-src", "src") as src,
        opened(request, dst_backend, f"{fleetmem_namespace}-dst", "dst") as dst,
    ):
        assert isinstance(src, Store) and isinstance(dst, Store)
        for key, value, partition, ttl in data:
            await src.set(key, value, partition=partition, ttl=ttl)
        source = await entries_of(src)
        assert sorted(source) == sorted(key for key, *_ in data)
        # The destination's own key, and one the source has too (read: cached where there
        # is a cache, which the copy must not leave stale).
        await dst.set("zz-own", {"mine": 2**90}, partition="own", ttl=3600)
        await dst.set("a", "the destination's", partition="own")
        own = await dst.get_entry("zz-own")
        assert await dst.get("a") == "the destination's"

        report = await fleetmem.copy_namespace(src, dst, mode=mode, verify=True)

        assert isinstance(report, CopyReport), report
        copied = len(data) - (1 if mode == "missing" else 0)
        assert (report.copied, report.skipped_expired, report.verified) == (copied, 0, True)
        got = await entries_of(dst)
        expected_keys = set(source) | ({"zz-own"} if mode != "replace" else set())
        assert set(got) == expected_keys, sorted(set(got) ^ expected_keys)
        assert await dst.keys() == sorted(expected_keys), "keys() not ascending by code point"
        for key, entry in source.items():
            other = got[key]
            if key == "a" and mode == "missing":
                assert (other.value, other.partition, other.version) == (
                    "the destination's",
                    "own",
                    1,
                ), other
                assert await dst.get("a") == "the destination's"
                continue
            what = f"{src_backend} -> {dst_backend} {key!r}"
            assert_same_json(other.value, entry.value, what)
            assert_same_json(await dst.get(key), entry.value, f"{what} get()")
            assert other.partition == entry.partition, (what, other, entry)
            assert_expiry(other.expires_at, entry.expires_at, what)
            ttl = await dst.ttl(key)
            if entry.expires_at is None:
                assert ttl is None, (what, ttl)
            else:
                remaining = (entry.expires_at - other.updated_at).total_seconds()
                assert ttl is not None and 0 < ttl <= remaining + 5, (what, ttl, remaining)
            assert other.version == (2 if key == "a" else 1), (what, other)
        for partition in [*PARTITIONS, "own"]:
            want = await src.keys(partition=partition)
            if partition == "own":
                want = [] if mode == "replace" else ["zz-own"]
                if mode == "missing":
                    want = ["a", "zz-own"]
            elif mode == "missing" and partition == source["a"].partition:
                want = [k for k in want if k != "a"]
            assert await dst.keys(partition=partition) == want, (partition, mode)
        if mode != "replace":
            assert await dst.get_entry("zz-own") == own
        # The source is untouched, and a second copy of the same source finds nothing missing.
        assert await entries_of(src) == source
        again = await fleetmem.copy_namespace(src, dst, mode="missing", verify=True)
        assert (again.copied, again.skipped_expired, again.verified) == (0, 0, True)
