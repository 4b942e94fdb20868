"""Helpers for the tests of ``fleetmem serve`` as users meet it: a real uvicorn process on a
free port, a tokens file made with the library, real HTTP.

:func:`running_service` starts ``fleetmem serve`` as a subprocess with a tokens file of the
tokens it is given (made with :func:`fleetmem.service.auth.new_token` and friends, so the file
holds digests only), waits for ``/healthz``, yields a :class:`ServiceProcess` (base URL, the
tokens by label, the server's log), and stops it with SIGTERM, asserting that it exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleetmem.service.auth import append_entry, make_entry, new_token

__all__ = [
    "CLI",
    "DEFAULT_TOKENS",
    "LEAK_MARKERS",
    "ServiceProcess",
    "SseEvent",
    "TokenSpec",
    "assert_no_leak",
    "assert_problem",
    "free_port",
    "hybrid_url",
    "openapi_operations",
    "raw_request",
    "read_sse",
    "running_service",
    "start_service",
    "stop_service",
    "unique",
]

#: How the tests run the CLI: the installed entry point's function, under this interpreter.
CLI = (sys.executable, "-c", "from fleetmem.cli import main; raise SystemExit(main())")

#: Text no response body may hold: a stack trace or a driver's class or module name.
LEAK_MARKERS = (
    "Traceback",
    'File "',
    "asyncpg",
    "redis.exceptions",
    "psycopg",
    "sqlite3.",
    "OperationalError",
    "ConnectionRefusedError",
)


@dataclass(frozen=True)
class TokenSpec:
    """A token to put in the tokens file: the namespace globs it may use and its scope."""

    globs: tuple[str, ...]
    scope: str


#: The tokens most tests use, by label. ``team-*`` at each scope, an admin for ``other-*``
#: (to make data the ``team-*`` tokens must not see), one for the bare name ``team`` and one
#: for the schema fuzzing's ``fuzz-*``.
DEFAULT_TOKENS: dict[str, TokenSpec] = {
    "read": TokenSpec(("team-*",), "read"),
    "write": TokenSpec(("team-*",), "write"),
    "admin": TokenSpec(("team-*",), "admin"),
    "other-admin": TokenSpec(("other-*",), "admin"),
    "exact": TokenSpec(("team",), "admin"),
    "fuzz": TokenSpec(("fuzz-*",), "admin"),
}


@dataclass
class ServiceProcess:
    """A running ``fleetmem serve``."""

    base_url: str
    port: int
    tokens: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path
    store_url: str
    returncode: int | None = field(default=None)

    def headers(self, label: str | None) -> dict[str, str]:
        """The ``Authorization`` header of the token ``label`` (none for ``None``)."""
        if label is None:
            return {}
        return {"Authorization": f"Bearer {self.tokens[label]}"}

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    """A namespace name beginning with ``prefix`` that no other run uses."""
    return f"{prefix}{secrets.token_hex(4)}"


def hybrid_url(postgres_dsn: str, redis_url: str) -> str:
    return f"hybrid+{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}cache={redis_url}"


def _write_tokens(path: Path, specs: Mapping[str, TokenSpec]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for label, spec in specs.items():
        token = new_token()
        append_entry(path, make_entry(token, spec.globs, spec.scope, name=label))
        tokens[label] = token
    return tokens


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMEM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


_IN_USE = re.compile(r"address already in use|errno 98|\[Errno 48\]", re.IGNORECASE)


def start_service(
    directory: Path,
    url: str,
    tokens: Mapping[str, TokenSpec] | None = None,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 60.0,
    attempts: int = 5,
) -> ServiceProcess:
    """Start ``fleetmem serve --url url`` on a free port of 127.0.0.1 with a tokens file of
    ``tokens`` (default :data:`DEFAULT_TOKENS`) and return once ``/healthz`` answers ``200``.

    A port taken between choosing it and binding it is retried on another one."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens_file = directory / f"tokens-{secrets.token_hex(3)}.toml"
    issued = _write_tokens(tokens_file, DEFAULT_TOKENS if tokens is None else tokens)
    last_log = ""
    for attempt in range(attempts):
        port = free_port()
        log_path = directory / f"serve-{port}-{attempt}.log"
        command = [
            *CLI,
            "serve",
            "--url",
            url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tokens",
            str(tokens_file),
            *args,
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_child_env(env),
            )
        service = ServiceProcess(
            f"http://127.0.0.1:{port}", port, issued, process, log_path, store_url=url
        )
        if _wait_healthy(service, startup_timeout):
            return service
        last_log = service.log()
        if process.poll() is None:
            process.kill()
            process.wait(10)
            raise AssertionError(
                f"fleetmem serve did not answer /healthz within {startup_timeout} s:\n{last_log}"
            )
        if not _IN_USE.search(last_log):
            raise AssertionError(
                f"fleetmem serve exited with {process.returncode} before answering:\n{last_log}"
            )
    raise AssertionError(f"no free port after {attempts} attempts:\n{last_log}")


