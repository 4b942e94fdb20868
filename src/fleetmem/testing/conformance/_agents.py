"""The agent registry: register, heartbeat, get, list, count, deregister, generations, expiry."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from fleetmem.errors import AgentGoneError, FleetmemError, KeyNotFoundError
from fleetmem.protocol import Agent, MemoryStore
from fleetmem.testing.conformance._base import GOOD_KEYS, assert_same_json, assert_utc, utcnow
from fleetmem.testing.conformance._leases import CoordinationBase

INFO: dict[str, Any] = {
    "role": "tester",
    "host": "h1",
    "n": 7,
    "load": 0.25,
    "tags": ["a", "b"],
    "nested": {"ok": True, "none": None, "big": 2**70},
    "\u00e9\U0001f600": "unicode",
}


def _span(agent: Agent) -> float:
    """Seconds from ``last_seen`` to ``expires_at`` (the TTL the server applied)."""
    return (agent.expires_at - agent.last_seen).total_seconds()


def assert_same_agent(actual: Agent | None, expected: Agent, what: str = "agent") -> None:
    assert actual is not None, f"{what}: expected {expected!r}, got None"
    assert (actual.id, actual.generation) == (expected.id, expected.generation), what
    assert_same_json(actual.info, expected.info, f"{what}.info")
    for field in ("registered_at", "last_seen", "expires_at"):
        got = getattr(actual, field)
        want = getattr(expected, field)
        assert abs((got - want).total_seconds()) <= 0.002, f"{what}.{field}: {got} != {want}"


class AgentsConformance(CoordinationBase):
    """The rules of ``COORDINATION.md`` ("Agent registry")."""

    pytestmark = [pytest.mark.asyncio]

    async def test_agent_register_and_get(self, store: MemoryStore) -> None:
        agents = store.agents
        assert await agents.get("agent-7") is None
        assert await agents.count() == 0
        before = utcnow()
        agent = await agents.register("agent-7", info=INFO, ttl=30)
        assert isinstance(agent, Agent)
        assert agent.id == "agent-7"
        assert_same_json(agent.info, INFO, "info")
        assert type(agent.generation) is int and agent.generation >= 1
        registered = assert_utc(agent.registered_at, "registered_at")
        seen = assert_utc(agent.last_seen, "last_seen")
        expires = assert_utc(agent.expires_at, "expires_at")
        assert registered <= seen < expires
        assert abs(_span(agent) - 30) <= self.ttl_slack, agent
        skew = timedelta(seconds=self.clock_skew)
        assert before - skew <= registered <= utcnow() + skew
        with pytest.raises(dataclasses.FrozenInstanceError):
            agent.generation = 99  # type: ignore[misc]
        assert_same_agent(await agents.get("agent-7"), agent, "get")
        assert await agents.count() == 1
        # info defaults to an empty object; a timedelta is a TTL.
        bare = await agents.register("bare", ttl=timedelta(minutes=2))
        assert bare.info == {}
        assert abs(_span(bare) - 120) <= self.ttl_slack, bare
        assert_same_agent(await agents.get("bare"), bare, "get bare")
        assert await agents.count() == 2

    async def test_agent_ids_round_trip(self, store: MemoryStore) -> None:
        for agent_id in GOOD_KEYS:
            agent = await store.agents.register(agent_id, info={"id": agent_id}, ttl=30)
            assert agent.id == agent_id
            got = await store.agents.get(agent_id)
            assert got is not None and got.id == agent_id and got.info == {"id": agent_id}
        assert await store.agents.count() == len(GOOD_KEYS)
        # Ascending by id: code point order, which is UTF-8 byte order.
        listed = [agent.id for agent in await store.agents.list()]
        assert listed == sorted(GOOD_KEYS)

    async def test_agent_register_of_a_live_agent_keeps_generation(
        self, store: MemoryStore
    ) -> None:
        agents = store.agents
        first = await agents.register("a", info={"v": 1}, ttl=30)
        again = await agents.register("a", info={"v": 2}, ttl=100)
        assert again.generation == first.generation
        assert abs((again.registered_at - first.registered_at).total_seconds()) <= 0.002
        assert again.info == {"v": 2}
        assert again.last_seen >= first.last_seen
        assert abs(_span(again) - 100) <= self.ttl_slack, again
        assert_same_agent(await agents.get("a"), again, "get")
        assert await agents.count() == 1

    async def test_agent_generation_grows_after_deregister_and_expiry(
        self, store: MemoryStore
    ) -> None:
        agents = store.agents
        first = await agents.register("a", info={"run": 1}, ttl=30)
        assert await agents.deregister("a") is True
        second = await agents.register("a", info={"run": 2}, ttl=self.lease_ttl)
        assert second.generation > first.generation
        assert second.registered_at >= first.registered_at
        assert second.info == {"run": 2}
        await self.wait_out_lease_ttl()
        assert await agents.get("a") is None
        third = await agents.register("a", info={"run": 3}, ttl=30)
        assert third.generation > second.generation
        assert third.registered_at > second.registered_at
        assert third.registered_at >= second.expires_at - timedelta(seconds=0.002)
        assert_same_agent(await agents.get("a"), third, "get")
        # Generations are per id.
        other = await agents.register("b", ttl=30)
        assert type(other.generation) is int and other.generation >= 1

    async def test_agent_concurrent_registers_make_one_generation(self, store: MemoryStore) -> None:
        n = self.concurrency
        agents = await asyncio.gather(
            *(store.agents.register("a", info={"i": i}, ttl=30) for i in range(n))
        )
        generations = {agent.generation for agent in agents}
        assert len(generations) == 1, f"{n} concurrent registers made generations {generations}"
        registered = {agent.registered_at for agent in agents}
        assert max(registered) - min(registered) <= timedelta(seconds=0.002), registered
        current = await store.agents.get("a")
        assert current is not None and current.generation in generations
        assert current.info in [{"i": i} for i in range(n)]
        assert await store.agents.count() == 1

    async def test_agent_heartbeat_extends_and_keeps(self, store: MemoryStore) -> None:
        agents = store.agents
        agent = await agents.register("a", info=INFO, ttl=100)
        beat = await agents.heartbeat("a")
        assert (beat.id, beat.generation) == (agent.id, agent.generation)
        assert abs((beat.registered_at - agent.registered_at).total_seconds()) <= 0.002
        assert_same_json(beat.info, INFO, "info kept")
        assert beat.last_seen >= agent.last_seen
        assert beat.expires_at >= agent.expires_at
        assert abs(_span(beat) - 100) <= self.ttl_slack, beat  # the registered TTL
        longer = await agents.heartbeat("a", ttl=200)
        assert abs(_span(longer) - 200) <= self.ttl_slack, longer
        kept = await agents.heartbeat("a")  # ttl=None: the last one given (200)
        assert abs(_span(kept) - 200) <= self.ttl_slack, kept
        shorter = await agents.heartbeat("a", ttl=timedelta(seconds=50))
        assert abs(_span(shorter) - 50) <= self.ttl_slack, shorter
        assert shorter.expires_at < kept.expires_at
        replaced = await agents.heartbeat("a", info={"role": "idle"})
        assert replaced.info == {"role": "idle"}  # replaced, not merged
        assert abs(_span(replaced) - 50) <= self.ttl_slack, replaced
        # register sets the TTL a later heartbeat reuses.
        await agents.register("a", info={}, ttl=70)
        beat = await agents.heartbeat("a")
        assert abs(_span(beat) - 70) <= self.ttl_slack, beat
        assert beat.generation == agent.generation
        assert_same_agent(await agents.get("a"), beat, "get")

    async def test_agent_heartbeat_of_a_gone_agent_raises(self, store: MemoryStore) -> None:
        agents = store.agents
        with pytest.raises(AgentGoneError) as info:
            await agents.heartbeat("never")
        assert isinstance(info.value, KeyNotFoundError)
        assert isinstance(info.value, FleetmemError)
        assert await agents.get("never") is None
        await agents.register("left", ttl=30)
        assert await agents.deregister("left") is True
        await agents.register("expired", info={"x": 1}, ttl=self.lease_ttl)
        await self.wait_out_lease_ttl()
        for agent_id in ("never", "left", "expired"):
            with pytest.raises(AgentGoneError):
                await agents.heartbeat(agent_id)
            with pytest.raises(AgentGoneError):
                await agents.heartbeat(agent_id, ttl=30, info={"late": True})
            assert await agents.get(agent_id) is None, f"{agent_id} was revived"
        assert await agents.list() == []
        assert await agents.count() == 0

    async def test_agent_deregister(self, store: MemoryStore) -> None:
        agents = store.agents
        await agents.register("a", ttl=30)
        await agents.register("b", ttl=30)
        assert await agents.count() == 2
        assert await agents.deregister("a") is True
        assert await agents.deregister("a") is False
        assert await agents.deregister("never") is False
        assert await agents.get("a") is None
        assert [agent.id for agent in await agents.list()] == ["b"]
        assert await agents.count() == 1

    async def test_agent_list_pages(self, store: MemoryStore) -> None:
        agents = store.agents
        ids = ["a/1", "a/2", "a/3", "ab", "b/1", "c"]
        for agent_id in reversed(ids):
            await agents.register(agent_id, info={"id": agent_id}, ttl=30)
        listed = await agents.list()
        assert [agent.id for agent in listed] == ids
        assert all(isinstance(agent, Agent) for agent in listed)
        assert [agent.info for agent in listed] == [{"id": agent_id} for agent_id in ids]

        async def page(prefix: str = "", **kwargs: Any) -> list[str]:
            return [agent.id for agent in await agents.list(prefix, **kwargs)]

        assert await page("a/") == ["a/1", "a/2", "a/3"]
        assert await page("a") == ["a/1", "a/2", "a/3", "ab"]
        assert await page("z") == []
        assert await page(limit=2) == ["a/1", "a/2"]
        assert await page(limit=0) == []
        assert await page(limit=100) == ids
        assert await page(after="a/2") == ["a/3", "ab", "b/1", "c"]
        assert await page(after="a/2", limit=2) == ["a/3", "ab"]
        assert await page(after="c") == []
        assert await page(after="a") == ids  # "a" is no agent; the cursor is exclusive
        assert await page("a/", after="a/1", limit=1) == ["a/2"]
        assert await page("b", after="a/3") == ["b/1"]
        # Paging through everything, two at a time.
        seen: list[str] = []
        after: str | None = None
        while True:
            chunk = await page(limit=2, after=after)
            if not chunk:
                break
            seen += chunk
            after = chunk[-1]
        assert seen == ids
        assert await agents.count() == len(ids)

    async def test_agent_expiry_on_every_path(self, store: MemoryStore) -> None:
        agents = store.agents
        await agents.register("gone/1", info={"x": 1}, ttl=self.lease_ttl)
        await agents.register("gone/2", ttl=30)
        await agents.heartbeat("gone/2", ttl=self.lease_ttl)
        await agents.register("live", info={"y": 2}, ttl=30)
        await self.wait_out_lease_ttl()
        for agent_id in ("gone/1", "gone/2"):
            assert await agents.get(agent_id) is None, agent_id
            assert await agents.deregister(agent_id) is False, agent_id
            with pytest.raises(AgentGoneError):
                await agents.heartbeat(agent_id)
        assert [agent.id for agent in await agents.list()] == ["live"]
        assert await agents.list("gone") == []
        assert await agents.list(after="a") == [await agents.get("live")]
        assert await agents.count() == 1

    async def test_agent_namespaces_are_separate(self, store: MemoryStore) -> None:
        ns = store.namespace
        async with self.sibling_namespaces(store, "x") as (other,):
            mine = await store.agents.register("x", info={"ns": "mine"}, ttl=30)
            theirs = await other.agents.register("x", info={"ns": "theirs"}, ttl=30)
            assert_same_agent(await store.agents.get("x"), mine, "this namespace")
            assert_same_agent(await other.agents.get("x"), theirs, "the other namespace")
            await other.agents.register("only-there", ttl=30)
            assert [agent.id for agent in await store.agents.list()] == ["x"]
            assert await store.agents.count() == 1
            assert await other.agents.count() == 2
            assert await store.agents.deregister("x") is True
            assert_same_agent(await other.agents.get("x"), theirs, "the other namespace")
            with pytest.raises(AgentGoneError):
                await store.agents.heartbeat("only-there")
            # Agents are no keys: none appears, a key of the same name is free, clear() keeps
            # agents, and a namespace holding only agents is not listed.
            mine = await store.agents.register("x", info={"ns": "mine"}, ttl=30)
            assert await store.keys() == [] and await store.search("*") == {}
            assert (await store.stats()).keys == 0
            assert await store.namespaces(ns) == []
            assert await store.set_if_absent("x", "key") is True
            assert await store.clear() == 1
            assert_same_agent(await store.agents.get("x"), mine, "after clear()")
            assert await store.agents.count() == 1
            # A view on the same namespace sees the same agents.
            same = store.with_namespace(ns)
            try:
                assert_same_agent(await same.agents.get("x"), mine, "through a view")
                assert await same.agents.deregister("x") is True
                assert await store.agents.get("x") is None
            finally:
                await same.close()
