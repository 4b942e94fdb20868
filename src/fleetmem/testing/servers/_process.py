"""Local server processes: free ports, process control, run-as and fault handles."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from fleetmem.errors import ConfigurationError

__all__ = ["HarnessError", "NotOwnedError", "ServerNotFoundError", "find_free_port"]

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


def stop_signal(signals: Mapping[str, Any], mode: str) -> Any:
    """The signal of stop ``mode`` in ``signals``; ``HarnessError`` naming the modes if unknown."""
    try:
        return signals[mode]
    except KeyError:
        raise HarnessError(f"unknown stop mode {mode!r}: use one of {', '.join(signals)}") from None


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
        owns: Callable[[int, int], bool] | None = None,
        run_as: _RunAs | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.kind = kind
        self.port = 0
        self.base_dir = base_dir
        self.log_path = base_dir / "server.log"
        self._argv = argv
        self._ready = ready
        self._owns = owns
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
            if self._ready(self.port) and self._answers_itself():
                return
            time.sleep(0.05)
        self._hard_kill()
        raise HarnessError(
            f"the {self.kind} server did not accept connections on port {self.port} within "
            f"{self._startup_timeout:.0f}s; its log ends with:\n{_log_tail(self.log_path)}"
        )

    def _answers_itself(self) -> bool:
        """Whether the server answering on the port is this process, not another one.

        A free port can be taken by another server (a parallel test run's, or another test's
        restarted server) between ``find_free_port`` and the bind; the probe would then reach
        that server while this one is still starting, about to exit with "Address already in
        use". Until this process is the one that answers, the start goes on waiting (and ends
        in ``_PortInUseError`` when the process exits).
        """
        assert self._proc is not None
        return self._owns is None or self._owns(self.port, self._proc.pid)

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
        sig = stop_signal(self._stop_signals, mode)
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
