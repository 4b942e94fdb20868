"""``SQLiteAgents``: the agent registry in the ``fleetmem_agents`` table of a file.

Each write is one statement in a ``BEGIN IMMEDIATE`` transaction; ``register`` commits with
the log synced to disk whatever ``synchronous`` says. Times are milliseconds on this process's
wall clock, as for the entries. A row outlives its agent (deregistered or expired),
keeping its generation so that the next ``register`` of that id gets a greater one.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from fleetmem._codec import decode_value, utc_from_ms
from fleetmem._validate import prefix_upper_bound
from fleetmem.backends.seam import AgentBackend, agent_gone
from fleetmem.backends.sqlite.connector import SQL, SQLiteConnector, Transaction, now_ms
from fleetmem.protocol import Agent

__all__ = ["SQLiteAgents"]


def _agent(agent_id: str, row: tuple[Any, ...]) -> Agent:
    info, generation, registered, last_seen, expires = row
    return Agent(
        agent_id,
        decode_value(info),
        generation,
        utc_from_ms(registered),
        utc_from_ms(last_seen),
        utc_from_ms(expires),
    )


class SQLiteAgents(AgentBackend):
    """Agents of one namespace of a SQLite file."""

    def __init__(self, connector: SQLiteConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._db = connector

    async def register(self, agent_id: str, info: bytes, ttl_ms: int) -> Agent:
        ns = self._namespace
        db = self._db

        def run(conn: sqlite3.Connection) -> Agent:
            # Synced to disk even in normal mode, as a lease grant: no power failure may hand
            # a generation out twice. Heartbeats, far more frequent, are not.
            with db.synced(conn), Transaction(conn):
                row = conn.execute(
                    SQL["agent_register"], (ns, agent_id, info, now_ms(), ttl_ms)
                ).fetchone()
            return _agent(agent_id, row)

        return await db.call(run)

    async def heartbeat(self, agent_id: str, ttl_ms: int | None, info: bytes | None) -> Agent:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Agent:
            with Transaction(conn):
                row = conn.execute(
                    SQL["agent_heartbeat"], (ns, agent_id, now_ms(), ttl_ms, info)
                ).fetchone()
            if row is None:
                raise agent_gone(agent_id)
            return _agent(agent_id, row)

        return await self._db.call(run)

    async def deregister(self, agent_id: str) -> bool:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> bool:
            with Transaction(conn):
                cursor = conn.execute(SQL["agent_deregister"], (ns, agent_id, now_ms()))
                return cursor.rowcount == 1

        return await self._db.call(run)

    async def get(self, agent_id: str) -> Agent | None:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> Agent | None:
            row = conn.execute(SQL["agent_get"], (ns, agent_id, now_ms())).fetchone()
            return None if row is None else _agent(agent_id, row)

        return await self._db.call(run)

    async def list(self, prefix: str, limit: int | None, after: str | None) -> list[Agent]:
        ns = self._namespace
        # The half-open id range of keys(): after + U+0000 is the smallest id above ``after``.
        low = after + "\x00" if after is not None and after >= prefix else prefix
        high = prefix_upper_bound(prefix)
        lim = -1 if limit is None else limit

        def run(conn: sqlite3.Connection) -> list[Agent]:
            rows = conn.execute(SQL["agent_list"], (ns, low, high, now_ms(), lim))
            return [_agent(row[0], row[1:]) for row in rows]

        return await self._db.call(run)

    async def count(self) -> int:
        ns = self._namespace

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute(SQL["agent_count"], (ns, now_ms())).fetchone()[0])

        return await self._db.call(run)
