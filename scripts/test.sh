#!/usr/bin/env bash
# fleetmem's test command: formatting, lint, strict typing, then the whole test suite.
# Integration tests start their own PostgreSQL and Redis servers (see docs/testing.md);
# FLEETMEM_REQUIRE_SERVERS=1 turns a missing server into a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "== ruff format --check"; "$PY" -m ruff format --check src tests bench
echo "== ruff check";          "$PY" -m ruff check src tests bench
echo "== mypy --strict";       "$PY" -m mypy
echo "== pytest";              "$PY" -m pytest "$@"
