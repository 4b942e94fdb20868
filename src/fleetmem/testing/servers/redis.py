"""Redis servers: the server handle, a minimal RESP client, and local redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit

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
)

__all__ = ["RedisServer", "find_redis_binary", "redis_command", "start_local_redis"]

#: Redis saves and exits on SIGTERM; "immediate" gives it no chance to (SIGKILL).
_REDIS_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGTERM,
    "immediate": signal.SIGKILL,
}


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


def _redis_is_process(host: str, port: int, pid: int) -> bool:
    """Whether the Redis answering on ``port`` is process ``pid`` (``INFO server``)."""
    try:
        info = redis_command(host, port, "INFO", "server", timeout=1.0)
    except (OSError, HarnessError):
        return False
    lines = info.decode(errors="replace").splitlines()
    return any(line.strip() == f"process_id:{pid}" for line in lines)


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
            owns=lambda port, pid: _redis_is_process(_LOCALHOST, port, pid),
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
