"""The fleetmem command line, run in-process on memory and SQLite stores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetmem import cli
from fleetmem.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_set_get_keys_search_ttl_del_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    code, out, _ = run(capsys, "--url", url, "set", "agents/a1", '{"state": "idle"}', "--ttl", "60")
    assert code == 0
    assert json.loads(out)["version"] == 1
    code, out, _ = run(
        capsys, "--url", url, "set", "agents/a2", "plain text", "--raw", "--partition", "p2"
    )
    assert code == 0
    code, out, _ = run(capsys, "--url", url, "--json", "get", "agents/a1")
    assert code == 0
    assert json.loads(out)["value"] == {"state": "idle"}
    code, out, _ = run(capsys, "--url", url, "keys", "agents/")
    assert json.loads(out) == ["agents/a1", "agents/a2"]
    code, out, _ = run(capsys, "--url", url, "search", "agents/a?", "--partition", "p2")
    assert json.loads(out) == {"agents/a2": "plain text"}
    code, out, _ = run(capsys, "--url", url, "ttl", "agents/a1")
    assert 0 < json.loads(out)["ttl"] <= 60
    code, out, _ = run(capsys, "--url", url, "stats")
    stats = json.loads(out)
    assert stats["keys"] == 2
    assert stats["partitions"] == {"default": 1, "p2": 1}
    code, out, _ = run(capsys, "--url", url, "del", "agents/a1", "agents/zz")
    assert code == 0
    assert json.loads(out) == {"deleted": 1}
    code, _, err = run(capsys, "--url", url, "get", "agents/a1")
    assert code == 1
    assert "not found" in err


def test_table_output_and_namespaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert run(capsys, "--url", url, "-n", "other", "set", "k", "1")[0] == 0
    code, out, _ = run(capsys, "--url", url, "--table", "-n", "other", "get", "k")
    assert code == 0
    assert "version" in out and "partition" in out
    code, out, _ = run(capsys, "--url", url, "keys")
    assert json.loads(out) == []


def test_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--url", "memory://", "set", "k", "{not json")
    assert code == 2
    assert "not JSON" in err
    code, _, err = run(capsys, "--url", "nope://x", "stats")
    assert code == 2
    assert "ConfigurationError" in err


def test_health(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", "memory://", "health")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["backend"] == "memory"


def test_demo_on_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEETMEM_URL", raising=False)
    code, out, _ = run(capsys, "demo", "--agents", "8", "--items", "40", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["consistent"] is True
    assert report["results"] == 40
    assert report["store"].startswith("sqlite")
    assert (tmp_path / "fleetmem.db").exists()


def test_demo_readable_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", "memory://", "demo", "--agents", "5", "--items", "20")
    assert code == 0
    assert "items done     20 / 20" in out
    assert "consistent     yes" in out


#: The checkout's benchmarks (``bench/run.py`` and its ``suite`` package): not in the package.
CHECKOUT_BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_runs_the_checkouts_bench_run_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a checkout (an editable install) ``fleetmem bench`` runs ``bench/run.py``; here on a
    saved run (``--from-json``), which measures nothing and needs no server."""
    if Path(cli.__file__).resolve().parents[2] == CHECKOUT_BENCH.parent:  # editable install
        assert cli._bench_dir() == CHECKOUT_BENCH
    monkeypatch.setattr(cli, "_bench_dir", lambda: CHECKOUT_BENCH)
    monkeypatch.setattr(sys, "path", [*sys.path])  # the command puts bench/ on it
    saved = tmp_path / "run.json"
    rows = [
        {"workload": "redis get p50", "subject": "raw", "unit": "us", "values": [100.0, 110.0]},
        {"workload": "redis get p50", "subject": "fleetmem", "unit": "us", "values": [105.0]},
    ]
    saved.write_text(
        json.dumps(
            {
                "started": "2026-12-04T00:00:00+00:00",
                "machine": "test",
                "command": "fleetmem bench",
                "rows": rows,
                "notes": ["a note"],
            }
        )
    )
    code, out, _ = run(capsys, "bench", "--from-json", str(saved))
    assert code == 0
    assert out.startswith("fleetmem bench — 2026-12-04T00:00:00+00:00 — test")
    assert "redis get p50 vs raw: latency ≤ 1.10x raw" in out
    assert out.rstrip().endswith("note: a note")


