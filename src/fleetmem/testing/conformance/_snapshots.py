"""Named, incremental snapshots: ``store.snapshots`` and ``export_to(snapshot=...)``.

Every rule of ``PORTABILITY.md`` ("Snapshots") that one store can show, as tests of the
``store`` fixture through the public API only. What a snapshot holds is read back through an
export by its name (each entry's value, partition, version, timestamps and absolute expiry, to
the millisecond) and through :meth:`restore`; the live namespace through ``keys`` and
``get_entry``.

Storage is checked through ``store.kv.snapshots().usage()`` -- the records and bytes the
namespace's snapshots keep -- which is how the contract's "incremental" and "deleting frees
what no other snapshot uses" show: a snapshot taken after 1% of the entries changed adds
about 1% (at most 5%) of the first one's bytes, and deleting a snapshot frees exactly the
records no remaining snapshot holds.

``clear()`` keeps snapshots by contract, so every test deletes the snapshots it made (of the
fixture's namespace and of the siblings it uses), also when it fails. The tests that need an
entry to expire give it a short TTL and poll until the store no longer returns it (the store's
clock decides, not this process's).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, cast

import pytest

import fleetmem
from fleetmem.errors import (
    InvalidKeyError,
    KeyNotFoundError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, MemoryStore, Snapshot, SnapshotDiff
from fleetmem.testing.conformance._base import (
    BAD_KEYS,
    ConformanceBase,
    assert_same_json,
    assert_utc,
    raises_each,
    utcnow,
)
from fleetmem.testing.conformance._portability import (
    HEADER_FIELDS,
    SAMPLE,
    SAMPLE_KEYS,
    ExportFile,
    assert_close,
    assert_file_entry_is,
    counts,
    dumps_line,
    import_lines,
    read_export,
    state_of,
    strict_json,
    write_sample,
)

#: Names every snapshot method refuses with ``InvalidKeyError`` before any I/O: whatever the
#: key rules refuse, and names over 255 UTF-8 bytes (a key may have 1024).
BAD_NAMES: list[Any] = [
    *BAD_KEYS,
    "n" * 256,
    "\u00e9" * 128,  # 256 bytes
    "\U0001f600" * 64,  # 256 bytes
]
#: Names at the limits, accepted and returned unchanged.
GOOD_NAMES: list[str] = [
    "n" * 255,
    "\u00e9" * 127 + "a",  # 255 bytes
    "\U0001f600" * 63 + "abc",  # 255 bytes
    "before run 42: * ? [x] {y} /\\",
]


class SnapshotsAPI(Protocol):
    """``store.snapshots`` as these tests use it."""

    async def create(self, name: str) -> Snapshot: ...

    async def get(self, name: str) -> Snapshot | None: ...

    async def diff(self, a: str, b: str | None = None) -> SnapshotDiff: ...

    async def restore(self, name: str) -> int: ...

    async def delete(self, name: str) -> bool: ...

    async def list(self) -> builtins.list[Snapshot]: ...


def snapshots_of(store: MemoryStore) -> SnapshotsAPI:
    """``store.snapshots``."""
    api = getattr(store, "snapshots", None)
    assert api is not None, f"{type(store).__name__} has no snapshots"
    return cast(SnapshotsAPI, api)


async def usage(store: MemoryStore) -> tuple[int, int]:
    """``(records, bytes)`` the snapshots of ``store``'s namespace keep now."""
    records, size = await cast(Any, store).kv.snapshots().usage()
    assert type(records) is int and type(size) is int, (records, size)
    return records, size


