"""The fleetmem pytest plugin (entry point ``pytest11``): fixtures for stores and servers.

Servers come from, in this order: ``FLEETMEM_TEST_POSTGRES_URL`` / ``FLEETMEM_TEST_REDIS_URL``;
a throwaway container when a Docker engine answers (``FLEETMEM_TEST_DOCKER=0`` turns that off);
the local server binaries (``FLEETMEM_TEST_POSTGRES_BIN_DIR`` / ``FLEETMEM_TEST_REDIS_BIN_DIR``
pin their directory). With none of them the tests that need a server skip, or fail when
``--fleetmem-require-servers`` or ``FLEETMEM_REQUIRE_SERVERS=1`` is given. See docs/testing.md.

The plugin also registers the markers fleetmem's docs use (``postgres``, ``redis``, ...), so a
``--strict-markers`` run collects them, and explains a failing test whose async fixture or
async test pytest-asyncio did not run (its strict mode, the default, needs
``@pytest_asyncio.fixture`` and ``@pytest.mark.asyncio``). It never changes ``asyncio_mode``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from typing import Any, NoReturn

import pytest

from fleetmem.testing import delete_snapshots
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

# The conformance suite's asserts are rewritten as a test module's are, so that a failing
# check says what it saw; registered here, before anything imports the package.
pytest.register_assert_rewrite("fleetmem.testing.conformance")

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


_LOOP_SCOPE_INI = "asyncio_default_fixture_loop_scope"


def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> None:
    """Give pytest-asyncio's ``asyncio_default_fixture_loop_scope`` an explicit default.

    Left unset, pytest-asyncio warns (a ``PytestDeprecationWarning``) in every project without
    that option, which is any new project. When it accepts ``"fixture-scope"`` (what it does
    when the option is unset), that value becomes the option's default: the behaviour stays
    exactly the same, the warning goes. A value set in the project's configuration or with
    ``-o`` still wins. This hook runs once every installed plugin has registered its options.
    """
    if not _HAVE_PYTEST_ASYNCIO:  # pragma: no cover - nothing to configure
        return
    asyncio_plugin = pytest_asyncio.plugin
    if not early_config.pluginmanager.is_registered(asyncio_plugin):
        return  # turned off (-p no:asyncio) or not loaded yet: its option is not ours to add
    match_fixture_scope = getattr(asyncio_plugin, "_MATCH_FIXTURE_SCOPE", None)
    if match_fixture_scope != "fixture-scope":
        return  # an older pytest-asyncio: every explicit value would change its behaviour
    parser.addini(
        _LOOP_SCOPE_INI,
        type="string",
        default=match_fixture_scope,
        help=(
            "default scope of the asyncio event loop used to execute async fixtures "
            "(fleetmem's plugin: 'fixture-scope', pytest-asyncio's behaviour when unset)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


# -- async tests that pytest-asyncio does not run ---------------------------------------------

_ASYNC_HINTS = pytest.StashKey[dict[str, str]]()
_HINTED_FAILURES = pytest.StashKey[list[str]]()
_OTHER_ASYNC_MARKERS = ("anyio", "trio")


def _asyncio_mode(config: pytest.Config) -> str | None:
    """pytest-asyncio's mode (``"strict"`` / ``"auto"``), None when it is not loaded."""
    if not _HAVE_PYTEST_ASYNCIO or not config.pluginmanager.is_registered(pytest_asyncio.plugin):
        return None
    option = config.getoption("asyncio_mode", default=None)
    return str(option or config.getini("asyncio_mode"))


def _is_async(func: object) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


def _is_asyncio_fixture(func: object) -> bool:
    # pytest_asyncio.fixture tags the function it decorates (since pytest-asyncio 0.17).
    func = getattr(func, "__func__", func)
    return bool(getattr(func, "_force_asyncio_fixture", False))


