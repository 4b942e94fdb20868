"""``PostgresAgents``: the agent registry in the table ``<table>_agents`` (migration 0003).

Each operation is one statement of ``sql/agents.sql`` judged by the server's ``now()``. A gone
agent (expired or deregistered) keeps its row, hence its generation: the next ``register`` makes
it live again with ``generation + 1``. Ids are ``COLLATE "C"``: ``list`` pages in code-point
order over a primary-key range, bounded like the entries' ``keys()``.
"""

from __future__ import annotations

from typing import Any

from fleetmem._validate import prefix_upper_bound
from fleetmem.backends.postgres.connector import FETCH, FETCHROW, FETCHVAL, PostgresConnector
from fleetmem.backends.seam import AgentBackend, agent_gone
from fleetmem.protocol import Agent

__all__ = ["PostgresAgents"]


def _agent(agent_id: str, row: Any, at: int = 0) -> Agent:
    # info arrives decoded by the connection's jsonb codec.
    return Agent(agent_id, row[at], row[at + 1], row[at + 2], row[at + 3], row[at + 4])


class PostgresAgents(AgentBackend):
    """The agents of one namespace, on the connector of the store's table."""

    def __init__(self, connector: PostgresConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._run = connector.run
        self._q = connector.statements("agents.sql")

    async def register(self, agent_id: str, info: bytes, ttl_ms: int) -> Agent:
        row = await self._run(
            FETCHROW, self._q["register"], (self._namespace, agent_id, info, ttl_ms), write=True
        )
        return _agent(agent_id, row)

    async def heartbeat(self, agent_id: str, ttl_ms: int | None, info: bytes | None) -> Agent:
        row = await self._run(
            FETCHROW,
            self._q["heartbeat"],
            (self._namespace, agent_id, ttl_ms, info),
            write=True,
        )
        if row is None:
            raise agent_gone(agent_id)
        return _agent(agent_id, row)

    async def deregister(self, agent_id: str) -> bool:
        value = await self._run(
            FETCHVAL, self._q["deregister"], (self._namespace, agent_id), write=True
        )
        return value is not None

    async def get(self, agent_id: str) -> Agent | None:
        row = await self._run(FETCHROW, self._q["get"], (self._namespace, agent_id), write=False)
        return None if row is None else _agent(agent_id, row)

    async def list(self, prefix: str, limit: int | None, after: str | None) -> list[Agent]:
        args = (self._namespace, prefix, prefix_upper_bound(prefix), after or "", limit)
        rows = await self._run(FETCH, self._q["list"], args, write=False)
        return [_agent(row[0], row, 1) for row in rows]

    async def count(self) -> int:
        value = await self._run(FETCHVAL, self._q["count"], (self._namespace,), write=False)
        return int(value)
