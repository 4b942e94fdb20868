"""The PostgreSQL schema, owned by alembic: upgrade, downgrade, current revision, offline SQL.

These functions are synchronous (alembic's command API); they open their own connection with
asyncpg through SQLAlchemy's ``postgresql+asyncpg`` dialect. ``fleetmem db ...`` calls
:func:`run_db_command`. Every migration runs in one transaction under a PostgreSQL advisory lock
keyed on the schema and table, so processes that upgrade at the same time apply it exactly once.

The schema and table names are configurable; they are validated as plain identifiers and always
double-quoted when formatted into SQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fleetmem._urls import (
    HYBRID_SCHEMES,
    is_hybrid_url,
    redact_url,
    split_hybrid_url,
    url_scheme,
)
from fleetmem.errors import ConfigurationError, MissingDependencyError

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_TABLE",
    "HEAD_REVISION",
    "REVISIONS",
    "add_db_commands",
    "advisory_lock_key",
    "coordination_names",
    "current",
    "downgrade",
    "feed_names",
    "migrations_dir",
    "notify_channel",
    "queue_table",
    "quote_ident",
    "run_db_command",
    "snapshot_names",
    "sql",
    "upgrade",
    "validate_identifier",
    "version_table_name",
]

DEFAULT_SCHEMA = "fleetmem"
DEFAULT_TABLE = "entries"
#: Every revision this fleetmem knows, oldest first; the last is the head the store needs.
REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD_REVISION = REVISIONS[-1]

# Lower-case ASCII identifiers only: no quoting surprises, and room for index-name suffixes
# within PostgreSQL's 63-byte limit.
_IDENT_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")

_T = TypeVar("_T")
#: Seconds to wait for a migration's connection to open (the alembic env.py waits as long).
_CONNECT_TIMEOUT = 10.0


def validate_identifier(name: object, what: str = "identifier") -> str:
    """Return ``name`` if it is a plain lower-case identifier (``[a-z_][a-z0-9_]{0,39}``)."""
    if not isinstance(name, str) or _IDENT_RE.fullmatch(name) is None:
        raise ConfigurationError(
            f"invalid {what} {name!r}: expected 1-40 characters of a-z 0-9 _ "
            "(not starting with a digit)"
        )
    return name


def quote_ident(name: str) -> str:
    """``name`` (already validated) as a double-quoted SQL identifier."""
    return '"' + validate_identifier(name).replace('"', '""') + '"'


def version_table_name(table: str) -> str:
    """The alembic version table of ``table`` (in the same schema)."""
    validate_identifier(table, "table name")
    return "alembic_version" if table == DEFAULT_TABLE else f"alembic_version_{table}"


def coordination_names(table: str) -> tuple[str, str, str]:
    """The lease table, the agent table and the fence function that belong to entries table
    ``table`` (same schema): ``<table>_leases``, ``<table>_agents``, ``<table>_fence``."""
    validate_identifier(table, "table name")
    return f"{table}_leases", f"{table}_agents", f"{table}_fence"


def queue_table(table: str) -> str:
    """The work-queue table that belongs to entries table ``table`` (same schema):
    ``<table>_jobs`` (revision 0004)."""
    validate_identifier(table, "table name")
    return f"{table}_jobs"


def feed_names(table: str) -> tuple[str, str, str, str]:
    """The change-feed objects that belong to entries table ``table`` (same schema, revision
    0005): the feed table ``<table>_feeds``, the change table ``<table>_changes``, the read
    function ``<table>_changes_read`` and the clear function ``<table>_clear``. Derived names,
    up to 55 characters: quote them whole (they may pass the 40 of a checked identifier)."""
    validate_identifier(table, "table name")
    return f"{table}_feeds", f"{table}_changes", f"{table}_changes_read", f"{table}_clear"


def snapshot_names(table: str) -> tuple[str, str]:
    """The snapshot tables that belong to entries table ``table`` (same schema, revision
    0006): the catalog ``<table>_snapshots`` and the record table ``<table>_snapshot_records``.
    Derived names, up to 57 characters: quote them whole (they may pass the 40 of a checked
    identifier)."""
    validate_identifier(table, "table name")
    return f"{table}_snapshots", f"{table}_snapshot_records"


def notify_channel(schema: str, table: str) -> str:
    """The ``NOTIFY`` channel of the leases, work queues and change feeds of ``schema.table``:
    channels are per database, so it names both (hashed, to stay within 63 bytes)."""
    digest = hashlib.blake2b(f"{schema}.{table}".encode(), digest_size=6).hexdigest()
    return f"fleetmem_leases_{digest}"


def advisory_lock_key(schema: str, table: str) -> int:
    """The signed 64-bit advisory-lock key that serializes migrations of ``schema.table``."""
    digest = hashlib.blake2b(f"fleetmem-migrate:{schema}.{table}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def migrations_dir() -> Path:
    """The alembic script directory: ``fleetmem/_migrations`` in a wheel, else the repo's."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "_migrations", here.parents[4] / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("fleetmem's alembic migrations are missing from this installation")