def test_bench_outside_a_checkout_says_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no ``bench/`` next to the package: exit 2, saying why."""
    monkeypatch.setattr(cli, "_bench_dir", lambda: tmp_path / "bench")
    code, out, err = run(capsys, "bench", "--quick")
    assert code == 2
    assert out == ""
    assert "fleetmem bench runs from a source checkout" in err
    assert "python bench/run.py" in err


# ------------------------------------------------------------------------ exit statuses


@pytest.mark.parametrize(
    "argv",
    [
        ["get", "missing"],
        ["ttl", "missing"],
        ["del", "missing"],
        ["expire", "missing", "10"],
        ["persist", "missing"],
        ["holder", "missing"],
    ],
)
def test_a_missing_key_exits_1_in_every_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--url", "memory://", *argv)
    assert code == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["set", "k", "{not json"],
        ["get", ""],
        ["search", "[unclosed"],
        ["keys", "--limit", "-1"],
        ["incr", "k", "--by", "lots"],
        ["--url", "nope://x", "stats"],
        ["get"],  # argparse
        ["demo", "--processes", "2"],
        ["holder", ""],
        ["agents", "--limit", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    args = argv if argv[0] == "--url" else ["--url", "memory://", *argv]
    with_exit = pytest.raises(SystemExit) if argv == ["get"] else None
    if with_exit is not None:
        with with_exit as raised:
            main(args)
        assert raised.value.code == 2
        return
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert err.startswith("fleetmem: ")


def test_a_failing_backend_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--url", f"sqlite:///{tmp_path}/no/such/dir/x.db", "stats")
    assert code == 3
    assert "BackendUnavailableError" in err


def test_the_exit_statuses_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for status in ("0 ", "1 ", "2 ", "3 ", "141"):
        assert f"\n  {status}" in out
    assert "``" not in out  # plain text, not reStructuredText
    assert "hybrid+postgresql://" in out
    assert "current directory" in out.lower()


def test_demo_options_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    options = out[out.index("\noptions:") : out.index("\nglobal options")]
    for option in ("--agents", "--items", "--processes"):
        # The help text follows the option, on its line or the next one.
        after = options[options.index(f"  {option} ") :].splitlines()
        text = after[0].split(maxsplit=2)[2:] or [after[1].strip()]
        assert text[0] and not text[0].startswith("-"), option


# ------------------------------------------------------------------------ global options


def test_global_options_work_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert run(capsys, "set", "k", "1", "--url", url, "-n", "after")[0] == 0
    code, out, _ = run(capsys, "get", "k", "--url", url, "--namespace", "after", "--table")
    assert code == 0
    assert "version" in out and not out.startswith("{")
    code, out, _ = run(capsys, "--url", url, "-n", "after", "stats", "--json")
    assert json.loads(out)["keys"] == 1


def test_db_takes_the_global_options_and_table_name_after_the_action(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "db", "sql", "--json", "--table-name", "other_entries")
    assert code == 0
    data = json.loads(out)
    assert data["table"] == "other_entries"
    assert '"other_entries"' in data["sql"]
    # --table NAME after a db action names the table, as before.
    code, out, _ = run(capsys, "--table", "db", "sql", "--table", "third")
    assert code == 0
    assert '"third"' in out
    # db current --json parses: what fails is the missing URL (a configuration error).
    code, _, err = run(capsys, "db", "current", "--json", "--url", "redis://localhost/0")
    assert code == 2
    assert "postgresql://" in err
    assert "unrecognized" not in err


def test_db_on_an_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "db", "current", "--url", "postgresql://u:sekret@127.0.0.1:1/x")
    assert code == 3
    assert out == ""
    assert "127.0.0.1" in err
    assert "sekret" not in err


# ------------------------------------------------------------------------ health and stats


@pytest.mark.parametrize("fmt", ["--json", "--table"])
def test_health_reports_a_store_that_cannot_be_opened(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    code, out, err = run(capsys, "--url", url, "health", fmt)
    assert code == 1
    assert err == ""
    if fmt == "--json":
        data = json.loads(out)
        assert data["ok"] is False
        assert data["backend"] == "sqlite"
        assert "BackendUnavailableError" in data["details"]["error"]
    else:
        assert out.splitlines()[0].split() == ["ok", "no"]
        assert "BackendUnavailableError" in out


def test_health_and_stats_say_which_file_they_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default store is ./fleetmem.db of the working directory: both print its path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEETMEM_URL", raising=False)
    code, out, _ = run(capsys, "stats", "--json")
    assert code == 0
    assert json.loads(out)["store"] == f"sqlite file {tmp_path / 'fleetmem.db'}"
    code, out, _ = run(capsys, "health", "--json")
    assert code == 0
    assert json.loads(out)["store"] == f"sqlite file {tmp_path / 'fleetmem.db'}"


def test_tables_never_cut_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    url = f"sqlite:///{deep}/cli.db"
    code, out, _ = run(capsys, "--url", url, "health", "--table")
    assert code == 0
    assert str(deep / "cli.db") in out
    long_value = "v" * 300
    assert run(capsys, "--url", url, "set", "k", long_value, "--raw")[0] == 0
    code, out, _ = run(capsys, "--url", url, "get", "k", "--table")
    assert long_value in out
    # On a terminal with rich: a long value folds onto more lines, it is not cut.
    pytest.importorskip("rich")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "60")
    code, out, _ = run(capsys, "--url", url, "get", "k", "--table")
    assert code == 0
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)  # rich's bold
    assert long_value in "".join(plain.split())
    assert max(len(line) for line in plain.splitlines()) <= 60
    assert "…" not in out and "..." not in out


# ------------------------------------------------------------------------ the new commands


def test_incr_expire_persist_partitions_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    code, out, _ = run(capsys, "--url", url, "incr", "n")
    assert (code, json.loads(out)) == (0, {"key": "n", "value": 1})
    code, out, _ = run(capsys, "--url", url, "incr", "n", "--by", "41")
    assert json.loads(out)["value"] == 42
    code, out, _ = run(capsys, "--url", url, "incr", "f", "--by", "0.5", "--partition", "p")
    assert json.loads(out)["value"] == 0.5
    assert run(capsys, "--url", url, "expire", "n", "30")[0] == 0
    code, out, _ = run(capsys, "--url", url, "ttl", "n")
    assert 0 < json.loads(out)["ttl"] <= 30
    assert run(capsys, "--url", url, "persist", "n")[0] == 0
    code, out, _ = run(capsys, "--url", url, "ttl", "n")
    assert json.loads(out)["ttl"] is None
    code, out, _ = run(capsys, "--url", url, "partitions")
    assert json.loads(out) == ["default", "p"]
    # clear is destructive: without --yes it refuses and deletes nothing.
    code, _, err = run(capsys, "--url", url, "clear")
    assert code == 2
    assert "--yes" in err
    code, out, _ = run(capsys, "--url", url, "keys")
    assert json.loads(out) == ["f", "n"]
    code, out, _ = run(capsys, "--url", url, "clear", "--partition", "p", "--yes")
    assert json.loads(out)["deleted"] == 1
    code, out, _ = run(capsys, "--url", url, "clear", "--yes")
    assert (code, json.loads(out)["deleted"]) == (0, 1)
    code, out, _ = run(capsys, "--url", url, "keys")
    assert json.loads(out) == []


def test_set_if_version_is_a_compare_and_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    code, out, _ = run(capsys, "--url", url, "set", "cfg", '{"rate": 1}', "--if-version", "0")
    assert (code, json.loads(out)["version"]) == (0, 1)
    code, out, err = run(capsys, "--url", url, "set", "cfg", '{"rate": 2}', "--if-version", "0")
    assert code == 1
    assert json.loads(out) == {
        "key": "cfg",
        "conflict": True,
        "expected_version": 0,
        "current_version": 1,
    }
    assert "current version is 1" in err
    code, out, _ = run(capsys, "--url", url, "set", "cfg", '{"rate": 2}', "--if-version", "1")
    assert (code, json.loads(out)["version"]) == (0, 2)
    code, _, err = run(capsys, "--url", url, "set", "cfg", "3", "--if-version", "-1")
    assert code == 2
    assert "InvalidArgumentError" in err


def test_namespaces_lists_the_namespaces_holding_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    for ns in ("beta", "alpha", "alpine"):
        assert run(capsys, "--url", url, "-n", ns, "set", "k", "1")[0] == 0
    code, out, _ = run(capsys, "--url", url, "namespaces")
    assert (code, json.loads(out)) == (0, ["alpha", "alpine", "beta"])
    code, out, _ = run(capsys, "--url", url, "namespaces", "alp", "--limit", "1")
    assert json.loads(out) == ["alpha"]
    code, out, _ = run(capsys, "--url", url, "namespaces", "--table")
    assert out.split() == ["alpha", "alpine", "beta"]


# ------------------------------------------------------------------------ a closed stdout


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """``fleetmem keys --table | head -1``: more output than a pipe holds, the reader gone
    after one line; no traceback, exit 141 (128 + SIGPIPE, as a shell shows for a Unix tool)."""
    import asyncio

    from fleetmem import open_store

    url = f"sqlite:///{tmp_path}/big.db"

    async def fill() -> None:
        async with open_store(url) as store:
            await store.set_many({f"key/{i:06d}/{'x' * 40}": i for i in range(4000)})

    asyncio.run(fill())
    for command in (["keys", "--table"], ["search", "*", "--table"], ["keys", "--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetmem.cli", "--url", url, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(10)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 141, err
        assert err == ""


# ------------------------------------------------------------------------ the demo


def test_demo_refuses_several_processes_on_an_in_memory_sqlite(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "demo", "--url", "sqlite://", "--processes", "2")
    assert code == 2
    assert out == ""
    assert "ConfigurationError" in err and "--processes 1" in err


def test_demo_hint_carries_url_and_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    code, out, err = run(
        capsys, "demo", "--url", url, "-n", "fleet-7", "--agents", "3", "--items", "6"
    )
    assert code == 0, out
    assert err == ""  # nothing on stderr when it is not a terminal
    hint = [line[line.index("fleetmem --url") :] for line in out.splitlines() if "--url" in line]
    assert hint[0].split() == [
        *("fleetmem", "--url", url, "-n", "fleet-7"),
        *("keys", "results/", "--limit", "5"),
    ]
    # The hints run as printed.
    command = hint[1].split()
    assert command[-1] == "queues"
    code, out, _ = run(capsys, *command[1:], "--json")
    assert code == 0
    (queue,) = json.loads(out)
    assert (queue["done"], queue["ready"], queue["claimed"], queue["dead"]) == (6, 0, 0, 0)
    command = hint[2].split()
    assert command[-1] == "stats"
    code, out, _ = run(capsys, *command[1:], "--json")
    assert code == 0
    assert json.loads(out)["namespace"] == "fleet-7"
    assert json.loads(out)["keys"] > 0


def test_demo_hint_never_prints_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    typed = argparse.Namespace(url="redis://:sekret@cache.example:6379/0", namespace="ns")
    hint = cli._demo_hint(typed, "ns")
    assert all(
        "sekret" not in line and "redis://:***@cache.example:6379/0" in line for line in hint
    )
    # A URL from FLEETMEM_URL is not repeated: the environment still applies.
    monkeypatch.setenv("FLEETMEM_URL", "postgresql://u:sekret@db.example/fleet")
    hint = cli._demo_hint(argparse.Namespace(url=None, namespace=None), "demo")
    assert hint == [
        "fleetmem -n demo keys results/ --limit 5",
        "fleetmem -n demo queues",
        "fleetmem -n demo stats",
    ]


def test_demo_progress_on_a_terminal_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # as if rich were not installed
    code, _, err = run(capsys, "--url", "memory://", "demo", "--agents", "3", "--items", "12")
    assert code == 0
    assert "items 12/12" in err
    assert "starting 3 agents" in err


# ------------------------------------------------------------------------ bench


def test_bench_help_says_which_servers_it_uses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path])
    code, out, _ = run(capsys, "--url", "redis://localhost:6379/0", "bench", "--help")
    assert code == 0
    assert "--quick" in out
    assert "FLEETMEM_BENCH_POSTGRES_URL" in out and "FLEETMEM_BENCH_REDIS_URL" in out
    assert "local binaries" in out


def test_bench_without_its_dependencies_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "asyncpg" else real(name, *a),
    )
    code, out, err = run(capsys, "bench", "--only", "postgres")
    assert code == 2
    assert out == ""
    assert "asyncpg" in err and "pip install -e '.[bench]'" in err
    assert "Traceback" not in err


def test_bench_takes_the_global_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli._bench_servers_from_url("redis://h:6379/0") == {
        "FLEETMEM_BENCH_REDIS_URL": "redis://h:6379/0"
    }
    assert cli._bench_servers_from_url("hybrid+postgresql://u@h/db?cache=redis://r:6379/0") == {
        "FLEETMEM_BENCH_POSTGRES_URL": "postgresql://u@h/db",
        "FLEETMEM_BENCH_REDIS_URL": "redis://r:6379/0",
    }
    code, _, err = run(capsys, "bench", "--url", "memory://", "--quick")
    assert code == 2
    assert "PostgreSQL and Redis" in err


def test_printed_urls_hide_every_password() -> None:
    from fleetmem._urls import redact_url as redact
    from fleetmem._where import describe

    hybrid = "hybrid+postgresql://fleet:pg-sekret@db:5432/fleet?cache=redis://:r-sekret@c:6379/0"
    shown = describe(hybrid)
    assert "sekret" not in shown
    assert shown.startswith("hybrid+postgresql://fleet:***@db:5432/fleet?cache=redis://")
    assert redact("memory://") == "memory://"  # a URL without a password, as written
    assert describe("sqlite://") == "sqlite in-memory database (this process only)"
    assert cli._bench_servers_from_url(hybrid) == {
        "FLEETMEM_BENCH_POSTGRES_URL": "postgresql://fleet:pg-sekret@db:5432/fleet",
        "FLEETMEM_BENCH_REDIS_URL": "redis://:r-sekret@c:6379/0",
    }


def _modules_after_cli(argv: list[str], cwd: Path, env: dict[str, str]) -> set[str]:
    """The modules a fresh interpreter has imported after running ``fleetmem ARGV``."""
    script = (
        "import sys\nfrom fleetmem.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "loaded = sorted(sys.modules)\nimport json\nprint(json.dumps(loaded))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEETMEM_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **env},
        check=False,
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_commands_import_only_what_they_use(tmp_path: Path) -> None:
    """--help imports no store, no JSON, no asyncio; a command on the default store (or
    FLEETMEM_URL) does not pay for pydantic; only the commands that need them import the demo,
    the migrations and rich."""
    heavy = {"asyncio", "json", "sqlite3", "fleetmem.store", "fleetmem.demo", "pydantic", "rich"}
    assert not heavy & _modules_after_cli(["--help"], tmp_path, {})
    for env in ({}, {"FLEETMEM_URL": f"sqlite:///{tmp_path}/env.db"}):
        loaded = _modules_after_cli(["stats"], tmp_path, env)
        assert "fleetmem.backends.sqlite" in loaded  # the check sees what the command did
        assert not {"pydantic", "fleetmem.demo", "rich", "alembic"} & loaded
    # Another setting is read through the settings, as open_store reads it.
    loaded = _modules_after_cli(["stats"], tmp_path, {"FLEETMEM_MAX_VALUE_BYTES": "1000"})
    assert "pydantic_settings" in loaded


def test_the_plain_settings_url_is_the_settings_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmem import _where
    from fleetmem.settings import DEFAULT_URL, FleetmemSettings

    assert _where.DEFAULT_URL == DEFAULT_URL
    for name in [k for k in os.environ if k.upper().startswith("FLEETMEM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLEETMEM_TEST_REDIS_URL", "redis://elsewhere/0")  # not a setting
    assert _where.plain_settings_url() == DEFAULT_URL
    monkeypatch.setenv("fleetmem_url", "memory://")  # the settings ignore case
    assert _where.plain_settings_url() == "memory://"
    secret = FleetmemSettings().url
    assert secret is not None and secret.get_secret_value() == "memory://"
    monkeypatch.setenv("FLEETMEM_CACHE_TTL", "5")
    assert _where.plain_settings_url() is None


def test_holder_and_agents_show_what_processes_hold_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from fleetmem.backends.sqlite import SQLiteStore

    db = tmp_path / "fleet.db"
    url = f"sqlite:///{db}"

    async def hold() -> int:
        async with SQLiteStore(db, namespace="fleet") as store:
            lease = await store.leases.acquire("build/main", owner="agent-7", ttl=600)
            assert lease is not None
            await store.agents.register("agent-7", info={"role": "builder"}, ttl=600)
            await store.agents.register("agent-8", ttl=600)
            return lease.token

    token = asyncio.run(hold())
    code, out, _ = run(capsys, "--url", url, "-n", "fleet", "--json", "holder", "build/main")
    assert code == 0
    shown = json.loads(out)
    assert (shown["owner"], shown["token"]) == ("agent-7", token)
    code, _, err = run(capsys, "--url", url, "-n", "fleet", "holder", "other")
    assert code == 1 and "free" in err
    code, out, _ = run(capsys, "--url", url, "-n", "fleet", "--json", "agents")
    assert code == 0
    listed = json.loads(out)
    assert [a["id"] for a in listed] == ["agent-7", "agent-8"]
    assert listed[0]["info"] == {"role": "builder"} and listed[0]["generation"] == 1
    code, out, _ = run(
        capsys, "--url", url, "-n", "fleet", "--json", "agents", "--after", "agent-7"
    )
    assert [a["id"] for a in json.loads(out)] == ["agent-8"]
    code, out, _ = run(capsys, "--url", url, "-n", "other", "--json", "agents")
    assert json.loads(out) == []


def test_queues_and_dead_list_what_the_queues_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from fleetmem.backends.sqlite import SQLiteStore

    db = tmp_path / "queues.db"
    url = f"sqlite:///{db}"

    async def fill() -> str:
        async with SQLiteStore(db, namespace="fleet") as store:
            builds = store.queue("builds")
            await builds.put_many([{"n": 1}, {"n": 2}])
            failing = await builds.put({"n": 3}, priority=9, max_attempts=1)
            job = await builds.claim(consumer="agent-7")
            assert job is not None and job.id == failing
            assert await builds.nack(job, error="disk full")
            await store.queue("docs").put({"page": "x"}, delay=600)
            return failing

    failing = asyncio.run(fill())
    code, out, _ = run(capsys, "--url", url, "-n", "fleet", "--json", "queues")
    assert code == 0
    assert json.loads(out) == [
        {"queue": "builds", "ready": 2, "delayed": 0, "claimed": 0, "dead": 1, "done": 0},
        {"queue": "docs", "ready": 0, "delayed": 1, "claimed": 0, "dead": 0, "done": 0},
    ]
    code, out, _ = run(capsys, "--url", url, "-n", "fleet", "--json", "dead", "builds")
    assert code == 0
    (dead,) = json.loads(out)
    assert (dead["id"], dead["last_error"], dead["payload"]) == (failing, "disk full", {"n": 3})
    assert (dead["attempts"], dead["max_attempts"], dead["consumer"]) == (1, 1, "agent-7")
    code, out, _ = run(capsys, "--url", url, "-n", "fleet", "dead", "builds", "--after", failing)
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run(capsys, "--url", url, "-n", "other", "--json", "queues")
    assert json.loads(out) == []
    code, _, err = run(capsys, "--url", url, "-n", "fleet", "dead", "builds", "--after", "x")
    assert code == 2 and "job id" in err


def test_changes_enable_read_watch_and_a_bad_cursor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    code, out, _ = run(capsys, "--url", url, "changes", "status")
    assert (code, json.loads(out)) == (0, {"enabled": False})
    code, _, err = run(capsys, "--url", url, "changes", "read")
    assert code != 0 and "not enabled" in err
    assert run(capsys, "--url", url, "changes", "enable", "--retention", "60")[0] == 0
    head = json.loads(run(capsys, "--url", url, "changes", "status")[1])["cursor"]
    run(capsys, "--url", url, "set", "results/a", '{"ok": true}')
    run(capsys, "--url", url, "set", "logs/a", '"x"')
    run(capsys, "--url", url, "del", "results/a")
    code, out, _ = run(capsys, "--url", url, "changes", "read", "--pattern", "results/*")
    page = json.loads(out)
    assert [(c["op"], c["key"], c["version"]) for c in page["changes"]] == [
        ("set", "results/a", 1),
        ("delete", "results/a", None),
    ]
    code, out, _ = run(capsys, "--url", url, "changes", "read", "--since", page["cursor"])
    assert json.loads(out)["changes"] == []
    # watch replays from a cursor, one JSON object per line, and stops after --count.
    code, out, _ = run(capsys, "--url", url, "--json", "watch", "--since", head, "--count", "2")
    assert code == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["results/a", "logs/a"]
    code, _, err = run(capsys, "--url", url, "changes", "read", "--since", "nonsense")
    assert code == 2 and "not a change cursor" in err
    assert run(capsys, "--url", url, "changes", "disable")[0] == 0
    code, out, _ = run(capsys, "--url", url, "changes", "status")
    assert json.loads(out) == {"enabled": False}
