#!/usr/bin/env bash
# fleetmem's test command: formatting, lint, strict typing, then the whole test suite.
# Integration tests start their own PostgreSQL and Redis servers (see docs/testing.md);
# FLEETMEM_REQUIRE_SERVERS=1 turns a missing server into a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "== ruff format --check"; "$PY" -m ruff format --check src tests bench migrations
echo "== ruff check";          "$PY" -m ruff check src tests bench migrations
echo "== mypy --strict";       "$PY" -m mypy
if ! "$PY" -c "from fleetmem.testing.servers import docker_available as up; raise SystemExit(not up())"
then
    # The container providers cannot run without an engine; say so instead of skipping silently.
    echo "== no Docker engine answers: the container tests (marker 'docker') are deselected;"
    echo "   PostgreSQL and Redis come from the local server binaries instead"
    set -- -m "not docker" "$@"
fi
echo "== pytest";              "$PY" -m pytest "$@"
