"""The fleetmem pytest plugin (entry point ``pytest11``): fixtures for stores and servers.

Servers come from, in this order: ``FLEETMEM_TEST_POSTGRES_URL`` / ``FLEETMEM_TEST_REDIS_URL``;
a throwaway container when a Docker engine answers (``FLEETMEM_TEST_DOCKER=0`` turns that off);
the local server binaries (``FLEETMEM_TEST_POSTGRES_BIN_DIR`` / ``FLEETMEM_TEST_REDIS_BIN_DIR``
pin their directory). With none of them the tests that need a server skip, or fail when
``--fleetmem-require-servers`` or ``FLEETMEM_REQUIRE_SERVERS=1`` is given. See docs/testing.md.

The plugin also registers the markers fleetmem's docs use (``postgres``, ``redis``, ...), so a
``--strict-markers`` run collects them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import itertools
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn

import pytest

from fleetmem.testing.proxy import TcpProxy
from fleetmem.testing.servers import (
    PostgresServer,
    RedisCluster,
    RedisServer,
    ServerNotFoundError,
    new_postgres_server,
    new_redis_server,
    start_local_redis_cluster,
)

try:
    import pytest_asyncio

    _HAVE_PYTEST_ASYNCIO = True
except ImportError:  # pragma: no cover - the proxy fixture then explains what to install
    _HAVE_PYTEST_ASYNCIO = False

_counter = itertools.count()

REQUIRE_OPTION = "--fleetmem-require-servers"
REQUIRE_ENV = "FLEETMEM_REQUIRE_SERVERS"


#: The markers fleetmem's tests and docs use: labels for ``-m``. A test that needs a server
#: skips (or fails) through its fixture, never through a marker.
MARKERS: dict[str, str] = {
    "memory": "runs against the in-memory backend",
    "sqlite": "runs against the SQLite backend",
    "postgres": "needs a real PostgreSQL server",
    "redis": "needs a real Redis server",
    "hybrid": "needs real PostgreSQL and Redis servers",
    "cluster": "needs a Redis Cluster started by the harness",
    "slow": "long-running (soak, fault) tests",
    "docker": "needs a Docker engine (the container providers of the harness)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fleetmem", "fleetmem test servers")
    group.addoption(
        REQUIRE_OPTION,
        action="store_true",
        default=False,
        help=(
            "fail (instead of skip) the tests that need a PostgreSQL or Redis server when none "
            f"can be had (same as {REQUIRE_ENV}=1)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def _servers_required(config: pytest.Config) -> bool:
    if config.getoption(REQUIRE_OPTION, default=False):
        return True
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(config: pytest.Config, message: str) -> NoReturn:
    if _servers_required(config):
        pytest.fail(f"{message} ({REQUIRE_OPTION} / {REQUIRE_ENV}=1 is set)", pytrace=False)
    pytest.skip(message)


def _worker_id() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return re.sub(r"[^a-z0-9]", "", worker.lower()) or "main"


def _bin_dirs(variable: str) -> list[str] | None:
    value = os.environ.get(variable)
    return [value] if value else None


@pytest.fixture
def fleetmem_namespace() -> str:
    """A namespace no other test (in this run or a parallel xdist worker) uses."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"t{next(_counter)}-{worker}-{secrets.token_hex(4)}"


# -- servers ------------------------------------------------------------------------------------


def _new_postgres(config: pytest.Config, **options: Any) -> PostgresServer:
    try:
        return new_postgres_server(
            search_dirs=_bin_dirs("FLEETMEM_TEST_POSTGRES_BIN_DIR"), **options
        )
    except ServerNotFoundError as exc:
        _unavailable(config, f"no PostgreSQL server for the tests: {exc}")


def _new_redis(config: pytest.Config, **options: Any) -> RedisServer:
    try:
        return new_redis_server(search_dirs=_bin_dirs("FLEETMEM_TEST_REDIS_BIN_DIR"), **options)
    except ServerNotFoundError as exc:
        _unavailable(config, f"no Redis server for the tests: {exc}")


