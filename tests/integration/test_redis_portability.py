"""Export and import on Redis (standalone and Cluster): what ``RedisKV.export_pages``,
``import_batch`` and ``import_replace`` write and record, seen from the store, from the change
feed and from Redis itself.

The conformance suite checks the contract through ``Store.export_to`` / ``import_from`` on
every backend; these tests check how Redis keeps it (``lua/kv/import.lua``, the ``scan`` page
behind the export): versions and timestamps by the write rules, the absolute expiry kept on
the server's clock, the index and counts kept, the change feed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, InvalidArgumentError, copy_namespace, portability
from fleetmem._codec import encode_value
from fleetmem.backends.redis import RedisKV, RedisStore
from fleetmem.backends.redis.entries import datetime_ms
from fleetmem.backends.seam import ImportOp, ImportTally
from fleetmem.portability import ImportReport, format_time
from fleetmem.protocol import Change, Entry
from fleetmem.testing import connected_store
from fleetmem.testing.servers import find_free_port

pytestmark = pytest.mark.redis

key_slot = pytest.importorskip("redis.crc").key_slot

#: The far end of what an export may carry: 9999-12-31T23:59:59.999Z.
FAR = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)


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


def kv_of(store: RedisStore) -> RedisKV:
    return store.kv


def op(key: str, value: Any, partition: str = "default", expires_at: Any = None) -> ImportOp:
    return ImportOp(key, encode_value(value), partition, expires_at)


async def server_now(store: RedisStore) -> datetime:
    """The Redis server's clock now (the updated time of a write), to the millisecond."""
    written = await store.set("~clock", 0)
    await store.delete("~clock")
    return written.updated_at


