"""``RedisAgents``: the agent registry on Redis.

Layout (see ``lua/leases/_lib.lua``): an agent is the hash ``fm:{<ns>}:a:<id>`` (info,
generation, registered, last seen, expires, TTL; times in ms on the server's ``TIME``) in its
namespace's slot, with no native TTL: the record of a gone agent keeps its generation, so
registering it again gets a greater one (within what Redis's persistence keeps, as for lease
tokens). Two sorted sets index the agents not known to be gone: ``fm:{<ns>}:ai`` by id
(``list`` reads it ``BYLEX`` and drops the gone agents it passes) and ``fm:{<ns>}:ae`` by
expiry (``count`` is one ``ZCOUNT`` above ``TIME``, never a pass over the agents). The records
of gone agents stay (a few dozen bytes each): a fleet that makes a new id per run grows by one
small hash per id.
"""

from __future__ import annotations

from typing import Any

from fleetmem._codec import decode_value
from fleetmem.backends.redis.connector import RedisConnector
from fleetmem.backends.redis.entries import ms_datetime
from fleetmem.backends.redis.scripts import LEASE_SCRIPTS
from fleetmem.backends.seam import AgentBackend, agent_gone
from fleetmem.protocol import Agent

__all__ = ["RedisAgents"]

_REGISTER, _HEARTBEAT = LEASE_SCRIPTS["agent_register"], LEASE_SCRIPTS["agent_heartbeat"]
_DEREGISTER, _GET = LEASE_SCRIPTS["agent_deregister"], LEASE_SCRIPTS["agent_get"]
_LIST, _COUNT = LEASE_SCRIPTS["agent_list"], LEASE_SCRIPTS["agent_count"]

#: Agents a ``list`` call returns at most, and ids it looks at at most, per script call.
_PAGE, _BUDGET = 1000, 5000


def _agent(agent_id: str, info: Any, gen: Any, reg: Any, seen: Any, exp: Any) -> Agent:
    return Agent(
        agent_id,
        decode_value(info),
        int(gen),
        ms_datetime(reg),
        ms_datetime(seen),
        ms_datetime(exp),
    )


class RedisAgents(AgentBackend):
    """The agents of one namespace on Redis (see the module docstring). Built by
    ``RedisKV.agents()``; shares its connector."""

    def __init__(self, connector: RedisConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._connector = connector
        self._keys = (f"fm:{{{namespace}}}:".encode(),)

    async def register(self, agent_id: str, info: bytes, ttl_ms: int) -> Agent:
        res = await self._connector.call(_REGISTER, self._keys, agent_id, info, ttl_ms, write=True)
        return _agent(agent_id, info, *res)

    async def heartbeat(self, agent_id: str, ttl_ms: int | None, info: bytes | None) -> Agent:
        res = await self._connector.call(
            _HEARTBEAT,
            self._keys,
            agent_id,
            b"" if ttl_ms is None else ttl_ms,
            b"" if info is None else info,
            write=True,
        )
        if res is None:
            raise agent_gone(agent_id)
        return _agent(agent_id, *res)

    async def deregister(self, agent_id: str) -> bool:
        res = await self._connector.call(_DEREGISTER, self._keys, agent_id, write=True)
        return bool(res == 1)

    async def get(self, agent_id: str) -> Agent | None:
        res = await self._connector.call(_GET, self._keys, agent_id, write=False)
        return None if res is None else _agent(agent_id, *res)

    async def list(self, prefix: str, limit: int | None, after: str | None) -> list[Agent]:
        encoded = prefix.encode()
        lo = b"[" + encoded if prefix else b"-"
        if after is not None and after >= prefix:
            lo = b"(" + after.encode()
        # No id holds the byte 0xff (UTF-8), so this bounds every id beginning with prefix.
        hi = b"(" + encoded + b"\xff" if prefix else b"+"
        out: list[Agent] = []
        while True:
            want = _PAGE if limit is None else min(limit - len(out), _PAGE)
            # Reads, and drops index members of gone agents: idempotent, so retried as a read.
            res = await self._connector.call(_LIST, self._keys, lo, hi, want, _BUDGET, write=False)
            for i in range(1, len(res), 6):
                out.append(_agent(res[i].decode(), *res[i + 1 : i + 6]))
            cursor = res[0]
            if not cursor or (limit is not None and len(out) >= limit):
                return out
            lo = cursor

    async def count(self) -> int:
        return int(await self._connector.call(_COUNT, self._keys, write=False))
