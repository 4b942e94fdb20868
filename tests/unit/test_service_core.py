"""The service's own machinery, in process: tokens, globs, problems, limits, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from fleetmem import InMemoryStore
from fleetmem.errors import (
    BackendUnavailableError,
    ChangesExpiredError,
    ConfigurationError,
    FleetmemError,
    InvalidKeyError,
    KeyNotFoundError,
    OutcomeUnknownError,
    ValueTooLargeError,
    VersionConflictError,
)
from fleetmem.service import ServiceSettings, create_app
from fleetmem.service.auth import (
    Scope,
    TokenTable,
    append_entry,
    digest,
    glob_matches,
    load_tokens,
    make_entry,
    new_token,
)
from fleetmem.service.problems import problem_for
from fleetmem.service.server import is_loopback, serve

# ------------------------------------------------------------------ globs and tokens


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("fleet-*", "fleet-a", True),
        ("fleet-*", "fleet-", True),
        ("fleet-*", "fleet", False),
        ("fleet-*", "xfleet-a", False),
        ("fleet", "fleet", True),
        ("fleet", "fleet-a", False),
        ("fleet", "fleetx", False),
        ("f?eet", "fleet", True),
        ("f?eet", "feet", False),
        ("*", "anything", True),
        ("a.b", "axb", False),  # '.' is itself, not a regex wildcard
        ("team-*-prod", "team-a-prod", True),
        ("team-*-prod", "team-a-prod2", False),
    ],
)
def test_glob_matches_whole_names(glob: str, name: str, matches: bool) -> None:
    assert glob_matches(glob, name) is matches


@pytest.mark.parametrize("glob", ["", "fleet/*", "a b", "[ab]", "x" * 65, "ns\n"])
def test_bad_globs_are_refused(glob: str) -> None:
    with pytest.raises(ConfigurationError):
        make_entry(new_token(), [glob], "read")


def test_table_authenticates_by_digest_and_scope() -> None:
    reader, writer = new_token(), new_token()
    table = TokenTable(
        [make_entry(reader, ["team-*"], "read"), make_entry(writer, ["team-a", "ops"], "write")]
    )
    p = table.authenticate(reader)
    assert p is not None and p.scope is Scope.READ
    assert p.allows("team-a", Scope.READ) and not p.allows("team-a", Scope.WRITE)
    assert not p.allows("team", Scope.READ)
    w = table.authenticate(writer)
    assert w is not None and w.allows("ops", Scope.WRITE) and not w.allows("ops", Scope.ADMIN)
    assert not w.allows("team-b", Scope.READ)
    assert table.authenticate(reader + "x") is None
    assert table.authenticate("") is None
    assert table.authenticate(digest(reader)) is None  # the digest is not a token


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(t.startswith("fm_") and len(t) >= 40 for t in tokens)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_tokens_file_round_trip_keeps_only_digests(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"tokens{suffix}"
    first, second = new_token(), new_token()
    append_entry(file, make_entry(first, ["fleet-*"], "write", "agents"))
    append_entry(file, make_entry(second, ["ops"], "admin"))
    text = file.read_text()
    assert first not in text and second not in text
    assert hashlib.sha256(first.encode()).hexdigest() in text
    assert file.stat().st_mode & 0o777 == 0o600
    table = load_tokens(file)
    assert len(table) == 2
    a = table.authenticate(first)
    assert a is not None and a.name == "agents" and a.globs == ("fleet-*",)
    with pytest.raises(ConfigurationError, match="twice"):
        append_entry(file, make_entry(first, ["x"], "read"))
    assert len(load_tokens(file)) == 2  # nothing appended by the refused call


@pytest.mark.parametrize(
    "content",
    [
        "[[tokens]]\nsha256 = 'abc'\nnamespaces = ['x']\nscope = 'read'\n",
        "[[tokens]]\nsha256 = '" + "a" * 64 + "'\nnamespaces = []\nscope = 'read'\n",
        "[[tokens]]\nsha256 = '" + "a" * 64 + "'\nnamespaces = ['x']\nscope = 'root'\n",
        "[[tokens]]\ntoken = 'plain'\nnamespaces = ['x']\nscope = 'read'\n",
        "not toml at all [",
    ],
)
def test_bad_tokens_files_are_refused(tmp_path: Path, content: str) -> None:
    file = tmp_path / "tokens.toml"
    file.write_text(content)
    with pytest.raises(ConfigurationError):
        load_tokens(file)


# ------------------------------------------------------------------ problems


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidKeyError("bad"), 400, "invalid-key"),
        (ValueTooLargeError("big"), 413, "value-too-large"),
        (KeyNotFoundError("k"), 404, "key-not-found"),
        (VersionConflictError("k", 3, 5), 412, "version-conflict"),
        (ChangesExpiredError("c1"), 410, "changes-expired"),
        (BackendUnavailableError("asyncpg said: password=hunter2"), 503, "backend-unavailable"),
        (OutcomeUnknownError("connection reset"), 503, "outcome-unknown"),
    ],
)
def test_errors_map_to_the_contract_status(exc: FleetmemError, status: int, type_: str) -> None:
    problem = problem_for(exc)
    assert (problem.status, problem.type) == (status, type_)
    body = problem.body()
    assert body["status"] == status and body["title"] and body["detail"]
    if status == 503:
        assert problem.headers["Retry-After"].isdigit()
        assert "hunter2" not in json.dumps(body) and "asyncpg" not in json.dumps(body)
    if isinstance(exc, VersionConflictError):
        assert body["current_version"] == 5
    if isinstance(exc, ChangesExpiredError):
        assert body["oldest"] == "c1"
    if isinstance(exc, OutcomeUnknownError):
        assert body["outcome"] == "unknown"


# ------------------------------------------------------------------ the app in process


@contextlib.asynccontextmanager
async def serving(
    settings: ServiceSettings | None = None, **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a fresh in-process app on a memory store."""
    store = InMemoryStore(namespace="default")
    app = create_app(store, settings=settings, metrics=False, **kw)
    try:
        async with (
            app.lifespan(),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://t"
            ) as c,
        ):
            yield c
    finally:
        await store.close()


