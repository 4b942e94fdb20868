"""``create_app``: the fleetmem HTTP service as an ASGI application (Litestar).

Litestar was chosen by measurement among the frameworks that generate OpenAPI 3.1 from typed
routes: a key-value ``GET`` route with an auth header and a JSON body answered 6,475 requests/s
on Litestar 2.25, 3,514 on FastAPI 0.165 (bare Starlette, which generates no schema: 12,659),
one uvicorn worker, 64 connections (``docs/service.md`` has the measurement).

The app is a thin layer: each route authenticates, checks the namespace against the token's
globs, calls the one store method the contract names, and renders the result; every fleetmem
error becomes the problem the contract's table gives (:mod:`fleetmem.service.problems`).
A pure ASGI middleware in front applies the limits (body caps, request timeouts, load shedding)
without the framework's per-request cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from fleetmem.errors import FleetmemError
from fleetmem.service.auth import TokenTable, load_tokens
from fleetmem.service.context import (
    MAX_WAIT_SECONDS,
    STATES,
    ServiceSettings,
    ServiceState,
    state_of,
)
from fleetmem.service.kv import fast_kv
from fleetmem.service.problems import PROBLEM_JSON, Problem, problem_for, send_problem
from fleetmem.store import Store

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ROUTE_MODULES", "create_app"]

log = logging.getLogger("fleetmem.service")

# Each module holds ``ROUTES``: its handlers. A new primitive adds its module here.
ROUTE_MODULES = (
    "fleetmem.service.kv",
    "fleetmem.service.coordination",
    "fleetmem.service.changes",
    "fleetmem.service.portability",
)

# Per-value envelope allowed on top of max_value_bytes (ttl, partition, JSON escaping).
_VALUE_ENVELOPE = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def problem_response(problem: Problem) -> Response[Any]:
    return Response(
        content=msgspec.json.encode(problem.body()),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _http_problem(exc: HTTPException) -> Problem:
    status = exc.status_code
    if isinstance(exc, ValidationException) or status == 400:
        errors = exc.extra if isinstance(exc.extra, list) else None
        detail = _validation_detail(errors) or "the request is not valid"
        return Problem(400, "invalid-argument", detail)
    kinds = {
        401: "unauthorized",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
        415: "unsupported-media-type",
        429: "too-many-requests",
        503: "unavailable",
    }
    detail = {
        404: "no such route",
        405: "method not allowed on this route",
        413: "the request body is too large",
    }.get(status, str(exc.detail) if status < 500 else "the server cannot answer now")
    headers = dict(exc.headers or {})
    if status == 503:
        headers.setdefault("Retry-After", "1")
    if status >= 500 and status != 503:
        return Problem(500, "internal-error", "internal error")
    return Problem(status, kinds.get(status, "error"), detail, headers=headers)


def _validation_detail(errors: list[Any] | None) -> str:
    if not errors:
        return ""
    parts = []
    for err in errors[:5]:
        if isinstance(err, dict):
            message = str(err.get("message", "")).strip()
            where = err.get("key")
            source = err.get("source")
            label = f"{source} {where}" if source and where else (where or source or "")
            parts.append(f"{label}: {message}" if label else message)
    return "; ".join(p for p in parts if p)[:500]


def _exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, Problem):
        return problem_response(exc)
    if isinstance(exc, FleetmemError):
        problem = problem_for(exc)
        if problem.status >= 500:
            log.warning(
                "%s %s: %s (%s)",
                request.method,
                request.url.path.split("/kv/", 1)[0],
                problem.type,
                type(exc.__cause__).__name__ if exc.__cause__ else type(exc).__name__,
            )
        return problem_response(problem)
    if isinstance(exc, HTTPException):
        return problem_response(_http_problem(exc))
    if isinstance(exc, msgspec.ValidationError):  # a body converted inside a handler
        return problem_response(Problem(400, "invalid-argument", str(exc)[:500]))
    if isinstance(exc, RecursionError):  # a JSON body nested too deeply to decode
        return problem_response(_TOO_DEEP)
    # Never a trace or a message in a response or a log line: the type names the bug.
    log.error(
        "internal error in %s %s: %s",
        request.method,
        request.url.path.split("/kv/", 1)[0],
        type(exc).__name__,
    )
    return problem_response(Problem(500, "internal-error", "internal error"))


_TOO_DEEP = Problem(400, "serialization", "the JSON body is nested too deeply to be read")

# ------------------------------------------------------------------ operations routes


@get("/healthz", include_in_schema=True, tags=["operations"], summary="Process is alive")
async def healthz() -> dict[str, str]:
    """``200`` while the process serves requests; no auth, no backend call."""
    return {"status": "ok"}


class Ready(msgspec.Struct):
    ok: bool
    backend: str
    latency_ms: float | None


@get("/readyz", tags=["operations"], summary="Backend is healthy")
async def readyz(request: Request[Any, Any, Any]) -> Response[Ready]:
    """The store's ``health()``: ``200`` when ok, ``503`` (with ``Retry-After``) when not.
    No auth; the body names the backend and its latency, never an error message."""
    state = state_of(request)
    if state.shutting_down.is_set():
        return Response(Ready(False, "", None), status_code=503, headers={"Retry-After": "1"})
    try:
        health = await asyncio.wait_for(state.store.health(), state.settings.request_timeout)
    except (FleetmemError, TimeoutError):
        return Response(Ready(False, "", None), status_code=503, headers={"Retry-After": "1"})
    ready = Ready(bool(health.ok), health.backend, health.latency_ms)
    if not health.ok:
        return Response(ready, status_code=503, headers={"Retry-After": "1"})
    return Response(ready)


@get("/metrics", tags=["operations"], summary="Prometheus metrics", media_type=MediaType.TEXT)
async def metrics(request: Request[Any, Any, Any]) -> Response[str]:
    """The store's metrics in the Prometheus text format (no auth, like ``/healthz``: no label
    holds a key, a value or, unless asked for, a namespace)."""
    state = state_of(request)
    inst = state.instrumentation
    if inst is None:
        raise Problem(404, "metrics-disabled", "this server was started without metrics")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    with contextlib.suppress(FleetmemError, TimeoutError):
        await asyncio.wait_for(inst.collect(), state.settings.request_timeout)
    # The framework appends the charset itself.
    media_type = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")
    return Response(generate_latest(inst.registry).decode(), media_type=media_type)


@get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[Any]:
    schema = request.app.openapi_schema.to_schema()
    return Response(msgspec.json.encode(schema), media_type="application/vnd.oai.openapi+json")


_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "the fleetmem error, e.g. invalid-key"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "additionalProperties": True,
}


def _document_problems(app: Litestar) -> None:
    """Every operation answers errors as ``application/problem+json``: say so in the OpenAPI
    document (replacing the framework's own error schema), so that clients and the schema
    fuzzing see the shape errors really have."""
    from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Schema

    problem = OpenAPIResponse(
        description="an error (RFC 9457 problem details; see docs/service.md for the statuses)",
        content={PROBLEM_JSON: OpenAPIMediaType(schema=Schema(**_schema_args(_PROBLEM_SCHEMA)))},
    )
    schema = app.openapi_schema
    for item in (schema.paths or {}).values():
        for method in ("get", "put", "post", "delete", "patch", "head"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            responses = dict(operation.responses or {})
            for code in [c for c in responses if c[:1] in ("4", "5")]:
                del responses[code]
            responses["4XX"] = problem
            responses["5XX"] = problem
            ok = responses.get("200")
            if operation.operation_id == "ReadyzReadyz" and isinstance(ok, OpenAPIResponse):
                # Not ready is the readiness body itself, with 503.
                responses["503"] = OpenAPIResponse(
                    description="the store is not healthy (or the server is stopping)",
                    content=ok.content,
                )
            operation.responses = responses


def _schema_args(spec: dict[str, Any]) -> dict[str, Any]:
    from litestar.openapi.spec import OpenAPIType, Schema

    properties = {
        name: Schema(type=OpenAPIType(prop["type"]), description=prop.get("description"))
        for name, prop in spec["properties"].items()
    }
    return {
        "type": OpenAPIType.OBJECT,
        "required": spec["required"],
        "properties": properties,
        "additional_properties": True,
    }


# ------------------------------------------------------------------ limits (pure ASGI)


def _area(path: str) -> tuple[str, str]:
    """``(area, last segment)`` of a ``/v1/ns/{ns}/{area}/…`` path (``("", "")`` otherwise),
    reading the path as the router does: empty segments (``//``, a trailing ``/``) do not count,
    so that no spelling of a route can get another route's limits."""
    parts = [part for part in path.split("/") if part]
    if len(parts) < 4 or parts[0] != "v1" or parts[1] != "ns":
        return "", ""
    return parts[3], parts[-1]


def _budget(area: str, last: str, settings: ServiceSettings) -> tuple[float | None, bool]:
    """``(timeout, counted)``: the request's time budget (``None``: a stream, unbounded) and
    whether it counts against ``max_in_flight``, by the path's :func:`_area`."""
    if area in ("kv", ""):
        return settings.request_timeout, True
    if area == "changes" and last == "watch":
        return None, False
    if area in ("export", "import"):
        return settings.transfer_timeout, False
    if (area == "queues" and last in ("claim", "result")) or (
        area == "leases" and last == "acquire"
    ):
        return settings.request_timeout + MAX_WAIT_SECONDS, False
    return settings.request_timeout, True


def _cap(method: str, area: str, settings: ServiceSettings, max_value_bytes: int) -> int:
    if area == "import" or (area == "snapshots" and method == "POST"):
        return settings.max_import_bytes
    if area == "kv":
        return max_value_bytes + _VALUE_ENVELOPE
    return settings.max_body_bytes


class _BodyTooLarge(Problem):
    """Raised by the counting ``receive`` when a body without ``Content-Length`` grows past its
    cap: a :class:`Problem`, so that it is a ``413`` whether the framework (reading the body
    for a handler) or the middleware sees it first."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, "body-too-large", f"the request body is larger than {cap} bytes")


def _limits(app: ASGIApp, state: ServiceState) -> ASGIApp:
    settings = state.settings

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        area, last = _area(path)  # once per request, for both the budget and the cap
        timeout, counted = _budget(area, last, settings)
        store = state._store
        cap = _cap(method, area, settings, store.max_value_bytes if store is not None else 0)
        if counted and state.in_flight >= settings.max_in_flight:
            await send_problem(
                send,
                Problem(
                    503,
                    "overloaded",
                    "the server is at its limit of requests in flight; retry shortly",
                    headers={"Retry-After": str(settings.retry_after)},
                ),
            )
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > cap:
                    await send_problem(
                        send,
                        Problem(
                            413 if value.isdigit() else 400,
                            "body-too-large" if value.isdigit() else "invalid-argument",
                            f"the request body is larger than this route's {cap} bytes"
                            if value.isdigit()
                            else "Content-Length is not a number",
                        ),
                    )
                    return
                break
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise _BodyTooLarge(cap)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if counted:
            state.in_flight += 1
        try:
            if timeout is None:
                await app(scope, counting_receive, tracking_send)
            else:
                async with _timeout(timeout):
                    if not (
                        state.fast_path
                        and await fast_kv(state, scope, counting_receive, tracking_send)
                    ):
                        await app(scope, counting_receive, tracking_send)
        except _BodyTooLarge as exc:
            if not started:
                await send_problem(send, exc)
        except TimeoutError:
            if not started:
                detail = "the request timed out"
                fields = {} if method in ("GET", "HEAD") else {"outcome": "unknown"}
                if fields:
                    detail += "; the write may or may not have been applied"
                await send_problem(
                    send,
                    Problem(
                        503,
                        "timeout",
                        detail,
                        headers={"Retry-After": str(settings.retry_after)},
                        **fields,
                    ),
                )
        except Exception as exc:  # a bug: a bare 500, the type name in the log, no trace
            log.error("internal error in %s: %s", method, type(exc).__name__)
            if not started:
                await send_problem(send, Problem(500, "internal-error", "internal error"))
        finally:
            if counted:
                state.in_flight -= 1

    return middleware


# ------------------------------------------------------------------ the app


def _chain_shutdown_signals(state: ServiceState) -> Callable[[], None]:
    """Put a handler in front of the server's own SIGTERM and SIGINT handlers (uvicorn's) that
    first tells long polls and event streams to end: uvicorn waits for requests in flight
    before it runs the app's shutdown, and a stream would otherwise hold it for the whole
    grace period. Returns the function that puts the previous handlers back. Outside the main
    thread (an app run in a thread) there is nothing to chain: shutdown then ends streams."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(state.shutting_down.set)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL and signum == signal.SIGINT:
            raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def restore() -> None:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, before)

    return restore


