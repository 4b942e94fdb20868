"""``--only service``: the HTTP service's KV ``GET`` and ``PUT`` against the same loop calling
the library in-process, on every backend (memory, SQLite, PostgreSQL, Redis, hybrid).

Three processes per measurement, so that no side pays for the other's Python:

* the **server**: ``create_app(url, tokens=FILE, metrics=False)`` (and a second one with
  ``metrics=True``, to show what the Prometheus/OpenTelemetry instrumentation costs) served by
  ``uvicorn.run(app, workers=1, log_level="warning", access_log=False)`` in a process of its
  own (uvloop and httptools, as ``uvicorn[standard]`` installs them), with a tokens file of one
  ``write`` token for ``bench-service-*``: auth is on, as in production;
* the **load client**: a process of its own holding an ``aiohttp`` ``ClientSession`` with a
  ``TCPConnector(limit=64)``: 64 keep-alive connections, each a coroutine sending
  ``GET /v1/ns/bench-service-<backend>/kv/<key>`` (or ``PUT`` with ``{"value": VALUE}``) one
  request after the other for a fixed time, timing each request from before it is sent to
  after the whole body is read;
* the **library loop**: in this process, 64 coroutines doing ``await store.get(key)`` (or
  ``store.set(key, VALUE)``) for the same time on the same keys.

Every side cycles through the same 1,000 keys (each of the ~200-byte
:data:`~suite.workloads.VALUE`); worker ``w`` starts at key ``w * 131``. Per repetition each
subject runs once per operation, the order rotating repetition by repetition (like
:func:`~suite.timing.alternate`), so the machine's drift weighs on every side alike. The
library and both servers have their store open the whole time; the idle ones cost nothing.

When ``wrk`` is on ``PATH``, the service (without metrics) is also loaded with ``wrk -t1 -c64
--latency`` (a Lua script cycles through the same keys and makes the ``PUT``), a client written
in C, to show whether the aiohttp client limits the figures: on a machine with fewer cores
than processes, every microsecond of CPU the client spends is one the server does not get.
Without wrk those rows are missing (and the notes say which client made each figure). The
client's and the server's CPU time per run (``getrusage`` in the client,
``/proc/<pid>/stat`` for the server, ``RUSAGE_CHILDREN`` for wrk) are rows too: a client near
one full core would be the bottleneck, a server near one full core is (one worker is one core).

A second, smaller pair (``1 client``): one coroutine calling ``store.get`` back to back
against one keep-alive connection sending ``GET``\\ s back to back; latency-bound rather than
CPU-bound, it shows what one HTTP round trip adds to one call.

Rows (medians over the repetitions; min and max in the JSON), subjects ``library``,
``service``, ``service+metrics`` and ``wrk``:

* ``<backend> service get 64 clients`` / ``... put 64 clients`` (ops/s, requests/s), with
  ``... p50`` and ``... p99`` (µs; client-side per request / per call);
* ``<backend> service get 64 clients client cpu`` / ``... server cpu`` (% of one core);
* ``<backend> service get 1 client`` (ops/s) and ``... p50`` (µs).

The targets of the contract (``docs/SERVICE.md``'s "Limits and load") are notes with their
figure and verdict, never assertions: ``GET`` through the service ≥ 0.5x the library loop's
throughput (one worker), and p99 ≤ 5x p50 with 64 clients, for ``GET`` and for the all-``PUT``
load. Non-2xx answers (a ``503`` shedding load, say) are counted and noted.

``FLEETMEM_BENCH_SERVICE_PROFILE=DIR`` runs every server under ``cProfile`` (timing CPU time,
not wall time) and writes ``DIR/<backend>-<metrics|plain>.prof`` when it stops (the figures of
such a run are not comparable: the profiler roughly doubles the server's cost per request).

Decisions: the service's ``GET`` answers the entry with its metadata (``get_entry``), the
library loop calls ``get`` as the contract's wording says; both read one row / one hash, the
difference is a few microseconds of Python, which a note states. The memory store lives in
each process: every server is filled with the keys through ``PUT`` before it is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fleetmem.errors import FleetmemError

from .timing import load_average
from .workloads import FULL, SMOKE, VALUE, Bench

BACKENDS = ("memory", "sqlite", "postgres", "redis", "hybrid")
#: The namespace of each backend: this and the backend's name (the token's glob is ``-*``).
NAMESPACE = "bench-service"
CLIENTS = 64
KEY_COUNT = 1000
#: Seconds of each timed load: full run, ``--quick``, ``--smoke``.
DURATIONS = {"full": 1.25, "quick": 1.0, "smoke": 0.2}
#: Seconds of each one-client (sequential) load, and of the warm-up loads.
SEQUENTIAL_SHARE = 0.5
WARM_UP = 0.5
#: The contract's bounds.
THROUGHPUT_BOUND = 0.5
TAIL_BOUND = 5.0
STEPS_PER_BACKEND = 2
SUITE_DIR = Path(__file__).resolve().parents[1]
PROFILE_ENV = "FLEETMEM_BENCH_SERVICE_PROFILE"

PUT_BODY = orjson.dumps({"value": VALUE})


def service_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs))


def _key(i: int) -> str:
    return f"k{i:05d}"


KEYS = [_key(i) for i in range(KEY_COUNT)]


def _duration(bench: Bench) -> float:
    if bench.sizes == SMOKE:
        return DURATIONS["smoke"]
    return DURATIONS["full"] if bench.sizes == FULL else DURATIONS["quick"]


def _percentiles(lat: array[int]) -> tuple[float, float]:
    """(p50, p99) in µs of latencies in ns."""
    if not lat:
        return float("nan"), float("nan")
    ordered = sorted(lat)
    return ordered[len(ordered) // 2] / 1000.0, ordered[int(len(ordered) * 0.99)] / 1000.0


# --------------------------------------------------------------------------- the library loop


async def library_load(
    op: Callable[[str], Awaitable[Any]], clients: int, duration: float
) -> dict[str, float]:
    """``clients`` coroutines calling ``op(key)`` back to back for ``duration`` seconds."""
    clock = time.perf_counter_ns
    lat: array[int] = array("q")
    deadline = clock() + int(duration * 1e9)

    async def worker(w: int) -> None:
        i = w * 131
        while clock() < deadline:
            key = KEYS[i % KEY_COUNT]
            i += 1
            t0 = clock()
            await op(key)
            lat.append(clock() - t0)

    start = clock()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = (clock() - start) / 1e9
    p50, p99 = _percentiles(lat)
    return {"rate": len(lat) / wall, "p50": p50, "p99": p99, "n": float(len(lat))}


# --------------------------------------------------------------------------- the load client


async def _client_load(
    session: Any, base: str, namespace: str, op: str, clients: int, duration: float
) -> dict[str, Any]:
    """In the client process: ``clients`` coroutines sending requests for ``duration`` s."""
    import yarl

    urls = [yarl.URL(f"{base}/v1/ns/{namespace}/kv/{key}", encoded=True) for key in KEYS]
    headers = {"Content-Type": "application/json"}
    clock = time.perf_counter_ns
    lat: array[int] = array("q")
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    put = op in ("put", "fill")
    deadline = clock() + int(duration * 1e9)
    fill = iter(urls) if op == "fill" else None  # every key once, then stop

    async def worker(w: int) -> None:
        i = w * 131
        while clock() < deadline:
            if fill is None:
                url = urls[i % KEY_COUNT]
                i += 1
            else:
                next_url = next(fill, None)
                if next_url is None:
                    return
                url = next_url
            t0 = clock()
            try:
                request = (
                    session.put(url, data=PUT_BODY, headers=headers) if put else (session.get(url))
                )
                async with request as response:
                    await response.read()
                    status = response.status
            except Exception as exc:  # a refused or reset connection: counted, not fatal
                failures[type(exc).__name__] += 1
                continue
            lat.append(clock() - t0)
            if status >= 300:
                statuses[status] += 1

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = clock()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = (clock() - start) / 1e9
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    p50, p99 = _percentiles(lat)
    return {
        "rate": len(lat) / wall,
        "p50": p50,
        "p99": p99,
        "n": len(lat),
        "cpu": 100.0 * cpu / wall,
        "statuses": {str(k): v for k, v in statuses.items()},
        "failures": dict(failures),
    }


async def _client_main() -> None:
    """The load client process: one JSON command per stdin line, one JSON answer per line.

    ``{"cmd": "load", "base", "token", "namespace", "op": "get"|"put"|"fill", "clients",
    "duration"}`` (``fill``: one ``PUT`` of every key); ``{"cmd": "close", "base",
    "clients"}`` closes that session; EOF ends."""
    import aiohttp

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sessions: dict[tuple[str, int], Any] = {}
    try:
        while line := await reader.readline():
            command = json.loads(line)
            where = (command["base"], command["clients"])
            if command["cmd"] == "close":
                session = sessions.pop(where, None)
                if session is not None:
                    await session.close()
                answer: dict[str, Any] = {"ok": True}
            else:
                session = sessions.get(where)
                if session is None:
                    session = sessions[where] = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(
                            limit=command["clients"], limit_per_host=command["clients"]
                        ),
                        headers={"Authorization": f"Bearer {command['token']}"},
                    )
                answer = await _client_load(
                    session,
                    command["base"],
                    command["namespace"],
                    command["op"],
                    command["clients"],
                    command["duration"],
                )
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for session in sessions.values():
            await session.close()


class _Client:
    """The parent's handle on the load client process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> _Client:
        process = await asyncio.create_subprocess_exec(
            *_child_command("client"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        return cls(process)

    async def call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the load client exited (status {await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


def _child_command(*args: str) -> list[str]:
    """A child process of the section: this module's :func:`_main` with ``args`` (run through
    ``-c``, not ``-m``: the package ``suite`` imports this module before ``-m`` would run it)."""
    code = (
        f"import sys; sys.path.insert(0, {str(SUITE_DIR)!r}); from suite.service import _main; "
        "raise SystemExit(_main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]


def _child_env() -> dict[str, str]:
    return dict(os.environ)


# --------------------------------------------------------------------------- the server


def _serve_main(config: dict[str, Any]) -> None:
    """The server process: the app on one uvicorn worker (see the module)."""
    import uvicorn

    from fleetmem.service import create_app

    app = create_app(config["url"], tokens=config["tokens"], metrics=config["metrics"])

    def serve() -> None:
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=config["port"],
            workers=1,
            log_level="warning",
            access_log=False,
        )

    if not config.get("profile"):
        serve()
        return
    import cProfile

    # uvicorn re-raises the SIGTERM it handled once it has shut down: with the default handler
    # that would end the process before the profile is written.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # CPU time, not wall time: on a shared machine a wall-clock profile charges a socket write
    # with the time the process waited for a core.
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        serve()
    finally:
        profiler.disable()
        profiler.dump_stats(config["profile"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    port: int
    label: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls, url: str, tokens: Path, metrics: bool, label: str, profile: Path | None
    ) -> _Server:
        port = _free_port()
        config = {
            "url": url,
            "tokens": str(tokens),
            "metrics": metrics,
            "port": port,
            "profile": str(profile) if profile else None,
        }
        process = await asyncio.create_subprocess_exec(
            *_child_command("serve", json.dumps(config)), env=_child_env()
        )
        server = cls(process, port, label)
        deadline = time.monotonic() + 60
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"the {label} server exited ({process.returncode})")
            with contextlib.suppress(OSError, IndexError, ValueError):
                if await _http_status(port, "/readyz") == 200:
                    return server
            if time.monotonic() > deadline:
                await server.stop()
                raise RuntimeError(f"the {label} server was not ready within 60 s")
            await asyncio.sleep(0.1)

    def cpu_seconds(self) -> float | None:
        """The server process's CPU time so far (Linux ``/proc``; ``None`` elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()


# --------------------------------------------------------------------------- wrk


_WRK_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _wrk_micros(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if found is None:
        raise ValueError(text)
    return float(found.group(1)) * _WRK_UNITS[found.group(2)]


def _wrk_script(folder: Path, namespace: str, op: str) -> Path:
    """The Lua script that makes wrk cycle through :data:`KEYS` like the other clients (and,
    for ``put``, send ``PUT`` with :data:`PUT_BODY`)."""
    path = folder / f"{op}.lua"
    lines = []
    if op == "put":
        body = PUT_BODY.decode().replace("\\", "\\\\").replace('"', '\\"')
        lines += [
            'wrk.method = "PUT"',
            f'wrk.body = "{body}"',
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    lines += [
        "local i = 0",
        "request = function()",
        f"  i = (i + 1) % {KEY_COUNT}",
        f'  return wrk.format(nil, string.format("/v1/ns/{namespace}/kv/k%05d", i))',
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _wrk(
    wrk: str,
    server: _Server,
    token: str,
    namespace: str,
    duration: float,
    script: Path,
) -> dict[str, Any]:
    """``wrk -t1 -c64 --latency -s script``: ``GET`` or ``PUT`` (see :func:`_wrk_script`)."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = server.cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        wrk,
        "-t1",
        f"-c{CLIENTS}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        "-H",
        f"Authorization: Bearer {token}",
        f"{server.base}/v1/ns/{namespace}/kv/{KEYS[0]}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), seconds + 30)
    cpu1 = server.cpu_seconds()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode()
    rate = re.search(r"Requests/sec:\s*([\d.]+)", text)
    p50 = re.search(r"^\s*50%\s+(\S+)", text, re.MULTILINE)
    p99 = re.search(r"^\s*99%\s+(\S+)", text, re.MULTILINE)
    if process.returncode != 0 or rate is None or p50 is None or p99 is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode()[:200]}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "rate": float(rate.group(1)),
        "p50": _wrk_micros(p50.group(1)),
        "p99": _wrk_micros(p99.group(1)),
        "cpu": 100.0 * cpu / seconds,
        "server_cpu": None if cpu0 is None or cpu1 is None else 100.0 * (cpu1 - cpu0) / seconds,
        "statuses": {"non-2xx": int(non2xx.group(1))} if non2xx else {},
        "failures": {},
    }


# --------------------------------------------------------------------------- the section


@dataclass
class _Figures:
    """One backend's figures: per (workload, subject, figure), a value per repetition."""

    values: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, workload: str, subject: str, result: dict[str, Any]) -> None:
        for name in ("rate", "p50", "p99", "cpu", "server_cpu"):
            value = result.get(name)
            if value is not None:
                self.values.setdefault((workload, subject, name), []).append(float(value))
        for status, count in {**result.get("statuses", {}), **result.get("failures", {})}.items():
            self.errors[f"{subject} {workload}: {status}"] += count

    def median(self, workload: str, subject: str, name: str) -> float:
        values = self.values.get((workload, subject, name))
        return statistics.median(values) if values else float("nan")


def _store_url(backend: str, folder: Path, dsn: str | None, url: str | None) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{folder / 'service.db'}"
    if backend == "postgres":
        assert dsn is not None
        return dsn
    if backend == "redis":
        assert url is not None
        return url
    assert dsn is not None and url is not None
    return f"hybrid+{dsn}{'&' if '?' in dsn else '?'}cache={url}"


async def bench_service(bench: Bench, dsn: str | None, url: str | None) -> None:
    """Each backend whose servers are given: the library loop, the service without and with
    metrics, and wrk when present."""
    notes = bench.report.notes
    try:
        import aiohttp  # noqa: F401
        import uvicorn  # noqa: F401

        import fleetmem.service  # noqa: F401
    except ImportError as exc:
        notes.append(f"service skipped: {exc} (pip install -e '.[bench,service]')")
        return
    duration = _duration(bench)
    wrk = shutil.which("wrk")
    loop_kind = "uvloop" if _importable("uvloop") else "asyncio"
    http_kind = "httptools" if _importable("httptools") else "h11"
    notes.append(
        f"service: KV GET and PUT of a ~200-byte JSON value over {KEY_COUNT:,} keys, "
        f"{CLIENTS} concurrent clients, {duration:g} s per load and repetition "
        f"({bench.reps} repetitions, the order rotating); server: create_app(url, tokens=one "
        f"write token) on uvicorn, one worker, {loop_kind} + {http_kind}, access log off; "
        f"client: aiohttp, {CLIENTS} keep-alive connections, in its own process"
        + (
            f"; wrk -t1 -c{CLIENTS} --latency (a Lua script cycling through the same keys) "
            "as a second client (subject wrk, metrics off)"
            if wrk
            else "; wrk not on PATH: aiohttp is the only client"
        )
        + "; library: the same loop calling store.get / store.set in-process"
    )
    notes.append(
        f"service: {os.cpu_count()} CPUs for the server process, the load client and (for "
        "PostgreSQL, Redis and the hybrid) the database servers: they compete for the cores, "
        "so the service's figures are those of a shared machine; the library loop has the "
        "database servers alone for company"
    )
    profile_dir = os.environ.get(PROFILE_ENV)
    load_before = load_average()
    took: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleetmem-bench-service-") as tmp:
        folder = Path(tmp)
        token = _tokens_file(folder / "tokens.toml")
        client = await _Client.start()
        try:
            for backend in BACKENDS:
                if backend in ("postgres", "hybrid") and dsn is None:
                    continue
                if backend in ("redis", "hybrid") and url is None:
                    continue
                started = time.monotonic()
                run = _Run(
                    bench,
                    backend,
                    _store_url(backend, folder, dsn, url),
                    folder,
                    token,
                    client,
                    duration,
                    wrk,
                    Path(profile_dir) if profile_dir else None,
                )
                try:
                    await run.measure()
                except (OSError, RuntimeError, FleetmemError, asyncio.TimeoutError) as exc:
                    notes.append(f"service: {backend} stopped: {type(exc).__name__}: {exc}")
                    continue
                took.append(f"{backend} {time.monotonic() - started:.0f} s")
                _record(bench, backend, run.figures)
        finally:
            await client.close()
    notes.append("service: time per backend: " + ", ".join(took))
    if load_before:
        notes.append(
            f"service: 1-minute load average {load_before} before the section, "
            f"{load_average()} after"
        )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _tokens_file(path: Path) -> str:
    from fleetmem.service.auth import append_entry, make_entry, new_token

    token = new_token()
    append_entry(path, make_entry(token, [f"{NAMESPACE}-*"], "write", name="bench"))
    return token


class _Run:
    """One backend's measurements."""

    def __init__(
        self,
        bench: Bench,
        backend: str,
        url: str,
        folder: Path,
        token: str,
        client: _Client,
        duration: float,
        wrk: str | None,
        profile: Path | None,
    ) -> None:
        self.bench, self.backend, self.url, self.folder = bench, backend, url, folder
        self.token, self.client, self.duration, self.wrk = token, client, duration, wrk
        self.profile = profile
        self.namespace = f"{NAMESPACE}-{backend}"
        self.figures = _Figures()

    async def measure(self) -> None:
        from fleetmem.factory import open_store

        bench = self.bench
        bench.progress.step(f"service {self.backend}: starting the servers, loading the keys")
        store = await open_store(self.url, namespace=self.namespace)
        servers: list[_Server] = []
        try:
            await store.clear()
            await store.set_many(dict.fromkeys(KEYS, VALUE))
            for metrics in (False, True):
                label = "service+metrics" if metrics else "service"
                profile = None
                if self.profile is not None:
                    self.profile.mkdir(parents=True, exist_ok=True)
                    kind = "metrics" if metrics else "plain"
                    profile = self.profile / f"{self.backend}-{kind}.prof"
                servers.append(
                    await _Server.start(
                        self.url, self.folder / "tokens.toml", metrics, label, profile
                    )
                )
            for server in servers:  # every key written through each server (memory: its own)
                for op in ("fill", "put", "get"):
                    await self._service(server, op, CLIENTS, 60 if op == "fill" else WARM_UP)
            for op in ("get", "set"):
                await library_load(_op(store, op), CLIENTS, WARM_UP)
            bench.progress.step(
                f"service {self.backend}: {bench.reps} repetitions of {self.duration:g} s loads"
            )
            for rep in range(bench.reps):
                await self._repetition(rep, store, servers)
        finally:
            for server in servers:
                with contextlib.suppress(Exception):
                    await self.client.call(
                        {"cmd": "close", "base": server.base, "clients": CLIENTS}, 30
                    )
                    await self.client.call({"cmd": "close", "base": server.base, "clients": 1}, 30)
                await server.stop()
            with contextlib.suppress(FleetmemError):
                await store.clear()
            await store.close()

    async def _repetition(self, rep: int, store: Any, servers: list[_Server]) -> None:
        f = self.figures
        service = servers[0]
        for op in ("get", "put"):
            workload = f"{op} 64 clients"
            subjects: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
                ("library", _bound(library_load, _op(store, op), CLIENTS, self.duration)),
            ]
            for server in servers:
                subjects.append(
                    (server.label, _bound(self._service, server, op, CLIENTS, self.duration))
                )
            if self.wrk is not None:
                script = _wrk_script(self.folder, self.namespace, op)
                wrk = _bound(
                    _wrk, self.wrk, service, self.token, self.namespace, self.duration, script
                )
                subjects.append(("wrk", wrk))
            turn = rep % len(subjects)
            for name, run in subjects[turn:] + subjects[:turn]:
                f.add(workload, name, await run())
        # One client: latency-bound.
        short = max(0.1, self.duration * SEQUENTIAL_SHARE)
        pair: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("library", _bound(library_load, _op(store, "get"), 1, short)),
            ("service", _bound(self._service, service, "get", 1, short)),
        ]
        for name, run in pair[rep % 2 :] + pair[: rep % 2]:
            f.add("get 1 client", name, await run())

    async def _service(
        self, server: _Server, op: str, clients: int, duration: float
    ) -> dict[str, Any]:
        cpu0 = server.cpu_seconds()
        t0 = time.perf_counter()
        result = await self.client.call(
            {
                "cmd": "load",
                "base": server.base,
                "token": self.token,
                "namespace": self.namespace,
                "op": op,
                "clients": clients,
                "duration": duration,
            },
            duration + 60,
        )
        wall = time.perf_counter() - t0
        cpu1 = server.cpu_seconds()
        if cpu0 is not None and cpu1 is not None:
            # The wall time here includes the command's round trip (< 1 ms).
            result["server_cpu"] = 100.0 * (cpu1 - cpu0) / wall
        return result


