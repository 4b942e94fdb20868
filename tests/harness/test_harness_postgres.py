"""The PostgreSQL providers: shared server, dedicated servers and their fault handles."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import secrets
from collections.abc import Callable, Iterator

import asyncpg
import pytest
from harness_clients import pg_execute, pg_fetchval

from fleetmem.testing.servers import HarnessError, PostgresServer

pytestmark = pytest.mark.postgres

# Errors a client sees when the server is gone (refused, reset, or the backend terminated).
GONE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@pytest.fixture(scope="module")
def pg_fault_server(fleetmem_postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """One dedicated server for this module's fault tests (never the shared one)."""
    return fleetmem_postgres_factory()


@pytest.fixture
def pg_victim(pg_fault_server: PostgresServer) -> Iterator[PostgresServer]:
    """The dedicated server, running again after each test whatever the test did to it."""
    yield pg_fault_server
    pg_fault_server.resume()
    pg_fault_server.start()


async def _write_token(dsn: str) -> str:
    token = secrets.token_hex(8)
    await pg_execute(dsn, "CREATE TABLE IF NOT EXISTS harness_kept (token text)")
    await pg_execute(dsn, "INSERT INTO harness_kept VALUES ($1)", token)
    return token


async def _has_token(dsn: str, token: str) -> bool:
    found = await pg_fetchval(dsn, "SELECT count(*) FROM harness_kept WHERE token = $1", token)
    return bool(found == 1)


async def test_shared_server_accepts_connections(
    fleetmem_postgres_server: PostgresServer,
) -> None:
    server = fleetmem_postgres_server
    assert await pg_fetchval(server.dsn, "SELECT current_database()") == server.database
    assert await pg_fetchval(server.dsn, "SELECT current_user") == server.user
    if server.owned:
        assert server.port not in (5432, 5433)
        assert server.dsn == (
            f"postgresql://{server.user}@{server.host}:{server.port}/{server.database}"
        )


async def test_factory_servers_are_new_and_owned(
    fleetmem_postgres_server: PostgresServer, pg_fault_server: PostgresServer
) -> None:
    assert pg_fault_server.owned
    assert pg_fault_server.port != fleetmem_postgres_server.port
    assert await pg_fetchval(pg_fault_server.dsn, "SELECT 1") == 1


async def test_kill_then_start_keeps_committed_rows(pg_victim: PostgresServer) -> None:
    token = await _write_token(pg_victim.dsn)
    conn = await asyncpg.connect(pg_victim.dsn, timeout=10)
    try:
        pg_victim.kill()
        with pytest.raises(GONE):
            await conn.fetchval("SELECT 1", timeout=10)
    finally:
        conn.terminate()
    with pytest.raises(OSError):
        await asyncpg.connect(pg_victim.dsn, timeout=5)
    pg_victim.start()
    assert await _has_token(pg_victim.dsn, token)


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
async def test_stop_then_start(pg_victim: PostgresServer, mode: str) -> None:
    token = await _write_token(pg_victim.dsn)
    pg_victim.stop(mode)
    with pytest.raises(OSError):
        await asyncpg.connect(pg_victim.dsn, timeout=5)
    pg_victim.start()
    assert await _has_token(pg_victim.dsn, token)


async def test_restart_keeps_port_and_data(pg_victim: PostgresServer) -> None:
    port = pg_victim.port
    token = await _write_token(pg_victim.dsn)
    pg_victim.restart()
    assert pg_victim.port == port
    assert await _has_token(pg_victim.dsn, token)


async def test_pause_hangs_clients_until_resume(pg_victim: PostgresServer) -> None:
    conn = await asyncpg.connect(pg_victim.dsn, timeout=10)
    try:
        pg_victim.pause()
        with pytest.raises(asyncio.TimeoutError):
            await asyncpg.connect(pg_victim.dsn, timeout=0.5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=0.5)
    finally:
        conn.terminate()
        pg_victim.resume()
    assert await pg_fetchval(pg_victim.dsn, "SELECT 1") == 1


def test_unknown_stop_mode_is_refused(pg_victim: PostgresServer) -> None:
    with pytest.raises(HarnessError, match="unknown stop mode"):
        pg_victim.stop("gentle")


# -- databases ----------------------------------------------------------------------------------


def _database_exists(server: PostgresServer, name: str) -> bool:
    async def query() -> bool:
        found = await pg_fetchval(
            server.dsn, "SELECT count(*) FROM pg_database WHERE datname = $1", name
        )
        return bool(found == 1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, query()).result()


@pytest.fixture
def dropped_after(fleetmem_postgres_server: PostgresServer) -> Iterator[list[str]]:
    """Set up before the database fixtures, so torn down after them: checks they dropped."""
    names: list[str] = []
    yield names
    assert names
    for name in names:
        assert not _database_exists(fleetmem_postgres_server, name), f"{name} was not dropped"


async def test_database_fixtures_give_fresh_databases(
    dropped_after: list[str],
    fleetmem_postgres_server: PostgresServer,
    fleetmem_postgres_database: str,
    fleetmem_postgres_empty_database: str,
) -> None:
    migrated = await pg_fetchval(fleetmem_postgres_database, "SELECT current_database()")
    empty = await pg_fetchval(fleetmem_postgres_empty_database, "SELECT current_database()")
    assert migrated != empty
    assert fleetmem_postgres_server.database not in (migrated, empty)
    assert fleetmem_postgres_database.endswith("/" + migrated)
    tables = (
        "SELECT count(*) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
    )
    assert await pg_fetchval(fleetmem_postgres_empty_database, tables) == 0
    if importlib.util.find_spec("fleetmem.backends.postgres.migrate") is not None:
        # The template was migrated: every copy has the schema already.
        assert await pg_fetchval(fleetmem_postgres_database, tables) > 0
    # Each database is the test's own: writes succeed and stay there.
    await pg_execute(fleetmem_postgres_empty_database, "CREATE TABLE mine (x int)")
    assert await pg_fetchval(fleetmem_postgres_database, "SELECT to_regclass('mine')") is None
    dropped_after.extend([migrated, empty])


async def test_each_test_gets_its_own_database(
    fleetmem_postgres_empty_database: str,
) -> None:
    # A table created by the previous test's empty database does not exist here.
    assert await pg_fetchval(fleetmem_postgres_empty_database, "SELECT to_regclass('mine')") is None
