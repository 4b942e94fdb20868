"""``fleetmem serve`` on PostgreSQL stops gracefully on SIGTERM with requests in flight.

Before the signal: 20 PUTs whose bodies are still being uploaded, a long-poll claim
(``wait=30``) and a result long poll (``wait=30``) on an empty queue, an SSE watch, and an
export of a few MiB read slowly. After it: the long polls answer at once with their normal
"nothing" (``{"jobs": []}``, ``202 pending``), the event stream ends, the uploads and the export
finish with ``2xx`` (the export with its trailer line), a new connection is refused, and the
process exits 0 within ``shutdown_grace`` (10 s) and a margin.

The bounds are generous (a busy machine): "at once" is well under the 30 s of the polls.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from service_support import (
    ServiceProcess,
    read_sse,
    start_service,
    stop_service,
    unique,
)

pytest.importorskip("litestar", reason="needs the service extra")
pytest.importorskip("uvicorn", reason="needs the service extra")

pytestmark = [pytest.mark.postgres]

SHUTDOWN_GRACE = 10.0  # ServiceSettings' default; `fleetmem serve` keeps it
MARGIN = 20.0
POLL_WAIT = 30
ENTRIES = 3000
VALUE = "v" * 2000
UPLOADS = 20
UPLOAD_BYTES = 256 * 1024


async def _fill(client: httpx.AsyncClient, api: str, headers: dict[str, str]) -> None:
    for start in range(0, ENTRIES, 500):
        items = {f"bulk/{i:06d}": VALUE for i in range(start, min(start + 500, ENTRIES))}
        r = await client.post(f"{api}/batch/set", json={"items": items}, headers=headers)
        assert r.status_code == 200, r.text


async def _upload(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    signalled: asyncio.Event,
    half_sent: list[str],
) -> httpx.Response:
    """A PUT whose body is half sent before the signal and finished after it."""
    payload = json.dumps({"value": "u" * UPLOAD_BYTES}).encode()
    half = len(payload) // 2

    async def body() -> AsyncIterator[bytes]:
        yield payload[:half]
        half_sent.append(url)  # the client asks for more once the first half went out
        await signalled.wait()
        await asyncio.sleep(0.2)
        yield payload[half:]

    return await client.put(
        url,
        content=body(),
        headers={
            **headers,
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
        },
    )


async def test_sigterm_drains_in_flight_requests(
    fleetmem_postgres_server: Any, tmp_path: Path
) -> None:
    service: ServiceProcess = start_service(tmp_path, fleetmem_postgres_server.dsn)
    try:
        await _scenario(service)
    finally:
        if service.process.poll() is None:
            stop_service(service)


async def _scenario(service: ServiceProcess) -> None:
    ns = unique("team-")
    api = f"{service.base_url}/v1/ns/{ns}"
    admin = service.headers("admin")
    writer = service.headers("write")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        r = await client.post(f"{api}/changes/enable", json={}, headers=admin)
        assert r.status_code == 200, r.text
        await _fill(client, api, admin)
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def claim() -> tuple[httpx.Response, float]:
            r = await client.post(
                f"{api}/queues/idle/claim",
                json={"consumer": "c", "wait": POLL_WAIT},
                headers=writer,
            )
            return r, loop.time()

        async def result() -> tuple[httpx.Response, float]:
            r = await client.get(
                f"{api}/queues/idle/jobs/00000000000000aa/result",
                params={"wait": str(POLL_WAIT)},
                headers=writer,
            )
            return r, loop.time()

        watch_open = asyncio.Event()

        async def watch() -> tuple[list[str], float]:
            events: list[str] = []
            async with client.stream("GET", f"{api}/changes/watch", headers=writer) as r:
                assert r.status_code == 200
                async for event in read_sse(r):
                    events.append(event.event)
                    if event.event == "ready":
                        watch_open.set()
            return events, loop.time()

        export_started = asyncio.Event()

        async def export() -> tuple[int, bytes]:
            chunks: list[bytes] = []
            async with client.stream("GET", f"{api}/export", headers=writer) as r:
                async for chunk in r.aiter_bytes(64 * 1024):
                    chunks.append(chunk)
                    if not export_started.is_set():
                        export_started.set()
                        await signalled.wait()
                    await asyncio.sleep(0.005)  # a slow reader
                return r.status_code, b"".join(chunks)

        polls = [asyncio.ensure_future(claim()), asyncio.ensure_future(result())]
        watcher = asyncio.ensure_future(watch())
        exporter = asyncio.ensure_future(export())
        half_sent: list[str] = []
        uploads = [
            asyncio.ensure_future(_upload(client, f"{api}/kv/up/{i}", writer, signalled, half_sent))
            for i in range(UPLOADS)
        ]
        await asyncio.wait_for(asyncio.gather(watch_open.wait(), export_started.wait()), 30)
        deadline = loop.time() + 30
        while len(half_sent) < UPLOADS and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert len(half_sent) == UPLOADS, half_sent
        await asyncio.sleep(1.5)  # the long polls have reached the server and wait
        assert not any(p.done() for p in polls), [p.result() for p in polls if p.done()]

        service.process.terminate()  # SIGTERM
        signalled_at = loop.time()
        started = time.monotonic()
        signalled.set()

        async def everything() -> tuple[
            list[tuple[httpx.Response, float]],
            tuple[list[str], float],
            tuple[int, bytes],
            list[httpx.Response],
        ]:
            polled = list(await asyncio.gather(*polls))
            watched = await watcher
            exported = await exporter
            return polled, watched, exported, list(await asyncio.gather(*uploads))

        (
            polled,
            (events, watch_end),
            (export_status, export_body),
            put_results,
        ) = await asyncio.wait_for(everything(), SHUTDOWN_GRACE + MARGIN)
        (claimed, claim_at), (waited, result_at) = polled

        # The long polls ended early with their normal "nothing".
        assert claim_at - signalled_at < POLL_WAIT / 2, claim_at - signalled_at
        assert (claimed.status_code, claimed.json()) == (200, {"jobs": []}), claimed.text
        assert result_at - signalled_at < POLL_WAIT / 2, result_at - signalled_at
        assert waited.status_code == 202, waited.text
        assert waited.json()["status"] == "pending"
        # The event stream ended (normally: no error event).
        assert watch_end - signalled_at < POLL_WAIT / 2
        assert events[0] == "ready" and "error" not in events, events
        # Requests in flight finished.
        assert [r.status_code for r in put_results] == [201] * UPLOADS, [
            (r.status_code, r.text[:200]) for r in put_results
        ]
        assert export_status == 200
        lines = export_body.decode().splitlines()
        assert len(lines) == ENTRIES + 2, len(lines)
        assert json.loads(lines[-1]).get("count", ENTRIES) == ENTRIES

        # New connections are refused once the server stopped listening.
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{service.base_url}/healthz")

    status = await asyncio.to_thread(
        stop_service, service, timeout=SHUTDOWN_GRACE + MARGIN, signal_it=False
    )
    elapsed = time.monotonic() - started
    assert elapsed < SHUTDOWN_GRACE + MARGIN, elapsed
    assert status == 0, f"exit status {status} after SIGTERM:\n{service.log_tail()}"
    assert "Traceback" not in service.log(), service.log()[-4000:]
