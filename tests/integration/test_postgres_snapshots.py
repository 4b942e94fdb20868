"""Snapshots on PostgreSQL (``PostgresSnapshots``, migration 0006), beyond the conformance
suite: the migration adds the two tables (and the downgrade removes them, the grants follow
the entries' writers); concurrent creates and deletes from two connections serialise and keep
the records right; a create is one instant while writers run; a create whose connection is
killed halfway leaves nothing; the snapshot tables stay out of everything the namespace shows;
values and record bytes are exact; a reading is one MVCC snapshot; the hybrid store uses its
PostgreSQL tier's snapshots and stays coherent after a restore. Every test talks to a real
server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, OutcomeUnknownError
from fleetmem._codec import encode_value
from fleetmem.backends.seam import ImportOp, SnapshotRow, record_bytes
from fleetmem.errors import SnapshotExistsError, SnapshotNotFoundError
from fleetmem.protocol import Entry

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")
pytest.importorskip("alembic")

from fleetmem.backends.postgres import PostgresStore, migrate  # noqa: E402
from fleetmem.backends.postgres.snapshots import PostgresSnapshots  # noqa: E402

_CATALOG = "fleetmem.entries_snapshots"
_RECORDS = "fleetmem.entries_snapshot_records"


@pytest.fixture
async def store(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=4
    ) as opened:
        yield opened


@pytest.fixture
async def other(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[PostgresStore]:
    """A second store on the same namespace, with a pool of its own: another client."""
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=4
    ) as opened:
        yield opened


async def _sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def _content(store: PostgresStore, name: str, page_size: int = 1000) -> list[Entry]:
    out: list[Entry] = []
    pages = store.kv.snapshots().pages(name, "", None, page_size)
    async with contextlib.aclosing(pages):
        async for page in pages:
            out.extend(page)
    return out


async def _live(store: PostgresStore) -> list[Entry]:
    out: list[Entry] = []
    pages = store.kv.export_pages("", None, 1000)
    async with contextlib.aclosing(pages):
        async for page in pages:
            out.extend(page)
    return out


async def _stored(dsn: str, ns: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The namespace's catalog rows and records, exactly as stored."""
    catalog = await _sql(
        dsn,
        f"SELECT name, seq, created_at, keys, bytes FROM {_CATALOG} WHERE namespace = $1 "
        "ORDER BY seq",
        ns,
    )
    records = await _sql(
        dsn,
        "SELECT key, from_seq, to_seq, value::text, partition, version, created_at, updated_at, "
        f"expires_at, bytes FROM {_RECORDS} WHERE namespace = $1 ORDER BY key, from_seq",
        ns,
    )
    return catalog, records


async def _check_records(dsn: str, ns: str) -> None:
    """The record model's invariants: every record is held by a snapshot of the catalog (a
    delete freed what nobody holds), each snapshot holds one record per key and as many as it
    counted, and ``usage()`` is what the table holds."""
    orphans = await _sql(
        dsn,
        f"SELECT r.key, r.from_seq, r.to_seq FROM {_RECORDS} r WHERE r.namespace = $1 "
        f"AND (r.to_seq <= r.from_seq OR NOT EXISTS (SELECT FROM {_CATALOG} s "
        "WHERE s.namespace = $1 AND s.seq >= r.from_seq "
        "AND (r.to_seq IS NULL OR s.seq < r.to_seq)))",
        ns,
    )
    assert orphans == []
    held = await _sql(
        dsn,
        f"SELECT s.name, s.keys, count(r.key), count(DISTINCT r.key) FROM {_CATALOG} s "
        f"LEFT JOIN {_RECORDS} r ON r.namespace = s.namespace AND r.from_seq <= s.seq "
        "AND (r.to_seq IS NULL OR r.to_seq > s.seq) WHERE s.namespace = $1 GROUP BY 1, 2",
        ns,
    )
    for name, keys, records, distinct in held:
        assert (keys, distinct) == (records, records), name
    usage = await _sql(
        dsn,
        f"SELECT count(*), coalesce(sum(bytes), 0) FROM {_RECORDS} WHERE namespace = $1",
        ns,
    )
    async with PostgresStore.from_url(dsn, namespace=ns, max_size=1) as reader:
        assert await reader.kv.snapshots().usage() == usage[0]


# ---------------------------------------------------------------------------- the migration

