"""Leases and the agent registry held in this process's memory.

Each operation runs without awaiting between its read and its write, so it is atomic with
respect to every other coroutine; a fenced key-value write checks its lease in the same step
(:func:`check_fence`). Times are this process's wall clock (there is no server clock). A lease
record outlives its lease, keeping the last token of its name, and an agent's record keeps its
generation; both live as long as the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fleetmem._codec import decode_value
from fleetmem._notify import Notifier
from fleetmem.backends.seam import AgentBackend, Fence, LeaseBackend, agent_gone, lease_lost
from fleetmem.protocol import Agent, Lease

__all__ = ["Coordination", "MemoryAgents", "MemoryLeases", "check_fence"]


@dataclass(slots=True)
class _LeaseRecord:
    owner: str
    token: int
    acquired_at: float
    expires_at: float  # epoch seconds; <= now once released or expired
    ttl_ms: int


@dataclass(slots=True)
class _AgentRecord:
    info: bytes
    generation: int
    registered_at: float
    last_seen: float
    expires_at: float
    ttl_ms: int


@dataclass(slots=True)
class Coordination:
    """The leases and agents of every namespace of one in-memory store (shared by views)."""

    leases: dict[tuple[str, str], _LeaseRecord] = field(default_factory=dict)
    agents: dict[str, dict[str, _AgentRecord]] = field(default_factory=dict)
    notifier: Notifier = field(default_factory=Notifier)


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def check_fence(coord: Coordination, namespace: str, fence: Fence, now: float) -> None:
    """Raise ``LeaseLostError`` unless ``fence`` is a live lease of ``namespace`` at ``now``."""
    record = coord.leases.get((namespace, fence.name))
    if record is None or record.token != fence.token or record.expires_at <= now:
        raise lease_lost(fence.name, fence.token)


class MemoryLeases(LeaseBackend):
    """Leases of one namespace; a release wakes this process's waiters at once."""

    def __init__(self, *, namespace: str, coord: Coordination, clock: Any) -> None:
        super().__init__(namespace=namespace, notifier=coord.notifier)
        self._coord = coord
        self._clock = clock

    def _lease(self, name: str, record: _LeaseRecord) -> Lease:
        return Lease(
            name,
            record.owner,
            record.token,
            _dt(record.acquired_at),
            _dt(record.expires_at),
            self._namespace,
        )

    async def acquire(self, name: str, owner: str, ttl_ms: int) -> tuple[Lease | None, int | None]:
        now = self._clock()
        key = (self._namespace, name)
        record = self._coord.leases.get(key)
        if record is not None and record.expires_at > now:
            return None, max(0, int((record.expires_at - now) * 1000))
        token = 1 if record is None else record.token + 1
        record = _LeaseRecord(owner, token, now, now + ttl_ms / 1000, ttl_ms)
        self._coord.leases[key] = record
        return self._lease(name, record), None

    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        now = self._clock()
        record = self._coord.leases.get((self._namespace, name))
        if record is None or record.token != token or record.expires_at <= now:
            raise lease_lost(name, token)
        if ttl_ms is not None:
            record.ttl_ms = ttl_ms
        record.expires_at = now + record.ttl_ms / 1000
        return self._lease(name, record)

    async def release(self, name: str, token: int) -> bool:
        now = self._clock()
        record = self._coord.leases.get((self._namespace, name))
        if record is None or record.token != token or record.expires_at <= now:
            return False
        record.expires_at = now
        self._notifier.notify((self._namespace, name))
        return True

    async def holder(self, name: str) -> Lease | None:
        record = self._coord.leases.get((self._namespace, name))
        if record is None or record.expires_at <= self._clock():
            return None
        return self._lease(name, record)


class MemoryAgents(AgentBackend):
    """Agents of one namespace."""

    def __init__(self, *, namespace: str, coord: Coordination, clock: Any) -> None:
        super().__init__(namespace=namespace)
        self._agents = coord.agents.setdefault(namespace, {})
        self._clock = clock

    @staticmethod
    def _agent(agent_id: str, r: _AgentRecord) -> Agent:
        return Agent(
            agent_id,
            decode_value(r.info),
            r.generation,
            _dt(r.registered_at),
            _dt(r.last_seen),
            _dt(r.expires_at),
        )

    def _live(self, agent_id: str, now: float) -> _AgentRecord | None:
        r = self._agents.get(agent_id)
        return r if r is not None and r.expires_at > now else None

    async def register(self, agent_id: str, info: bytes, ttl_ms: int) -> Agent:
        now = self._clock()
        r = self._agents.get(agent_id)
        expires = now + ttl_ms / 1000
        if r is not None and r.expires_at > now:
            r.info, r.last_seen, r.expires_at, r.ttl_ms = info, now, expires, ttl_ms
        else:
            generation = 1 if r is None else r.generation + 1
            r = _AgentRecord(info, generation, now, now, expires, ttl_ms)
            self._agents[agent_id] = r
        return self._agent(agent_id, r)

    async def heartbeat(self, agent_id: str, ttl_ms: int | None, info: bytes | None) -> Agent:
        now = self._clock()
        r = self._live(agent_id, now)
        if r is None:
            raise agent_gone(agent_id)
        if ttl_ms is not None:
            r.ttl_ms = ttl_ms
        if info is not None:
            r.info = info
        r.last_seen = now
        r.expires_at = now + r.ttl_ms / 1000
        return self._agent(agent_id, r)

    async def deregister(self, agent_id: str) -> bool:
        now = self._clock()
        r = self._live(agent_id, now)
        if r is None:
            return False
        r.expires_at = now
        return True

    async def get(self, agent_id: str) -> Agent | None:
        r = self._live(agent_id, self._clock())
        return None if r is None else self._agent(agent_id, r)

    async def list(self, prefix: str, limit: int | None, after: str | None) -> list[Agent]:
        now = self._clock()
        out: list[Agent] = []
        for agent_id in sorted(self._agents):
            if not agent_id.startswith(prefix) or (after is not None and agent_id <= after):
                continue
            r = self._agents[agent_id]
            if r.expires_at > now:
                out.append(self._agent(agent_id, r))
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def count(self) -> int:
        now = self._clock()
        return sum(1 for r in self._agents.values() if r.expires_at > now)
