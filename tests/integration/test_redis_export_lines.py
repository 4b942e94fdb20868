"""``RedisKV.export_lines`` (an export's lines written straight from the ``scan`` script's
replies) against the path through ``Entry`` objects on the same namespace: ``export_pages``
with ``portability._entry_line``, and ``export_to`` with the seam's default ``export_lines``.
Every line, page and trailer must be the same bytes, on a standalone server and a Cluster.

The renderer alone, on replies built in the test, is ``tests/unit/test_export_lines.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fleetmem._codec import encode_value
from fleetmem.backends.redis import RedisKV, RedisStore
from fleetmem.backends.seam import ImportOp, KVBackend
from fleetmem.portability import _entry_line
from fleetmem.protocol import Entry
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

#: The far end of what an export may carry: 9999-12-31T23:59:59.999Z.
FAR = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)

VALUES: list[Any] = [
    {"agent": "agent-0042", "state": "running", "step": 17, "score": 0.8734},
    {"nested": {"a": [1, [2, {"b": [3.5, {"c": {}}]}]], "empty": [], "e": {}}},
    2**64,
    2**200,
    -(2**63) - 1,
    [2**70, 1],
    12345678901234567,
    1,
    -0.0,
    1.0,
    5e-324,
    1e16,
    -1e16,
    1e300,
    0.1,
    [1.0, 1e16, -0.0, 5e-324, 1e22],
    {"f": 1e16, "g": -1.5e17, "h": 0.5},
    [12345678901234567],
    "",
    'quote " backslash \\ tab \t bell \x07 unit \x1f del \x7f',
    "é ü ß 中文 ключ 🙂 \u2028 \ufeff",
    "1" * 19,
    True,
    False,
    None,
    [],
    {},
]

KEYS = ["k", "é", "ключ", "🔑", 'q"uote', "back\\slash", "a b", "\u2028line", "{tag}"]
PARTITIONS = ["default", "p", "раздел", 'p"q']


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
async def store(
    request: pytest.FixtureRequest, fleetmem_namespace: str
) -> AsyncIterator[RedisStore]:
    """A store on the session's Redis, and on its Redis Cluster."""
    fixture = "fleetmem_redis_server" if request.param == "standalone" else "fleetmem_redis_cluster"
    server: Any = request.getfixturevalue(fixture)
    created = RedisStore.from_url(server.url, namespace=fleetmem_namespace)
    async with connected_store(created) as connected:
        yield connected


async def fill(store: RedisStore) -> set[str]:
    """Every value under every kind of key, partition and expiry, ``incr``'s numbers, and
    imported far expiries; the keys the fast path hands to ``render`` (what orjson might
    write otherwise than it is stored)."""
    handed: set[str] = set()
    n = 0
    for i, value in enumerate(VALUES):
        for j, partition in enumerate(PARTITIONS):
            key = f"{KEYS[(i + j) % len(KEYS)]}-{n:04d}"
            # A fractional TTL, long enough that no entry expires between the two exports a
            # test compares (1.5 s did, on a busy machine).
            ttl = [None, 3600, 86_400 * 365 * 50, 1800.5][(i + j) % 4]
            await store.set(key, value, partition=partition, ttl=ttl)
            payload = encode_value(value)
            if payload[:1] not in (b"{", b"[", b'"', b"t", b"f", b"n") or value in (
                2**64,
                2**200,
                [2**70, 1],
                [1.0, 1e16, -0.0, 5e-324, 1e22],
                {"f": 1e16, "g": -1.5e17, "h": 0.5},
                [12345678901234567],
                "1" * 19,
            ):
                handed.add(key)
            n += 1
    # incr's numbers, formatted by Lua (1e+15, 0.30000000000000004 ...).
    increments: dict[str, list[int | float]] = {
        "c-int": [5, -12],
        "c-e15": [1e15],
        "c-sum": [0.1, 0.2],
        "c-small": [1.5e-5],
        "c-big": [1e20],
        "c-max": [2**63 - 1],
    }
    for key, steps in increments.items():
        for step in steps:
            await store.incr(key, step)
        handed.add(key)
    # Expiries an import may carry: year 9999, whole seconds, whole minutes.
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ops = [
        ImportOp("far-9999", encode_value({"far": True}), "p", FAR),
        ImportOp("far-second", encode_value([1, 2]), "default", now + timedelta(days=3)),
        ImportOp("far-minute", encode_value("m"), "раздел", now.replace(second=0) + timedelta(1)),
        ImportOp(
            "far-2100", encode_value({"y": 2100}), "p", datetime(2100, 1, 1, tzinfo=timezone.utc)
        ),
    ]
    await store.kv.import_batch(ops, False)
    # Enough plain entries for several scan calls and pages.
    await store.set_many({f"m-{i:05d}": {"i": i, "s": "x" * (i % 50)} for i in range(6_000)})
    return handed