_CATALOG_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("name", "text", "NO", "C"),
    ("seq", "bigint", "NO", None),
    ("created_at", "timestamp with time zone", "NO", None),
    ("keys", "bigint", "NO", None),
    ("bytes", "bigint", "NO", None),
]
_RECORD_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("key", "text", "NO", "C"),
    ("from_seq", "bigint", "NO", None),
    ("to_seq", "bigint", "YES", None),
    ("value", "jsonb", "NO", None),
    ("partition", "text", "NO", "C"),
    ("version", "bigint", "NO", None),
    ("created_at", "timestamp with time zone", "NO", None),
    ("updated_at", "timestamp with time zone", "NO", None),
    ("expires_at", "timestamp with time zone", "YES", None),
    ("bytes", "bigint", "NO", None),
]


def _expected_tables(schema: str, table: str) -> dict[str, Any]:
    catalog, records = f"{table}_snapshots", f"{table}_snapshot_records"
    on_c, on_r = f"ON {schema}.{catalog} USING btree", f"ON {schema}.{records} USING btree"
    return {
        catalog: (
            _CATALOG_COLUMNS,
            {
                f"{catalog}_pkey": f"CREATE UNIQUE INDEX {catalog}_pkey {on_c} (namespace, name)",
                f"{catalog}_seq_key": f"CREATE UNIQUE INDEX {catalog}_seq_key {on_c} "
                "(namespace, seq)",
            },
        ),
        records: (
            _RECORD_COLUMNS,
            {
                f"{records}_pkey": f"CREATE UNIQUE INDEX {records}_pkey {on_r} "
                "(namespace, key, from_seq)",
                f"{records}_open_idx": f"CREATE INDEX {records}_open_idx {on_r} "
                "(namespace, key) WHERE (to_seq IS NULL)",
                f"{records}_seq_idx": f"CREATE INDEX {records}_seq_idx {on_r} "
                "(namespace, to_seq, from_seq)",
            },
        ),
    }


async def _tables_of(dsn: str, schema: str, table: str) -> dict[str, Any]:
    """Columns and indexes of the two snapshot tables of ``schema.table``; a table that does
    not exist has none."""
    found: dict[str, Any] = {}
    for name in migrate.snapshot_names(table):
        columns = await _sql(
            dsn,
            "SELECT column_name, data_type, is_nullable, collation_name "
            "FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
            "ORDER BY ordinal_position",
            schema,
            name,
        )
        indexes = await _sql(
            dsn,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
            schema,
            name,
        )
        found[name] = (columns, dict(indexes))
    return found


def _absent(table: str) -> dict[str, Any]:
    return {name: ([], {}) for name in migrate.snapshot_names(table)}


@pytest.mark.parametrize(
    ("schema", "table"),
    [("fleetmem", "entries"), ("mem_schema", "kv")],
    ids=["default", "named"],
)
async def test_the_upgrade_adds_the_snapshot_tables_and_the_downgrade_removes_them(
    fleetmem_postgres_empty_database: str, fleetmem_namespace: str, schema: str, table: str
) -> None:
    """0006 adds the catalog and the record table next to ``schema.table``; a store on that
    schema and table takes snapshots in them; downgrading to 0005 drops exactly them, keeping
    the entries and the feed; upgrading again brings them back, empty."""
    dsn, ns = fleetmem_postgres_empty_database, fleetmem_namespace
    await asyncio.to_thread(migrate.upgrade, dsn, schema=schema, table=table, revision="0005")
    assert await _tables_of(dsn, schema, table) == _absent(table)
    async with PostgresStore.from_url(dsn, namespace=ns, schema=schema, table=table) as opened:
        await opened.set("k", {"v": 1})  # migrates to the head on connect
        assert (
            await asyncio.to_thread(migrate.current, dsn, schema=schema, table=table)
            == migrate.HEAD_REVISION
            == "0006"
        )
        assert await _tables_of(dsn, schema, table) == _expected_tables(schema, table)
        snaps = opened.kv.snapshots()
        row = await snaps.create("s1")
        assert (row.name, row.seq, row.keys) == ("s1", 1, 1)
        assert [e.value for e in await _content(opened, "s1")] == [{"v": 1}]
    catalog, records = migrate.snapshot_names(table)
    counts = await _sql(
        dsn,
        f'SELECT (SELECT count(*) FROM "{schema}"."{catalog}"), '
        f'(SELECT count(*) FROM "{schema}"."{records}")',
    )
    assert counts == [(1, 1)]
    await asyncio.to_thread(migrate.downgrade, dsn, "0005", schema=schema, table=table)
    assert await asyncio.to_thread(migrate.current, dsn, schema=schema, table=table) == "0005"
    assert await _tables_of(dsn, schema, table) == _absent(table)
    feeds = await _sql(dsn, "SELECT to_regclass($1) IS NOT NULL", f'"{schema}"."{table}_feeds"')
    assert feeds == [(True,)]
    assert await _sql(dsn, f'SELECT key FROM "{schema}"."{table}"') == [("k",)]
    await asyncio.to_thread(migrate.upgrade, dsn, schema=schema, table=table)
    assert await _tables_of(dsn, schema, table) == _expected_tables(schema, table)
    async with PostgresStore.from_url(dsn, namespace=ns, schema=schema, table=table) as opened:
        assert await opened.kv.snapshots().list() == []


