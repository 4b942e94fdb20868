"""RedisConnector: one per backend, shared by its views (no server needed)."""

from __future__ import annotations

from fleetmem.backends.redis import RedisConnector, RedisStore
from fleetmem.backends.redis.connector import EVALSHA, FCALL, UNDECIDED

#: Nothing listens there: a store that tried I/O would fail differently.
URL = "redis://127.0.0.1:1/0"


def test_views_made_before_connect_share_the_connector() -> None:
    store = RedisStore.from_url(URL)
    view = store.with_namespace("other")
    assert isinstance(store.kv.connector, RedisConnector)
    assert view.kv.connector is store.kv.connector
    assert store.kv.connector.form == UNDECIDED
    client = view.client  # decides "standalone" for both
    assert store.client is client
    assert store.kv.connector.form == FCALL


def test_a_cluster_calls_scripts_with_evalsha() -> None:
    store = RedisStore.from_url(URL, cluster=True)
    assert store.kv.connector.cluster
    assert store.kv.connector.form == EVALSHA