def _route_handlers() -> list[Any]:
    import importlib

    handlers: list[Any] = [healthz, readyz, metrics, openapi_json]
    for name in ROUTE_MODULES:
        handlers.extend(importlib.import_module(name).ROUTES)
    return handlers


def create_app(
    store: Store[Any] | str | None = None,
    *,
    namespace: str | None = None,
    tokens: TokenTable | str | Path | None = None,
    settings: ServiceSettings | None = None,
    metrics: bool = True,
) -> Litestar:
    """The fleetmem HTTP service for ``store``: a store object (which the caller keeps and
    closes), a URL, or ``None`` for the ``FLEETMEM_*`` settings (the app opens that store at
    startup and closes it at shutdown). ``tokens`` is a :class:`TokenTable` or the path of a
    tokens file; without it every request is allowed (``fleetmem serve`` then listens on
    loopback only). ``metrics`` instruments the store for ``/metrics`` and OpenTelemetry
    (the ``metrics`` extra; ``False`` leaves the store untouched and ``/metrics`` a ``404``).
    """
    settings = settings or ServiceSettings()
    table = load_tokens(tokens) if isinstance(tokens, (str, Path)) else tokens
    owned = not isinstance(store, Store)
    state = ServiceState(store if isinstance(store, Store) else None, table, settings)
    url = store if isinstance(store, str) else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        opened: Store[Any] | None = None
        if owned:
            from fleetmem.factory import open_store

            opened = await open_store(url, namespace=namespace)
            state.attach(opened)
        if metrics:
            from fleetmem.observability import instrument

            state.instrumentation = instrument(state.store)
        restore_signals = _chain_shutdown_signals(state)
        try:
            yield
        finally:
            restore_signals()
            state.shutting_down.set()
            inst = state.instrumentation
            if inst is not None and not owned:
                inst.uninstrument()
            state.instrumentation = None
            if opened is not None:
                state.attach(None)
                await opened.close()

    app = Litestar(
        route_handlers=_route_handlers(),
        exception_handlers={Exception: _exception_handler},
        lifespan=[lifespan],
        state=None,
        debug=False,
        request_max_body_size=None,
        openapi_config=OpenAPIConfig(
            title="fleetmem",
            version="1",
            description="Shared memory for fleets of agents: key-value, leases, agents, "
            "queues, change feed, export and snapshots over HTTP.",
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer"),
                }
            ),
            security=[{"bearer": []}],
        ),
    )
    _document_problems(app)
    app.state["fleetmem"] = state
    STATES.add(state)
    app.asgi_handler = _limits(app.asgi_handler, state)  # type: ignore[assignment,arg-type]
    return app


def state_of_app(app: Litestar) -> ServiceState:
    """The service state of an app made by :func:`create_app` (for ``fleetmem serve``)."""
    state: ServiceState = app.state["fleetmem"]
    return state