def ms(at: datetime) -> datetime:
    """``at`` rounded down to the millisecond, as Redis keeps it."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


async def all_changes(store: RedisStore) -> list[Change]:
    out: list[Change] = []
    batch = await store.changes.read()
    while batch.changes:
        out += batch.changes
        batch = await store.changes.read(batch.cursor)
    return out


async def pages_of(*pages: list[ImportOp]) -> AsyncIterator[list[ImportOp]]:
    for page in pages:
        yield page


async def export_all(
    kv: RedisKV, prefix: str = "", partition: str | None = None, size: int = 1000
) -> list[list[Entry]]:
    return [page async for page in kv.export_pages(prefix, partition, size)]


def test_redis_exports_per_entry_and_replaces_page_by_page() -> None:
    assert RedisKV.export_consistency == "per-entry"
    assert RedisKV.replace_is_atomic is False


async def test_merge_writes_each_entry_as_a_set_with_its_partition_and_expiry(
    store: RedisStore,
) -> None:
    await store.set("a", 0, ttl=60, partition="p1")
    first = await store.set("a", 1)
    assert first.version == 2
    now = await server_now(store)
    later = now + timedelta(hours=1, microseconds=123_456)
    big = 12345678901234567890123  # stored "!"-marked: read back exactly
    tally = await kv_of(store).import_batch(
        [
            op("a", {"x": 1}, "p2", later),
            op("b", big),
            op("c", "s", "p1", FAR),
        ],
        False,
    )
    assert tally == ImportTally(3, 0, 0)
    a, b, c = [await store.get_entry(k) for k in "abc"]
    assert a is not None and b is not None and c is not None
    # A live entry: version + 1, created kept, updated now, the import's partition and expiry.
    assert (a.value, a.partition, a.version) == ({"x": 1}, "p2", 3)
    assert a.created_at == first.created_at and a.updated_at >= now
    assert a.expires_at == ms(later)
    # A new entry: version 1, created = updated, persistent.
    assert (b.value, b.partition, b.version, b.expires_at) == (big, "default", 1, None)
    assert type(b.value) is int and b.created_at == b.updated_at >= now
    assert (c.partition, c.expires_at) == ("p1", FAR)
    # The expiry is absolute: Redis holds exactly the import's millisecond.
    raw = store.kv.connector.client
    assert await raw.pexpiretime(f"fm:{{{store.namespace}}}:e:a") == datetime_ms(later)
    assert await raw.pexpiretime(f"fm:{{{store.namespace}}}:e:c") == datetime_ms(FAR)
    # Index and counts follow the partitions.
    assert await store.keys() == ["a", "b", "c"]
    assert await store.keys(partition="p2") == ["a"]
    assert await store.keys(partition="p1") == ["c"]
    assert await store.partitions() == ["default", "p1", "p2"]
    stats = await store.stats()
    assert (stats.keys, stats.partitions) == (3, {"default": 1, "p1": 1, "p2": 1})
    # Every key of the namespace sits in its one slot (the script would fail otherwise).
    assert len({key_slot(f"fm:{{{store.namespace}}}:{s}".encode()) for s in "ecds"}) == 1


async def test_ops_whose_expiry_passed_on_the_server_clock_are_skipped(store: RedisStore) -> None:
    await store.set("old", "kept")
    now = await server_now(store)
    kv = kv_of(store)
    tally = await kv.import_batch(
        [
            op("gone", 1, expires_at=now - timedelta(hours=1)),
            op("old", "new", expires_at=now - timedelta(milliseconds=1)),
            # An hour ahead: written however long the call takes; that Redis expires it at
            # exactly this millisecond is read back from PEXPIRETIME (no waiting on the clock).
            op("soon", 2, expires_at=now + timedelta(hours=1, microseconds=1500)),
        ],
        False,
    )
    assert tally == ImportTally(1, 2, 0)
    assert await store.get("gone") is None
    old = await store.get_entry("old")
    assert old is not None and (old.value, old.version) == ("kept", 1)
    raw = store.kv.connector.client
    soon_at = now + timedelta(hours=1, milliseconds=1)  # to the millisecond, rounded down
    assert await raw.pexpiretime(f"fm:{{{store.namespace}}}:e:soon") == datetime_ms(soon_at)
    left = await store.ttl("soon")
    assert left is not None and 3500 < left <= 3600.002
    # Expired and existing at once counts as expired, also with missing_only.
    past = now - timedelta(seconds=1)
    assert await kv.import_batch([op("old", "x", expires_at=past)], True) == ImportTally(0, 1, 0)
    assert await store.keys() == ["old", "soon"]


async def test_missing_only_writes_the_keys_without_a_live_entry(store: RedisStore) -> None:
    await store.set("a", "mine")
    await store.set("e", "expiring", ttl=0.05)  # its index member outlives it
    await asyncio.sleep(0.15)
    kv = kv_of(store)
    tally = await kv.import_batch([op("a", "theirs"), op("e", "theirs"), op("n", "theirs")], True)
    assert tally == ImportTally(2, 0, 1)
    a, e, n = [await store.get_entry(k) for k in "aen"]
    assert a is not None and (a.value, a.version) == ("mine", 1)
    assert e is not None and (e.value, e.version, e.expires_at) == ("theirs", 1, None)
    assert n is not None and (n.value, n.version) == ("theirs", 1)
    assert await store.keys() == ["a", "e", "n"]
    assert (await store.stats()).keys == 3  # the expired entry's member was replaced, once
    # Merge overwrites all of them.
    assert await kv.import_batch([op("a", 1), op("e", 2), op("n", 3)], False) == (3, 0, 0)
    assert await store.get_many(["a", "e", "n"]) == {"a": 1, "e": 2, "n": 3}
    assert [(await store.get_entry(k)).version for k in "aen"] == [2, 2, 2]  # type: ignore[union-attr]


async def test_a_persistent_import_over_an_entry_with_a_ttl_makes_it_persistent(
    store: RedisStore,
) -> None:
    await store.set("t", 1, ttl=60)
    now = await server_now(store)
    kv = kv_of(store)
    assert await kv.import_batch([op("t", 2)], False) == (1, 0, 0)
    assert await store.ttl("t") is None
    assert await store.cleanup_expired() == 0
    assert (await store.stats()).keys == 1
    # And back to an expiry, then a partition move: one member, counted once.
    soon = now + timedelta(seconds=30)
    assert await kv.import_batch([op("t", 3, "q", soon)], False) == (1, 0, 0)
    entry = await store.get_entry("t")
    assert entry is not None and (entry.value, entry.partition, entry.version) == (3, "q", 3)
    assert entry.expires_at == ms(soon)
    assert (await store.stats()).partitions == {"q": 1}


async def test_large_imports_span_calls_and_keep_every_entry(store: RedisStore) -> None:
    now = await server_now(store)
    ops = [
        op(
            f"k{i:05d}",
            {"i": i, "pad": "x" * (i % 50)},
            f"p{i % 3}",
            None if i % 2 else now + timedelta(minutes=10 + i),
        )
        for i in range(2500)
    ]
    kv = kv_of(store)
    assert await kv.import_batch(ops, False) == (2500, 0, 0)
    pages = await export_all(kv, size=1000)
    assert [len(p) for p in pages] == [1000, 1000, 500]
    got = [e for page in pages for e in page]
    assert [e.key for e in got] == [o.key for o in ops]
    for entry, i in zip(got, range(2500), strict=True):
        assert entry.value == {"i": i, "pad": "x" * (i % 50)}
        assert entry.partition == f"p{i % 3}" and entry.version == 1
        assert entry.expires_at == (None if i % 2 else ms(now + timedelta(minutes=10 + i)))
    stats = await store.stats()
    assert stats.keys == 2500 and stats.partitions == {"p0": 834, "p1": 833, "p2": 833}
    # Values large enough to split a batch by bytes.
    heavy = [op(f"h{i}", "v" * 3_000_000) for i in range(7)]
    assert await kv.import_batch(heavy, False) == (7, 0, 0)
    assert await store.get("h6") == "v" * 3_000_000


async def test_the_change_feed_records_what_an_import_writes(store: RedisStore) -> None:
    await store.set("have", 1)
    await store.changes.enable()
    now = await server_now(store)
    later = now + timedelta(minutes=5)
    kv = kv_of(store)
    await kv.import_batch(
        [
            op("a", {"v": 1}, "p", later),
            op("gone", 1, expires_at=now - timedelta(seconds=1)),
            op("have", 2),
        ],
        False,
    )
    await kv.import_batch([op("b", 12345678901234567890123), op("have", 3)], True)
    changes = [c for c in await all_changes(store) if c.key != "~clock"]
    assert [(c.op, c.key, c.partition, c.version, c.value) for c in changes] == [
        ("set", "a", "p", 1, {"v": 1}),
        ("set", "have", "default", 2, 2),
        ("set", "b", "default", 1, 12345678901234567890123),
    ]
    assert changes[0].expires_at == ms(later) and changes[1].expires_at is None
    assert changes[0].at >= now
    await store.changes.disable()


async def test_replace_leaves_exactly_the_files_entries_and_records_the_deletes(
    store: RedisStore,
) -> None:
    before = ["a0", "a1", "b2", "cz", "k5", "m", "z1", "z2"]
    await store.set_many(dict.fromkeys(before, "old"))
    await store.set("m", "older", partition="q")
    await store.changes.enable()
    now = await server_now(store)
    past, later = now - timedelta(seconds=1), now + timedelta(minutes=1)
    kv = kv_of(store)
    tally = await kv.import_replace(
        pages_of(
            [op("b1", 1), op("c", 2, "p", later), op("k5", "dead", expires_at=past)],
            [],
            [op("m", 4), op("n", 3), op("x", 5, expires_at=past)],
        )
    )
    assert tally == ImportTally(4, 2, 0)
    assert await store.keys() == ["b1", "c", "m", "n"]
    assert await store.get_many(["b1", "c", "m", "n"]) == {"b1": 1, "c": 2, "m": 4, "n": 3}
    m = await store.get_entry("m")
    assert m is not None and (m.version, m.partition) == (3, "default")
    stats = await store.stats()
    assert (stats.keys, stats.partitions) == (4, {"default": 3, "p": 1})
    changes = [c for c in await all_changes(store) if c.key != "~clock"]
    assert sorted((c.op, c.key) for c in changes) == sorted(
        [("set", k) for k in ("b1", "c", "m", "n")]
        + [("delete", k) for k in ("a0", "a1", "b2", "cz", "k5", "z1", "z2")]
    )
    deletes = [c for c in changes if c.op == "delete"]
    assert all(c.version is None and c.value is None for c in deletes)
    # An empty file empties the namespace.
    assert await kv.import_replace(pages_of()) == ImportTally(0, 0, 0)
    assert await store.keys() == []
    await store.changes.disable()


async def test_replace_deletes_keys_in_long_runs_between_and_after_pages(
    store: RedisStore,
) -> None:
    await store.set_many({f"n{i:04d}": i for i in range(2500)})
    kv = kv_of(store)
    tally = await kv.import_replace(
        pages_of([op("n0000", "first")], [op("n1200", "mid"), op("n1201", "mid")])
    )
    assert tally == ImportTally(3, 0, 0)
    assert await store.keys() == ["n0000", "n1200", "n1201"]
    assert (await store.stats()).keys == 3


async def test_replace_refuses_keys_out_of_order_before_writing_the_page(
    store: RedisStore,
) -> None:
    await store.set_many({"a": 0, "z": 0})
    kv = kv_of(store)
    with pytest.raises(InvalidArgumentError, match="strictly ascending"):
        await kv.import_replace(pages_of([op("b", 1), op("c", 1)], [op("d", 1), op("c2", 1)]))
    # The first page was written (and "a" before it deleted); nothing of the second.
    assert await store.get_many(["a", "b", "c", "c2", "d", "z"]) == {"b": 1, "c": 1, "z": 0}
    with pytest.raises(InvalidArgumentError, match="strictly ascending"):
        await kv.import_replace(pages_of([op("b", 2), op("b", 3)]))
    assert await store.get_many(["b", "c", "z"]) == {"b": 1, "c": 1, "z": 0}


async def test_export_pages_hold_the_live_entries_in_key_order(store: RedisStore) -> None:
    now = await server_now(store)
    await store.set_many({f"x{i:03d}": i for i in range(300)})
    await store.set_many({f"y{i:03d}": {"i": i} for i in range(50)}, partition="p", ttl=600)
    await store.set("x100", "moved", partition="p")
    await store.set("x150", "short", ttl=0.05)
    await store.set("big", 2**80)
    # The expiry index lists the keys that may have an expiry: one made persistent since (its
    # member stays until a prune) and one given an expiry by expire() are exported right.
    await store.set("x200", "was timed", ttl=600)
    await store.set("x200", "persistent now")
    assert await store.expire("x201", 300)
    await asyncio.sleep(0.15)  # x150 expired: not exported, its member dropped on the way
    kv = kv_of(store)
    everything = [e for page in await export_all(kv, size=64) for e in page]
    keys = [e.key for e in everything]
    assert keys == sorted(keys) and len(keys) == 300 - 1 + 50 + 1
    assert "x150" not in keys
    assert everything == list((await kv.get_entries(keys)).values())
    timed = {e.key: e.expires_at for e in everything if e.key in ("x200", "x201")}
    assert timed["x200"] is None and timed["x201"] is not None and timed["x201"] > now
    assert all(len(p) == 64 for p in (await export_all(kv, size=64))[:-1])
    by_prefix = [e for page in await export_all(kv, "y0", None, 7) for e in page]
    assert [e.key for e in by_prefix] == [f"y{i:03d}" for i in range(50)]
    assert all(e.expires_at is not None and e.expires_at > now for e in by_prefix)
    in_p = [e.key for page in await export_all(kv, "", "p", 1000) for e in page]
    assert in_p == ["x100"] + [f"y{i:03d}" for i in range(50)]
    assert next(e for page in await export_all(kv, "x1", "p", 1) for e in page).value == "moved"
    (only,) = [e for page in await export_all(kv, "big", None, 10) for e in page]
    assert only.value == 2**80 and type(only.value) is int
    assert await export_all(kv, "nothing") == []
    assert (await store.stats()).keys == 350


# ------------------------------------------------------------------------------------ clocks


async def test_server_time_is_the_servers_clock(store: RedisStore) -> None:
    before = await server_now(store)
    now = await store.kv.server_time()
    after = await server_now(store)
    assert now.tzinfo is timezone.utc
    # Writes carry the server's TIME to the millisecond (rounded down); TIME has microseconds.
    assert before <= now < after + timedelta(milliseconds=1)


async def test_server_time_errors_are_translated() -> None:
    kv = RedisKV.from_url(f"redis://127.0.0.1:{find_free_port()}/0", namespace="t", timeout=0.5)
    try:
        with pytest.raises(BackendUnavailableError):
            await kv.server_time()
    finally:
        await kv.aclose()


class SkewedDatetime(datetime):
    """``datetime`` whose ``now()`` runs :attr:`skew` seconds off the real clock -- an
    application host with a wrong clock -- put in place of the import front end's only: Redis
    keeps its own. (At module level: the check pass pickles what it parses.)"""

    skew = 0.0

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(seconds=cls.skew)


@pytest.fixture(params=[-30, 30])
def skewed_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(SkewedDatetime, "skew", request.param)
    monkeypatch.setattr(portability, "datetime", SkewedDatetime)
    return int(request.param)


def _export_of(entries: list[tuple[str, Any, datetime | None]]) -> bytes:
    """A valid export file of ``(key, value, expires_at)``."""
    lines = b"".join(
        json.dumps(
            {"key": k, "value": v, "expires_at": None if e is None else format_time(e)},
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for k, v, e in entries
    )
    head = b'{"format":"fleetmem-export","version":1}\n'
    tail = b'{"end":true,"count":%d,"sha256":"%s"}\n' % (
        len(entries),
        hashlib.sha256(lines).hexdigest().encode(),
    )
    return head + lines + tail


@pytest.mark.parametrize("mode", ["merge", "replace"])
async def test_a_skewed_client_clock_does_not_change_what_is_imported(
    store: RedisStore, skewed_client: int, mode: str
) -> None:
    """With the application 30 s ahead of Redis, an entry with 10 s left on the server is
    written (a replace keeps its key); 30 s behind, one 10 s past its expiry is skipped."""
    now = await server_now(store)
    await store.set_many({"dead": "old", "live": "old", "other": "old"})
    data = _export_of(
        [("dead", "new", now - timedelta(seconds=10)), ("live", "new", now + timedelta(seconds=10))]
    )
    report = await store.import_from(io.BytesIO(data), mode=mode)
    assert report == ImportReport(written=1, skipped_expired=1, skipped_existing=0)
    expected = (
        {"dead": "old", "live": "new", "other": "old"} if mode == "merge" else {"live": "new"}
    )
    assert await store.get_many(await store.keys()) == expected
    left = await store.ttl("live")
    assert left is not None and 0 < left <= 10


async def test_a_copy_is_verified_on_the_destination_clock(
    store: RedisStore, skewed_client: int
) -> None:
    """An entry copied correctly that expires on Redis before it is compared is excused,
    whichever way the application's clock is off."""
    src = store.with_namespace(store.namespace + "-src")
    try:
        await src.set("fleeting", 1, ttl=0.3)
        await src.set("lasting", 2, ttl=60)

        def slow_import(phase: str, done: int) -> None:
            if phase == "import":
                time.sleep(0.4)  # "fleeting" expires between its write and its comparison

        report = await copy_namespace(src, store, progress=slow_import)
        assert report.verified and report.copied + report.skipped_expired == 2
        assert await store.keys() == ["lasting"]
    finally:
        await src.clear()
