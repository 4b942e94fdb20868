"""``fleetmem serve`` when its backend dies: ``503`` with ``Retry-After`` (never a ``500``, never
a driver message), ``/readyz`` says so, and the service recovers by itself when the backend
is back. In front of the hybrid, Redis dying is not an outage at all.

The servers killed here are the harness's own (``fleetmem_redis_factory``), never the
machine's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from service_support import (
    TokenSpec,
    assert_no_leak,
    assert_problem,
    hybrid_url,
    running_service,
    unique,
)

pytest.importorskip("litestar", reason="needs the service extra")
pytest.importorskip("uvicorn", reason="needs the service extra")

TOKENS = {"write": TokenSpec(("fm-*",), "write")}
RECOVERY = 60.0  # seconds the service may take to see the backend again (a busy machine)


def _until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.redis
def test_redis_down_is_503_with_retry_after_then_recovers(
    tmp_path: Path, fleetmem_redis_factory: Callable[..., Any]
) -> None:
    server = fleetmem_redis_factory(appendonly=True)
    ns = unique("fm-")
    with (
        running_service(tmp_path, server.url, TOKENS, args=("--request-timeout", "10")) as service,
        httpx.Client(base_url=service.base_url, headers=service.headers("write"), timeout=30) as c,
    ):
        url = f"/v1/ns/{ns}/kv/doc"
        assert c.put(url, json={"value": {"n": 1}}).status_code == 201
        assert c.get("/readyz").status_code == 200

        server.kill()
        for answer in (
            c.get(url),
            c.put(url, json={"value": {"n": 2}}),
            c.get(f"/v1/ns/{ns}/keys"),
        ):
            body = assert_problem(answer, 503)
            assert answer.headers["retry-after"].isdigit()
            assert body["type"] in ("backend-unavailable", "outcome-unknown", "timeout")
            assert_no_leak(answer.text, [server.url])
            assert "redis" not in answer.text.lower()
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ok"] is False
        assert ready.headers["retry-after"].isdigit()

        server.start()
        assert _until(lambda: c.get(url).status_code == 200, RECOVERY), c.get(url).text
        assert c.get(url).json()["value"]["n"] in (1, 2)  # the write in flight may have landed
        assert c.get("/readyz").status_code == 200


@pytest.mark.hybrid
def test_hybrid_service_keeps_serving_when_redis_dies(
    tmp_path: Path,
    fleetmem_postgres_server: Any,
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    redis = fleetmem_redis_factory()
    ns = unique("fm-")
    url = hybrid_url(fleetmem_postgres_server.dsn, redis.url)
    with (
        running_service(tmp_path, url, TOKENS) as service,
        httpx.Client(base_url=service.base_url, headers=service.headers("write"), timeout=30) as c,
    ):
        doc = f"/v1/ns/{ns}/kv/doc"
        assert c.put(doc, json={"value": 1}).status_code == 201
        assert c.get(doc).json()["value"] == 1  # cached in Redis now

        redis.kill()
        # PostgreSQL is the store of record: reads and writes go on, and nothing is stale.
        written = c.put(doc, json={"value": 2}, headers={"If-Match": '"1"'})
        assert written.status_code == 200, written.text
        assert written.headers["etag"] == '"2"'
        read = c.get(doc)
        assert read.status_code == 200 and read.json()["value"] == 2, read.text

        redis.start()
        assert _until(lambda: c.get(doc).status_code == 200, RECOVERY)
        assert c.get(doc).json()["value"] == 2
