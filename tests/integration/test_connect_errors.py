"""A connection that never opened says why, naming the target without its password.

Real servers and real sockets only: a port nothing listens on, a host that cannot exist
(``.invalid``, RFC 6761), a socket that accepts and never answers, and the harness's PostgreSQL
and Redis asked for a database or a role they do not have. Never the machine's own servers.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, ConfigurationError, open_store
from fleetmem.testing.servers import PostgresServer, RedisServer

PASSWORD = "s3cret-pw"


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose connections are accepted by the kernel and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def _refused(url: str, **options: Any) -> BaseException:
    with pytest.raises(Exception) as info:  # the class: checked by each test
        await open_store(url, **options)
    message = str(info.value)
    assert PASSWORD not in message
    assert "lost its connection" not in message
    return info.value


# -- PostgreSQL ----------------------------------------------------------------------------------


async def test_postgres_connection_refused(closed_port: int) -> None:
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{closed_port}/db"
    err = await _refused(url, acquire_timeout=2)
    assert type(err) is BackendUnavailableError
    assert str(err) == (
        f"cannot connect to PostgreSQL at postgresql://app:***@127.0.0.1:{closed_port}/db: "
        "connection refused"
    )


async def test_postgres_host_not_found() -> None:
    err = await _refused(f"postgresql://app:{PASSWORD}@nonexistent.invalid/db", acquire_timeout=2)
    assert type(err) is BackendUnavailableError
    assert re.fullmatch(
        r"cannot connect to PostgreSQL at postgresql://app:\*\*\*@nonexistent\.invalid/db: "
        r"(host not found|host name lookup failed \(.+\))",
        str(err),
    ), str(err)


async def test_postgres_no_answer_times_out(silent_port: int) -> None:
    err = await _refused(
        f"postgresql://app:{PASSWORD}@127.0.0.1:{silent_port}/db", acquire_timeout=0.5
    )
    assert type(err) is BackendUnavailableError
    assert str(err).endswith(": timed out: no answer within 0.5 s")


@pytest.mark.postgres
async def test_postgres_missing_database_is_a_configuration_error(
    fleetmem_postgres_server: PostgresServer,
) -> None:
    err = await _refused(fleetmem_postgres_server.dsn_for("fleetmem_no_such_db"))
    assert type(err) is ConfigurationError
    assert "cannot connect to PostgreSQL at postgresql://" in str(err)
    assert "database does not exist" in str(err)
    assert "fleetmem_no_such_db" in str(err)


@pytest.mark.postgres
async def test_postgres_unknown_role_is_an_authentication_failure(
    fleetmem_postgres_server: PostgresServer,
) -> None:
    server = fleetmem_postgres_server
    host = f"[{server.host}]" if ":" in server.host else server.host
    url = f"postgresql://fleetmem_no_such_role:{PASSWORD}@{host}:{server.port}/{server.database}"
    err = await _refused(url)
    assert type(err) is ConfigurationError
    assert "fleetmem_no_such_role:***@" in str(err)
    assert "authentication failed" in str(err)


@pytest.mark.postgres
async def test_postgres_server_gone_from_an_open_pool(
    fleetmem_postgres_factory: Any, fleetmem_namespace: str
) -> None:
    """The pool had connections, the server went away: the retry's new connection is refused,
    and the error says so (nothing was lost: the read is retried once, then refused)."""
    server = fleetmem_postgres_factory()
    async with open_store(server.dsn, namespace=fleetmem_namespace, acquire_timeout=2) as store:
        await store.set("k", 1)
        server.stop()
        with pytest.raises(BackendUnavailableError) as info:
            await store.get("k")
        assert str(info.value).startswith("cannot connect to PostgreSQL at postgresql://")
        assert str(info.value).endswith(": connection refused")


# -- Redis ---------------------------------------------------------------------------------------


async def test_redis_connection_refused(closed_port: int) -> None:
    err = await _refused(f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0")
    assert type(err) is BackendUnavailableError
    assert str(err) == (
        f"cannot connect to Redis at redis://:***@127.0.0.1:{closed_port}/0: connection refused"
    )


async def test_redis_host_not_found() -> None:
    err = await _refused(f"redis://:{PASSWORD}@nonexistent.invalid:6390/0")
    assert type(err) is BackendUnavailableError
    assert re.fullmatch(
        r"cannot connect to Redis at redis://:\*\*\*@nonexistent\.invalid:6390/0: "
        r"(host not found|host name lookup failed \(.+\))",
        str(err),
    ), str(err)


@pytest.mark.redis
async def test_redis_database_out_of_range_is_a_configuration_error(
    fleetmem_redis_server: RedisServer,
) -> None:
    err = await _refused(fleetmem_redis_server.url_for(99))
    assert type(err) is ConfigurationError
    message = str(err)
    assert message.startswith("cannot use Redis at redis")
    assert "no database 99 (DB index is out of range" in message
    # The harness's server answers CONFIG GET: the message names its limit.
    if fleetmem_redis_server.owned:
        assert "its `databases` setting is 16: indexes 0 to 15" in message


@pytest.mark.redis
async def test_redis_wrong_password_says_authentication_failed(
    fleetmem_redis_factory: Any,
) -> None:
    import redis.asyncio as aioredis

    server = fleetmem_redis_factory()  # a server of this test's own: its password may change
    host = f"[{server.host}]" if ":" in server.host else server.host
    admin = aioredis.Redis.from_url(server.url)
    await admin.config_set("requirepass", "right-pw")
    try:
        err = await _refused(f"redis://:{PASSWORD}@{host}:{server.port}/0")
        assert type(err) is BackendUnavailableError
        assert str(err).startswith(
            f"cannot connect to Redis at redis://:***@{host}:{server.port}/0: "
            "authentication failed ("
        )
        none_given = await _refused(f"redis://{host}:{server.port}/0")
        assert type(none_given) is BackendUnavailableError
        assert str(none_given).endswith(
            ": authentication failed (the server requires a password and none was given)"
        )
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()