def _unhandled_async(item: pytest.Item, mode: str | None) -> str | None:
    """What of ``item`` no installed plugin will run, when it uses fleetmem's fixtures."""
    if mode == "auto" or not isinstance(item, pytest.Function):
        return None
    if not any(name.startswith("fleetmem_") for name in item.fixturenames):
        return None
    if any(item.get_closest_marker(name) for name in _OTHER_ASYNC_MARKERS):
        return None  # another async framework runs it
    if mode is None:
        needs = "pytest-asyncio is not installed (pip install 'fleetmem[test]')"
    else:
        needs = f"pytest-asyncio runs in {mode!r} mode"
    problems: list[str] = []
    if _is_async(item.obj) and item.get_closest_marker("asyncio") is None:
        problems.append(f"the test {item.name!r} is an async def without @pytest.mark.asyncio")
    info = getattr(item, "_fixtureinfo", None)
    definitions = getattr(info, "name2fixturedefs", {})
    for name in item.fixturenames:
        defs = definitions.get(name)
        if defs and _is_async(defs[-1].func) and not _is_asyncio_fixture(defs[-1].func):
            problems.append(f"the async fixture {name!r} is a plain @pytest.fixture")
    if not problems:
        return None
    return (
        f"{'; '.join(problems)}, and {needs}. Decorate async fixtures with "
        "@pytest_asyncio.fixture and mark async tests with @pytest.mark.asyncio (the classes "
        "of fleetmem.testing.conformance are marked already), or set asyncio_mode = auto in "
        "the pytest configuration. See fleetmem's docs/testing.md."
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    mode = _asyncio_mode(config)
    hints: dict[str, str] = {}
    for item in items:
        hint = _unhandled_async(item, mode)
        if hint is not None:
            hints[item.nodeid] = hint
    config.stash[_ASYNC_HINTS] = hints
    config.stash[_HINTED_FAILURES] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    hint = item.config.stash.get(_ASYNC_HINTS, {}).get(item.nodeid)
    if hint is not None and report.failed:
        report.sections.append(("fleetmem: async test not run by pytest-asyncio", hint))
        item.config.stash.get(_HINTED_FAILURES, []).append(item.nodeid)
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    failed = terminalreporter.config.stash.get(_HINTED_FAILURES, [])
    if not failed:
        return
    hint = terminalreporter.config.stash[_ASYNC_HINTS][failed[0]]
    terminalreporter.write_sep("=", "fleetmem", yellow=True)
    terminalreporter.write_line(
        f"{len(failed)} failed test(s) using fleetmem's fixtures had async code that no "
        f"plugin ran; the first, {failed[0]}: {hint}"
    )


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


POSTGRES_URL_ENV = "FLEETMEM_TEST_POSTGRES_URL"
REDIS_URL_ENV = "FLEETMEM_TEST_REDIS_URL"


class GivenServersCleaner:
    """Clears namespaces on the servers given by URL, as each store a test could have opened.

    Redis: a ``RedisStore`` on ``redis_url``. PostgreSQL: a ``PostgresStore`` on
    ``postgres_url`` (default schema and table) once fleetmem's table exists there; it is never
    created. Both: a ``HybridStore`` on the two instead of the ``PostgresStore`` (its clear
    empties the durable rows and the cache; the rest of its state is its own business), and
    the ``RedisStore``. A driver that is not installed means that no such store could have
    written: it is left out.

    The stores stay open for the session on an event loop thread of their own (a test's loop
    comes and goes), and each clear goes through a ``with_namespace`` view of them.
    """

    def __init__(self, postgres_url: str | None, redis_url: str | None) -> None:
        self._postgres_url = postgres_url if importlib.util.find_spec("asyncpg") else None
        self._redis_url = redis_url if importlib.util.find_spec("redis") else None
        self._stores: list[Any] = []
        self._redis_opened = False
        self._postgres_opened = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fleetmem-namespace-cleaner", daemon=True
        )
        self._thread.start()

    def clear(self, namespace: str) -> None:
        """Empty ``namespace`` on every given server; returns when it is done."""
        asyncio.run_coroutine_threadsafe(self._clear(namespace), self._loop).result()

    def close(self) -> None:
        """Close the stores and the loop thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _clear(self, namespace: str) -> None:
        await self._open(namespace)
        for store in self._stores:
            view = store.with_namespace(namespace)
            try:
                await view.clear()
                await delete_snapshots(view)
            finally:
                await view.close()

    async def _open(self, namespace: str) -> None:
        # Opened in the first namespace to clear: a store may keep state for the namespace
        # it was made for, and that one is cleared.
        if (
            self._postgres_url
            and not self._postgres_opened
            and await _has_fleetmem_table(self._postgres_url)
        ):
            options = {"auto_migrate": False, "min_size": 1, "max_size": 2}
            if self._redis_url:
                from fleetmem.backends.hybrid import HybridStore

                store: Any = HybridStore.from_urls(
                    self._postgres_url,
                    self._redis_url,
                    namespace=namespace,
                    postgres_options=options,
                )
            else:
                from fleetmem.backends.postgres import PostgresStore

                store = PostgresStore.from_url(self._postgres_url, namespace=namespace, **options)
            self._stores.append(await store.connect())
            self._postgres_opened = True
        if self._redis_url and not self._redis_opened:
            from fleetmem.backends.redis import RedisStore

            redis_store = RedisStore.from_url(self._redis_url, namespace=namespace)
            self._stores.append(await redis_store.connect())
            self._redis_opened = True

    async def _close(self) -> None:
        for store in self._stores:
            await store.close()


async def _has_fleetmem_table(dsn: str) -> bool:
    import asyncpg

    from fleetmem.backends.postgres import migrate

    schema, table = migrate.DEFAULT_SCHEMA, migrate.DEFAULT_TABLE
    qualified = f"{migrate.quote_ident(schema)}.{migrate.quote_ident(table)}"
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified) is True
    finally:
        await conn.close()


@pytest.fixture(scope="session", name="_fleetmem_given_servers")
def _given_servers_cleaner() -> Iterator[GivenServersCleaner | None]:
    """The session's :class:`GivenServersCleaner` for the servers given by
    ``FLEETMEM_TEST_POSTGRES_URL`` / ``FLEETMEM_TEST_REDIS_URL``; None without them."""
    postgres_url = os.environ.get(POSTGRES_URL_ENV) or None
    redis_url = os.environ.get(REDIS_URL_ENV) or None
    if postgres_url is None and redis_url is None:
        yield None
        return
    cleaner = GivenServersCleaner(postgres_url, redis_url)
    try:
        yield cleaner
    finally:
        cleaner.close()


@pytest.fixture
def fleetmem_namespace(_fleetmem_given_servers: GivenServersCleaner | None) -> Iterator[str]:
    """A namespace no other test (in this run or a parallel xdist worker) uses.

    On the servers given by ``FLEETMEM_TEST_POSTGRES_URL`` / ``FLEETMEM_TEST_REDIS_URL`` (never
    flushed: they are not the harness's) the namespace is cleared after the test, whichever
    store wrote it (see :class:`GivenServersCleaner`). Without those variables the teardown
    does nothing.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    namespace = f"t{next(_counter)}-{worker}-{secrets.token_hex(4)}"
    yield namespace
    if _fleetmem_given_servers is not None:
        _fleetmem_given_servers.clear(namespace)


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