async def test_a_long_table_name_keeps_every_snapshot_name_whole(
    fleetmem_postgres_empty_database: str,
) -> None:
    """Every name 0006 derives from the longest table name the earlier revisions take (26
    characters) fits PostgreSQL's 63 bytes whole."""
    dsn, table = fleetmem_postgres_empty_database, "t" * 26
    await asyncio.to_thread(migrate.upgrade, dsn, table=table)
    assert await _tables_of(dsn, "fleetmem", table) == _expected_tables("fleetmem", table)
    await asyncio.to_thread(migrate.downgrade, dsn, "0005", table=table)
    assert await _tables_of(dsn, "fleetmem", table) == _absent(table)


def test_offline_sql_creates_the_snapshot_tables() -> None:
    text = migrate.sql(schema="ops", table="mem", from_revision="0005")
    assert 'CREATE TABLE "ops"."mem_snapshots"' in text
    assert 'CREATE TABLE "ops"."mem_snapshot_records"' in text
    for index in ("open", "seq"):
        assert f'"mem_snapshot_records_{index}_idx" ON "ops"."mem_snapshot_records"' in text
    assert "UNLOGGED" not in text  # a snapshot survives a crash once committed
    assert 'CREATE TABLE "ops"."mem_feeds"' not in text  # from 0005: it exists


async def test_the_upgrade_gives_the_writers_of_the_entries_the_snapshot_tables(
    fleetmem_postgres_empty_database: str, fleetmem_namespace: str
) -> None:
    """A least-privilege role that may write the entries before 0006 may take, read and
    delete snapshots after it; a role that may only read the entries gets nothing new."""
    from urllib.parse import urlsplit, urlunsplit

    dsn, ns = fleetmem_postgres_empty_database, fleetmem_namespace
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0004")
    suffix = secrets.token_hex(4)  # roles are the server's: no other test may share them
    writer, reader = f"fm_snap_writer_{suffix}", f"fm_snap_reader_{suffix}"
    conn = await asyncpg.connect(dsn)
    try:
        for role in (writer, reader):
            await conn.execute(f"CREATE ROLE {role} LOGIN")
            await conn.execute(f"GRANT USAGE ON SCHEMA fleetmem TO {role}")
            await conn.execute(f"GRANT SELECT ON fleetmem.alembic_version TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries TO {writer}")
        await conn.execute(f"GRANT SELECT ON fleetmem.entries TO {reader}")
        await asyncio.to_thread(migrate.upgrade, dsn)
        granted = await conn.fetch(
            "SELECT grantee, table_name, privilege_type FROM information_schema.table_privileges "
            "WHERE table_schema = 'fleetmem' AND grantee = ANY($1::text[]) "
            "AND table_name LIKE 'entries\\_snapshot%' ORDER BY 1, 2, 3",
            [writer, reader],
        )
        assert [tuple(r) for r in granted] == [
            (writer, table, privilege)
            for table in ("entries_snapshot_records", "entries_snapshots")
            for privilege in ("DELETE", "INSERT", "SELECT", "UPDATE")
        ]
        parts = urlsplit(dsn)
        app_dsn = urlunsplit(parts._replace(netloc=f"{writer}@{parts.hostname}:{parts.port}"))
        async with PostgresStore.from_url(app_dsn, namespace=ns, auto_migrate=False) as app:
            await app.set("k", 1)
            snaps = app.kv.snapshots()
            await snaps.create("s")
            assert [r.name for r in await snaps.list()] == ["s"]
            assert [e.value for e in await _content(app, "s")] == [1]
            assert await snaps.delete("s") is True
            assert await snaps.usage() == (0, 0)
    finally:
        for role in (writer, reader):
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        await conn.close()