def _state(client: httpx.AsyncClient) -> Any:
    return client._transport.app.state["fleetmem"]  # type: ignore[attr-defined]


async def test_body_over_the_value_cap_is_413_before_any_write() -> None:
    async with serving() as client:
        await _test_body_over_the_value_cap_is_413_before_any_write(client)


async def _test_body_over_the_value_cap_is_413_before_any_write(client: httpx.AsyncClient) -> None:
    big = {"value": "x" * (InMemoryStore(namespace="n").max_value_bytes + 70_000)}
    r = await client.put("/v1/ns/a/kv/k", json=big)
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert (await client.get("/v1/ns/a/kv/k")).status_code == 404


async def test_batch_body_cap() -> None:
    async with serving(ServiceSettings(max_body_bytes=1000)) as client:
        await _test_batch_body_cap(client)


async def _test_batch_body_cap(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/ns/a/batch/set", json={"items": {"k": "x" * 2000}})
    assert r.status_code == 413
    r = await client.post("/v1/ns/a/batch/set", json={"items": {"k": "x"}})
    assert r.status_code == 200 and r.json() == {"count": 1}


async def test_load_is_shed_with_503_and_retry_after() -> None:
    async with serving(ServiceSettings(max_in_flight=1, retry_after=2)) as client:
        await _test_load_is_shed_with_503_and_retry_after(client)


async def _test_load_is_shed_with_503_and_retry_after(client: httpx.AsyncClient) -> None:
    app_state = _state(client)
    app_state.in_flight = 1  # one request already in flight
    r = await client.get("/v1/ns/a/kv/k")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["type"] == "overloaded"
    app_state.in_flight = 0
    assert (await client.get("/v1/ns/a/kv/k")).status_code == 404


async def test_request_timeout_is_503_and_says_the_outcome_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(ServiceSettings(request_timeout=0.2)) as client:
        await _timeout_case(client, monkeypatch)


async def _timeout_case(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _state(client).store

    async def slow_set(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(5)

    monkeypatch.setattr(store, "set", slow_set)
    r = await client.put("/v1/ns/default/kv/k", json={"value": 1})
    assert r.status_code == 503
    body = r.json()
    assert body["type"] == "timeout" and body["outcome"] == "unknown"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/ns/a/kv/k", b"{not json"),
        ("PUT", "/v1/ns/a/kv/k", b'{"value": 1, "ttl": "soon"}'),
        ("PUT", "/v1/ns/a/kv/k", b'{"value": 1, "ttl": 0}'),
        ("PUT", "/v1/ns/a/kv/k", b'{"ttl": 5}'),
        ("PUT", "/v1/ns/a b/kv/k", b'{"value": 1}'),
        ("PUT", "/v1/ns/a/kv/%FF", b'{"value": 1}'),
        ("GET", "/v1/ns/a/search?pattern=%5B", b""),
        ("GET", "/v1/ns/a/keys?limit=-1", b""),
        ("POST", "/v1/ns/a/kv/c/incr", b'{"amount": "x"}'),
        ("POST", "/v1/ns/a/batch/get", b'{"keys": "notalist"}'),
    ],
)
async def test_bad_input_is_400_problem_never_500(method: str, path: str, body: bytes) -> None:
    async with serving() as client:
        r = await client.request(method, path, content=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in r.text


async def test_if_match_semantics() -> None:
    async with serving() as client:
        await _test_if_match_semantics(client)


async def _test_if_match_semantics(client: httpx.AsyncClient) -> None:
    url = "/v1/ns/a/kv/doc"
    r = await client.put(url, json={"value": 1}, headers={"If-None-Match": "*"})
    assert r.status_code == 201 and r.headers["etag"] == '"1"'
    r = await client.put(url, json={"value": 2}, headers={"If-None-Match": "*"})
    assert r.status_code == 412 and r.json()["current_version"] == 1
    r = await client.put(url, json={"value": 2}, headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    r = await client.put(url, json={"value": 3}, headers={"If-Match": '"1"'})
    assert r.status_code == 412 and r.json()["current_version"] == 2
    r = await client.put(url, json={"value": 3}, headers={"If-Match": "*"})
    assert r.status_code == 200 and r.json()["version"] == 3
    r = await client.put("/v1/ns/a/kv/none", json={"value": 3}, headers={"If-Match": "*"})
    assert r.status_code == 412
    r = await client.put(url, json={"value": 4}, headers={"If-Match": "three"})
    assert r.status_code == 400
    assert (await client.get(url)).json()["value"] == 3


async def test_tokens_guard_every_namespace_route() -> None:
    token = new_token()
    table = TokenTable([make_entry(token, ["team-*"], "write")])
    async with serving(tokens=table) as client:
        await _tokens_case(client, token)


async def _tokens_case(client: httpx.AsyncClient, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    r = await client.get("/v1/ns/team-a/kv/k")
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    r = await client.get("/v1/ns/team-a/kv/k", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert (await client.get("/v1/ns/team-a/kv/k", headers=auth)).status_code == 404
    forbidden = [
        await client.get(f"/v1/ns/{ns}/kv/k", headers=auth) for ns in ("team", "other", "a b")
    ]
    assert {r.status_code for r in forbidden} == {403}
    assert len({r.text for r in forbidden}) == 1  # nothing tells them apart
    r = await client.post("/v1/ns/team-a/clear", headers=auth)
    assert r.status_code == 403  # admin only
    assert (await client.get("/healthz")).status_code == 200  # no auth
    assert (await client.get("/readyz")).status_code == 200


# ------------------------------------------------------------------ serving and the CLI


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.3.4", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_tokens() -> None:
    with pytest.raises(ConfigurationError, match="without a tokens file"):
        serve("memory://", host="0.0.0.0", port=1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from fleetmem.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_token_new_prints_the_token_once_and_stores_its_digest(tmp_path: Path) -> None:
    done = _cli(
        "token", "new", "--namespaces", "fleet-*,ops", "--scope", "write", "--file", "t.toml",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.splitlines()[0]
    assert done.stdout.strip() == token
    table = load_tokens(tmp_path / "t.toml")
    principal = table.authenticate(token)
    assert principal is not None and principal.globs == ("fleet-*", "ops")
    assert token not in (tmp_path / "t.toml").read_text()
    bare = _cli("token", "new", "--namespaces", "x", "--scope", "read", cwd=tmp_path)
    lines = bare.stdout.splitlines()
    assert lines[1] == "[[tokens]]" and digest(lines[0]) in bare.stdout


def test_cli_serve_refuses_public_address_without_tokens(tmp_path: Path) -> None:
    done = _cli("--url", "memory://", "serve", "--host", "0.0.0.0", "--port", "1", cwd=tmp_path)
    assert done.returncode == 2
    assert "without a tokens file" in done.stderr


_SCRIPT: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/v1/ns/team-a/kv/missing", {}, b""),
    ("PUT", "/v1/ns/team-a/kv/a%2Fb/c", {}, b'{"value": {"n": 123456789012345678901234567890}}'),
    ("GET", "/v1/ns/team-a/kv/a/b/c", {}, b""),
    ("PUT", "/v1/ns/team-a/kv/a/b/c", {"If-Match": '"7"'}, b'{"value": 2}'),
    ("PUT", "/v1/ns/team-a/kv/a/b/c", {"If-Match": '"1"'}, b'{"value": 2, "ttl": 60}'),
    ("PUT", "/v1/ns/team-a/kv/a/b/c", {"If-None-Match": "*"}, b'{"value": 3}'),
    ("PUT", "/v1/ns/team-a/kv/x", {}, b'{"value": 1, "ttl": -1}'),
    ("PUT", "/v1/ns/team-a/kv/x", {}, b"{nope"),
    ("PUT", "/v1/ns/team-a/kv/x", {}, b'{"value": 1, "extra": 1}'),
    ("PUT", "/v1/ns/team-a/kv/x", {"Fleetmem-Fence": "nolease; token=3"}, b'{"value": 1}'),
    ("PUT", "/v1/ns/team-a/kv/x", {"Fleetmem-Fence": "garbage"}, b'{"value": 1}'),
    ("PUT", "/v1/ns/kv/kv/kv", {}, b'{"value": "ns kv"}'),  # a namespace called kv
    ("GET", "/v1/ns/kv/kv/kv", {}, b""),
    ("GET", "/v1/ns/team-a/kv/%FF", {}, b""),
    ("GET", "/v1/ns/other/kv/x", {}, b""),
    ("GET", "/v1/ns/bad%20ns/kv/x", {}, b""),
    ("GET", "/v1/ns/team-a/kv/x", {"Authorization": "Bearer wrong"}, b""),
    ("GET", "/v1/ns/team-a/kv/x", {"Authorization": ""}, b""),
]


def _comparable(r: httpx.Response) -> tuple[Any, ...]:
    body: Any = r.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("created_at", "updated_at")}
        if "expires_at" in body:
            body["expires_at"] = body["expires_at"] is not None
    headers = {k: r.headers.get(k) for k in ("content-type", "etag", "www-authenticate")}
    return r.status_code, body, headers


async def test_fast_path_answers_exactly_as_the_framework_routes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET and PUT of one entry skip the framework; every answer must be the routes' own."""
    import fleetmem.service.app as app_module

    answered = 0
    real = app_module.fast_kv  # type: ignore[attr-defined]

    async def counting(*args: Any) -> bool:
        nonlocal answered
        done = await real(*args)
        answered += done
        return done

    monkeypatch.setattr(app_module, "fast_kv", counting)
    token = new_token()
    table = TokenTable([make_entry(token, ["team-*", "kv"], "write")])
    answers: list[list[tuple[Any, ...]]] = []
    for fast in (True, False):
        async with serving(tokens=table) as client:
            _state(client).fast_path = fast
            got = []
            for method, path, headers, body in _SCRIPT:
                sent = {"Authorization": f"Bearer {token}", **headers}
                if sent["Authorization"] == "":
                    del sent["Authorization"]
                r = await client.request(method, path, headers=sent, content=body)
                got.append(_comparable(r))
            answers.append(got)
        if fast:
            # every request but the one with a percent-encoded namespace took the fast path
            assert answered == len(_SCRIPT) - 1
    assert answered == len(_SCRIPT) - 1  # and none with it off
    for (method, path, _, _), fast, routed in zip(_SCRIPT, *answers, strict=True):
        assert fast[0] == routed[0], (method, path, fast, routed)
        if fast[0] < 400:
            assert fast == routed, (method, path)
        else:  # same problem type and fields; the wording of a 400 may differ
            assert fast[1]["type"] == routed[1]["type"], (method, path, fast, routed)
            assert fast[2] == routed[2]
    statuses = [a[0] for a in answers[0]]
    assert statuses[:3] == [404, 201, 200] and statuses[11:13] == [201, 200]


# ------------------------------------------------------------------ review findings


@pytest.mark.parametrize(
    ("path", "area"),
    [
        ("/v1/ns/a/kv/x", ("kv", "x")),
        ("/v1/ns//import/kv/x", ("kv", "x")),  # the router reads ns "import", area kv
        ("//v1/ns/a/kv/x", ("kv", "x")),
        ("/v1/ns/a/changes/watch/", ("changes", "watch")),
        ("/v1/ns/export/kv/import", ("kv", "import")),
        ("/healthz", ("", "")),
    ],
)
def test_limits_read_the_path_as_the_router_does(path: str, area: tuple[str, str]) -> None:
    from fleetmem.service.app import _area

    assert _area(path) == area


async def test_a_namespace_named_import_gets_the_value_cap() -> None:
    async with serving() as client:
        cap = _state(client).store.max_value_bytes + 64 * 1024
        r = await client.put("/v1/ns//import/kv/x", content=b"x" * (cap + 10))
        assert r.status_code == 413


@pytest.mark.parametrize("path", ["/v1/ns/a/kv/k", "/v1/ns/a/kv/k?via=framework"])
async def test_a_non_ascii_digit_in_a_fence_is_400(path: str) -> None:
    async with serving() as client:
        r = await client.put(
            path, content=b'{"value": 1}', headers=[(b"Fleetmem-Fence", b"x; token=\xb2")]
        )
        assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/ns/a/kv/d", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("/v1/ns/a/kv/d?via=framework", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("/v1/ns/a/batch/set", b'{"items": {"k": ' + b"[" * 5000 + b"]" * 5000 + b"}}"),
    ],
)
async def test_deeply_nested_bodies_are_400(path: str, body: bytes) -> None:
    async with serving() as client:
        method = "POST" if "batch" in path else "PUT"
        r = await client.request(method, path, content=body)
        assert r.status_code == 400, r.text
        assert (await client.get("/v1/ns/a/kv/d")).status_code == 404


async def test_delete_refuses_if_match_and_keeps_the_entry() -> None:
    async with serving() as client:
        await client.put("/v1/ns/a/kv/k", json={"value": 1})
        r = await client.delete("/v1/ns/a/kv/k", headers={"If-Match": '"999"'})
        assert r.status_code == 400
        assert (await client.get("/v1/ns/a/kv/k")).status_code == 200


async def test_exports_and_imports_count_as_streams_of_their_token() -> None:
    async with serving(ServiceSettings(max_streams_per_token=1)) as client:
        state = _state(client)
        state.streams["-"] = 1  # the open server's principal already holds its one stream
        assert (await client.get("/v1/ns/a/export")).status_code == 429
        r = await client.post("/v1/ns/a/import", content=b"")
        assert r.status_code == 429
        del state.streams["-"]
        assert (await client.get("/v1/ns/a/export")).status_code == 200
        assert not state.streams  # released once the export was sent


async def test_metrics_read_a_bounded_number_of_namespaces() -> None:
    from fleetmem.observability import COLLECTED_NAMESPACES

    store = InMemoryStore(namespace="default")
    app = create_app(store, metrics=True)
    try:
        async with (
            app.lifespan(),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://t"
            ) as client,
        ):
            for i in range(COLLECTED_NAMESPACES + 50):
                assert (await client.get(f"/v1/ns/n{i}/kv/x")).status_code == 404
            inst = _state(client).instrumentation
            assert len(inst.namespaces) == COLLECTED_NAMESPACES
            assert (
                "default" in inst.namespaces and f"n{COLLECTED_NAMESPACES + 49}" in inst.namespaces
            )
            assert (await client.get("/metrics")).status_code == 200
    finally:
        await store.close()
