"""Real PostgreSQL and Redis servers for tests, with fault handles.

A server comes from one of three providers, tried in this order by the pytest plugin:

1. a URL (``FLEETMEM_TEST_POSTGRES_URL`` / ``FLEETMEM_TEST_REDIS_URL``): used as is, never owned;
2. a throwaway container through testcontainers, when a Docker engine answers;
3. the local server binaries, started in a temporary directory on a free port.

A server the harness started itself is *owned*: only an owned server can be killed, stopped,
restarted, paused or resumed. The handles of any other server raise :class:`NotOwnedError`, so no
test can take down a server it did not start.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fleetmem._urls import redact_url
from fleetmem.errors import ConfigurationError

__all__ = [
    "HarnessError",
    "NotOwnedError",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerNotFoundError",
    "docker_available",
    "find_free_port",
    "find_postgres_bindir",
    "find_redis_binary",
    "new_postgres_server",
    "new_redis_server",
    "postgres_accepts",
    "redis_command",
    "start_local_postgres",
    "start_local_redis",
    "start_local_redis_cluster",
    "start_postgres_container",
    "start_redis_container",
]

#: Where PostgreSQL server binaries are looked for after ``PATH`` (newest major version first).
POSTGRES_BIN_GLOBS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)
POSTGRES_IMAGE = "postgres:15"
REDIS_IMAGE = "redis:7"
#: How a ``stop(mode)`` signals the PostgreSQL postmaster (``pg_ctl stop -m`` semantics).
_POSTGRES_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
#: Redis saves and exits on SIGTERM; "immediate" gives it no chance to (SIGKILL).
_REDIS_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGTERM,
    "immediate": signal.SIGKILL,
}
_LOCALHOST = "127.0.0.1"
_START_ATTEMPTS = 5


class HarnessError(ConfigurationError):
    """The test harness cannot do this."""


class ServerNotFoundError(HarnessError):
    """No server is available for the tests."""


class NotOwnedError(HarnessError):
    """This server was not started by the test harness: it cannot be killed, stopped or paused."""


class _PortInUseError(HarnessError):
    """The chosen port was taken before the server could bind it."""


# -- ports, processes ---------------------------------------------------------------------------


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str = _LOCALHOST, *, cluster_bus: bool = False) -> int:
    """A TCP port nothing listens on now (the OS picks it: bind to port 0).

    With ``cluster_bus``, ``port + 10000`` (the Redis Cluster bus port) is free too. The port can
    still be taken by another process before the server binds it: starters retry on a new port.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if not cluster_bus:
            return port
        if port + 10000 <= 65535 and _port_is_free(host, port + 10000):
            return port
    raise HarnessError(f"found no free TCP port on {host}")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux ``/proc``; ``pgrep -P`` elsewhere)."""
    found: list[int] = []
    frontier = [pid]
    proc = Path("/proc")
    while frontier:
        parent = frontier.pop()
        kids: list[int] = []
        if proc.is_dir():
            for entry in proc.iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = stat[stat.rfind(")") + 2 :].split()
                if len(fields) > 1 and int(fields[1]) == parent:
                    kids.append(int(entry.name))
        else:
            pgrep = shutil.which("pgrep")
            if pgrep is not None:
                out = subprocess.run(
                    [pgrep, "-P", str(parent)], capture_output=True, text=True, check=False
                ).stdout
                kids = [int(line) for line in out.split() if line.isdigit()]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    """Wait until ``pids`` have exited; SIGKILL whatever is left after ``timeout``."""
    remaining = [pid for pid in pids if _alive(pid)]
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        time.sleep(0.02)
        remaining = [pid for pid in remaining if _alive(pid)]
    if remaining:
        _signal_all(remaining, signal.SIGKILL)
        _signal_all(remaining, signal.SIGCONT)
        deadline = time.monotonic() + 5.0
        while any(_alive(pid) for pid in remaining) and time.monotonic() < deadline:
            time.sleep(0.02)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account a server runs as when the tests run as root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # What runuser/setpriv do (setgroups, setgid, setuid, exec), without an extra process
        # in between: the server's PID is the child's PID, so signals reach it directly.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


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


class _Control(Protocol):
    """The fault handles of one owned server."""

    def kill(self) -> None: ...
    def stop(self, mode: str) -> None: ...
    def start(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


_LIVE: list[_Control] = []


@atexit.register
def _close_leftovers() -> None:
    """Safety net: stop every owned server a crashed run did not close."""
    for control in list(_LIVE):
        with contextlib.suppress(Exception):
            control.close()


class _LocalProcess:
    """One server process started from a local binary, restartable on the same port and data."""

    def __init__(
        self,
        *,
        kind: str,
        argv: Callable[[int], list[str]],
        base_dir: Path,
        ready: Callable[[int], bool],
        stop_signals: Mapping[str, signal.Signals],
        run_as: _RunAs | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.kind = kind
        self.port = 0
        self.base_dir = base_dir
        self.log_path = base_dir / "server.log"
        self._argv = argv
        self._ready = ready
        self._stop_signals = stop_signals
        self._run_as = run_as
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._orphans: list[int] = []
        self._paused: list[int] = []
        self._closed = False

    # The first start picks a free port, and a new one if another process took it meanwhile.
    def start_on_free_port(self, *, cluster_bus: bool = False) -> None:
        for attempt in range(_START_ATTEMPTS):
            self.port = find_free_port(cluster_bus=cluster_bus)
            try:
                self.start()
            except _PortInUseError:
                if attempt == _START_ATTEMPTS - 1:
                    raise
                continue
            _LIVE.append(self)
            return

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _pids(self) -> list[int]:
        if not self.running:
            return []
        assert self._proc is not None
        return [self._proc.pid, *_children(self._proc.pid)]

    def start(self) -> None:
        if self._closed:
            raise HarnessError(f"this {self.kind} server was closed")
        if self.running:
            return
        # Processes left by a kill -9 of the parent still hold its shared memory: a new
        # PostgreSQL postmaster refuses to start until they are gone.
        _wait_gone(self._orphans, timeout=10.0)
        self._orphans = []
        self._paused = []
        with self.log_path.open("ab") as log:
            kwargs = self._run_as.popen_kwargs() if self._run_as is not None else {}
            self._proc = subprocess.Popen(
                self._argv(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
                **kwargs,
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc.wait()
                tail = _log_tail(self.log_path)
                if "Address already in use" in tail:
                    raise _PortInUseError(f"port {self.port} is in use")
                raise HarnessError(
                    f"the {self.kind} server exited with code {self._proc.returncode} "
                    f"while starting on port {self.port}; its log ends with:\n{tail}"
                )
            if self._ready(self.port):
                return
            time.sleep(0.05)
        self._hard_kill()
        raise HarnessError(
            f"the {self.kind} server did not accept connections on port {self.port} within "
            f"{self._startup_timeout:.0f}s; its log ends with:\n{_log_tail(self.log_path)}"
        )

    def kill(self) -> None:
        if not self.running:
            return
        assert self._proc is not None
        children = _children(self._proc.pid)
        os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        # Orphans of a paused server must run to notice that their parent is gone.
        _signal_all(children, signal.SIGCONT)
        self._orphans = children
        self._paused = []

    def stop(self, mode: str = "fast") -> None:
        try:
            sig = self._stop_signals[mode]
        except KeyError:
            raise HarnessError(
                f"unknown stop mode {mode!r}: use one of {', '.join(self._stop_signals)}"
            ) from None
        if not self.running:
            return
        assert self._proc is not None
        children = _children(self._proc.pid)
        self.resume()
        os.kill(self._proc.pid, sig)
        try:
            self._proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            self._hard_kill()
        _wait_gone(children, timeout=10.0)

    def pause(self) -> None:
        pids = self._pids()
        _signal_all(pids, signal.SIGSTOP)
        self._paused = sorted({*self._paused, *pids})

    def resume(self) -> None:
        _signal_all(sorted({*self._paused, *self._pids()}), signal.SIGCONT)
        self._paused = []

    def _hard_kill(self) -> None:
        if self._proc is None:
            return
        children = _children(self._proc.pid) if self.running else []
        _signal_all([self._proc.pid, *children], signal.SIGKILL)
        _signal_all([self._proc.pid, *children], signal.SIGCONT)
        self._proc.wait()
        _wait_gone([*children, *self._orphans], timeout=5.0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        try:
            if self.running:
                self.stop("immediate")
            _wait_gone(self._orphans, timeout=5.0)
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._hard_kill()
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _make_base_dir(prefix: str, run_as: _RunAs | None) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    if run_as is not None:
        os.chown(base, run_as.uid, run_as.gid)
    return base


# -- PostgreSQL ---------------------------------------------------------------------------------


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _FaultHandles:
    """The fault handles of a test server; they refuse unless the harness started it."""

    _kind: ClassVar[str]
    _factory_fixture: ClassVar[str]
    _control: _Control | None
    host: str
    port: int

    @property
    def owned(self) -> bool:
        """True when the harness started this server (and so may kill, stop or pause it)."""
        return self._control is not None

    def _owned_control(self) -> _Control:
        if self._control is None:
            raise NotOwnedError(
                f"the {self._kind} server at {self.host}:{self.port} was not started by the test "
                "harness, so it cannot be killed, stopped, started or paused: use "
                f"{self._factory_fixture} for a dedicated server"
            )
        return self._control

    def kill(self) -> None:
        """SIGKILL the server (a crash: only what reached its durable storage survives)."""
        self._owned_control().kill()

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (see the class for the modes) and wait."""
        self._owned_control().stop(mode)

    def start(self) -> None:
        """Start it again on the same port and data; return once it answers."""
        self._owned_control().start()

    def restart(self, mode: str = "fast") -> None:
        control = self._owned_control()
        control.stop(mode)
        control.start()

    def pause(self) -> None:
        """SIGSTOP every server process: connections hang, nothing is refused."""
        self._owned_control().pause()

    def resume(self) -> None:
        """SIGCONT every paused server process."""
        self._owned_control().resume()

    def close(self) -> None:
        """Stop and remove an owned server (its data is deleted); nothing for any other."""
        if self._control is not None:
            self._control.close()


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


