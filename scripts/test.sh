#!/usr/bin/env bash
# fleetmem's test command: formatting, lint, strict typing, then the whole test suite.
# Integration tests start their own PostgreSQL and Redis servers (see docs/testing.md);
# FLEETMEM_REQUIRE_SERVERS=1 turns a missing server into a failure instead of a skip.
# Arguments go to pytest. Without a Docker engine the container tests (marker 'docker') are
# deselected: a marker expression given here (-m EXPR, -mEXPR, -m=EXPR, or after other flags
# as in -xm EXPR; the last one counts, as in pytest) becomes '(EXPR) and not docker'.
# The whole suite (no test path given) runs in parallel worker processes (pytest-xdist):
# FLEETMEM_TEST_WORKERS of them, by default as many as there are CPUs, at most 2; 0 or 1 runs
# in one process. Naming a test path, or choosing -n / --dist / -p no:xdist, runs as given.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

# Print the pytest arguments "$@", each ended by a NUL, with the marker expression EXPR of
# -m made '(EXPR) and not docker' (just 'not docker' without one). After '--' nothing is read.
without_docker_tests() {
    local expr="" arg
    local -a out=()
    while (($#)); do
        arg=$1
        shift
        case $arg in
            --)
                out+=("$arg" "$@")
                break
                ;;
            -m)
                if (($# == 0)); then
                    out+=("$arg")  # pytest reports the missing value
                    break
                fi
                expr=$1
                shift
                ;;
            -m=*) expr=${arg#-m=} ;;
            -m?*) expr=${arg#-m} ;;
            *)
                # -m bundled after flags that take no value (-xm EXPR, -xmEXPR, -qvm EXPR).
                if [[ $arg =~ ^-([xsqvl]+)m(.*)$ ]]; then
                    out+=("-${BASH_REMATCH[1]}")
                    if [[ -n ${BASH_REMATCH[2]} ]]; then
                        expr=${BASH_REMATCH[2]}
                    elif (($#)); then
                        expr=$1
                        shift
                    else
                        out+=(-m)  # pytest reports the missing value
                    fi
                else
                    out+=("$arg")
                fi
                ;;
        esac
    done
    if [[ -n "${expr//[[:space:]]/}" ]]; then
        printf '%s\0' -m "($expr) and not docker"
    else
        printf '%s\0' -m "not docker"
    fi
    if ((${#out[@]})); then
        printf '%s\0' "${out[@]}"
    fi
}

# How many pytest-xdist workers run the whole suite: FLEETMEM_TEST_WORKERS, by default the CPU
# count, at most 2 (each worker starts its own PostgreSQL and Redis servers).
if [[ -n ${FLEETMEM_TEST_WORKERS-} ]]; then
    workers=$FLEETMEM_TEST_WORKERS
else
    workers=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    if ((workers > 2)); then
        workers=2
    fi
fi
if ! [[ $workers =~ ^[0-9]+$ ]]; then
    echo "FLEETMEM_TEST_WORKERS must be a number of workers, not '$workers'" >&2
    exit 2
fi

# Succeed when the pytest arguments "$@" ask for the whole suite in a way workers can run: no
# test path (an existing file or directory, a node id such as tests/x.py::test_y, anything
# after --), and no choice of their own (-n, --numprocesses, --dist, --pdb, --trace, or a -p
# naming xdist, as in -p no:xdist).
whole_suite() {
    local arg
    while (($#)); do
        arg=$1
        shift
        case $arg in
            -- | -n* | --numprocesses* | --dist* | --pdb* | --trace*) return 1 ;;
            -p)
                [[ ${1-} == *xdist* ]] && return 1
                (($#)) && shift
                ;;
            -p*) [[ $arg == *xdist* ]] && return 1 ;;
            -*) ;;
            *) [[ -e ${arg%%::*} ]] && return 1 ;;
        esac
    done
    return 0
}

if ((workers >= 2)) && whole_suite "$@"; then
    set -- -n "$workers" "$@"
fi

echo "== ruff format --check"; "$PY" -m ruff format --check src tests bench migrations
echo "== ruff check";          "$PY" -m ruff check src tests bench migrations
echo "== mypy --strict";       "$PY" -m mypy
if ! "$PY" -c "from fleetmem.testing.servers import docker_available as up; raise SystemExit(not up())"
then
    # The container providers cannot run without an engine; say so instead of skipping silently.
    echo "== no Docker engine answers: the container tests (marker 'docker') are deselected;"
    echo "   PostgreSQL and Redis come from the local server binaries instead"
    args=()
    while IFS= read -r -d '' arg; do
        args+=("$arg")
    done < <(without_docker_tests "$@")
    set -- "${args[@]}"
fi
echo "== pytest";              "$PY" -m pytest "$@"