def _bound(
    fn: Callable[..., Awaitable[dict[str, Any]]], *args: Any
) -> Callable[[], Awaitable[dict[str, Any]]]:
    return lambda: fn(*args)


def _op(store: Any, op: str) -> Callable[[str], Awaitable[Any]]:
    if op == "get":
        return store.get  # type: ignore[no-any-return]

    async def put(key: str) -> Any:
        return await store.set(key, VALUE)

    return put


def _record(bench: Bench, backend: str, f: _Figures) -> None:
    prefix = f"{backend} service"
    subjects = ("library", "service", "service+metrics", "wrk")
    for workload in ("get 64 clients", "put 64 clients", "get 1 client"):
        for name, suffix, unit in (
            ("rate", "", "ops/s"),
            ("p50", " p50", "us"),
            ("p99", " p99", "us"),
            ("cpu", " client cpu", "%core"),
            ("server_cpu", " server cpu", "%core"),
        ):
            if workload == "get 1 client" and name not in ("rate", "p50"):
                continue
            row = {
                s: f.values[(workload, s, name)]
                for s in subjects
                if (workload, s, name) in f.values
            }
            if row:
                bench.record(f"{prefix} {workload}{suffix}", unit, row)
    _notes(bench, backend, f)


def _notes(bench: Bench, backend: str, f: _Figures) -> None:
    notes = bench.report.notes
    med = f.median
    parts = []
    for op in ("get", "put"):
        w = f"{op} 64 clients"
        lib = med(w, "library", "rate")
        svc, svcm = med(w, "service", "rate"), med(w, "service+metrics", "rate")
        parts.append(
            f"{op.upper()} library {lib:,.0f}/s, service {svc:,.0f}/s ({svc / lib:.3f}x), with "
            f"metrics {svcm:,.0f}/s ({svcm / svc:.2f}x the service without); service p50 "
            f"{med(w, 'service', 'p50'):,.0f} µs p99 {med(w, 'service', 'p99'):,.0f} µs; client "
            f"CPU {med(w, 'service', 'cpu'):.0f}% of a core, server "
            f"{med(w, 'service', 'server_cpu'):.0f}%"
        )
    for op in ("get", "put"):
        w = f"{op} 64 clients"
        if (w, "wrk", "rate") not in f.values:
            continue
        wrk_rate = med(w, "wrk", "rate")
        parts.append(
            f"wrk {op.upper()} {wrk_rate:,.0f}/s ({wrk_rate / med(w, 'library', 'rate'):.3f}x the "
            f"library, {wrk_rate / med(w, 'service', 'rate'):.2f}x aiohttp's), p50 "
            f"{med(w, 'wrk', 'p50'):,.0f} µs p99 {med(w, 'wrk', 'p99'):,.0f} µs, wrk CPU "
            f"{med(w, 'wrk', 'cpu'):.0f}%, server {med(w, 'wrk', 'server_cpu'):.0f}%"
        )
    one_lib, one_svc = med("get 1 client", "library", "p50"), med("get 1 client", "service", "p50")
    parts.append(
        f"1 client GET p50 library {one_lib:,.0f} µs, service {one_svc:,.0f} µs (+"
        f"{one_svc - one_lib:,.0f} µs), throughput "
        f"{med('get 1 client', 'service', 'rate') / med('get 1 client', 'library', 'rate'):.3f}x"
    )
    notes.append(f"service: {backend}: " + "; ".join(parts) + " (medians)")
    for subject in ("service", "wrk"):
        if ("get 64 clients", subject, "rate") not in f.values:
            continue
        client = "aiohttp" if subject == "service" else "wrk"
        ratio = med("get 64 clients", subject, "rate") / med("get 64 clients", "library", "rate")
        notes.append(
            f"service target {backend} GET through the service ≥ {THROUGHPUT_BOUND}x the "
            f"library loop (64 clients, one worker; {client} client): {ratio:.3f}x "
            f"({'met' if ratio >= THROUGHPUT_BOUND else 'NOT met'})"
        )
        put = med("put 64 clients", subject, "rate") / med("put 64 clients", "library", "rate")
        notes.append(
            f"service {backend} PUT through the service / the library loop (64 clients; "
            f"{client} client): {put:.3f}x (the contract names GET only)"
        )
    for op in ("get", "put"):
        for subject in ("service", "service+metrics", "wrk"):
            if (f"{op} 64 clients", subject, "p50") not in f.values:
                continue
            w = f"{op} 64 clients"
            tail = med(w, subject, "p99") / med(w, subject, "p50")
            notes.append(
                f"service target {backend} {subject} {op.upper()} p99 ≤ {TAIL_BOUND:g}x p50 "
                f"with {CLIENTS} clients: {tail:.2f}x "
                f"({'met' if tail <= TAIL_BOUND else 'NOT met'})"
            )
    if f.errors:
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(f.errors.items()))
        notes.append(f"service: {backend}: answers other than 2xx or failed requests: {shown}")


def _main(argv: list[str]) -> int:
    """``python -m suite.service serve CONFIG`` / ``client``: the section's child processes."""
    if argv[:1] == ["serve"] and len(argv) == 2:
        _serve_main(json.loads(argv[1]))
        return 0
    if argv == ["client"]:
        if _importable("uvloop"):
            import uvloop

            uvloop.run(_client_main())
        else:
            asyncio.run(_client_main())
        return 0
    print("usage: python -m suite.service serve CONFIG_JSON | client", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
