"""``fleetmem db``: alembic migrations from the command line, on a real PostgreSQL."""

from __future__ import annotations

import json

import pytest

from fleetmem.backends.postgres import migrate
from fleetmem.cli import main

pytestmark = pytest.mark.postgres


def test_db_upgrade_current_downgrade_sql(
    fleetmem_postgres_empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = fleetmem_postgres_empty_database
    assert main(["db", "current", "--url", dsn]) == 0
    before = capsys.readouterr().out
    assert main(["db", "upgrade", "--url", dsn]) == 0
    capsys.readouterr()
    assert main(["db", "current", "--url", dsn]) == 0
    after = capsys.readouterr().out
    assert after != before
    assert migrate.HEAD_REVISION in after
    assert main(["db", "downgrade", "base", "--url", dsn]) == 0
    capsys.readouterr()
    assert main(["db", "current", "--url", dsn]) == 0
    assert migrate.HEAD_REVISION not in capsys.readouterr().out
    assert main(["db", "sql", "--url", dsn]) == 0
    sql = capsys.readouterr().out
    assert "CREATE TABLE" in sql
    assert 'COLLATE "C"' in sql


def test_db_downgrade_needs_a_revision(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["db", "downgrade"])


def test_db_global_options_json_and_a_quiet_pipe(
    fleetmem_postgres_empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--url and --json before or after the action; nothing on stderr when it is not a
    terminal (the spinner is for terminals only)."""
    dsn = fleetmem_postgres_empty_database
    assert main(["db", "current", "--json", "--url", dsn]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == {
        "schema": "fleetmem",
        "table": "entries",
        "revision": None,
        "head": migrate.HEAD_REVISION,
    }
    assert main(["--url", dsn, "--json", "db", "upgrade", "--table-name", "cli_entries"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["upgraded_to"] == "head"
    assert out.err == ""
    assert main(["--url", dsn, "db", "current", "--table", "cli_entries", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == migrate.HEAD_REVISION
    # A revision alembic does not know is a usage error: one line, exit 2, no traceback.
    assert main(["db", "downgrade", "nonexistent", "--url", dsn, "--table", "cli_entries"]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert main(["db", "sql", "nonexistent"]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_db_takes_a_hybrid_url_and_migrates_its_postgresql(
    fleetmem_postgres_empty_database: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cache is never contacted by a migration: an unreachable one shows that.
    hybrid = f"hybrid+{fleetmem_postgres_empty_database}?cache=redis://127.0.0.1:1/0"
    assert main(["--url", hybrid, "--json", "db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["--url", hybrid, "--json", "db", "current"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == migrate.HEAD_REVISION
    monkeypatch.delenv("FLEETMEM_POSTGRES_URL", raising=False)
    monkeypatch.setenv("FLEETMEM_URL", hybrid)
    assert main(["--json", "db", "current"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == migrate.HEAD_REVISION
    assert main(["db", "downgrade", "base"]) == 0


def test_db_says_why_it_cannot_connect(capsys: pytest.CaptureFixture[str]) -> None:
    from fleetmem.testing.servers import find_free_port

    closed = f"postgresql://fleet:s3cret@127.0.0.1:{find_free_port()}/db"
    assert main(["db", "current", "--url", closed]) == 3
    err = capsys.readouterr().err
    assert "cannot connect to PostgreSQL at postgresql://fleet:***@127.0.0.1:" in err
    assert err.rstrip().endswith("connection refused"), err
    assert "s3cret" not in err and "ConnectionRefusedError" not in err
