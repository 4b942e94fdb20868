"""``RedisStore.namespaces()`` on a Redis Cluster: the registry lives in a slot of its own, so a
failover of its node can lose a registration while the entry, on another node, survives; the
registry's marker names the node's run, and a listing that sees another run backfills it from
a ``SCAN`` of every primary.

The cluster is shared by the session: this test only removes its own names from the registry
and makes the marker stale, which costs a concurrent listing a backfill and nothing else.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleetmem.backends.redis import RedisStore

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

cluster_mod = pytest.importorskip("redis.asyncio.cluster")

REGISTRY, MARKER = b"fm:{_fleetmem}:ns", b"fm:{_fleetmem}:nsm"


async def test_a_registration_lost_on_the_registry_node_is_found_on_every_primary(
    fleetmem_redis_cluster: Any, fleetmem_namespace: str
) -> None:
    names = [f"{fleetmem_namespace}-{i}" for i in range(12)]  # spread over the three primaries
    writer = await RedisStore.from_url(fleetmem_redis_cluster.url, namespace=names[0]).connect()
    lister = await RedisStore.from_url(
        fleetmem_redis_cluster.url, namespace=fleetmem_namespace
    ).connect()
    raw = cluster_mod.RedisCluster.from_url(fleetmem_redis_cluster.url)
    try:
        for name in names:
            await writer.with_namespace(name).set("k", name)
        assert await lister.namespaces(fleetmem_namespace + "-") == sorted(names)
        # A failover of the registry's node that lost these registrations: the marker, older,
        # was replicated and names the former primary's run.
        await raw.zrem(REGISTRY, *names)
        await raw.set(MARKER, "0" * 40)
        assert await lister.namespaces(fleetmem_namespace + "-") == sorted(names)
        assert await raw.get(MARKER) != b"0" * 40
    finally:
        for name in names:
            await writer.with_namespace(name).clear()
        await raw.aclose()
        await writer.close()
        await lister.close()
