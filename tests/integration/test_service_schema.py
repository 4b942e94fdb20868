"""The service's OpenAPI document, fuzzed with schemathesis against a live server.

The operations are parametrized at collection time from the document of the app that
``fleetmem serve`` runs, built in this process (schemathesis' fixture-based lazy loading does
not work with this pytest); ``test_served_document_is_the_fuzzed_one`` checks that the live
server's ``/openapi.json`` is that same document. Every generated request (the examples,
coverage and fuzzing phases, valid and invalid data) goes over HTTP to ``fleetmem serve`` on
SQLite with an admin token for ``fuzz-*``. Each response must not be a server error, must have
a status the document declares for the operation, and must match the declared schema (errors:
the problem+json schema).

Bounded so that the run stays short: a few examples per operation, derandomized (the same
cases every run), no deadline. Generated namespaces become valid names under ``fuzz-`` (the
namespace checks are the auth matrix's subject). Long polls are cut to a fraction of a second.
The event stream (``changes/watch``) never ends by itself, so it is left out here; the SSE
tests of ``test_service_http.py`` cover it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)
from service_support import ServiceProcess, running_service

pytest.importorskip("litestar", reason="needs the service extra")
pytest.importorskip("uvicorn", reason="needs the service extra")

FUZZ_EXAMPLES = 15
LONG_POLL_CAP = 0.2

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("serve-fuzz")
    with running_service(directory, f"sqlite:///{directory / 'fleetmem.db'}") as service:
        yield service


def _document() -> dict[str, Any]:
    """The OpenAPI document of the app ``fleetmem serve`` runs, built in this process (the
    operations are parametrized when tests are collected, before any server runs);
    :func:`test_served_document_is_the_fuzzed_one` checks that the server serves the same."""
    from fleetmem.service import create_app

    document: dict[str, Any] = create_app(None).openapi_schema.to_schema()
    return document


DOCUMENT = _document()
# An export is JSON Lines: text on the wire, sent as generated.
schemathesis.serializer.alias("application/jsonl", "text/plain")
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path_regex=r"/changes/watch$")


def test_served_document_is_the_fuzzed_one(fuzz_service: ServiceProcess) -> None:
    served = httpx.get(f"{fuzz_service.base_url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(DOCUMENT))


def _namespace(generated: Any) -> str:
    """A valid namespace under the token's ``fuzz-*`` made of the generated one (the checks
    of the namespace itself are the auth tests' subject)."""
    return "fuzz-" + re.sub(r"[^A-Za-z0-9_.-]", "", str(generated))[:40]


def _shorten_waits(container: Any) -> None:
    if isinstance(container, dict) and "wait" in container:
        wait = container["wait"]
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
            if wait <= 60:
                container["wait"] = min(wait, LONG_POLL_CAP)
        elif isinstance(wait, str):
            try:
                seconds = float(wait)
            except ValueError:
                return
            if 0 < seconds <= 60:
                container["wait"] = str(min(seconds, LONG_POLL_CAP))


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_conformance(case: Any, fuzz_service: ServiceProcess) -> None:
    params = case.path_parameters
    if params is not None and "namespace" in params:
        params["namespace"] = _namespace(params["namespace"])
    _shorten_waits(case.body)
    _shorten_waits(case.query)
    case.call_and_validate(
        base_url=fuzz_service.base_url,
        headers=fuzz_service.headers("fuzz"),
        checks=CHECKS,
        timeout=30,
    )
