"""The ``fleetmem`` command on real PostgreSQL and Redis servers (and the hybrid of both).

Every command runs in-process through ``main``; the unreachable servers are ports nothing
listens on.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from fleetmem._urls import redact_url as redact
from fleetmem.cli import main

BACKENDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("hybrid", marks=pytest.mark.hybrid),
]


def _hybrid_url(dsn: str, redis_url: str) -> str:
    return f"hybrid+{dsn}{'&' if '?' in dsn else '?'}cache={redis_url}"


@pytest.fixture(params=BACKENDS)
def server_url(request: pytest.FixtureRequest) -> str:
    """The URL of a real store of each server backend."""
    if request.param == "redis":
        return str(request.getfixturevalue("fleetmem_redis_server").url)
    dsn = str(request.getfixturevalue("fleetmem_postgres_database"))
    if request.param == "postgres":
        return dsn
    return _hybrid_url(dsn, str(request.getfixturevalue("fleetmem_redis_server").url))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port nothing listens on (bound, never listening, for the test's duration)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
@pytest.mark.parametrize("fmt", ["--json", "--table"])
def test_health_of_an_unreachable_server_is_a_report(
    backend: str, fmt: str, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not an exception line and exit 2: the report (ok no, the reason), exit 1."""
    url = (
        f"redis://:sekret@127.0.0.1:{closed_port}/0"
        if backend == "redis"
        else f"postgresql://fleet:sekret@127.0.0.1:{closed_port}/fleet"
    )
    code, out, err = run(capsys, "--url", url, "health", fmt)
    assert code == 1
    assert err == ""
    assert "sekret" not in out
    if fmt == "--json":
        data = json.loads(out)
        assert data["ok"] is False
        assert data["backend"] == backend
        assert "BackendUnavailableError" in data["details"]["error"]
        assert f"127.0.0.1:{closed_port}" in data["store"]
    else:
        assert out.splitlines()[0].split() == ["ok", "no"]
        assert "BackendUnavailableError" in out


def test_health_on_a_server(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", server_url, "health", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["ok"] is True
    assert data["backend"] == server_url.partition("+")[0].partition(":")[0].replace(
        "postgresql", "postgres"
    )


def test_every_store_command_on_a_server(
    server_url: str, fleetmem_namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = ["--url", server_url, "-n", fleetmem_namespace]
    code, out, _ = run(capsys, *ns, "set", "cfg", '{"rate": 1}', "--if-version", "0")
    assert (code, json.loads(out)["version"]) == (0, 1)
    code, out, err = run(capsys, *ns, "set", "cfg", '{"rate": 2}', "--if-version", "3")
    assert code == 1
    assert json.loads(out)["current_version"] == 1
    assert "current version is 1" in err
    code, out, _ = run(capsys, "incr", "done", "--by", "5", "--partition", "counters", *ns)
    assert (code, json.loads(out)["value"]) == (0, 5)
    assert run(capsys, *ns, "expire", "done", "60")[0] == 0
    code, out, _ = run(capsys, *ns, "ttl", "done")
    assert 0 < json.loads(out)["ttl"] <= 60
    assert run(capsys, *ns, "persist", "done")[0] == 0
    code, out, _ = run(capsys, *ns, "ttl", "done")
    assert json.loads(out)["ttl"] is None
    assert run(capsys, *ns, "ttl", "missing")[0] == 1
    assert run(capsys, *ns, "expire", "missing", "5")[0] == 1
    assert run(capsys, *ns, "persist", "missing")[0] == 1
    code, out, _ = run(capsys, *ns, "partitions")
    assert json.loads(out) == ["counters", "default"]
    code, out, _ = run(capsys, *ns, "namespaces", fleetmem_namespace)
    assert json.loads(out) == [fleetmem_namespace]
    code, out, _ = run(capsys, *ns, "stats", "--json")
    stats = json.loads(out)
    assert stats["keys"] == 2
    assert stats["store"] == redact(server_url)
    assert run(capsys, *ns, "clear")[0] == 2  # no --yes: nothing deleted
    code, out, _ = run(capsys, *ns, "clear", "--partition", "counters", "--yes")
    assert json.loads(out)["deleted"] == 1
    code, out, _ = run(capsys, *ns, "clear", "--yes")
    assert json.loads(out)["deleted"] == 1
    code, out, _ = run(capsys, *ns, "namespaces", fleetmem_namespace)
    assert json.loads(out) == []


@pytest.mark.redis
def test_demo_on_redis_hints_at_its_url_and_namespace(
    fleetmem_redis_server: object, fleetmem_namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(fleetmem_redis_server.url)  # type: ignore[attr-defined]
    code, out, _ = run(
        capsys, "demo", "--url", url, "-n", fleetmem_namespace, "--agents", "3", "--items", "8"
    )
    assert code == 0, out
    assert "consistent     yes" in out
    commands = [line[line.index("fleetmem ") :] for line in out.splitlines() if "--url" in line]
    assert commands == [
        f"fleetmem --url {url} -n {fleetmem_namespace} keys results/ --limit 5",
        f"fleetmem --url {url} -n {fleetmem_namespace} queues",
        f"fleetmem --url {url} -n {fleetmem_namespace} stats",
    ]
    code, out, _ = run(capsys, *commands[1].split()[1:], "--json")
    assert code == 0
    (queue,) = json.loads(out)
    assert (queue["done"], queue["ready"], queue["dead"]) == (8, 0, 0)
    code, out, _ = run(capsys, *commands[2].split()[1:], "--json")
    assert code == 0
    assert json.loads(out)["keys"] >= 8
    assert run(capsys, "--url", url, "-n", fleetmem_namespace, "clear", "--yes")[0] == 0


@pytest.mark.postgres
def test_demo_on_postgres_in_two_processes(
    fleetmem_postgres_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "--url",
        fleetmem_postgres_database,
        "--json",
        "demo",
        "--processes",
        "2",
        "--agents",
        "4",
        "--items",
        "8",
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["consistent"] is True
    assert report["processes"] == 2
    # Two processes worked one queue: every job acked once, none dead, none left.
    assert (report["jobs_done"], report["jobs_dead"], report["jobs_left"]) == (8, 0, 0)
    assert report["inspect"][1].endswith("-n demo queues")
    assert report["inspect"][2].endswith("-n demo stats")
