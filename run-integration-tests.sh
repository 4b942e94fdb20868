#!/usr/bin/env bash
# Run fleetmem's integration, reliability and harness tests against real servers.
#
#   bash run-integration-tests.sh [pytest args...]      e.g.  -x -k redis   or   -n 2
#
# Servers: URLs already in FLEETMEM_TEST_POSTGRES_URL and FLEETMEM_TEST_REDIS_URL are used as
# they are. Otherwise, when a Docker engine answers, docker-compose-test.yml starts PostgreSQL 15
# on 127.0.0.1:5433 and Redis 7 on 127.0.0.1:6380 (removed again on exit, whatever happens).
# Without Docker the test plugin starts its own servers from the local binaries on free ports.
# FLEETMEM_TEST_DOCKER=0 skips Docker. A missing server fails the run (FLEETMEM_REQUIRE_SERVERS
# defaults to 1 here) instead of skipping tests.
set -euo pipefail

cd "$(dirname "$0")"

if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

export FLEETMEM_REQUIRE_SERVERS="${FLEETMEM_REQUIRE_SERVERS:-1}"

compose=()
docker_answers() {
    [[ "${FLEETMEM_TEST_DOCKER:-1}" != 0 ]] || return 1
    command -v docker >/dev/null 2>&1 || return 1
    timeout 10 docker info >/dev/null 2>&1 || return 1
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    else
        return 1
    fi
}

if [[ -n "${FLEETMEM_TEST_POSTGRES_URL:-}" && -n "${FLEETMEM_TEST_REDIS_URL:-}" ]]; then
    echo "run-integration-tests: using the servers given by FLEETMEM_TEST_*_URL"
elif docker_answers; then
    project="fleetmem-test-$$"
    cleanup() {
        "${compose[@]}" -p "$project" -f docker-compose-test.yml down -v --remove-orphans \
            >/dev/null 2>&1 || true
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    echo "run-integration-tests: starting PostgreSQL and Redis with Docker Compose"
    "${compose[@]}" -p "$project" -f docker-compose-test.yml up -d --wait
    export FLEETMEM_TEST_POSTGRES_URL="${FLEETMEM_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5433/fleetmem_test}"
    export FLEETMEM_TEST_REDIS_URL="${FLEETMEM_TEST_REDIS_URL:-redis://127.0.0.1:6380/0}"
else
    echo "run-integration-tests: no Docker engine; the tests start local server binaries"
fi

paths=()
for dir in tests/integration tests/reliability tests/harness; do
    [[ -d "$dir" ]] && paths+=("$dir")
done

status=0
"$python" -m pytest "${paths[@]}" "$@" || status=$?
exit "$status"