# ---------------------------------------------------------------------------- concurrency


async def test_concurrent_creates_and_deletes_from_two_connections_serialise(
    store: PostgresStore, other: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Creates and deletes from two pools race while a third client writes: each create gets
    its own seq (in the order of created_at), a name taken twice at once is created once (the
    other gets SnapshotExistsError), a snapshot reads the same whatever is created or deleted
    after it, nothing is left that no snapshot holds, and the open records end up exactly
    the live entries."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many({f"k{i:03d}": i for i in range(200)})
    taken: dict[str, list[Entry]] = {}
    stop = asyncio.Event()
    writes = 0

    async with PostgresStore.from_url(dsn, namespace=ns, max_size=2) as writer_store:

        async def write() -> None:
            nonlocal writes
            while not stop.is_set():
                writes += 1
                key = f"k{writes * 7 % 230:03d}"  # some keys come and go
                if writes % 5 == 0:
                    await writer_store.delete(key)
                else:
                    await writer_store.set(key, -writes)

        async def take(client: PostgresStore, name: str) -> SnapshotRow:
            row = await client.kv.snapshots().create(name)
            taken[name] = await _content(client, name, page_size=37)
            assert len(taken[name]) == row.keys
            return row

        writer = asyncio.create_task(write())
        try:
            rows = await asyncio.gather(
                *(take(store if i % 2 else other, f"s{i:02d}") for i in range(16))
            )
            assert sorted(r.seq for r in rows) == list(range(1, 17))
            same = await asyncio.gather(
                store.kv.snapshots().create("same"),
                other.kv.snapshots().create("same"),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in same) == [
                "SnapshotExistsError",
                "SnapshotRow",
            ]
            deleted = [f"s{i:02d}" for i in range(0, 16, 2)] + ["s15"]
            results = await asyncio.gather(
                *(
                    (store if i % 2 else other).kv.snapshots().delete(name)
                    for i, name in enumerate(deleted)
                ),
                *(take(store if i % 2 else other, f"t{i}") for i in range(6)),
            )
            assert results[: len(deleted)] == [True] * len(deleted)
        finally:
            stop.set()
            await writer
    assert writes > 0
    listed = await store.kv.snapshots().list()
    assert [r.seq for r in listed] == sorted(r.seq for r in listed)
    assert len({r.seq for r in listed}) == len(listed)
    expected = sorted(set(taken) - set(deleted) | {"same"})
    assert sorted(r.name for r in listed) == expected
    for name in expected:
        if name != "same":
            assert await _content(store, name) == taken[name], name
    await _check_records(dsn, ns)
    # The newest deleted: its predecessor's records are open again, so a create stores only
    # what differs from the predecessor.
    newest = listed[-1].name
    await store.set("k000", "changed")
    await store.kv.snapshots().create("u")
    assert await store.kv.snapshots().delete("u") is True
    final = await store.kv.snapshots().create("final")
    live = await _live(store)
    assert await _content(store, "final") == live
    assert final.keys == len(live)
    before = {e.key: e for e in await _content(store, newest)}
    assert final.bytes == sum(
        record_bytes(e.key, len(encode_value(e.value)), e.partition)
        for e in live
        if before.get(e.key) != e
    )
    await _check_records(dsn, ns)


async def test_a_create_sees_one_instant_while_writers_run(
    store: PostgresStore, other: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Another client replaces the whole namespace over and over, one transaction each
    (generation g: every key holds g; even generations have every key, odd ones every other
    key): each snapshot holds exactly one generation -- never a mix of two -- and the
    generations follow the order of the snapshots."""
    n = 600

    def generation(g: int) -> list[ImportOp]:
        step = 1 if g % 2 == 0 else 2
        return [ImportOp(f"k{i:04d}", encode_value(g), "default", None) for i in range(0, n, step)]

    async def one(g: int) -> AsyncIterator[list[ImportOp]]:
        yield generation(g)

    await other.kv.import_replace(one(0))
    stop = asyncio.Event()
    done = 0

    async def replace() -> None:
        nonlocal done
        g = 0
        while not stop.is_set():
            g += 1
            await other.kv.import_replace(one(g))
            done = g

    writer = asyncio.create_task(replace())
    seen: list[int] = []
    try:
        for i in range(8):
            # Let the writer commit a generation first, so that it runs around every create.
            floor = done
            for _ in range(600):
                if done > floor:
                    break
                await asyncio.sleep(0.05)
            row = await store.kv.snapshots().create(f"s{i}")
            entries = await _content(store, f"s{i}", page_size=100)
            values = {e.value for e in entries}
            assert len(values) == 1, values
            g = int(values.pop())
            assert [e.key for e in entries] == [op.key for op in generation(g)]
            assert row.keys == len(entries)
            seen.append(g)
    finally:
        stop.set()
        await writer
    assert seen == sorted(seen)
    assert len(set(seen)) > 1
    await _check_records(fleetmem_postgres_database, store.namespace)


async def test_a_create_whose_connection_is_killed_halfway_leaves_nothing(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """The server ends a create's session while its statement waits for a record's row lock
    (after it began to write): the error says the store is unavailable -- no COMMIT was
    sent -- the catalog and the records are exactly as before, and the next create is
    right."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    snaps = store.kv.snapshots()
    await store.set_many({f"k{i}": i for i in range(20)})
    base = await snaps.create("base")
    await store.set("k5", "changed")
    await store.delete("k7")
    await store.set("new", [1, 2])
    before = await _stored(dsn, ns)
    blocker = await asyncpg.connect(dsn)
    try:
        # Hold k5's open record: closing it, the create's statement waits, in flight.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            f"SELECT 1 FROM {_RECORDS} WHERE namespace = $1 AND key = 'k5' AND to_seq IS NULL "
            "FOR UPDATE",
            ns,
        )
        task = asyncio.create_task(snaps.create("two"))
        waiting = "state = 'active' AND wait_event_type = 'Lock' AND query LIKE '%snapshot%'"
        for _ in range(600):
            found = await _sql(
                dsn,
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE datname = current_database() AND {waiting}",
            )
            if found[0][0] == 1:
                break
            await asyncio.sleep(0.05)
        killed = await _sql(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND {waiting} AND pid <> $1",
            blocker.get_server_pid(),
        )
        assert [row[0] for row in killed] == [True]
        with pytest.raises(BackendUnavailableError) as info:
            await asyncio.wait_for(task, timeout=30)
        assert not isinstance(info.value, OutcomeUnknownError)
        await tx.rollback()
    finally:
        await blocker.close()
    assert await _stored(dsn, ns) == before
    assert [r.name for r in await snaps.list()] == ["base"]
    two = await snaps.create("two")
    assert two.seq == base.seq + 1
    assert await _content(store, "two") == await _live(store)
    live = {e.key: e for e in await _live(store)}
    assert two.bytes == sum(
        record_bytes(key, len(encode_value(live[key].value)), "default") for key in ("k5", "new")
    )
    await _check_records(dsn, ns)


# ---------------------------------------------------------------------------- isolation


async def test_the_snapshot_tables_stay_out_of_the_namespace(store: PostgresStore) -> None:
    """A snapshot's rows are in tables of their own: keys, stats, namespaces, exports,
    clear(), clear_partition() and the change feed never see them (a namespace that has
    only snapshots left is not listed)."""
    ns = store.namespace
    await store.set_many({"a": 1, "b": 2})
    await store.set("c", 3, partition="p")
    await store.changes.enable(retention=600)
    cursor = await store.changes.cursor()
    snaps = store.kv.snapshots()
    await snaps.create("s1")
    await store.set("a", 10)
    await snaps.create("s2")
    assert sorted(await store.keys()) == ["a", "b", "c"]
    stats = await store.stats()
    assert (stats.keys, stats.partitions) == (3, {"default": 2, "p": 1})
    assert [e.key for e in await _live(store)] == ["a", "b", "c"]
    assert await store.clear_partition("p") == 1
    assert await store.clear() == 2
    assert await store.keys() == []
    assert (await store.stats()).keys == 0
    assert ns not in await store.namespaces(ns)
    assert [r.name for r in await snaps.list()] == ["s1", "s2"]
    assert [(e.key, e.value) for e in await _content(store, "s1")] == [
        ("a", 1),
        ("b", 2),
        ("c", 3),
    ]
    usage = await snaps.usage()
    assert usage[0] == 4
    assert await snaps.delete("s1") is True
    batch = await store.changes.read(since=cursor)
    assert [(c.op, c.key) for c in batch.changes] == [
        ("set", "a"),
        ("clear", None),
        ("clear", None),
    ]
    # Another namespace of the same table has snapshots of its own.
    view = store.with_namespace(f"{ns}-other")
    assert await view.kv.snapshots().list() == []
    with pytest.raises(SnapshotNotFoundError):
        await _content(view, "s2")


# ---------------------------------------------------------------------------- values, reads


async def test_values_come_back_exactly_and_bytes_count_the_compact_json(
    store: PostgresStore,
) -> None:
    """Values are decoded as the entries are (integers of any size exact), and a record's
    bytes count the value's compact JSON -- jsonb's text without its blanks outside strings:
    strings holding ", ", ": ", quotes and backslashes, nested containers, multi-byte text."""
    values: dict[str, Any] = {
        "big": 2**70,
        "neg": -(2**65) + 3,
        "text": 'a, b: c "d", \\e\\ \t\n é ✓',
        "obj": {"a, b": "c: d", "q": '"x", "y": ', "n": [1, [2, {"z": None}]], "e": {}},
        "list": [" , ", ": ", "\\", '\\"', [], [True, False]],
        "spaces": {"k": "    ", " ": " "},
        "plain": [1, 2, 3],
        "float": 1.5,
    }
    await store.set_many(values)
    await store.set("moved", "x", partition="elsewhere")
    row = await store.kv.snapshots().create("s")
    entries = {e.key: e for e in await _content(store, "s")}
    assert {k: e.value for k, e in entries.items() if k != "moved"} == values
    assert entries["moved"].partition == "elsewhere"
    assert list(entries.values()) == await _live(store)
    expected = sum(
        record_bytes(key, len(encode_value(value)), "default") for key, value in values.items()
    ) + record_bytes("moved", len(encode_value("x")), "elsewhere")
    assert row.bytes == expected
    assert await store.kv.snapshots().usage() == (len(values) + 1, expected)


async def test_a_reading_is_one_snapshot_even_if_deleted_meanwhile(
    fleetmem_postgres_database: str, fleetmem_namespace: str, other: PostgresStore
) -> None:
    """Pages read one REPEATABLE READ snapshot: a delete committed after the first page does
    not change the rest; then the name is unknown. Closing the pages early gives the
    connection back (a pool of one keeps working)."""
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=1, acquire_timeout=10
    ) as store:
        await store.set_many({f"k{i:02d}": i for i in range(50)})
        snaps = store.kv.snapshots()
        await snaps.create("s")
        read: list[Entry] = []
        pages = snaps.pages("s", "", None, 10)
        async with contextlib.aclosing(pages):
            async for page in pages:
                if not read:
                    assert await asyncio.wait_for(other.kv.snapshots().delete("s"), 30)
                read.extend(page)
        assert [e.value for e in read] == list(range(50))
        assert await snaps.usage() == (0, 0)
        with pytest.raises(SnapshotNotFoundError):
            await _content(store, "s")
        await snaps.create("t")
        partial = snaps.pages("t", "k1", None, 3)
        first = await anext(partial)
        assert [e.key for e in first] == ["k10", "k11", "k12"]
        await partial.aclose()
        assert await asyncio.wait_for(store.get("k00"), 30) == 0
        only = [e.key for e in await _content(store, "t") if e.key.startswith("k4")]
        assert only == [f"k4{i}" for i in range(10)]