# -- Redis --------------------------------------------------------------------------------------


@dataclass(eq=False)
class RedisServer(_FaultHandles):
    """A Redis server for tests: where it is, and (when owned) its fault handles.

    ``url`` is ``redis://host:port/0``. ``stop(mode)``: ``"fast"`` (SIGTERM: Redis flushes its
    AOF and exits) or ``"immediate"`` (SIGKILL).
    """

    host: str
    port: int
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    scheme: str = field(default="redis", repr=False)
    _control: _Control | None = field(default=None, repr=False)
    _kind: ClassVar[str] = "Redis"
    _factory_fixture: ClassVar[str] = "fleetmem_redis_factory"

    @classmethod
    def from_url(cls, url: str) -> RedisServer:
        """A server that is already running (never owned: its fault handles refuse)."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise HarnessError(f"not a redis://host:port/db URL: {redact_url(url)}")
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path) if path.isdigit() else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            scheme=parts.scheme,
        )

    @property
    def url(self) -> str:
        return self.url_for(self.db)

    def url_for(self, db: int) -> str:
        """The URL of another logical database on this server."""
        userinfo = ""
        if self.username or self.password is not None:
            userinfo = quote(self.username or "", safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{_host_for_url(self.host)}:{self.port}/{db}"

    def __repr__(self) -> str:
        return f"RedisServer({redact_url(self.url)}, owned={self.owned})"


def _resp_encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def redis_command(host: str, port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command and return its reply's payload (simple, integer or bulk string).

    An error reply raises :class:`HarnessError`. Small on purpose: the harness needs it before any
    client library is known to work.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_resp_encode(*args))
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            buf += chunk
        line, _, rest = buf.partition(b"\r\n")
        kind, payload = line[:1], line[1:]
        if kind == b"-":
            raise HarnessError(f"redis replied with an error: {payload.decode(errors='replace')}")
        if kind != b"$":
            return payload
        length = int(payload)
        if length < 0:
            return b""
        while len(rest) < length + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            rest += chunk
        return rest[:length]


def _redis_answers(host: str, port: int) -> bool:
    try:
        return redis_command(host, port, "PING", timeout=1.0) == b"PONG"
    except (OSError, HarnessError):  # refused, or -LOADING while it reads its AOF
        return False


def find_redis_binary(
    name: str = "redis-server", search_dirs: Sequence[str | os.PathLike[str]] | None = None
) -> Path:
    """``redis-server`` (or ``redis-cli``) on ``PATH`` or in ``search_dirs``."""
    if search_dirs is not None:
        path = os.pathsep.join(str(d) for d in search_dirs)
        where = path or "(nothing)"
    else:
        path = os.environ.get("PATH", "")
        where = "PATH"
    found = shutil.which(name, path=path)
    if found is None:
        raise ServerNotFoundError(
            f"{name} not found in {where}. Install Redis (e.g. apt-get install redis-server), "
            "point FLEETMEM_TEST_REDIS_BIN_DIR at its directory, set "
            "FLEETMEM_TEST_REDIS_URL=redis://host:port/0, or start a Docker engine"
        )
    return Path(found)


def _start_redis_process(
    server_bin: Path,
    *,
    prefix: str,
    options: Mapping[str, str],
    extra_args: Sequence[str],
    cluster_bus: bool = False,
    startup_timeout: float = 30.0,
) -> _LocalProcess:
    base = _make_base_dir(prefix, None)
    try:
        fixed = {
            "bind": _LOCALHOST,
            "dir": str(base),
            "daemonize": "no",
            "protected-mode": "no",
            "logfile": "",  # stdout, which goes to server.log
        }
        fixed_args = [*_flatten(options), *_flatten(fixed), *extra_args]
        control = _LocalProcess(
            kind="Redis",
            argv=lambda port: [str(server_bin), "--port", str(port), *fixed_args],
            base_dir=base,
            ready=lambda port: _redis_answers(_LOCALHOST, port),
            stop_signals=_REDIS_STOP_SIGNALS,
            startup_timeout=startup_timeout,
        )
        control.start_on_free_port(cluster_bus=cluster_bus)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return control


def _flatten(options: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for name, value in options.items():
        args += [f"--{name}", value]
    return args


def start_local_redis(
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    appendonly: bool = False,
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> RedisServer:
    """Start ``redis-server`` in a temporary directory on a free port (no RDB snapshots).

    With ``appendonly=True`` every write goes to the AOF (``appendfsync`` default ``always``), so
    a server killed and started again comes back with its data. ``extra_args`` are appended to
    the command line (``["--maxmemory", "10mb"]``).
    """
    server_bin = find_redis_binary("redis-server", search_dirs)
    options = {
        "save": "",
        "appendonly": "yes" if appendonly else "no",
        "appendfsync": appendfsync,
    }
    control = _start_redis_process(
        server_bin,
        prefix="fleetmem-redis-",
        options=options,
        extra_args=extra_args,
        startup_timeout=startup_timeout,
    )
    return RedisServer(host=_LOCALHOST, port=control.port, _control=control)


@dataclass(eq=False)
class RedisCluster:
    """A Redis Cluster of masters started by the harness (``servers`` hold the fault handles)."""

    servers: list[RedisServer]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(server.host, server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """``redis://host:port`` of the first node (a cluster client discovers the others)."""
        first = self.servers[0]
        return f"redis://{_host_for_url(first.host)}:{first.port}"

    @property
    def owned(self) -> bool:
        return all(server.owned for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def start_local_redis_cluster(
    *,
    masters: int = 3,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    timeout: float = 60.0,
) -> RedisCluster:
    """Start ``masters`` cluster-enabled nodes on free ports and join them with ``redis-cli``."""
    server_bin = find_redis_binary("redis-server", search_dirs)
    cli_bin = find_redis_binary("redis-cli", search_dirs)
    servers: list[RedisServer] = []
    try:
        for _ in range(masters):
            control = _start_redis_process(
                server_bin,
                prefix="fleetmem-redis-cluster-",
                options={
                    "save": "",
                    "appendonly": "no",
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": "5000",
                },
                extra_args=(),
                cluster_bus=True,
            )
            servers.append(RedisServer(host=_LOCALHOST, port=control.port, _control=control))
        create = subprocess.run(
            [
                str(cli_bin),
                "--cluster",
                "create",
                *(f"{s.host}:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise HarnessError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
        deadline = time.monotonic() + timeout
        pending = list(servers)
        while pending and time.monotonic() < deadline:
            pending = [
                s
                for s in pending
                if b"cluster_state:ok" not in redis_command(s.host, s.port, "CLUSTER", "INFO")
            ]
            if pending:
                time.sleep(0.1)
        if pending:
            raise HarnessError(f"the Redis Cluster did not reach cluster_state:ok in {timeout}s")
    except BaseException:
        for server in servers:
            server.close()
        raise
    return RedisCluster(servers)


# -- Docker (testcontainers) --------------------------------------------------------------------


def docker_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping (fast False when there is no socket at all).

    ``FLEETMEM_TEST_DOCKER=0`` turns containers off even when Docker runs.
    """
    if os.environ.get("FLEETMEM_TEST_DOCKER", "").lower() in ("0", "false", "no", "off"):
        return False
    if not os.environ.get("DOCKER_HOST"):
        sockets = [
            Path("/var/run/docker.sock"),
            Path.home() / ".docker/run/docker.sock",
            Path.home() / ".docker/desktop/docker.sock",
        ]
        if not any(path.exists() for path in sockets):
            return False
    try:
        docker = importlib.import_module("docker")
    except ImportError:
        return False
    with warnings.catch_warnings():
        # A failed docker.from_env() leaves an unclosed socket to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=max(1, round(timeout)))
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


class _ContainerControl:
    """Fault handles of a testcontainers container (ports bound fixed, so restarts keep them)."""

    def __init__(
        self,
        container: Any,
        *,
        ready: Callable[[], bool],
        stop_signals: Mapping[str, str],
        startup_timeout: float = 60.0,
    ) -> None:
        self._container = container
        self._ready = ready
        self._stop_signals = stop_signals
        self._startup_timeout = startup_timeout
        self._closed = False
        _LIVE.append(self)

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(0.1)
        raise HarnessError(f"the container did not answer within {self._startup_timeout:.0f}s")

    def kill(self) -> None:
        self._wrapped().kill(signal="SIGKILL")
        self._wrapped().wait(timeout=30)

    def stop(self, mode: str = "fast") -> None:
        try:
            sig = self._stop_signals[mode]
        except KeyError:
            raise HarnessError(
                f"unknown stop mode {mode!r}: use one of {', '.join(self._stop_signals)}"
            ) from None
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status == "paused":
            wrapped.unpause()
        if wrapped.status in ("running", "paused"):
            wrapped.kill(signal=sig)
            wrapped.wait(timeout=60)

    def start(self) -> None:
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status != "running":
            wrapped.start()
        self._wait_ready()

    def pause(self) -> None:
        self._wrapped().pause()

    def resume(self) -> None:
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status == "paused":
            wrapped.unpause()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        self._container.stop()


def _start_container(container: Any, internal_port: int) -> tuple[Any, str, int]:
    """Start ``container`` with ``internal_port`` bound to a free host port (retry if taken)."""
    last: Exception | None = None
    for _ in range(_START_ATTEMPTS):
        host_port = find_free_port()
        container.with_bind_ports(internal_port, host_port)
        try:
            container.start()
        except Exception as exc:  # the Docker SDK's APIError on a port conflict
            message = str(exc).lower()
            if (
                "port is already allocated" not in message
                and "address already in use" not in message
            ):
                raise
            last = exc  # the created-but-unstarted container is left to testcontainers' reaper
            continue
        return container, container.get_container_host_ip(), host_port
    raise HarnessError("could not bind a free host port for the container") from last


def start_postgres_container(image: str = POSTGRES_IMAGE) -> PostgresServer:
    """A throwaway PostgreSQL container (trust auth, user and database ``postgres``)."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.postgres import PostgresContainer
    # The image wants a password; trust auth makes it unused, so the DSN carries none.
    container = PostgresContainer(
        image,
        username="postgres",
        password="unused",  # noqa: S106
        dbname="postgres",
        driver=None,
    ).with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
    container, host, port = _start_container(container, 5432)
    control = _ContainerControl(
        container,
        ready=lambda: postgres_accepts(host, port, "postgres", "postgres"),
        stop_signals={"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"},
    )
    server = PostgresServer(
        host=host, port=port, user="postgres", database="postgres", _control=control
    )
    control.start()  # wait until it answers through the bound port
    return server


def start_redis_container(
    image: str = REDIS_IMAGE,
    *,
    appendonly: bool = False,
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """A throwaway Redis container; with ``appendonly`` its AOF survives kill and start."""
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.redis import RedisContainer
    command = [
        "redis-server",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        appendfsync,
        *extra_args,
    ]
    container = RedisContainer(image).with_command(command)
    container, host, port = _start_container(container, 6379)
    control = _ContainerControl(
        container,
        ready=lambda: _redis_answers(host, port),
        stop_signals={"smart": "SIGTERM", "fast": "SIGTERM", "immediate": "SIGKILL"},
    )
    control.start()
    return RedisServer(host=host, port=port, _control=control)


# -- provider order -----------------------------------------------------------------------------


def new_postgres_server(
    *,
    durable: bool = False,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    use_docker: bool | None = None,
) -> PostgresServer:
    """A new owned PostgreSQL server: a container when Docker answers, else local binaries.

    Raises :class:`ServerNotFoundError` (with how to get a server) when neither is available.
    """
    if use_docker is None:
        use_docker = docker_available()
    if use_docker:
        return start_postgres_container()
    return start_local_postgres(search_dirs=search_dirs, durable=durable)


def new_redis_server(
    *,
    appendonly: bool = False,
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    use_docker: bool | None = None,
) -> RedisServer:
    """A new owned Redis server: a container when Docker answers, else ``redis-server``."""
    if use_docker is None:
        use_docker = docker_available()
    if use_docker:
        return start_redis_container(
            appendonly=appendonly, appendfsync=appendfsync, extra_args=extra_args
        )
    return start_local_redis(
        search_dirs=search_dirs,
        appendonly=appendonly,
        appendfsync=appendfsync,
        extra_args=extra_args,
    )
