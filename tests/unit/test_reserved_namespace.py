"""fleetmem's own state lives in namespaces no user can open (issue 14 B)."""

from __future__ import annotations

import pytest

from fleetmem import InMemoryStore, InvalidKeyError, SQLiteStore


@pytest.mark.parametrize("namespace", ["_fleetmem.hybrid", "_fleetmem", "_fleetmem-x"])
def test_a_reserved_namespace_is_refused(namespace: str) -> None:
    with pytest.raises(InvalidKeyError, match="reserved"):
        InMemoryStore(namespace=namespace)
    with pytest.raises(InvalidKeyError, match="reserved"):
        SQLiteStore(":memory:", namespace=namespace)
    with pytest.raises(InvalidKeyError, match="reserved"):
        InMemoryStore(namespace="ns").with_namespace(namespace)


@pytest.mark.parametrize("namespace", ["_fleetme", "fleetmem", "x_fleetmem", "_Fleetmem"])
def test_names_near_the_reserved_prefix_are_users(namespace: str) -> None:
    assert InMemoryStore(namespace=namespace).namespace == namespace


async def test_the_internal_view_reaches_a_reserved_namespace_and_only_those() -> None:
    store = InMemoryStore(namespace="ns")
    internal = store.kv.reserved_view("_fleetmem.hybrid")
    await internal.set("epoch/ns", b"3", None, None, False)
    assert await store.get("epoch/ns") is None  # nothing leaks into the user's namespace
    assert await internal.get("epoch/ns") == 3
    with pytest.raises(ValueError, match="not a reserved namespace"):
        store.kv.reserved_view("other")
