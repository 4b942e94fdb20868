"""Provider choice, skip-or-fail, missing binaries and URL-given servers (no server needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetmem.testing.servers import (
    NotOwnedError,
    PostgresServer,
    RedisServer,
    ServerNotFoundError,
    docker_available,
    find_free_port,
    find_postgres_bindir,
    find_redis_binary,
    start_local_postgres,
    start_local_redis,
    start_local_redis_cluster,
)

QUIET = ("-p", "no:cacheprovider", "-rA")
INNER_TESTS = """
def test_postgres(fleetmem_postgres_server):
    pass

def test_redis(fleetmem_redis_server):
    pass

def test_cluster(fleetmem_redis_cluster):
    pass
"""


@pytest.fixture(scope="module")
def inner_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """pytest run three ways (in parallel) in a scratch project where no server can be found."""
    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "plain": ([], {}),
        "env": ([], {"FLEETMEM_REQUIRE_SERVERS": "1"}),
        "option": (["--fleetmem-require-servers"], {}),
    }
    running: dict[str, subprocess.Popen[str]] = {}
    for name, (args, extra_env) in variants.items():
        project = tmp_path_factory.mktemp(f"inner-{name}")
        empty = project / "no-binaries"
        empty.mkdir()
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "test_inner.py").write_text(INNER_TESTS)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("FLEETMEM_", "PYTEST_"))
        }
        env.update(
            FLEETMEM_TEST_DOCKER="0",
            FLEETMEM_TEST_POSTGRES_BIN_DIR=str(empty),
            FLEETMEM_TEST_REDIS_BIN_DIR=str(empty),
            # Only this plugin: other installed plugins would just slow the runs down.
            PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
            **extra_env,
        )
        running[name] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "fleetmem.testing.plugin", *QUIET, *args],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results: dict[str, tuple[int, str]] = {}
    for name, proc in running.items():
        out, _ = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out)
    return results


def test_without_servers_the_tests_skip_and_say_how_to_get_one(
    inner_runs: dict[str, tuple[int, str]],
) -> None:
    code, out = inner_runs["plain"]
    assert code == 0, out
    assert "3 skipped" in out
    assert "FLEETMEM_TEST_POSTGRES_URL" in out
    assert "FLEETMEM_TEST_REDIS_URL" in out


def test_require_servers_env_turns_skips_into_errors(
    inner_runs: dict[str, tuple[int, str]],
) -> None:
    code, out = inner_runs["env"]
    assert code == 1, out
    assert "3 errors" in out
    assert "FLEETMEM_REQUIRE_SERVERS=1" in out


def test_require_servers_option_turns_skips_into_errors(
    inner_runs: dict[str, tuple[int, str]],
) -> None:
    code, out = inner_runs["option"]
    assert code == 1, out
    assert "3 errors" in out
    assert "no PostgreSQL server for the tests" in out


def test_missing_postgres_binaries_give_a_helpful_error(tmp_path: Path) -> None:
    with pytest.raises(ServerNotFoundError) as caught:
        start_local_postgres(search_dirs=[tmp_path])
    message = str(caught.value)
    assert "initdb" in message
    assert str(tmp_path) in message
    assert "FLEETMEM_TEST_POSTGRES_URL" in message
    assert "apt-get install postgresql" in message
    with pytest.raises(ServerNotFoundError):
        find_postgres_bindir([])


def test_missing_redis_binaries_give_a_helpful_error(tmp_path: Path) -> None:
    for start in (start_local_redis, start_local_redis_cluster):
        with pytest.raises(ServerNotFoundError) as caught:
            start(search_dirs=[tmp_path])
        message = str(caught.value)
        assert "redis-server" in message
        assert "FLEETMEM_TEST_REDIS_URL" in message


def test_a_redis_cli_alone_is_not_a_server(tmp_path: Path) -> None:
    cli = tmp_path / "redis-cli"
    cli.write_text("#!/bin/sh\n")
    cli.chmod(0o755)
    assert find_redis_binary("redis-cli", [tmp_path]) == cli
    with pytest.raises(ServerNotFoundError):
        find_redis_binary("redis-server", [tmp_path])


def test_postgres_server_from_url_refuses_fault_handles() -> None:
    server = PostgresServer.from_url(
        "postgresql://app:s3cret@db.example:5433/fleet?sslmode=disable"
    )
    assert not server.owned
    assert (server.host, server.port, server.user, server.database) == (
        "db.example",
        5433,
        "app",
        "fleet",
    )
    assert server.dsn == "postgresql://app:s3cret@db.example:5433/fleet?sslmode=disable"
    assert (
        server.dsn_for("other") == "postgresql://app:s3cret@db.example:5433/other?sslmode=disable"
    )
    assert "s3cret" not in repr(server)
    for handle in (server.kill, server.stop, server.start, server.restart, server.pause):
        with pytest.raises(NotOwnedError, match="not started by the test harness"):
            handle()
    with pytest.raises(NotOwnedError):
        server.resume()
    server.close()  # a no-op: it is not ours to stop


def test_redis_server_from_url_refuses_fault_handles() -> None:
    server = RedisServer.from_url("redis://:pw@cache.example:6380/2")
    assert not server.owned
    assert (server.host, server.port, server.db) == ("cache.example", 6380, 2)
    assert server.url == "redis://:pw@cache.example:6380/2"
    assert "pw" not in repr(server).replace("redis", "")
    for handle in (server.kill, server.stop, server.start, server.restart, server.pause):
        with pytest.raises(NotOwnedError, match="not started by the test harness"):
            handle()
    with pytest.raises(NotOwnedError):
        server.resume()
    server.close()


def test_free_ports_leave_room_for_the_cluster_bus() -> None:
    import socket

    port = find_free_port(cluster_bus=True)
    assert port + 10000 <= 65535
    for candidate in (port, port + 10000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", candidate))


def test_docker_detection_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETMEM_TEST_DOCKER", "0")
    assert docker_available() is False