def _wait_healthy(service: ServiceProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                return False
            try:
                if client.get(f"{service.base_url}/healthz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    return False


def stop_service(service: ServiceProcess, *, timeout: float = 30.0, signal_it: bool = True) -> int:
    """SIGTERM (unless ``signal_it`` is false: the caller sent it already, and a second one
    during the last steps of a graceful stop would kill the process), then wait up to
    ``timeout`` seconds for the exit status (killed and reported as a failure when it does not
    exit)."""
    process = service.process
    if process.poll() is None:
        if signal_it:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(
                f"fleetmem serve did not exit within {timeout} s of SIGTERM:\n{service.log_tail()}"
            ) from None
    service.returncode = process.returncode
    return process.returncode


@contextlib.contextmanager
def running_service(
    directory: Path,
    url: str,
    tokens: Mapping[str, TokenSpec] | None = None,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ServiceProcess]:
    """:func:`start_service`, then on exit SIGTERM and the assertion of a clean exit: status 0
    and no traceback in the server's log."""
    service = start_service(directory, url, tokens, args=args, env=env)
    try:
        yield service
    except BaseException:
        stop_service(service)
        raise
    status = stop_service(service)
    log = service.log()
    problems = []
    if "Traceback" in log:
        problems.append("the server logged a traceback")
    if any("internal error" in line for line in log.splitlines()):
        problems.append("the server answered 500 (internal error)")
    if status != 0:
        problems.append(f"it exited with status {status} after SIGTERM (expected 0)")
    assert not problems, f"fleetmem serve: {'; '.join(problems)}. Its log:\n{log[-6000:]}"


# ------------------------------------------------------------------ checks


def assert_no_leak(text: str, secrets_: Sequence[str] = ()) -> None:
    """``text`` (a response body) holds no stack trace, driver name or secret."""
    for marker in LEAK_MARKERS:
        assert marker not in text, f"a response holds {marker!r}: {text[:500]}"
    for secret in secrets_:
        if secret:
            assert secret not in text, f"a response holds a secret ({secret[:12]}…): {text[:500]}"


def assert_problem(
    response: httpx.Response, status: int, type_: str | None = None
) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with ``status`` (and ``type_``); its body."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.raw_path!r}: expected {status}, "
        f"got {response.status_code}: {response.text[:500]}"
    )
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/problem+json"), content_type
    body = response.json()
    assert isinstance(body, dict), body
    for name, kind in (("type", str), ("title", str), ("status", int), ("detail", str)):
        assert isinstance(body.get(name), kind), f"problem field {name!r}: {body}"
    assert body["status"] == status, body
    if type_ is not None:
        assert body["type"] == type_, body
    assert_no_leak(response.text)
    return body


def openapi_operations(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(METHOD, path template)`` of every operation of an OpenAPI document."""
    methods = ("get", "put", "post", "delete", "patch", "head", "options")
    return sorted(
        (method.upper(), path)
        for path, item in document.get("paths", {}).items()
        for method in methods
        if method in item
    )


# ------------------------------------------------------------------ raw HTTP and SSE


async def raw_request(
    port: int, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request whose request target is sent exactly as given (no client
    normalises ``..`` segments away): ``(status, headers, body)``."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("PUT", "POST"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers[name.strip().lower()] = value.strip()
    if response_headers.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    return int(status_line.split()[1]), response_headers, payload


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_text, _, rest = data.partition(b"\r\n")
        size = int(size_text.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


@dataclass(frozen=True)
class SseEvent:
    """One Server-Sent Event: its ``id``, ``event`` name and ``data`` (lines joined)."""

    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def read_sse(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The events of a ``text/event-stream`` response, as the SSE specification parses them
    (comments skipped; an event without data is not dispatched)."""
    event_id: str | None = None
    name = ""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(event_id, name or "message", "\n".join(data))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        fieldname, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if fieldname == "id":
            event_id = value
        elif fieldname == "event":
            name = value
        elif fieldname == "data":
            data.append(value)