async def export_snapshot(store: MemoryStore, name: str, **options: Any) -> ExportFile:
    """``export_to(snapshot=name)`` into a buffer, parsed and checked as an export (the
    header may name the snapshot: ``"snapshot": name`` after the format's fields)."""
    buffer = io.BytesIO()
    report = await cast(Any, store).export_to(buffer, snapshot=name, **options)
    raw = buffer.getvalue()
    first, _, rest = raw.partition(b"\n")
    header = strict_json(first, "the header")
    assert isinstance(header, dict), header
    fields = tuple(header)
    assert fields in (HEADER_FIELDS, (*HEADER_FIELDS, "snapshot")), f"header: {header!r}"
    assert header.get("snapshot", name) == name, f"header: {header!r}"
    assert header["namespace"] == store.namespace, header
    assert first + b"\n" == dumps_line(header), f"the header is not compact JSON: {first!r}"
    header.pop("snapshot", None)
    exported = read_export(dumps_line(header) + rest)
    assert report.count == len(exported.entries), (report, exported.trailer)
    assert report.sha256 == exported.trailer["sha256"], report
    return exported


def compact(value: Any) -> bytes:
    """``value`` as compact JSON (UTF-8, no blanks): what a snapshot's ``bytes`` counts."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


async def wait_gone(store: MemoryStore, key: str, patience: float) -> None:
    """Poll until ``store`` no longer returns ``key`` (its TTL ran out on the store's clock)."""
    deadline = time.monotonic() + patience
    while await store.get(key) is not None:
        assert time.monotonic() < deadline, f"{key!r} did not expire within {patience} s"
        await asyncio.sleep(0.05)


def live_view(entries: dict[str, Entry]) -> dict[str, tuple[str, str]]:
    """Each key's value (as sorted JSON) and partition."""
    return {
        key: (json.dumps(entry.value, sort_keys=True), entry.partition)
        for key, entry in entries.items()
    }


def file_view(exported: ExportFile) -> dict[str, tuple[str, str]]:
    """An export's keys with their value (as sorted JSON) and partition."""
    return {
        line["key"]: (json.dumps(line["value"], sort_keys=True), line["partition"])
        for line in exported.entries
    }


class SnapshotConformance(ConformanceBase):
    """The rules of ``PORTABILITY.md``, "Snapshots", on one store.

    ``snapshot_slack``
        Seconds of tolerance on a restored entry's absolute expiry (kept to the millisecond,
        blurred only by the store's clock and the write's duration).
    ``snapshot_patience``
        How long (seconds) a test waits for a short-TTL entry to expire before it fails.
    """

    pytestmark = [pytest.mark.asyncio]

    snapshot_slack: float = 0.5
    snapshot_patience: float = 30.0

    @contextlib.asynccontextmanager
    async def snapshots(self, store: MemoryStore) -> AsyncIterator[SnapshotsAPI]:
        """``store.snapshots``; every snapshot of the namespace is deleted afterwards (if the
        store is open): ``clear()`` keeps them."""
        api = snapshots_of(store)
        try:
            yield api
        finally:
            if not store.closed:
                for snapshot in await api.list():
                    await api.delete(snapshot.name)

    @contextlib.asynccontextmanager
    async def sibling(self, store: MemoryStore, suffix: str) -> AsyncIterator[MemoryStore]:
        """A sibling namespace of the fixture's; its entries and snapshots removed after."""
        async with (
            self.sibling_namespaces(store, suffix) as (view,),
            self.snapshots(view),
        ):
            yield view

    async def entries_of(self, store: MemoryStore) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for key in await store.keys():
            entry = await store.get_entry(key)
            if entry is not None:
                out[key] = entry
        return out

    def assert_snapshot(
        self, snapshot: object, name: str, keys: int, taken: tuple[Any, Any] | None = None
    ) -> Snapshot:
        assert isinstance(snapshot, fleetmem.Snapshot), repr(snapshot)
        assert snapshot.name == name, snapshot
        assert type(snapshot.keys) is int and snapshot.keys == keys, snapshot
        assert type(snapshot.bytes) is int and snapshot.bytes >= 0, snapshot
        assert_utc(snapshot.created_at, "created_at")
        if taken is not None:
            skew = timedelta(seconds=self.clock_skew)
            before, after = taken
            assert before - skew <= snapshot.created_at <= after + skew, (snapshot, taken)
        return snapshot

    # ------------------------------------------------------------ create, get, list, delete

    async def test_snapshot_create_get_list_and_delete(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps:
            assert await snaps.list() == []
            started = utcnow()
            empty = self.assert_snapshot(await snaps.create("zeta"), "zeta", 0)
            assert empty.bytes == 0, empty

            ttl = self.expiry_ttl
            await store.set("gone", "expires before the snapshot", ttl=ttl)
            data: dict[str, tuple[Any, str]] = {
                "k1": ({"n": 2**80, "s": "\u00e9"}, "p"),
                "k2": ([1, 2.5, None], "default"),
                "\U0001f600": ("x" * 100, "q"),
            }
            for key, (value, partition) in data.items():
                await store.set(key, value, partition=partition)
            await wait_gone(store, "gone", self.snapshot_patience)
            alpha = self.assert_snapshot(await snaps.create("alpha"), "alpha", 3)
            # The bytes of what it stored: each entry's key, value and partition and a little
            # for the rest; the expired entry is not held.
            least = sum(
                len(key.encode()) + len(compact(value)) + len(partition.encode())
                for key, (value, partition) in data.items()
            )
            assert least <= alpha.bytes <= least + 3 * 256, (alpha, least)
            await store.delete("k2")
            mid = self.assert_snapshot(await snaps.create("mid"), "mid", 2, (started, utcnow()))
            assert mid.bytes == 0, f"nothing new since 'alpha': {mid}"

            listed = await snaps.list()
            assert listed == [empty, alpha, mid], listed  # by creation, not by name
            moments = [snapshot.created_at for snapshot in listed]
            assert moments == sorted(moments), moments
            for snapshot in listed:
                assert await snaps.get(snapshot.name) == snapshot
            assert await snaps.get("Alpha") is None  # names are exact
            assert await snaps.get("nothing") is None

            exported = await export_snapshot(store, "alpha")
            assert exported.keys == sorted(data), exported.keys
            assert (await export_snapshot(store, "zeta")).keys == []
            assert (await export_snapshot(store, "mid")).keys == ["k1", "\U0001f600"]

            assert await snaps.delete("alpha") is True
            assert await snaps.delete("alpha") is False
            assert await snaps.get("alpha") is None
            assert await snaps.list() == [empty, mid]
            assert (await export_snapshot(store, "mid")).keys == ["k1", "\U0001f600"]
            # The name is free again; the new snapshot is taken now.
            again = self.assert_snapshot(await snaps.create("alpha"), "alpha", 2)
            assert await snaps.list() == [empty, mid, again]

            for name in GOOD_NAMES:
                created = self.assert_snapshot(await snaps.create(name), name, 2)
                assert await snaps.get(name) == created
                assert (await export_snapshot(store, name)).keys == ["k1", "\U0001f600"]
            assert [s.name for s in await snaps.list()] == ["zeta", "mid", "alpha", *GOOD_NAMES]
            for name in GOOD_NAMES:
                assert await snaps.delete(name) is True, name
            for name in ("zeta", "mid", "alpha"):
                assert await snaps.delete(name) is True, name
            assert await snaps.list() == []
            assert await usage(store) == (0, 0), "deleting every snapshot frees everything"

    async def test_snapshot_create_of_a_taken_name_changes_nothing(
        self, store: MemoryStore
    ) -> None:
        async with self.snapshots(store) as snaps:
            await store.set("a", 1)
            first = await snaps.create("s")
            await store.set("a", 2)
            await store.set("b", 3, partition="p")
            live = await state_of(store)
            stored = await usage(store)
            with pytest.raises(SnapshotExistsError):
                await snaps.create("s")
            assert await snaps.list() == [first]
            assert await snaps.get("s") == first
            assert await usage(store) == stored, "a refused create stored something"
            assert await state_of(store) == live
            exported = await export_snapshot(store, "s")
            assert [(line["key"], line["value"]) for line in exported.entries] == [("a", 1)]
            # The check is on the name only: another name is taken at once.
            other = await snaps.create("t")
            assert other.keys == 2 and await snaps.list() == [first, other]

    async def test_snapshot_refuses_bad_names_before_any_io(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = tmp_path / "snapshots"
        folder.mkdir()
        target = folder / "never.jsonl"
        async with self.snapshots(store) as snaps:
            await store.set("k", 1)
            ok = await snaps.create("ok")
            live = await state_of(store)
            api: Any = snaps
            exporter: Any = store
            for name in BAD_NAMES:
                calls: list[tuple[str, Any]] = [
                    (f"create({name!r})", lambda n=name: api.create(n)),
                    (f"get({name!r})", lambda n=name: api.get(n)),
                    (f"restore({name!r})", lambda n=name: api.restore(n)),
                    (f"delete({name!r})", lambda n=name: api.delete(n)),
                    (f"diff({name!r})", lambda n=name: api.diff(n)),
                ]
                if name is not None:  # None means "the live namespace" / "no snapshot"
                    calls += [
                        (f"diff('ok', {name!r})", lambda n=name: api.diff("ok", n)),
                        (
                            f"export_to(snapshot={name!r})",
                            lambda n=name: exporter.export_to(target, snapshot=n),
                        ),
                    ]
                await raises_each(InvalidKeyError, calls)
                assert not target.exists(), f"export_to(snapshot={name!r}) created its file"
            assert await snaps.list() == [ok]
            assert await state_of(store) == live
            assert list(folder.iterdir()) == []

    async def test_snapshot_unknown_names_are_not_found(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        assert issubclass(SnapshotNotFoundError, KeyNotFoundError)
        folder = tmp_path / "snapshots"
        folder.mkdir()
        target = folder / "never.jsonl.gz"
        async with self.snapshots(store) as snaps:
            await store.set("k", 1)
            await snaps.create("known")
            await store.set("k", 2)
            await store.set("other", 3)
            live = await state_of(store)
            exporter: Any = store

            async def refused(name: str) -> None:
                await raises_each(
                    SnapshotNotFoundError,
                    [
                        (f"restore({name!r})", lambda: snaps.restore(name)),
                        (f"diff({name!r})", lambda: snaps.diff(name)),
                        (f"diff({name!r}, 'known')", lambda: snaps.diff(name, "known")),
                        (f"diff('known', {name!r})", lambda: snaps.diff("known", name)),
                        (
                            f"export_to(io, snapshot={name!r})",
                            lambda: exporter.export_to(io.BytesIO(), snapshot=name),
                        ),
                        (
                            f"export_to(path, snapshot={name!r})",
                            lambda: exporter.export_to(target, snapshot=name),
                        ),
                    ],
                )
                assert await snaps.get(name) is None
                assert await snaps.delete(name) is False

            for name in ("nope", "Known", "known "):
                await refused(name)
            assert await snaps.delete("known") is True
            await snaps.create("later")
            await refused("known")  # deleted
            assert list(folder.iterdir()) == [], "a refused export left a file"
            assert await state_of(store) == live, "a refused call changed the namespace"

    # ------------------------------------------------------------ invisible, kept by clear

    async def test_snapshots_are_invisible_and_clear_keeps_them(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps:
            await store.set("k1", "one", partition="p")
            await store.set("k2", "two", partition="q")
            await snaps.create("s")
            await snaps.create("t")
            assert await store.keys() == ["k1", "k2"]
            assert await store.search("*") == {"k1": "one", "k2": "two"}
            stats = await store.stats()
            assert (stats.keys, stats.partitions) == (2, {"p": 1, "q": 1}), stats
            assert await store.namespaces(store.namespace) == [store.namespace]
            assert (await export_snapshot(store, "s")).keys == ["k1", "k2"]

            assert await store.clear() == 2
            assert await store.keys() == [] and await store.search("*") == {}
            stats = await store.stats()
            assert (stats.keys, stats.partitions) == (0, {}), stats
            assert await store.namespaces(store.namespace) == [], "snapshots listed as entries"
            buffer = io.BytesIO()
            assert (await cast(Any, store).export_to(buffer)).count == 0
            assert [s.name for s in await snaps.list()] == ["s", "t"]
            assert (await export_snapshot(store, "s")).keys == ["k1", "k2"]

            assert await snaps.restore("s") == 2
            assert await store.clear_partition("p") == 1
            assert await store.keys() == ["k2"]
            assert (await export_snapshot(store, "t")).keys == ["k1", "k2"]
            assert await snaps.diff("s") == SnapshotDiff([], ["k1"], [])

    # ------------------------------------------------------------ restore

    async def test_snapshot_restore_is_exact(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps:
            written = await write_sample(store)
            # Expires after the snapshot and before the restore: longer than the slack, so a
            # restore that re-applied TTLs instead of absolute expiries would show.
            short = max(self.expiry_ttl, self.snapshot_slack + 0.3)
            await store.set("soon", "expires after the snapshot", ttl=short, partition="p")
            await store.set("probe", 1, ttl=short)  # set last: expires last
            snap = await snaps.create("s")
            assert snap.keys == len(SAMPLE) + 2, snap

            await store.set("a", "changed", partition="elsewhere")  # version 2
            await store.delete("a/1")
            await store.set("new", {"n": 1})
            await store.persist("a b")
            await store.set("B", [1, 2.5, None, True, "x"], partition="q", ttl=99999)
            await store.set("soon", "live again, persistent")
            versions = {key: e.version for key, e in (await self.entries_of(store)).items()}
            await wait_gone(store, "probe", self.snapshot_patience)

            assert await snaps.restore("s") == len(SAMPLE)
            restored = await self.entries_of(store)
            assert sorted(restored) == SAMPLE_KEYS, sorted(restored)
            for key, entry in written.items():
                got = restored[key]
                assert_same_json(got.value, entry.value, f"restored {key!r}")
                assert_same_json(await store.get(key), entry.value, f"get({key!r})")
                assert got.partition == entry.partition, (got, entry)
                assert_close(got.expires_at, entry.expires_at, self.snapshot_slack, key)
                # Versions keep growing: +1 for a key that existed, 1 for a new one.
                want = versions[key] + 1 if key in versions else 1
                assert got.version == want, f"{key!r}: {got.version}, expected {want}"
            assert restored["a"].version == 3 and restored["a/1"].version == 1
            for key in ("new", "soon", "probe"):
                assert await store.get(key) is None and not await store.exists(key), key
            ttl = await store.ttl("a b")
            assert ttl is not None and 3000 < ttl <= 3600, ttl

            # A compare_and_set on a version read before the restore fails.
            for key in ("a", "B", "_"):
                with pytest.raises(VersionConflictError):
                    await store.compare_and_set(key, "stale", version=versions[key])
            assert await self.entries_of(store) == restored
            # The snapshot itself is unchanged: restoring again gives the same entries.
            assert await snaps.restore("s") == len(SAMPLE)
            again = await self.entries_of(store)
            assert {k: (e.value, e.partition, e.expires_at) for k, e in again.items()} == {
                k: (e.value, e.partition, e.expires_at) for k, e in restored.items()
            }
            assert all(again[k].version == restored[k].version + 1 for k in again)

    async def test_snapshot_restore_is_recorded_in_the_change_feed(
        self, store: MemoryStore
    ) -> None:
        async with self.sibling(store, "f") as other:
            snaps = snapshots_of(other)
            await other.set("a", 1)
            await other.set("b", {"x": 2**70}, partition="p")
            await other.set("c", "\u00e9", ttl=3600)
            changes = other.changes
            await changes.enable()
            try:
                start = await changes.cursor()
                await snaps.create("s")
                await other.set("b", "changed")
                await other.delete("c")
                await other.set("d", 4)
                middle = await changes.cursor()
                assert await snaps.restore("s") == 3
                got = (await changes.read(since=middle, limit=1000)).changes
                assert Counter((c.op, c.key) for c in got) == Counter(
                    [("set", "a"), ("set", "b"), ("set", "c"), ("delete", "d")]
                ), got
                for change in got:
                    assert change.key is not None
                    entry = await other.get_entry(change.key)
                    if change.op == "set":
                        assert entry is not None, change
                        assert (change.version, change.partition) == (
                            entry.version,
                            entry.partition,
                        ), (change, entry)
                        assert_same_json(change.value, entry.value, f"change of {change.key!r}")
                    else:
                        assert entry is None and change.value is None, change
                # Creating and deleting snapshots writes nothing to the feed.
                done = await changes.cursor()
                await snaps.create("t")
                assert await snaps.delete("s") is True
                assert (await changes.read(since=done, limit=1000)).changes == []
                everything = (await changes.read(since=start, limit=1000)).changes
                assert len(everything) == 3 + len(got), everything
            finally:
                await changes.disable()

    # ------------------------------------------------------------ diff

    async def test_snapshot_diff(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps:
            before: dict[str, tuple[Any, str]] = {
                "a": ({"x": 1, "y": [1, 2]}, "default"),
                "b": (1, "default"),
                "c": (2**70, "default"),
                "d": ("text", "p"),
                "g": (True, "default"),
                "h": (0, "default"),
                "\u00e9": ("x", "default"),
                "e": (1, "default"),
                "E": (2, "default"),
            }
            for key, (value, partition) in before.items():
                await store.set(key, value, partition=partition)
            await store.set("t", "short", ttl=self.expiry_ttl)
            await snaps.create("s1")
            assert await snaps.diff("s1") == SnapshotDiff([], [], [])

            # Not changed: the same JSON (key order, 1 and 1.0), a new version.
            await store.set("a", {"y": [1, 2], "x": 1})
            await store.set("b", 1.0)
            # Changed: a big integer by one, the partition alone, a bool for a number, text.
            await store.set("c", 2**70 + 1)
            await store.set("d", "text", partition="q")
            await store.set("g", 1)
            await store.set("h", False)
            await store.set("\u00e9", "y")
            await store.delete("e")
            await store.delete("E")
            await store.set("f", 1)
            await store.set("F", 2)
            await wait_gone(store, "t", self.snapshot_patience)

            forward = SnapshotDiff(["F", "f"], ["E", "e", "t"], ["c", "d", "g", "h", "\u00e9"])
            assert await snaps.diff("s1") == forward
            await snaps.create("s2")
            assert await snaps.diff("s2") == SnapshotDiff([], [], [])
            # "t" expired before s2 was taken; s1 still counts it.
            assert await snaps.diff("s1", "s2") == forward
            assert await snaps.diff("s2", "s1") == SnapshotDiff(
                ["E", "e", "t"], ["F", "f"], ["c", "d", "g", "h", "\u00e9"]
            )
            assert await snaps.diff("s1", "s1") == SnapshotDiff([], [], [])
            await store.clear()
            await store.set("z", "new")
            assert await snaps.diff("s2") == SnapshotDiff(
                ["z"], ["F", "a", "b", "c", "d", "f", "g", "h", "\u00e9"], []
            )

    # ------------------------------------------------------------ incremental storage

    async def test_snapshots_are_incremental(self, store: MemoryStore) -> None:
        count = 200
        keys = [f"k{i:03d}" for i in range(count)]
        async with self.snapshots(store) as snaps:
            assert await usage(store) == (0, 0)
            await store.set_many({key: f"value {key} a" for key in keys})
            first = await snaps.create("s1")
            assert first.keys == count and first.bytes > 0, first
            assert await usage(store) == (count, first.bytes)

            # 1% of the entries change (values of the same length).
            changed = keys[50], keys[150]
            for key in changed:
                await store.set(key, f"value {key} b")
            second = await snaps.create("s2")
            assert second.keys == count, second
            assert second.bytes > 0, second
            # At most 5% of the first (two records of ~1% each), a record's worth of slack.
            assert second.bytes <= 0.05 * first.bytes + first.bytes / count, (first, second)
            assert await usage(store) == (count + 2, first.bytes + second.bytes)

            third = await snaps.create("s3")  # nothing changed
            assert (third.keys, third.bytes) == (count, 0), third
            assert await usage(store) == (count + 2, first.bytes + second.bytes)

            # Deleting s1 frees only the two records the others do not hold.
            assert await snaps.delete("s1") is True
            records, size = await usage(store)
            assert records == count, (records, size)
            assert size == first.bytes, "freed exactly the two old records (same sizes)"
            exported = await export_snapshot(store, "s2")
            assert exported.keys == keys
            for line in exported.entries:
                letter = "b" if line["key"] in changed else "a"
                assert line["value"] == f"value {line['key']} {letter}", line
            # Every record of s2 is still there: a restore brings the whole namespace back.
            await store.clear()
            assert await snaps.restore("s2") == count
            assert await store.get_many(keys) == {
                key: f"value {key} {'b' if key in changed else 'a'}" for key in keys
            }

            assert await snaps.delete("s3") is True
            assert await usage(store) == (count, first.bytes)
            assert await snaps.delete("s2") is True
            assert await usage(store) == (0, 0), "deleting the last snapshot frees everything"

    async def test_deleting_a_middle_snapshot_keeps_the_others_exact(
        self, store: MemoryStore
    ) -> None:
        async with self.snapshots(store) as snaps:
            await store.set_many({f"k{i}": f"v1-{i}" for i in range(10)}, partition="p")
            await store.set("x", 2**90, ttl=3600)
            await snaps.create("s1")
            await store.set("k1", "v2")
            await snaps.create("s2")
            await store.set("k1", "v3")
            await store.set("k2", "v3", partition="q")
            await store.delete("k3")
            await store.set("k10", {"new": True})
            await snaps.create("s3")
            exports = {name: await export_snapshot(store, name) for name in ("s1", "s2", "s3")}
            assert exports["s2"].entry("k1")["value"] == "v2"
            records, _ = await usage(store)

            assert await snaps.delete("s2") is True
            assert (await usage(store))[0] == records - 1, "only k1 = 'v2' was s2's alone"
            for name in ("s1", "s3"):
                assert (await export_snapshot(store, name)).entries == exports[name].entries
                assert await snaps.restore(name) == len(exports[name].entries)
                assert live_view(await self.entries_of(store)) == file_view(exports[name])

            # Deleting the newest leaves the oldest exact, and a new snapshot after it too.
            assert await snaps.delete("s3") is True
            assert (await export_snapshot(store, "s1")).entries == exports["s1"].entries
            await store.set("k4", "v4")
            s4 = await snaps.create("s4")
            live = await export_snapshot(store, "s4")
            assert s4.keys == 11 and live.entry("k4")["value"] == "v4", live.entries
            assert file_view(live) == live_view(await self.entries_of(store))
            assert await snaps.delete("s1") is True
            assert (await export_snapshot(store, "s4")).entries == live.entries
            assert await snaps.delete("s4") is True
            assert await usage(store) == (0, 0)

    async def test_deleting_newer_snapshots_then_creating_again_is_exact(
        self, store: MemoryStore
    ) -> None:
        # k's first value is held by s1 and s2 and replaced before s3; deleting s2, then s3,
        # then s4 leaves s1 newest again, so its record of k must hold the next snapshot's
        # state as well, whatever sequence the backend reuses.
        async with self.snapshots(store) as snaps:
            await store.set("k", "A")
            await store.set("same", 1)
            await snaps.create("s1")
            await snaps.create("s2")
            await store.set("k", "B")
            await snaps.create("s3")
            await snaps.create("s4")
            for name in ("s2", "s3", "s4"):
                assert await snaps.delete(name) is True
            assert await snaps.diff("s1") == SnapshotDiff([], [], ["k"])
            await store.set("k", "C")
            s5 = await snaps.create("s5")
            assert s5.keys == 2
            assert file_view(await export_snapshot(store, "s5")) == {
                "k": (compact("C").decode(), "default"),
                "same": ("1", "default"),
            }
            assert await snaps.diff("s1", "s5") == SnapshotDiff([], [], ["k"])
            assert await snaps.restore("s1") == 2
            assert await store.get("k") == "A"
            assert await snaps.restore("s5") == 2
            assert await store.get("k") == "C"
            s1 = await snaps.get("s1")
            assert s1 is not None
            assert await usage(store) == (3, s1.bytes + s5.bytes)

    # ------------------------------------------------------------ namespaces

    async def test_snapshots_of_each_namespace_are_separate(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps, self.sibling(store, "x") as other:
            theirs = snapshots_of(other)
            await store.set("a", 1)
            await other.set("a", 2)
            await other.set("b", 3)
            mine = await snaps.create("s")
            their = await theirs.create("s")  # the same name, another namespace
            assert (mine.keys, their.keys) == (1, 2)
            assert await snaps.list() == [mine] and await theirs.list() == [their]
            assert file_view(await export_snapshot(store, "s")) == {"a": ("1", "default")}
            assert file_view(await export_snapshot(other, "s")) == {
                "a": ("2", "default"),
                "b": ("3", "default"),
            }
            await store.set("a", 9)
            await other.clear()
            assert await theirs.restore("s") == 2
            assert await other.get_many(["a", "b"]) == {"a": 2, "b": 3}
            assert await store.get("a") == 9 and await store.keys() == ["a"]
            assert await snaps.diff("s") == SnapshotDiff([], [], ["a"])
            assert await theirs.diff("s") == SnapshotDiff([], [], [])

            assert await snaps.delete("s") is True
            assert await snaps.get("s") is None and await theirs.get("s") == their
            assert await usage(store) == (0, 0)
            assert (await usage(other))[0] == 2
            with pytest.raises(SnapshotNotFoundError):
                await snaps.restore("s")
            assert await theirs.delete("s") is True

    # ------------------------------------------------------------ export by name

    async def test_export_by_snapshot_name(self, store: MemoryStore) -> None:
        async with self.snapshots(store) as snaps:
            written = await write_sample(store)
            await store.set("soon", "expires after the snapshot", ttl=self.expiry_ttl)
            soon = await store.get_entry("soon")
            assert soon is not None
            await snaps.create("s")
            await store.set("a", "changed later")
            await store.delete("a/1")
            await store.set("later", 1)
            await wait_gone(store, "soon", self.snapshot_patience)

            exported = await export_snapshot(store, "s")
            assert exported.keys == sorted([*SAMPLE_KEYS, "soon"]), exported.keys
            held = {**written, "soon": soon}
            for line in exported.entries:
                assert_file_entry_is(line, held[line["key"]], f"snapshot line {line['key']!r}")
            filtered = await export_snapshot(store, "s", prefix="a/", partition="p")
            assert filtered.keys == ["a/1"], filtered.keys
            assert (await export_snapshot(store, "s", prefix="a/")).keys == ["a/1", "a/10", "a/2"]

            async with self.sibling(store, "i") as other:
                await other.set("zz", "dropped by replace")
                report = await import_lines(other, exported.lines, "replace")
                assert counts(report) == (len(SAMPLE), 1, 0), report
                imported = await self.entries_of(other)
                assert sorted(imported) == SAMPLE_KEYS
                for key, entry in written.items():
                    assert_same_json(imported[key].value, entry.value, f"imported {key!r}")
                    assert imported[key].partition == entry.partition, imported[key]
                    assert_close(
                        imported[key].expires_at, entry.expires_at, self.snapshot_slack, key
                    )
