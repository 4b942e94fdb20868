"""PostgreSQL servers: the server handle, its probe, and local initdb clusters."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fleetmem._urls import redact_url
from fleetmem.testing.servers._process import (
    _LOCALHOST,
    HarnessError,
    ServerNotFoundError,
    _Control,
    _FaultHandles,
    _host_for_url,
    _LocalProcess,
    _make_base_dir,
    _RunAs,
)

__all__ = [
    "POSTGRES_BIN_GLOBS",
    "PostgresServer",
    "find_postgres_bindir",
    "postgres_accepts",
    "start_local_postgres",
]

#: Where PostgreSQL server binaries are looked for after ``PATH`` (newest major version first).
POSTGRES_BIN_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)
#: How a ``stop(mode)`` signals the PostgreSQL postmaster (``pg_ctl stop -m`` semantics).
_POSTGRES_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


def _postgres_run_as(name: str = "postgres") -> _RunAs | None:
    """``None`` when not root; else the ``postgres`` account (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise HarnessError(
            f"the tests run as root and PostgreSQL refuses to: create an unprivileged user "
            f"{name!r} (e.g. useradd --system {name}) or run the tests as a normal user"
        ) from None
    return _RunAs(name, entry.pw_uid, entry.pw_gid)


@dataclass(eq=False)
class PostgresServer(_FaultHandles):
    """A PostgreSQL server for tests: where it is, and (when owned) its fault handles.

    ``dsn`` is ``postgresql://user@host:port/database``, usable by asyncpg and ``open_store``.
    ``stop(mode)`` takes ``pg_ctl``'s modes: ``"smart"``, ``"fast"`` (default), ``"immediate"``.
    """

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    query: str = field(default="", repr=False)
    _control: _Control | None = field(default=None, repr=False)
    _kind: ClassVar[str] = "PostgreSQL"
    _factory_fixture: ClassVar[str] = "fleetmem_postgres_factory"

    @classmethod
    def from_url(cls, url: str) -> PostgresServer:
        """A server that is already running (never owned: its fault handles refuse)."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise HarnessError(f"not a postgresql://user@host:port/db URL: {redact_url(url)}")
        return cls(
            host=parts.hostname,
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            database=unquote(parts.path.lstrip("/")) or "postgres",
            password=unquote(parts.password) if parts.password is not None else None,
            query=parts.query,
        )

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server."""
        userinfo = quote(self.user, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        netloc = f"{userinfo}@{_host_for_url(self.host)}:{self.port}"
        return urlunsplit(("postgresql", netloc, "/" + quote(database, safe=""), self.query, ""))

    def __repr__(self) -> str:
        return f"PostgresServer({redact_url(self.dsn)}, owned={self.owned})"


def postgres_accepts(host: str, port: int, user: str, database: str, timeout: float = 1.0) -> bool:
    """True when the server answers a startup packet with an authentication request.

    While starting, recovering or shutting down, PostgreSQL answers with an error instead.
    """
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params  # protocol 3.0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            kind = sock.recv(1)
            if kind == b"R":
                with contextlib.suppress(OSError):
                    sock.sendall(b"X\0\0\0\4")  # Terminate
                return True
    except OSError:
        return False
    return False


def _postmaster_answers(datadir: Path, port: int, pid: int) -> bool:
    """Whether postmaster ``pid`` of ``datadir`` is up and listening on ``port``.

    Read from the data directory's ``postmaster.pid`` (PostgreSQL 10+): its pid, its port, and
    its status ``ready``, which the postmaster writes once its sockets are bound and it accepts
    connections. A postmaster that could not bind the port never gets there.
    """
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return (
        len(lines) >= 8
        and lines[0].strip() == str(pid)
        and lines[3].strip() == str(port)
        and lines[7].strip() == "ready"
    )


def _postgres_search_dirs() -> list[Path]:
    dirs = [Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    for pattern in POSTGRES_BIN_GLOBS:
        root = Path("/")
        matches = sorted(
            root.glob(pattern.lstrip("/")),
            key=lambda path: [int(p) if p.isdigit() else 0 for p in path.parent.name.split(".")],
            reverse=True,
        )
        dirs.extend(matches)
    return dirs


def find_postgres_bindir(search_dirs: Sequence[str | os.PathLike[str]] | None = None) -> Path:
    """The first directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``search_dirs`` default: ``PATH``, then ``/usr/lib/postgresql/*/bin`` (newest first) and the
    other usual places. A symlinked ``initdb`` (``/usr/local/bin/initdb``) leads to its real
    directory.
    """
    dirs = [Path(d) for d in search_dirs] if search_dirs is not None else _postgres_search_dirs()
    names = ("initdb", "pg_ctl", "postgres")
    for directory in dirs:
        initdb = directory / "initdb"
        if not initdb.is_file():
            continue
        for candidate in (directory, initdb.resolve().parent):
            if all(os.access(candidate / name, os.X_OK) for name in names):
                return candidate
    searched = ", ".join(str(d) for d in dirs) or "(nothing)"
    raise ServerNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; searched: "
        f"{searched}. Install them (e.g. apt-get install postgresql), point "
        "FLEETMEM_TEST_POSTGRES_BIN_DIR at their directory, set "
        "FLEETMEM_TEST_POSTGRES_URL=postgresql://user@host:port/db, or start a Docker engine"
    )


def start_local_postgres(
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    durable: bool = False,
    startup_timeout: float = 30.0,
) -> PostgresServer:
    """initdb a new cluster in a temporary directory and start it on a free port.

    Auth is ``trust`` for user ``postgres``; the server listens on 127.0.0.1 and keeps its unix
    socket in the temporary directory. By default ``fsync=off`` and ``full_page_writes=off``
    (fast, and a killed *process* loses nothing; only an OS crash would): pass ``durable=True``
    for a server whose commits survive power loss. Run as root, the server runs as ``postgres``.
    """
    bindir = find_postgres_bindir(search_dirs)
    run_as = _postgres_run_as()
    base = _make_base_dir("fleetmem-pg-", run_as)
    try:
        datadir = base / "data"
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ],
            cwd=base,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            **(run_as.popen_kwargs() if run_as is not None else {}),
        )
        if initdb.returncode != 0:
            raise HarnessError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        settings = {
            "listen_addresses": _LOCALHOST,
            "unix_socket_directories": str(base),
            "max_connections": "200",
            "logging_collector": "off",
        }
        if not durable:
            settings.update({"fsync": "off", "full_page_writes": "off"})

        def argv(port: int) -> list[str]:
            args = [str(bindir / "postgres"), "-D", str(datadir), "-p", str(port)]
            for name, value in settings.items():
                args += ["-c", f"{name}={value}"]
            return args

        control = _LocalProcess(
            kind="PostgreSQL",
            argv=argv,
            base_dir=base,
            ready=lambda port: postgres_accepts(_LOCALHOST, port, "postgres", "postgres"),
            owns=lambda port, pid: _postmaster_answers(datadir, port, pid),
            stop_signals=_POSTGRES_STOP_SIGNALS,
            run_as=run_as,
            startup_timeout=startup_timeout,
        )
        control.start_on_free_port()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return PostgresServer(
        host=_LOCALHOST, port=control.port, user="postgres", database="postgres", _control=control
    )
