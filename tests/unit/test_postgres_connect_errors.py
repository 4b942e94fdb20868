"""How a failure to open a PostgreSQL connection is classified (the server's answers that the
test servers cannot be made to give: they trust every login)."""

from __future__ import annotations

import asyncpg
import pytest

from fleetmem import BackendUnavailableError, ConfigurationError
from fleetmem.backends.postgres import PostgresConnector

DSN = "postgresql://app:pa%24%24word@db.example:5432/agents?password=pa$$word"


def _classify(exc: BaseException) -> Exception:
    return PostgresConnector(DSN)._cannot_connect(exc)


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (
            asyncpg.InvalidPasswordError('password authentication failed for user "app"'),
            ConfigurationError,
            'authentication failed (server: password authentication failed for user "app")',
        ),
        (
            asyncpg.InvalidAuthorizationSpecificationError('no pg_hba.conf entry for host "x"'),
            ConfigurationError,
            'authentication failed (server: no pg_hba.conf entry for host "x")',
        ),
        (
            asyncpg.CannotConnectNowError("the database system is starting up"),
            BackendUnavailableError,
            "the server is starting up, shutting down or in recovery "
            "(server: the database system is starting up)",
        ),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            BackendUnavailableError,
            "connection reset by peer",
        ),
        (
            ValueError("invalid value pa$$word for option"),
            ConfigurationError,
            "invalid connection option (invalid value *** for option)",
        ),
    ],
)
def test_open_failures_say_why(exc: BaseException, kind: type[Exception], reason: str) -> None:
    err = _classify(exc)
    assert type(err) is kind
    assert str(err) == (
        "cannot connect to PostgreSQL at "
        "postgresql://app:***@db.example:5432/agents?password=***: " + reason
    )
    assert "pa$$" not in str(err)
    assert "pa%24%24" not in str(err)


def test_too_many_clients_stays_the_refusal_the_pool_waits_out() -> None:
    err = _classify(asyncpg.TooManyConnectionsError("sorry, too many clients already"))
    assert type(err) is BackendUnavailableError
    assert "too many clients (SQLSTATE 53300" in str(err)