def _asyncpg_dsn(dsn: str) -> str:
    scheme = url_scheme(dsn)
    if scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(
            f"expected a postgresql:// or postgres:// URL, not {redact_url(dsn)!r}"
        )
    return dsn


def _config(
    schema: str,
    table: str,
    *,
    dsn: str | None = None,
    connection: Any = None,
    output: io.StringIO | None = None,
) -> Any:
    try:
        from alembic.config import Config
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise MissingDependencyError("alembic", "postgres") from exc
    cfg = Config(output_buffer=output, stdout=output or io.StringIO())
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["fleetmem_schema"] = validate_identifier(schema, "schema name")
    cfg.attributes["fleetmem_table"] = validate_identifier(table, "table name")
    if dsn is not None:
        cfg.attributes["fleetmem_dsn"] = _asyncpg_dsn(dsn)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _off_loop(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` here, or in a worker thread when this thread runs an event loop.

    env.py starts its own event loop (``asyncio.run``), which cannot nest in a running one.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name="fleetmem-migrate")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    result: _T = box["result"]
    return result


def _wrap_errors(fn: Callable[[], _T], dsn: str) -> _T:
    from fleetmem.backends.postgres.connector import _cannot_connect
    from fleetmem.errors import BackendUnavailableError, FleetmemError

    try:
        return _off_loop(fn)
    except FleetmemError:
        raise
    except (OSError, asyncio.TimeoutError) as exc:
        # The migration's connection could not be opened: say why, as the store does.
        raise _cannot_connect(exc, redact_url(dsn), dsn, _CONNECT_TIMEOUT) from exc
    except Exception as exc:
        state = getattr(exc, "sqlstate", None) or ""
        if type(exc).__module__.startswith("asyncpg") and (
            state.startswith("28") or state == "3D000"
        ):
            # Authentication failed, or no such database: only opening a connection says that.
            raise _cannot_connect(exc, redact_url(dsn), dsn, _CONNECT_TIMEOUT) from exc
        if type(exc).__module__.startswith(("asyncpg", "sqlalchemy")):
            raise BackendUnavailableError(
                f"migration on {redact_url(dsn)} failed: {type(exc).__name__}: "
                f"{_safe_message(exc, dsn)}"
            ) from exc
        raise


def _safe_message(exc: BaseException, dsn: str) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if dsn and dsn in text:
        text = text.replace(dsn, redact_url(dsn))
    return text


def upgrade(
    dsn: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
    revision: str = "head",
) -> None:
    """Upgrade the schema at ``dsn`` to ``revision`` (default: the newest). A no-op at head."""
    from alembic import command

    cfg = _config(schema, table, dsn=dsn)
    _wrap_errors(lambda: command.upgrade(cfg, revision), dsn)


def downgrade(
    dsn: str,
    revision: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
) -> None:
    """Downgrade the schema at ``dsn`` to ``revision`` (``"base"`` drops fleetmem's table)."""
    from alembic import command

    cfg = _config(schema, table, dsn=dsn)
    _wrap_errors(lambda: command.downgrade(cfg, revision), dsn)


def current(
    dsn: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
) -> str | None:
    """The revision the database at ``dsn`` is at, ``None`` when fleetmem's schema is absent."""
    _asyncpg_dsn(dsn)

    async def read() -> str | None:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT)
        try:
            return await read_version(conn, schema=schema, table=table)
        finally:
            await conn.close()

    return _wrap_errors(lambda: asyncio.run(read()), dsn)


async def read_version(
    conn: Any, *, schema: str = DEFAULT_SCHEMA, table: str = DEFAULT_TABLE
) -> str | None:
    """The revision recorded in ``schema``'s version table on asyncpg ``conn`` (one query)."""
    qualified = f"{quote_ident(schema)}.{quote_ident(version_table_name(table))}"
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified)
    if not found:
        return None
    value = await conn.fetchval(f"SELECT max(version_num) FROM {qualified}")
    return None if value is None else str(value)


def sql(
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
    revision: str = "head",
    from_revision: str | None = None,
) -> str:
    """The SQL that upgrades to ``revision`` (offline: no database needed), for a DBA to run."""
    from alembic import command

    buffer = io.StringIO()
    cfg = _config(schema, table, output=buffer)
    target = f"{from_revision}:{revision}" if from_revision else revision
    command.upgrade(cfg, target, sql=True)
    return buffer.getvalue()


async def upgrade_on(
    connect: Callable[[], Any],
    *,
    schema: str = DEFAULT_SCHEMA,
    table: str = DEFAULT_TABLE,
    revision: str = "head",
) -> None:
    """Upgrade from inside a running event loop on a connection ``connect()`` returns.

    ``connect`` is an async callable returning an asyncpg connection; SQLAlchemy closes that
    connection when the migration is done.
    """
    from alembic import command
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine("postgresql+asyncpg://", async_creator=connect, poolclass=NullPool)
    try:
        async with engine.connect() as conn:

            def run(sync_conn: Any) -> None:
                command.upgrade(_config(schema, table, connection=sync_conn), revision)

            await conn.run_sync(run)
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------- the CLI


def add_db_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``db`` with its ``upgrade | downgrade | current | sql`` subcommands to ``subparsers``.

    The ``db`` parser sets ``func`` to a callable taking the parsed namespace and returning an
    exit code.
    """
    db = subparsers.add_parser("db", help="manage the PostgreSQL schema (alembic migrations)")
    _fill_db_parser(db)
    return db  # type: ignore[no-any-return]


def _fill_db_parser(db: argparse.ArgumentParser) -> None:
    commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, needs_dsn: bool = True) -> None:
        if needs_dsn:
            p.add_argument(
                "--url",
                dest="url",
                default=None,
                help="PostgreSQL URL (default: $FLEETMEM_POSTGRES_URL or $FLEETMEM_URL)",
            )
        p.add_argument("--schema", default=DEFAULT_SCHEMA, help="schema (default: fleetmem)")
        p.add_argument(
            "--table-name",
            "--table",
            dest="table",
            default=DEFAULT_TABLE,
            metavar="NAME",
            help="table (default: entries)",
        )
        p.add_argument("--json", dest="fmt", action="store_const", const="json", help="print JSON")

    up = commands.add_parser("upgrade", help="upgrade the schema (default: to head)")
    common(up)
    up.add_argument("revision", nargs="?", default="head")
    down = commands.add_parser(
        "downgrade", help="downgrade the schema to REVISION ('base' drops the table)"
    )
    common(down)
    down.add_argument("revision")
    cur = commands.add_parser("current", help="print the revision the database is at")
    common(cur)
    offline = commands.add_parser("sql", help="print the upgrade SQL without a database")
    common(offline, needs_dsn=False)
    offline.add_argument("revision", nargs="?", default="head")
    offline.add_argument(
        "--from",
        dest="from_revision",
        default=None,
        help="revision the database is at (default: empty)",
    )
    db.set_defaults(func=_dispatch)


def _resolve_url(given: str | None) -> str:
    """The PostgreSQL URL to migrate: ``--url``, else ``FLEETMEM_POSTGRES_URL``, else a
    PostgreSQL ``FLEETMEM_URL``. A hybrid URL names its durable tier's database."""
    if given:
        return _durable_url(given)
    import os

    for name in ("FLEETMEM_POSTGRES_URL", "FLEETMEM_URL"):
        value = os.environ.get(name)
        if value and url_scheme(value) in ("postgres", "postgresql", *HYBRID_SCHEMES):
            return _durable_url(value)
    raise ConfigurationError("no PostgreSQL URL: pass --url or set FLEETMEM_POSTGRES_URL")


def _durable_url(url: str) -> str:
    return split_hybrid_url(url).postgres_url if is_hybrid_url(url) else url


def _dispatch(args: argparse.Namespace) -> int:
    command = args.db_command
    schema = getattr(args, "schema", None) or DEFAULT_SCHEMA
    table = getattr(args, "table", None) or DEFAULT_TABLE
    revision = getattr(args, "revision", None)
    as_json = getattr(args, "fmt", None) == "json"

    def emit(data: dict[str, Any], text: str) -> None:
        if as_json:
            import json

            print(json.dumps(data))
        else:
            print(text)

    if command == "sql":
        text = sql(
            schema=schema,
            table=table,
            revision=revision or "head",
            from_revision=getattr(args, "from_revision", None),
        )
        if as_json:
            emit(
                {"schema": schema, "table": table, "revision": revision or "head", "sql": text}, ""
            )
        else:
            sys.stdout.write(text)
        return 0
    dsn = _resolve_url(getattr(args, "url", None))
    where = {"schema": schema, "table": table}
    if command == "upgrade":
        target = revision or "head"
        with _working(f"upgrading {schema}.{table} to {target} on {redact_url(dsn)}"):
            upgrade(dsn, schema=schema, table=table, revision=target)
        emit({**where, "upgraded_to": target}, f"upgraded {schema}.{table} to {target}")
    elif command == "downgrade":
        if not revision:
            raise ConfigurationError("fleetmem db downgrade needs a REVISION (e.g. base)")
        with _working(f"downgrading {schema}.{table} to {revision} on {redact_url(dsn)}"):
            downgrade(dsn, revision, schema=schema, table=table)
        emit({**where, "downgraded_to": revision}, f"downgraded {schema}.{table} to {revision}")
    else:
        rev = current(dsn, schema=schema, table=table)
        emit({**where, "revision": rev, "head": HEAD_REVISION}, rev if rev is not None else "none")
    return 0


@contextlib.contextmanager
def _working(text: str) -> Iterator[None]:
    """Show ``text`` while a migration runs, on stderr when it is a terminal: a rich spinner,
    one plain line without rich (the ``cli`` extra); nothing when stderr is piped."""
    if not sys.stderr.isatty():
        yield
        return
    try:
        from rich.console import Console
    except ImportError:
        print(f"{text} ...", file=sys.stderr, flush=True)
        yield
        return
    with Console(stderr=True, highlight=False).status(text.replace("[", "\\[")):
        yield


def run_db_command(argv: Sequence[str] | argparse.Namespace) -> int:
    """Run ``fleetmem db ...``; return the exit status of ``fleetmem --help`` (an error prints
    one line: 2 for a usage or configuration error, 3 when PostgreSQL or the migration fails).

    ``argv`` is the argument list after ``db`` (``["upgrade", "--url", URL]``), or a namespace
    already parsed by the CLI with ``db_command``, ``revision``, ``schema``, ``table``, ``url``
    (``None``: ``FLEETMEM_POSTGRES_URL``, else a PostgreSQL ``FLEETMEM_URL``) and ``fmt``
    (``"json"`` prints JSON). On a terminal, ``upgrade`` and ``downgrade`` show a spinner on
    stderr while they run.
    """
    from fleetmem.cli import exit_status
    from fleetmem.errors import FleetmemError

    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = argparse.ArgumentParser(
            prog="fleetmem db", description="Manage fleetmem's PostgreSQL schema."
        )
        _fill_db_parser(parser)
        args = parser.parse_args(list(argv))
    try:
        return _dispatch(args)
    except FleetmemError as exc:
        print(f"fleetmem db: error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except Exception as exc:
        # alembic's CommandError: a revision it cannot find or reach, given on the command line.
        if type(exc).__module__.startswith("alembic") and type(exc).__name__ == "CommandError":
            print(f"fleetmem db: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_db_command(sys.argv[1:]))
