"""Multi-row writes on PostgreSQL lock their rows in key order, whatever the plan.

Two writers that lock overlapping rows in different orders deadlock (a concurrent ``set_many``
and coalesced deletes did, under CI: SQLSTATE 40P01). ``set_many`` and ``set_batch`` sort their
rows by key; a ``DELETE ... WHERE key = ANY(...)`` locked in its scan's order, which a bitmap
or sequential scan makes heap order. Here the database plans without index scans and the rows
sit in the heap in reverse key order, so a delete that locks in scan order would take ``b``
before ``a``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from fleetmem.backends.postgres import PostgresStore

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("delete", ["delete_many", "delete_batch"])
async def test_deletes_of_several_keys_lock_rows_in_key_order(
    fleetmem_postgres_database: str, fleetmem_namespace: str, delete: str
) -> None:
    admin = await asyncpg.connect(fleetmem_postgres_database)
    try:
        database = await admin.fetchval("SELECT current_database()")
        # Plans without index scans: heap order, for the connections opened from now on.
        await admin.execute(f'ALTER DATABASE "{database}" SET enable_indexscan = off')
        await admin.execute(f'ALTER DATABASE "{database}" SET enable_indexonlyscan = off')
    finally:
        await admin.close()
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=4
    ) as store:
        await store.set("b", 1)  # b first: lower in the heap
        await store.set("a", 1)
        holder = await asyncpg.connect(fleetmem_postgres_database)
        probe = await asyncpg.connect(fleetmem_postgres_database)
        try:
            table = "fleetmem.entries"
            holding = holder.transaction()
            await holding.start()
            # Another writer holds b: the delete must already hold a when it waits for b.
            await holder.execute(
                f"SELECT 1 FROM {table} WHERE namespace = $1 AND key = 'b' FOR UPDATE",
                fleetmem_namespace,
            )
            deleting: Callable[[], Awaitable[object]]
            if delete == "delete_many":

                def deleting() -> Awaitable[object]:
                    return store.delete_many(["a", "b"])

            else:  # the statement of coalesced deletes

                def deleting() -> Awaitable[object]:
                    return store.kv.delete_batch(["a", "b"])

            task = asyncio.ensure_future(deleting())
            locked_a = False
            for _ in range(200):  # until the delete waits for b with a locked (busy machine)
                await asyncio.sleep(0.05)
                try:
                    async with probe.transaction():
                        await probe.execute(
                            f"SELECT 1 FROM {table} WHERE namespace = $1 AND key = 'a' "
                            "FOR UPDATE NOWAIT",
                            fleetmem_namespace,
                        )
                except asyncpg.LockNotAvailableError:
                    locked_a = True
                    break
            await holding.rollback()
            await asyncio.wait_for(task, 30)
            assert locked_a, "the delete waited for b without holding a: not in key order"
            assert await store.keys() == []
        finally:
            await holder.close()
            await probe.close()
