"""``namespaces()`` is answered from indexes: the query plans on SQLite and PostgreSQL.

A loose index scan seeks from one namespace to the next; none of the plans reads the table
from end to end, so the cost follows the number of namespaces, not of entries.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from fleetmem.backends.postgres import PostgresStore
from fleetmem.backends.sqlite import SQLiteStore
from fleetmem.backends.sqlite.connector import SQL


async def test_sqlite_lists_namespaces_from_the_indexes(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    store = await SQLiteStore(path, namespace="ns0").connect()
    try:
        for i in range(40):
            view = store.with_namespace(f"ns{i}")
            await view.set_many({f"k{j}": j for j in range(50)}, ttl=3600 if i % 2 else None)
        assert await store.namespaces(limit=3) == ["ns0", "ns1", "ns10"]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        conn.execute("ANALYZE")
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + SQL["namespaces"], ("", "\U0010ffff", "", 0, -1, "_f*")
            )
        ]
    finally:
        conn.close()
    searches = [step for step in plan if "fleetmem_entries" in step]
    assert searches, plan
    assert all(step.startswith("SEARCH") and "INDEX" in step for step in searches), plan
    assert any("fleetmem_entries_expiry" in step for step in searches), plan


@pytest.mark.postgres
async def test_postgres_lists_namespaces_with_a_loose_index_scan(
    fleetmem_postgres_database: str,
) -> None:
    conn = await asyncpg.connect(fleetmem_postgres_database)
    try:
        await conn.execute(
            """INSERT INTO fleetmem.entries (namespace, key, value, expires_at)
               SELECT 'ns' || lpad(i::text, 4, '0'), 'k' || k, '1'::jsonb,
                      CASE WHEN i % 2 = 0 THEN now() - interval '1 hour'
                           WHEN i % 3 = 0 THEN now() + interval '1 hour' END
               FROM generate_series(1, 400) AS i, generate_series(1, 100) AS k"""
        )
        await conn.execute("ANALYZE fleetmem.entries")
    finally:
        await conn.close()
    store = await PostgresStore.from_url(fleetmem_postgres_database, namespace="ns0001").connect()
    try:
        assert await store.namespaces(limit=3) == ["ns0001", "ns0003", "ns0005"]
        assert len(await store.namespaces()) == 200
        sql = store.kv.connector.statements("kv.sql")["namespaces"]
    finally:
        await store.close()
    conn = await asyncpg.connect(fleetmem_postgres_database)
    try:
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF) " + sql, "", "\U0010ffff", "", None, "_fleetmem"
        )
    finally:
        await conn.close()
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan" not in plan, plan
    assert "Recursive Union" in plan and "entries_pkey" in plan, plan
    assert "entries_expires_idx" in plan, plan