@pytest.fixture(scope="session")
def fleetmem_postgres_server(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """The session's shared PostgreSQL server (owned unless given by FLEETMEM_TEST_POSTGRES_URL).

    Tests share it: never kill or pause it; use ``fleetmem_postgres_factory`` for that.
    """
    url = os.environ.get("FLEETMEM_TEST_POSTGRES_URL")
    server = PostgresServer.from_url(url) if url else _new_postgres(pytestconfig)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fleetmem_redis_server(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """The session's shared Redis server (owned unless given by FLEETMEM_TEST_REDIS_URL)."""
    url = os.environ.get("FLEETMEM_TEST_REDIS_URL")
    server = RedisServer.from_url(url) if url else _new_redis(pytestconfig)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fleetmem_postgres_factory(
    pytestconfig: pytest.Config,
) -> Iterator[Callable[..., PostgresServer]]:
    """``factory(durable=False)`` starts a new dedicated, owned PostgreSQL server per call.

    ``durable=True`` keeps ``fsync`` on. Every server is stopped and removed at session end.
    """
    started: list[PostgresServer] = []

    def factory(*, durable: bool = False) -> PostgresServer:
        server = _new_postgres(pytestconfig, durable=durable)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def fleetmem_redis_factory(pytestconfig: pytest.Config) -> Iterator[Callable[..., RedisServer]]:
    """``factory(appendonly=False, appendfsync="always", extra_args=())``: a new owned Redis.

    With ``appendonly=True`` a killed server started again has its data back.
    """
    started: list[RedisServer] = []

    def factory(
        *, appendonly: bool = False, appendfsync: str = "always", extra_args: Sequence[str] = ()
    ) -> RedisServer:
        server = _new_redis(
            pytestconfig, appendonly=appendonly, appendfsync=appendfsync, extra_args=extra_args
        )
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def fleetmem_redis_cluster(pytestconfig: pytest.Config) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster on free ports, started from the local ``redis-server``."""
    try:
        cluster = start_local_redis_cluster(search_dirs=_bin_dirs("FLEETMEM_TEST_REDIS_BIN_DIR"))
    except ServerNotFoundError as exc:
        _unavailable(pytestconfig, f"no Redis Cluster for the tests: {exc}")
    try:
        yield cluster
    finally:
        cluster.close()


# -- PostgreSQL databases -----------------------------------------------------------------------


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _run_sql(config: pytest.Config, dsn: str, *statements: str) -> None:
    """Run statements on their own connection, outside any event loop the test may own."""
    try:
        import asyncpg
    except ImportError:
        _unavailable(config, "asyncpg is not installed: pip install 'fleetmem[postgres]'")

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


def _database_name(kind: str) -> str:
    # At most 63 bytes, unique across xdist workers and concurrent runs.
    return f"fleetmem_{kind}_{_worker_id()}_{next(_counter)}_{secrets.token_hex(4)}"[:63]


def _migrate(dsn: str) -> None:
    try:
        module = importlib.import_module("fleetmem.backends.postgres.migrate")
    except ModuleNotFoundError as exc:
        if exc.name in ("fleetmem.backends.postgres", "fleetmem.backends.postgres.migrate"):
            return  # no schema to install yet: the template stays empty
        raise
    module.upgrade(dsn)


@pytest.fixture(scope="session")
def fleetmem_postgres_template(
    pytestconfig: pytest.Config, fleetmem_postgres_server: PostgresServer
) -> Iterator[str]:
    """The name of a session template database holding fleetmem's migrated schema."""
    server = fleetmem_postgres_server
    name = _database_name("tpl")
    _run_sql(pytestconfig, server.dsn, f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0")
    try:
        _migrate(server.dsn_for(name))
        # No connection may stay open on a template while it is copied.
        _run_sql(
            pytestconfig,
            server.dsn,
            f"ALTER DATABASE {_quote_ident(name)} WITH ALLOW_CONNECTIONS false",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
        yield name
    finally:
        _run_sql(
            pytestconfig, server.dsn, f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)"
        )


def _database_from(
    config: pytest.Config, server: PostgresServer, template: str, kind: str
) -> Iterator[str]:
    name = _database_name(kind)
    _run_sql(
        config,
        server.dsn,
        f"CREATE DATABASE {_quote_ident(name)} TEMPLATE {_quote_ident(template)}",
    )
    try:
        yield server.dsn_for(name)
    finally:
        _run_sql(config, server.dsn, f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


@pytest.fixture
def fleetmem_postgres_database(
    pytestconfig: pytest.Config,
    fleetmem_postgres_server: PostgresServer,
    fleetmem_postgres_template: str,
) -> Iterator[str]:
    """The DSN of a fresh database with fleetmem's schema, copied from the session template and
    dropped after the test."""
    yield from _database_from(
        pytestconfig, fleetmem_postgres_server, fleetmem_postgres_template, "db"
    )


@pytest.fixture
def fleetmem_postgres_empty_database(
    pytestconfig: pytest.Config, fleetmem_postgres_server: PostgresServer
) -> Iterator[str]:
    """The DSN of a fresh, empty database (from ``template0``), dropped after the test."""
    yield from _database_from(pytestconfig, fleetmem_postgres_server, "template0", "empty")


# -- fault proxy --------------------------------------------------------------------------------

ProxyFactory = Callable[[str, int], Awaitable[TcpProxy]]

if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture(name="fleetmem_proxy")
    async def _fleetmem_proxy() -> AsyncIterator[ProxyFactory]:
        """``proxy = await fleetmem_proxy(host, port)``: a running :class:`TcpProxy` to the
        server; every proxy is closed at the end of the test."""
        proxies: list[TcpProxy] = []

        async def factory(host: str, port: int) -> TcpProxy:
            proxy = await TcpProxy(host, port).start()
            proxies.append(proxy)
            return proxy

        try:
            yield factory
        finally:
            for proxy in proxies:
                await proxy.close()

else:  # pragma: no cover

    @pytest.fixture(name="fleetmem_proxy")
    def _fleetmem_proxy_unavailable() -> NoReturn:
        pytest.skip("fleetmem_proxy needs pytest-asyncio: pip install 'fleetmem[test]'")
