"""The HTTP service over real HTTP: ``fleetmem serve`` in a subprocess on a free port, a real
store behind it, ``httpx`` in front.

* The auth matrix: every operation of the server's own ``/openapi.json`` x every scope x own,
  foreign (existing, missing, invalid) namespaces, plus no token and a bad token. Each
  operation's required scope is written down in :data:`ROUTES`, keyed by the operation's
  method and path template: an operation the document lists and the table does not know fails
  the test, so a new route has to be classified.
* Keys round-trip exactly (``%2F``, ``%25``, unicode, ``..`` segments); errors are RFC 9457
  problems and never leak a trace, a driver name or the store's DSN.
* An SSE watcher that drops its connection and reconnects with ``Last-Event-ID`` gets exactly
  the changes it missed, in order.

Everything runs on SQLite; a representative subset (KV, one route per family, the SSE resume)
runs on PostgreSQL, Redis and the hybrid, each behind its own ``fleetmem serve``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest
from service_support import (
    ServiceProcess,
    assert_no_leak,
    assert_problem,
    hybrid_url,
    openapi_operations,
    raw_request,
    read_sse,
    running_service,
    unique,
)

from fleetmem.service.auth import Scope

pytest.importorskip("litestar", reason="needs the service extra")
pytest.importorskip("uvicorn", reason="needs the service extra")

R, W, A = Scope.READ, Scope.WRITE, Scope.ADMIN
PUBLIC = None  # an operations route: no token needed

_NO_BODY: Any = object()


@dataclass(frozen=True)
class Probe:
    """One request of an operation: ``path`` is what follows ``/v1/ns/{namespace}/`` (or the
    whole path of a public route), ``scope`` the least scope it needs (``None``: public)."""

    method: str
    path: str
    scope: Scope | None
    json: Any = _NO_BODY
    content: bytes | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def url(self, base: str, namespace: str) -> str:
        if self.scope is PUBLIC:
            return f"{base}{self.path}"
        return f"{base}/v1/ns/{quote(namespace, safe='')}/{self.path}"


_NS = "/v1/ns/{namespace}"
_EXPORT_BODY = b"@export"  # replaced by a real (empty) export of the namespace at run time

#: Every operation of the service and the scope each of its requests needs. The contract's
#: scopes: read = GET routes, watch, export; write = + writes, leases, agents, queues;
#: admin = + clear, clear partition, import, snapshots create/delete/restore, changes
#: enable/disable.
ROUTES: dict[tuple[str, str], tuple[Probe, ...]] = {
    # operations
    ("GET", "/healthz"): (Probe("GET", "/healthz", PUBLIC),),
    ("GET", "/readyz"): (Probe("GET", "/readyz", PUBLIC),),
    ("GET", "/metrics"): (Probe("GET", "/metrics", PUBLIC),),
    # kv
    ("GET", f"{_NS}/kv/{{key}}"): (Probe("GET", "kv/m/k", R),),
    ("PUT", f"{_NS}/kv/{{key}}"): (Probe("PUT", "kv/m/k", W, json={"value": 1}),),
    ("POST", f"{_NS}/kv/{{key}}"): (
        Probe("POST", "kv/m/n/incr", W, json={"amount": 2}),
        Probe("POST", "kv/m/k/expire", W, json={"ttl": 600}),
        Probe("POST", "kv/m/k/persist", W),
    ),
    ("DELETE", f"{_NS}/kv/{{key}}"): (Probe("DELETE", "kv/m/gone", W),),
    ("GET", f"{_NS}/keys"): (Probe("GET", "keys", R, params={"prefix": "m/"}),),
    ("GET", f"{_NS}/search"): (Probe("GET", "search", R, params={"pattern": "m/*"}),),
    ("POST", f"{_NS}/batch/get"): (Probe("POST", "batch/get", R, json={"keys": ["m/k"]}),),
    ("POST", f"{_NS}/batch/set"): (Probe("POST", "batch/set", W, json={"items": {"m/b": 1}}),),
    ("POST", f"{_NS}/batch/delete"): (Probe("POST", "batch/delete", W, json={"keys": ["m/b"]}),),
    ("GET", f"{_NS}/partitions"): (Probe("GET", "partitions", R),),
    ("DELETE", f"{_NS}/partitions/{{partition}}"): (Probe("DELETE", "partitions/p1", A),),
    ("POST", f"{_NS}/clear"): (Probe("POST", "clear", A),),
    ("GET", f"{_NS}/stats"): (Probe("GET", "stats", R),),
    # changes
    ("GET", f"{_NS}/changes/watch"): (Probe("GET", "changes/watch", R),),
    ("GET", f"{_NS}/changes"): (Probe("GET", "changes", R),),
    ("GET", f"{_NS}/changes/cursor"): (Probe("GET", "changes/cursor", R),),
    ("POST", f"{_NS}/changes/enable"): (Probe("POST", "changes/enable", A, json={}),),
    ("POST", f"{_NS}/changes/disable"): (Probe("POST", "changes/disable", A),),
    # leases
    ("POST", f"{_NS}/leases/{{rest}}"): (
        Probe("POST", "leases/l1/acquire", W, json={"owner": "o", "ttl": 30}),
        Probe("POST", "leases/l1/renew", W, json={"token": 1}),
        Probe("POST", "leases/l1/release", W, json={"token": 1}),
    ),
    ("GET", f"{_NS}/leases/{{rest}}"): (Probe("GET", "leases/l1", R),),
    # agents
    ("PUT", f"{_NS}/agents/{{rest}}"): (
        Probe("PUT", "agents/a1", W, json={"info": {"k": 1}, "ttl": 30}),
    ),
    ("POST", f"{_NS}/agents/{{rest}}"): (Probe("POST", "agents/a1/heartbeat", W, json={}),),
    ("DELETE", f"{_NS}/agents/{{rest}}"): (Probe("DELETE", "agents/gone", W),),
    ("GET", f"{_NS}/agents/{{rest}}"): (Probe("GET", "agents/a1", R),),
    ("GET", f"{_NS}/agents"): (Probe("GET", "agents", R),),
    # queues
    ("POST", f"{_NS}/queues/{{rest}}"): (
        Probe("POST", "queues/q1/jobs", W, json={"payload": {"n": 1}}),
        Probe("POST", "queues/q1/claim", W, json={"consumer": "c", "wait": 0}),
        Probe("POST", "queues/q1/jobs/00000000000000ff/ack", W, json={"token": 1}),
        Probe("POST", "queues/q1/jobs/00000000000000ff/nack", W, json={"token": 1}),
        Probe("POST", "queues/q1/jobs/00000000000000ff/extend", W, json={"token": 1}),
        Probe("POST", "queues/q1/dead/retry", W, json={}),
    ),
    ("GET", f"{_NS}/queues/{{rest}}"): (
        Probe("GET", "queues/q1/stats", R),
        Probe("GET", "queues/q1/dead", R),
        Probe("GET", "queues/q1/jobs/00000000000000ff/result", R, params={"wait": "0"}),
    ),
    ("DELETE", f"{_NS}/queues/{{rest}}"): (Probe("DELETE", "queues/q1/jobs/00000000000000ff", W),),
    ("GET", f"{_NS}/queues"): (Probe("GET", "queues", R),),
    # portability
    ("GET", f"{_NS}/export"): (Probe("GET", "export", R),),
    ("POST", f"{_NS}/import"): (
        Probe("POST", "import", A, content=_EXPORT_BODY, params={"mode": "merge"}),
    ),
    ("GET", f"{_NS}/snapshots"): (Probe("GET", "snapshots", R),),
    ("POST", f"{_NS}/snapshots"): (Probe("POST", "snapshots", A, json={"name": "s-new"}),),
    ("GET", f"{_NS}/snapshots/{{rest}}"): (
        Probe("GET", "snapshots/s1", R),
        Probe("GET", "snapshots/s1/diff", R),
    ),
    ("DELETE", f"{_NS}/snapshots/{{rest}}"): (Probe("DELETE", "snapshots/s-none", A),),
    ("POST", f"{_NS}/snapshots/{{rest}}"): (Probe("POST", "snapshots/s1/restore", A),),
}

#: The subset run on every server backend: KV and one route per family.
REPRESENTATIVE = (
    ("GET", f"{_NS}/kv/{{key}}"),
    ("PUT", f"{_NS}/kv/{{key}}"),
    ("POST", f"{_NS}/kv/{{key}}"),
    ("DELETE", f"{_NS}/kv/{{key}}"),
    ("GET", f"{_NS}/keys"),
    ("POST", f"{_NS}/batch/set"),
    ("POST", f"{_NS}/clear"),
    ("GET", f"{_NS}/changes"),
    ("POST", f"{_NS}/changes/enable"),
    ("POST", f"{_NS}/leases/{{rest}}"),
    ("PUT", f"{_NS}/agents/{{rest}}"),
    ("POST", f"{_NS}/queues/{{rest}}"),
    ("GET", f"{_NS}/export"),
    ("POST", f"{_NS}/snapshots"),
)

SCOPE_TOKENS = {R: "read", W: "write", A: "admin"}


@dataclass
class Names:
    """The namespaces of one server's tests: ``own`` matches ``team-*``; ``other`` (which
    holds data) and ``missing`` (which never does) match ``other-*``; ``invalid`` is not a
    valid name at all."""

    own: str = field(default_factory=lambda: unique("team-"))
    other: str = field(default_factory=lambda: unique("other-"))
    missing: str = field(default_factory=lambda: unique("other-"))
    invalid: str = "bad name!"


# ------------------------------------------------------------------ servers


def _sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'fleetmem.db'}"


@pytest.fixture(scope="module")
def sqlite_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("serve-sqlite")
    with running_service(directory, _sqlite_url(directory)) as service:
        yield service


def _with_password(dsn: str, password: str | None) -> tuple[str, str]:
    """The DSN with a password in it (the harness's server trusts local connections, so a
    made-up one is ignored by the server yet sits in the URL the service was given)."""
    if password:
        return dsn, password
    secret = f"pw-{secrets.token_hex(8)}"
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}:{secret}@{host}" if user else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc)), secret


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("hybrid", marks=(pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis)),
    ],
)
def backend_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, list[str]]]:
    """``fleetmem serve`` on a server backend, with the secrets its URL holds."""
    kind: str = request.param
    secrets_: list[str] = []
    if kind in ("postgres", "hybrid"):
        pg = request.getfixturevalue("fleetmem_postgres_server")
        dsn, password = _with_password(pg.dsn, pg.password)
        secrets_ += [dsn, password]
    if kind in ("redis", "hybrid"):
        rs = request.getfixturevalue("fleetmem_redis_server")
        secrets_.append(rs.url)
    if kind == "postgres":
        url = dsn
    elif kind == "redis":
        url = rs.url
    else:
        url = hybrid_url(dsn, rs.url)
    secrets_.append(url)
    directory = tmp_path_factory.mktemp(f"serve-{kind}")
    with running_service(directory, url) as service:
        yield service, secrets_


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as session:
        yield session


# ------------------------------------------------------------------ the auth matrix


async def _send(
    client: httpx.AsyncClient,
    service: ServiceProcess,
    probe: Probe,
    namespace: str,
    token: str | None,
    export_body: bytes,
) -> tuple[int, str, str]:
    """``(status, content type, body)``; an event stream is closed after its headers."""
    headers = dict(probe.headers)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kwargs: dict[str, Any] = {"params": dict(probe.params), "headers": headers}
    if probe.json is not _NO_BODY:
        kwargs["json"] = probe.json
    elif probe.content is not None:
        kwargs["content"] = export_body if probe.content == _EXPORT_BODY else probe.content
    async with client.stream(probe.method, probe.url(service.base_url, namespace), **kwargs) as r:
        content_type = r.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            return r.status_code, content_type, ""
        body = (await r.aread()).decode("utf-8", "replace")
    return r.status_code, content_type, body


async def _seed(client: httpx.AsyncClient, service: ServiceProcess, namespace: str) -> None:
    """Data of every kind in ``namespace`` (with the ``other-admin`` token), so that a
    ``403`` there cannot differ from one on a namespace that does not exist."""
    base = f"{service.base_url}/v1/ns/{namespace}"
    headers = service.headers("other-admin")
    calls: list[tuple[str, str, Any]] = [
        ("PUT", "kv/m/k", {"value": "secret"}),
        ("POST", "changes/enable", {}),
        ("PUT", "kv/m/k2", {"value": "secret"}),
        ("POST", "snapshots", {"name": "s1"}),
        ("PUT", "agents/a1", {"info": {}, "ttl": 60}),
        ("POST", "leases/l1/acquire", {"owner": "o", "ttl": 60}),
        ("POST", "queues/q1/jobs", {"payload": 1}),
    ]
    for method, path, body in calls:
        response = await client.request(method, f"{base}/{path}", json=body, headers=headers)
        assert response.status_code in (200, 201), (path, response.status_code, response.text)


async def _untouched(client: httpx.AsyncClient, service: ServiceProcess, namespace: str) -> None:
    """What :func:`_seed` wrote is all still there: no refused request changed anything."""
    base = f"{service.base_url}/v1/ns/{namespace}"
    headers = service.headers("other-admin")
    keys = await client.get(f"{base}/keys", headers=headers)
    assert keys.json() == {"keys": ["m/k", "m/k2"], "next": None}
    entry = await client.get(f"{base}/kv/m/k", headers=headers)
    assert (entry.json()["value"], entry.json()["version"]) == ("secret", 1)
    snapshots = await client.get(f"{base}/snapshots", headers=headers)
    assert [s["name"] for s in snapshots.json()["snapshots"]] == ["s1"]
    lease = await client.get(f"{base}/leases/l1", headers=headers)
    assert lease.json()["owner"] == "o"
    stats = await client.get(f"{base}/queues/q1/stats", headers=headers)
    assert stats.json()["ready"] == 1
    changes = await client.get(f"{base}/changes", headers=headers)
    assert [c["key"] for c in changes.json()["changes"]] == ["m/k2"]


async def _empty_export(client: httpx.AsyncClient, service: ServiceProcess, ns: str) -> bytes:
    response = await client.get(
        f"{service.base_url}/v1/ns/{ns}/export",
        params={"prefix": "no-such-prefix/"},
        headers=service.headers("admin"),
    )
    assert response.status_code == 200, response.text
    return response.content


async def _check_matrix(
    client: httpx.AsyncClient,
    service: ServiceProcess,
    operations: list[tuple[str, str]],
    names: Names,
    secrets_: list[str],
) -> list[str]:
    """Run every probe of ``operations``; the list of what went wrong."""
    failures: list[str] = []
    export_body = await _empty_export(client, service, names.own)
    foreign = (names.other, names.missing, names.invalid)
    for operation in operations:
        probes = ROUTES.get(operation)
        if probes is None:
            failures.append(f"{operation}: not classified in ROUTES (add its probes and scope)")
            continue
        for probe in probes:
            label = f"{probe.method} {probe.path}"

            async def send(
                namespace: str, token: str | None, probe: Probe = probe, label: str = label
            ) -> Any:
                status, content_type, body = await _send(
                    client, service, probe, namespace, token, export_body
                )
                try:
                    assert_no_leak(body, secrets_)
                except AssertionError as exc:
                    failures.append(f"{label} ({namespace}): {exc}")
                return status, content_type, body

            if probe.scope is PUBLIC:
                status, _, body = await send(names.own, None)
                if status != 200:
                    failures.append(f"{label}: public route answered {status}: {body[:200]}")
                continue
            for token, why in ((None, "no token"), ("fm_not-a-token", "bad token")):
                status, content_type, body = await send(names.own, token)
                if status != 401 or not content_type.startswith("application/problem+json"):
                    failures.append(f"{label} with {why}: expected a 401 problem, got {status}")
            for scope, label_token in SCOPE_TOKENS.items():
                token = service.tokens[label_token]
                seen: dict[str, str] = {}
                for namespace in foreign:
                    status, content_type, body = await send(namespace, token)
                    if status != 403 or not content_type.startswith("application/problem+json"):
                        failures.append(
                            f"{label} as {label_token} on {namespace!r}: expected 403, got "
                            f"{status}: {body[:200]}"
                        )
                        continue
                    if json.loads(body).get("type") != "forbidden":
                        failures.append(f"{label} as {label_token}: 403 type: {body[:200]}")
                    seen[namespace] = body
                if len(set(seen.values())) > 1:
                    failures.append(
                        f"{label} as {label_token}: the 403 differs between an existing, a "
                        f"missing and an invalid namespace (a leak): {seen}"
                    )
                status, content_type, body = await send(names.own, token)
                assert probe.scope is not None
                if probe.scope > scope:
                    if status != 403 or not content_type.startswith("application/problem+json"):
                        failures.append(
                            f"{label} as {label_token} on its own namespace: needs "
                            f"{probe.scope.label}, expected 403, got {status}: {body[:200]}"
                        )
                elif status in (401, 403) or status >= 500:
                    failures.append(
                        f"{label} as {label_token} on its own namespace: allowed, got "
                        f"{status}: {body[:200]}"
                    )
    return failures


async def _operations(client: httpx.AsyncClient, service: ServiceProcess) -> list[tuple[str, str]]:
    response = await client.get(f"{service.base_url}/openapi.json")
    assert response.status_code == 200
    return openapi_operations(response.json())


async def test_every_operation_is_classified(
    client: httpx.AsyncClient, sqlite_service: ServiceProcess
) -> None:
    """The table knows every operation of the document, and nothing the document lacks."""
    listed = set(await _operations(client, sqlite_service))
    unknown = sorted(listed - set(ROUTES))
    stale = sorted(set(ROUTES) - listed)
    assert not unknown, f"operations without a scope in ROUTES (classify them): {unknown}"
    assert not stale, f"ROUTES lists operations the server does not have: {stale}"


async def test_auth_matrix(client: httpx.AsyncClient, sqlite_service: ServiceProcess) -> None:
    names = Names()
    await _seed(client, sqlite_service, names.other)
    operations = await _operations(client, sqlite_service)
    failures = await _check_matrix(client, sqlite_service, operations, names, [])
    assert not failures, "\n".join(failures)
    await _untouched(client, sqlite_service, names.other)


async def test_globs_match_whole_names(
    client: httpx.AsyncClient, sqlite_service: ServiceProcess
) -> None:
    """``team-*`` matches ``team-a`` but neither ``team`` nor ``xteam-a``; ``team`` matches
    only ``team``."""
    base = sqlite_service.base_url

    async def status(label: str, namespace: str) -> int:
        r = await client.put(
            f"{base}/v1/ns/{namespace}/kv/glob",
            json={"value": 1},
            headers=sqlite_service.headers(label),
        )
        if r.status_code == 403:
            assert_problem(r, 403, "forbidden")
        return r.status_code

    own = unique("team-")
    assert await status("admin", own) in (200, 201)
    assert await status("admin", "team") == 403
    assert await status("admin", "xteam-a") == 403
    assert await status("admin", f"x{own}") == 403
    assert await status("admin", "TEAM-a") == 403
    assert await status("exact", "team") in (200, 201)
    assert await status("exact", "team-a") == 403
    assert await status("exact", "teams") == 403
    assert await status("exact", "xteam") == 403


# ------------------------------------------------------------------ keys and errors

#: (what the client writes in the path, the key it names)
KEY_PATHS = [
    ("a%2Fb", "a/b"),
    ("a/b%2Fc/d", "a/b/c/d"),
    ("100%25", "100%"),
    ("%2525literal", "%25literal"),
    ("na%C3%AFve/%D0%BA%D0%BB%D1%8E%D1%87/%F0%9F%99%82", "naïve/ключ/🙂"),
    ("x/%2E%2E/y", "x/../y"),
    ("%2E%2E", ".."),
    ("%2E/z/%2E", "./z/."),
    ("a//b", "a//b"),
    ("sp%20ace%3Fq%23h", "sp ace?q#h"),
]


async def _roundtrip(client: httpx.AsyncClient, service: ServiceProcess, ns: str) -> None:
    base = f"{service.base_url}/v1/ns/{ns}"
    headers = service.headers("admin")
    for index, (written, key) in enumerate(KEY_PATHS):
        put = await client.put(f"{base}/kv/{written}", json={"value": index}, headers=headers)
        assert put.status_code == 201, (written, put.status_code, put.text)
        assert put.json()["key"] == key
        assert put.headers["etag"] == '"1"'
        got = await client.get(f"{base}/kv/{written}", headers=headers)
        assert got.status_code == 200, (written, got.text)
        assert (got.json()["key"], got.json()["value"]) == (key, index)
    # A raw ``..`` segment, as ``curl --path-as-is`` sends it, is a part of the key too.
    status, _, body = await raw_request(
        service.port,
        "PUT",
        f"/v1/ns/{ns}/kv/raw/../dots/./x",
        service.headers("admin"),
        b'{"value": "raw"}',
    )
    assert status == 201, body
    assert json.loads(body)["key"] == "raw/../dots/./x"
    status, _, body = await raw_request(
        service.port, "GET", f"/v1/ns/{ns}/kv/raw/../dots/./x", service.headers("read")
    )
    assert (status, json.loads(body)["value"]) == (200, "raw")
    listed = await client.get(f"{base}/keys", headers=headers)
    assert listed.status_code == 200
    assert sorted(listed.json()["keys"]) == sorted([k for _, k in KEY_PATHS] + ["raw/../dots/./x"])
    found = await client.get(f"{base}/keys", params={"prefix": "naïve/"}, headers=headers)
    assert found.json()["keys"] == ["naïve/ключ/🙂"]


async def test_keys_round_trip_exactly(
    client: httpx.AsyncClient, sqlite_service: ServiceProcess
) -> None:
    await _roundtrip(client, sqlite_service, unique("team-"))


async def _errors(
    client: httpx.AsyncClient, service: ServiceProcess, ns: str, secrets_: list[str]
) -> None:
    """Each error class answers its status as a problem, with nothing leaked. Every case is
    tried and the mismatches are reported together."""
    base = f"{service.base_url}/v1/ns/{ns}"
    admin = service.headers("admin")
    as_json = {**admin, "Content-Type": "application/json"}
    failures: list[str] = []

    async def expect(
        status: int, type_: str | None, method: str, url: str, **kwargs: Any
    ) -> dict[str, Any]:
        kwargs.setdefault("headers", admin)
        response = await client.request(method, url, **kwargs)
        try:
            assert_no_leak(response.text, secrets_)
            return assert_problem(response, status, type_)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
            return {}

    async def ok(method: str, url: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("headers", admin)
        response = await client.request(method, url, **kwargs)
        assert response.status_code in (200, 201), (url, response.status_code, response.text)
        return response

    await expect(404, "key-not-found", "GET", f"{base}/kv/missing")
    await expect(404, "key-not-found", "DELETE", f"{base}/kv/missing")
    await expect(400, "invalid-key", "GET", f"{base}/kv/bad%01key")
    await expect(400, "invalid-key", "GET", f"{base}/kv/%FF%FE")
    await expect(400, None, "PUT", f"{base}/kv/k", content=b"{not", headers=as_json)
    await expect(400, None, "PUT", f"{base}/kv/k", json={"nope": 1})
    await expect(400, None, "PUT", f"{base}/kv/k", json={"value": 1, "ttl": -1})
    await expect(400, None, "PUT", f"{base}/kv/k", json=[1, 2])
    await expect(400, None, "GET", f"{base}/search", params={"pattern": "[z-a"})
    await expect(400, None, "GET", f"{base}/keys", params={"limit": "-1"})
    await ok("PUT", f"{base}/kv/cas", json={"value": 1})
    body = await expect(
        412,
        "version-conflict",
        "PUT",
        f"{base}/kv/cas",
        json={"value": 2},
        headers={**admin, "If-Match": '"7"'},
    )
    if body and body.get("current_version") != 1:
        failures.append(f"412 without the current version: {body}")
    await expect(
        412,
        "version-conflict",
        "PUT",
        f"{base}/kv/cas",
        json={"value": 2},
        headers={**admin, "If-None-Match": "*"},
    )
    await expect(
        400,
        None,
        "PUT",
        f"{base}/kv/cas",
        json={"value": 2},
        headers={**admin, "If-Match": "not-a-version"},
    )
    await expect(
        400,
        None,
        "PUT",
        f"{base}/kv/cas",
        json={"value": 2},
        headers={**admin, "Fleetmem-Fence": "no token here"},
    )
    await ok("PUT", f"{base}/kv/s", json={"value": "text"})
    await expect(400, None, "POST", f"{base}/kv/s/incr", json={})
    await expect(400, None, "POST", f"{base}/kv/n/incr", json={"amount": "x"})
    await expect(400, None, "POST", f"{base}/kv/n/expire", json={"ttl": "soon"})
    await expect(400, None, "POST", f"{base}/kv/s/expire", json={})
    await expect(404, None, "POST", f"{base}/kv/missing/persist")
    await expect(400, None, "POST", f"{base}/batch/get", json={"keys": "not-a-list"})
    big = b'{"value": "' + b"x" * (8 * 1024 * 1024 + 1) + b'"}'
    await expect(413, None, "PUT", f"{base}/kv/big", content=big, headers=as_json)
    await ok("POST", f"{base}/leases/l/acquire", json={"owner": "a", "ttl": 30})
    await expect(409, "lease-unavailable", "POST", f"{base}/leases/l/acquire", json={"owner": "b"})
    await expect(409, "lease-lost", "POST", f"{base}/leases/l/renew", json={"token": 999999})
    await expect(400, None, "POST", f"{base}/leases/l/acquire", json={"owner": "b", "wait": 61})
    await expect(404, "agent-gone", "POST", f"{base}/agents/none/heartbeat", json={})
    await expect(400, None, "POST", f"{base}/queues/q/claim", json={"consumer": "c", "wait": -1})
    await expect(409, "changes-not-enabled", "GET", f"{base}/changes")
    await ok("POST", f"{base}/changes/enable", json={})
    await expect(400, None, "GET", f"{base}/changes", params={"since": "not-a-cursor"})
    await expect(404, None, "GET", f"{base}/snapshots/none")
    await expect(400, None, "POST", f"{base}/import", content=b"not an export\n")
    await expect(400, None, "POST", f"{base}/import", params={"mode": "sideways"}, content=b"")
    await expect(405, None, "PATCH", f"{base}/kv/k", json={})
    await expect(404, None, "GET", f"{service.base_url}/v1/nothing-here")
    await expect(401, "unauthorized", "GET", f"{base}/kv/k", headers={})
    await expect(400, None, "GET", f"{service.base_url}/v1/ns/team-bad%20name/kv/k")
    assert not failures, "\n".join(failures)


async def test_errors_are_problems(
    client: httpx.AsyncClient, sqlite_service: ServiceProcess
) -> None:
    await _errors(client, sqlite_service, unique("team-"), [sqlite_service.store_url])


# ------------------------------------------------------------------ SSE resume


async def _sse_resume(client: httpx.AsyncClient, service: ServiceProcess, ns: str) -> None:
    """Watch, read some changes, drop the connection, miss some, reconnect with
    ``Last-Event-ID``: exactly the missed changes come, in order, then the live ones."""
    base = f"{service.base_url}/v1/ns/{ns}"
    enabled = await client.post(f"{base}/changes/enable", json={}, headers=service.headers("admin"))
    assert enabled.status_code == 200, enabled.text
    writer = service.headers("write")
    reader = service.headers("read")

    async def write(key: str, value: int) -> None:
        r = await client.put(f"{base}/kv/{key}", json={"value": value}, headers=writer)
        assert r.status_code in (200, 201), r.text

    url = f"{base}/changes/watch"
    params = {"pattern": "sse/*"}
    await asyncio.wait_for(_sse_steps(client, url, params, reader, write), 60)


async def _sse_steps(
    client: httpx.AsyncClient,
    url: str,
    params: dict[str, str],
    reader: dict[str, str],
    write: Callable[[str, int], Awaitable[None]],
) -> None:
    last_id: str | None = None
    got: list[tuple[str, int]] = []
    async with client.stream("GET", url, params=params, headers=reader) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
        ready = await anext(events)
        assert ready.event == "ready"
        for i in range(3):
            await write(f"sse/{i}", i)
        await write("elsewhere/x", -1)  # not matched: never delivered
        async for event in events:
            if event.event != "change":
                continue
            data = event.json()
            assert event.id == data["cursor"]
            got.append((data["key"], data["value"]))
            last_id = event.id
            if len(got) == 3:
                break
    assert got == [("sse/0", 0), ("sse/1", 1), ("sse/2", 2)]
    # Disconnected: these must come after the reconnection, once each, in order.
    for i in range(3, 7):
        await write(f"sse/{i}", i)
    await write("sse/1", 100)
    assert last_id is not None
    headers = {**reader, "Last-Event-ID": last_id}
    resumed: list[tuple[str, int]] = []
    async with client.stream("GET", url, params=params, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        events = read_sse(response)
        ready = await anext(events)
        assert (ready.event, ready.id) == ("ready", last_id)
        async for event in events:
            if event.event != "change":
                assert event.event != "error", event.data
                continue
            data = event.json()
            resumed.append((data["key"], data["value"]))
            if len(resumed) == 5:
                await write("sse/live", 7)  # a live change after the missed ones
            if len(resumed) == 6:
                break
    assert resumed == [
        ("sse/3", 3),
        ("sse/4", 4),
        ("sse/5", 5),
        ("sse/6", 6),
        ("sse/1", 100),
        ("sse/live", 7),
    ]


async def test_sse_reconnect_misses_nothing(
    client: httpx.AsyncClient, sqlite_service: ServiceProcess
) -> None:
    await _sse_resume(client, sqlite_service, unique("team-"))


# ------------------------------------------------------------------ server backends


async def _families(client: httpx.AsyncClient, service: ServiceProcess, ns: str) -> None:
    """One working call per family: a lease, an agent, a job claimed and acked with its
    result, a snapshot and an export holding what was written."""
    base = f"{service.base_url}/v1/ns/{ns}"
    h = service.headers("admin")
    put = await client.put(f"{base}/kv/f/k", json={"value": {"a": 1}}, headers=h)
    assert (put.status_code, put.headers["etag"]) == (201, '"1"')
    cas = await client.put(
        f"{base}/kv/f/k", json={"value": {"a": 2}}, headers={**h, "If-Match": '"1"'}
    )
    assert (cas.status_code, cas.headers["etag"]) == (200, '"2"')
    lease = await client.post(f"{base}/leases/f/l/acquire", json={"owner": "me"}, headers=h)
    assert lease.status_code == 200, lease.text
    fence = {**h, "Fleetmem-Fence": f"f%2Fl; token={lease.json()['token']}"}
    fenced = await client.put(f"{base}/kv/f/fenced", json={"value": 1}, headers=fence)
    assert fenced.status_code == 201, fenced.text
    agent = await client.put(f"{base}/agents/f/a", json={"info": {"x": 1}}, headers=h)
    assert (agent.status_code, agent.json()["id"]) == (200, "f/a")
    job = await client.post(f"{base}/queues/f/q/jobs", json={"payload": {"n": 1}}, headers=h)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    claim = await client.post(
        f"{base}/queues/f/q/claim", json={"consumer": "c", "wait": 5}, headers=h
    )
    (claimed,) = claim.json()["jobs"]
    assert claimed["id"] == job_id
    ack = await client.post(
        f"{base}/queues/f/q/jobs/{job_id}/ack",
        json={"token": claimed["token"], "result": {"ok": True}},
        headers=h,
    )
    assert ack.json() == {"acked": True}
    result = await client.get(f"{base}/queues/f/q/jobs/{job_id}/result", headers=h)
    assert (result.status_code, result.json()["value"]) == (200, {"ok": True})
    snap = await client.post(f"{base}/snapshots", json={"name": "f/s"}, headers=h)
    assert snap.status_code == 201, snap.text
    export = await client.get(f"{base}/export", headers=h)
    assert export.status_code == 200
    lines = [json.loads(line) for line in export.text.splitlines() if line]
    assert {line.get("key") for line in lines[1:-1]} == {"f/k", "f/fenced"}


async def test_backend_auth_subset(
    client: httpx.AsyncClient, backend_service: tuple[ServiceProcess, list[str]]
) -> None:
    service, secrets_ = backend_service
    names = Names()
    await _seed(client, service, names.other)
    failures = await _check_matrix(client, service, list(REPRESENTATIVE), names, secrets_)
    assert not failures, "\n".join(failures)
    await _untouched(client, service, names.other)


async def test_backend_keys_and_families(
    client: httpx.AsyncClient, backend_service: tuple[ServiceProcess, list[str]]
) -> None:
    service, _ = backend_service
    await _roundtrip(client, service, unique("team-"))
    await _families(client, service, unique("team-"))


async def test_backend_errors(
    client: httpx.AsyncClient, backend_service: tuple[ServiceProcess, list[str]]
) -> None:
    service, secrets_ = backend_service
    await _errors(client, service, unique("team-"), secrets_)


async def test_backend_sse_reconnect(
    client: httpx.AsyncClient, backend_service: tuple[ServiceProcess, list[str]]
) -> None:
    service, _ = backend_service
    await _sse_resume(client, service, unique("team-"))


async def test_sqlite_families(client: httpx.AsyncClient, sqlite_service: ServiceProcess) -> None:
    await _families(client, sqlite_service, unique("team-"))
