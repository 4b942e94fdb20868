"""Errors as ``application/problem+json`` (RFC 9457): one shape, the contract's status.

``type`` names the fleetmem error in kebab case (``invalid-key``, ``version-conflict``; a
relative URI reference, as RFC 9457 allows), ``title`` is the error's general meaning,
``detail`` fleetmem's own message (it never holds a password, a driver message or a stack
trace), and the error's fields follow (``current_version``, ``oldest``, ``line``, …).

Decisions where the contract is silent: ``NotANumberError`` (``incr`` of a stored string) is a
``400`` like every bad argument; ``ChangesNotEnabledError`` and ``SnapshotExistsError`` are
``409`` (the namespace's state conflicts with the request, as a held lease does); a
store-side ``ConfigurationError`` or ``SchemaVersionError`` met while serving is a ``503``
(the backend cannot serve; the server log says why); a per-token cap on long polls or event
streams is ``429`` with ``Retry-After``; load shed by the whole server is ``503``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from fleetmem.errors import (
    AgentGoneError,
    BackendUnavailableError,
    ChangesExpiredError,
    ChangesNotEnabledError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    InvalidExportError,
    InvalidKeyError,
    InvalidPatternError,
    KeyNotFoundError,
    LeaseLostError,
    LeaseUnavailableError,
    NotANumberError,
    OutcomeUnknownError,
    SchemaVersionError,
    SerializationError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreClosedError,
    ValueTooLargeError,
    VersionConflictError,
)

__all__ = ["PROBLEM_JSON", "Problem", "problem_for", "send_problem", "status_for"]

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 1

# Most specific first: the first class an error is an instance of decides.
_STATUS: tuple[tuple[type[FleetmemError], int], ...] = (
    (ValueTooLargeError, 413),
    (VersionConflictError, 412),
    (ChangesExpiredError, 410),
    (ChangesNotEnabledError, 409),
    (SnapshotExistsError, 409),
    (LeaseLostError, 409),
    (LeaseUnavailableError, 409),
    (SnapshotNotFoundError, 404),
    (AgentGoneError, 404),
    (KeyNotFoundError, 404),
    (InvalidKeyError, 400),
    (InvalidPatternError, 400),
    (InvalidArgumentError, 400),
    (InvalidExportError, 400),
    (SerializationError, 400),
    (NotANumberError, 400),
    (OutcomeUnknownError, 503),
    (BackendUnavailableError, 503),
    (StoreClosedError, 503),
    (SchemaVersionError, 503),
    (ConfigurationError, 503),
)

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _kebab(name: str) -> str:
    name = name.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def status_for(exc: FleetmemError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class Problem(Exception):
    """An HTTP problem the service raises itself (auth, limits, bad headers)."""

    def __init__(
        self,
        status: int,
        type_: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type_
        self.detail = detail
        self.headers = headers or {}
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            **self.fields,
        }


def problem_for(exc: FleetmemError) -> Problem:
    """The problem a fleetmem error becomes (status from the contract's table)."""
    status = status_for(exc)
    fields: dict[str, Any] = {}
    headers: dict[str, str] = {}
    detail = str(exc)
    if isinstance(exc, VersionConflictError):
        fields["current_version"] = exc.current_version
        fields["expected_version"] = exc.expected
    elif isinstance(exc, ChangesExpiredError):
        fields["oldest"] = exc.oldest
    elif isinstance(exc, InvalidExportError):
        fields["line"] = exc.line
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        if isinstance(exc, OutcomeUnknownError):
            fields["outcome"] = "unknown"
        # A backend message may quote a driver; keep the contract's general wording only.
        detail = (exc.__doc__ or "the backend is unavailable").strip().splitlines()[0]
    elif status == 500:
        detail = "internal error"
    return Problem(status, _kebab(type(exc).__name__), detail, headers=headers, **fields)


async def send_problem(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]], problem: Problem
) -> None:
    """Answer ``problem`` on a raw ASGI ``send`` (the limits layer and the fast path)."""
    body = msgspec.json.encode(problem.body())
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