async def test_a_snapshot_taken_under_a_serializable_default_is_still_one_instant(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """The create asks for READ COMMITTED itself: a server whose default isolation is
    SERIALIZABLE (whose first statement, the lock, would fix an older snapshot) takes a
    second snapshot right after the first one committed, seeing its records."""
    async with PostgresStore.from_url(
        fleetmem_postgres_database,
        namespace=fleetmem_namespace,
        server_settings={"default_transaction_isolation": "serializable"},
    ) as store:
        await store.set_many({"a": 1, "b": 2})
        snaps = store.kv.snapshots()
        first, second = await asyncio.gather(snaps.create("one"), snaps.create("two"))
        assert {first.seq, second.seq} == {1, 2}
        assert sorted([first.bytes, second.bytes])[0] == 0
        await _check_records(fleetmem_postgres_database, fleetmem_namespace)
        with pytest.raises(SnapshotExistsError):
            await snaps.create("one")


# ---------------------------------------------------------------------------- hybrid


@pytest.mark.hybrid
@pytest.mark.redis
async def test_the_hybrid_store_restores_through_its_own_replace(
    fleetmem_postgres_server: Any, fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    """The hybrid store's snapshots are its PostgreSQL tier's (the same tables); a restore
    replaces the namespace through the hybrid's own replace, so the cached copies read
    before it are never served after it."""
    from fleetmem.backends.hybrid import HybridStore

    pg, url, ns = fleetmem_postgres_server, fleetmem_redis_server.url, fleetmem_namespace
    async with HybridStore.from_urls(pg.dsn, url, namespace=ns, trust_window=30.0) as hybrid:
        snaps = hybrid.kv.snapshots()
        assert isinstance(snaps, PostgresSnapshots)
        await hybrid.set_many({"a": 1, "b": 2})
        assert await hybrid.get("a") == 1  # cached
        taken = await hybrid.snapshots.create("s")
        await hybrid.set("a", 10)
        await hybrid.delete("b")
        await hybrid.set("c", 3)
        assert [await hybrid.get(k) for k in ("a", "b", "c")] == [10, None, 3]  # cached
        assert await hybrid.snapshots.restore("s") == 2
        assert [await hybrid.get(k) for k in ("a", "b", "c")] == [1, 2, None]
        async with PostgresStore.from_url(pg.dsn, namespace=ns) as direct:
            assert await direct.kv.snapshots().get("s") == await snaps.get("s")
            assert (await direct.kv.snapshots().get("s")).keys == taken.keys  # type: ignore[union-attr]


async def test_a_pool_of_one_connection_serves_diff_and_restore(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """diff and restore hold one connection at a time (the snapshot is spooled first): with
    a pool of one they would otherwise wait for themselves until the pool's timeout."""
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=1
    ) as single:
        await single.set_many({"a": 1, "b": 2})
        await single.snapshots.create("s1")
        await single.set("a", 10)
        await single.snapshots.create("s2")
        assert (await single.snapshots.diff("s1")).changed == ["a"]
        assert (await single.snapshots.diff("s1", "s2")).changed == ["a"]
        assert await single.snapshots.restore("s1") == 2
        assert await single.get("a") == 1


async def test_a_create_longer_than_the_command_timeout_completes(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """A create's and a delete's one statement reads or frees the whole namespace: they run
    without the command_timeout (which bounds the statements of single operations), so a
    namespace of any size can be taken and dropped."""
    for start in range(0, 100_000, 10_000):
        await store.set_many({f"k{i:06}": {"i": i} for i in range(start, start + 10_000)})
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=store.namespace, command_timeout=0.1
    ) as hurried:
        taken = await hurried.snapshots.create("whole")
        assert taken.keys == 100_000
        assert await hurried.snapshots.delete("whole") is True


async def test_a_create_waits_for_the_lock_up_to_lock_wait(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Behind another holder of the namespace's snapshot lock, a create waits past its
    command_timeout (the lock is held for as long as a large create runs) and proceeds when
    the lock is released; after ``lock_wait`` it gives up with BackendUnavailableError."""
    ns = store.namespace
    holder = await asyncpg.connect(fleetmem_postgres_database)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_advisory_xact_lock(1718382963, hashtext($1))", ns)
        async with PostgresStore.from_url(
            fleetmem_postgres_database, namespace=ns, command_timeout=0.2
        ) as waiting:
            backend = waiting.snapshots.backend
            assert isinstance(backend, PostgresSnapshots)
            backend.lock_wait = 0.5
            with pytest.raises(BackendUnavailableError, match="lock"):
                await waiting.snapshots.create("late")
            backend.lock_wait = 600.0
            creating = asyncio.ensure_future(waiting.snapshots.create("late"))
            await asyncio.sleep(1.0)  # well past the command_timeout
            assert not creating.done()
            await tx.rollback()
            assert (await asyncio.wait_for(creating, 60)).name == "late"
            assert await waiting.snapshots.delete("late") is True
    finally:
        await holder.close()
