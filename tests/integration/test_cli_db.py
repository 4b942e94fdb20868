"""``fleetmem db``: alembic migrations from the command line, on a real PostgreSQL."""

from __future__ import annotations

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