class Renderer:
    """``_entry_line``, recording the keys it was called for."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, entry: Entry) -> bytes:
        self.keys.append(entry.key)
        return _entry_line(entry)


async def fast_pages(
    kv: RedisKV, prefix: str, partition: str | None, size: int, render: Renderer
) -> list[tuple[list[str], bytes]]:
    out = []
    async with contextlib.aclosing(kv.export_lines(prefix, partition, size, render)) as pages:
        async for keys, blob in pages:
            out.append((keys, bytes(blob)))
    return out


async def slow_pages(
    kv: RedisKV, prefix: str, partition: str | None, size: int
) -> list[tuple[list[str], bytes]]:
    out = []
    async with contextlib.aclosing(kv.export_pages(prefix, partition, size)) as pages:
        async for page in pages:
            out.append(([e.key for e in page], b"".join(_entry_line(e) for e in page)))
    return out


async def test_the_lines_are_those_of_the_entry_path(store: RedisStore) -> None:
    handed = await fill(store)
    kv = store.kv
    total = len(await store.keys())
    for prefix, partition, size in [
        ("", None, 10_000),
        ("", None, 7),
        ("", None, 4_999),
        ("m-", None, 2_500),
        ("", "раздел", 3),
        ("", 'p"q', 10_000),
        ("c-", None, 10_000),
        ("nothing", None, 10),
    ]:
        render = Renderer()
        fast = await fast_pages(kv, prefix, partition, size, render)
        slow = await slow_pages(kv, prefix, partition, size)
        assert fast == slow, (prefix, partition, size)
        if (prefix, partition) == ("", None):
            assert sum(len(keys) for keys, _ in fast) == total
            # The fast path wrote the ordinary entries itself; render had only the others.
            assert set(render.keys) == handed
            whole = b"".join(blob for _, blob in fast)
            assert b'"expires_at":"9999-12-31T23:59:59.999000Z"}' in whole


async def test_export_to_writes_the_same_file_as_the_entry_path(
    store: RedisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(store)
    seen: dict[str, list[int]] = {"fast": [], "slow": []}
    fast = await store.export_to(
        tmp_path / "fast.jsonl", progress=lambda _, n: seen["fast"].append(n)
    )
    with monkeypatch.context() as patched:
        patched.setattr(RedisKV, "export_lines", KVBackend.export_lines)
        slow = await store.export_to(
            tmp_path / "slow.jsonl", progress=lambda _, n: seen["slow"].append(n)
        )
    fast_lines = (tmp_path / "fast.jsonl").read_bytes().split(b"\n")
    slow_lines = (tmp_path / "slow.jsonl").read_bytes().split(b"\n")
    assert fast_lines[1:] == slow_lines[1:]  # every entry line and the trailer
    assert (fast.count, fast.sha256, fast.consistency) == (slow.count, slow.sha256, "per-entry")
    assert seen["fast"] == seen["slow"] and seen["fast"][-1] == fast.count
