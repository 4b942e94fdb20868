"""RedisStore over TLS (``rediss://``) against a real Redis started with ``--tls-port``.

The certificates come from ``trustme`` (a throwaway CA); the server is one the harness owns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, ConfigurationError
from fleetmem.backends.redis import RedisStore
from fleetmem.testing.servers import find_free_port

pytestmark = pytest.mark.redis

trustme = pytest.importorskip("trustme")


@dataclass(frozen=True)
class TLSRedis:
    url: str  # rediss://127.0.0.1:<tls port>
    ca: Path  # the CA that signed the server's certificate
    client_cert: Path  # a client certificate (chain + key in one PEM) from the same CA


def _start(factory: Callable[..., Any], tmp: Path, *, auth_clients: str) -> TLSRedis:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fleetmem-test-client")
    paths = {
        "ca": tmp / "ca.pem",
        "cert": tmp / "server.pem",
        "key": tmp / "server.key",
        "client": tmp / "client.pem",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["client"]))
    port = find_free_port()
    factory(
        extra_args=[
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(paths["cert"]),
            "--tls-key-file",
            str(paths["key"]),
            "--tls-ca-cert-file",
            str(paths["ca"]),
            "--tls-auth-clients",
            auth_clients,
        ]
    )
    return TLSRedis(f"rediss://127.0.0.1:{port}", paths["ca"], paths["client"])


@pytest.fixture
def tls_redis(fleetmem_redis_factory: Callable[..., Any], tmp_path: Path) -> Iterator[TLSRedis]:
    yield _start(fleetmem_redis_factory, tmp_path, auth_clients="no")


@pytest.fixture
def mtls_redis(fleetmem_redis_factory: Callable[..., Any], tmp_path: Path) -> Iterator[TLSRedis]:
    yield _start(fleetmem_redis_factory, tmp_path, auth_clients="yes")


async def _round_trip(store: RedisStore) -> None:
    entry = await store.set("tls/a", {"secure": True}, partition="p")
    assert entry.version == 1
    assert await store.get("tls/a") == {"secure": True}
    assert await store.incr("tls/n", 5) == 5
    assert await store.set_many({"tls/b": 1, "tls/c": 2}, ttl=60) == 2
    assert await store.keys("tls/") == ["tls/a", "tls/b", "tls/c", "tls/n"]
    health = await store.health()
    assert health.ok, health
    assert await store.clear() == 4


async def test_rediss_with_the_servers_ca_verifies_and_works(tls_redis: TLSRedis) -> None:
    store = RedisStore.from_url(
        tls_redis.url,
        namespace="tls",
        ssl_ca_certs=str(tls_redis.ca),
        ssl_cert_reqs="required",
        ssl_check_hostname=True,
    )
    async with store:
        await _round_trip(store)


async def test_rediss_refuses_a_server_signed_by_another_ca(
    tls_redis: TLSRedis, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    store = RedisStore.from_url(
        tls_redis.url, namespace="tls", ssl_ca_certs=str(other), ssl_cert_reqs="required", timeout=1
    )
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        async with store:
            await store.get("k")
    assert time.monotonic() - started < 2
    assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()


async def test_plain_redis_url_cannot_reach_the_tls_port(tls_redis: TLSRedis) -> None:
    store = RedisStore.from_url(tls_redis.url.replace("rediss://", "redis://"), timeout=1)
    with pytest.raises(BackendUnavailableError):
        async with store:
            await store.get("k")


async def test_mutual_tls_needs_the_client_certificate(mtls_redis: TLSRedis) -> None:
    without = RedisStore.from_url(
        mtls_redis.url, namespace="tls", ssl_ca_certs=str(mtls_redis.ca), timeout=1
    )
    with pytest.raises(BackendUnavailableError):
        async with without:
            await without.get("k")
    with_cert = RedisStore.from_url(
        mtls_redis.url,
        namespace="tls",
        ssl_ca_certs=str(mtls_redis.ca),
        ssl_certfile=str(mtls_redis.client_cert),
        ssl_keyfile=str(mtls_redis.client_cert),
    )
    async with with_cert:
        await _round_trip(with_cert)


def test_ssl_options_need_a_rediss_url() -> None:
    with pytest.raises(ConfigurationError, match="rediss://"):
        RedisStore.from_url("redis://127.0.0.1:6379", ssl_ca_certs="/nowhere/ca.pem")
