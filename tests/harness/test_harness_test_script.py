"""scripts/test.sh: the arguments it gives pytest, with and without a Docker engine.

``PYTHON`` points the script at a stand-in interpreter that records each call and answers the
Docker check as told, so what is checked is the script's own argument handling, exactly as
pytest would receive it (no formatter, linter or test run happens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test.sh"

FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PYTHON_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "-c":  # the Docker check: exit 0 when an engine answers
    sys.exit(0 if os.environ["FAKE_DOCKER"] == "1" else 1)
"""


def _run_script(
    tmp_path: Path, *args: str, docker: bool = False, workers: str | None = "1"
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run scripts/test.sh with the stand-in interpreter; ``workers`` is FLEETMEM_TEST_WORKERS
    (None: unset). Returns the run and the log of the interpreter's calls."""

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "FAKE_PYTHON_LOG": str(log),
        "FAKE_DOCKER": "1" if docker else "0",
    }
    # GNU nproc answers OMP_NUM_THREADS / OMP_THREAD_LIMIT when they are set.
    for name in ("FLEETMEM_TEST_WORKERS", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):
        env.pop(name, None)
    if workers is not None:
        env["FLEETMEM_TEST_WORKERS"] = workers
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )
    return done, log


def _pytest_args(
    tmp_path: Path, *args: str, docker: bool = False, workers: str | None = "1"
) -> list[str]:
    """The arguments scripts/test.sh passes to ``python -m pytest`` for ``args``."""
    done, log = _run_script(tmp_path, *args, docker=docker, workers=workers)
    assert done.returncode == 0, done.stdout + done.stderr
    calls: list[list[str]] = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [call[2:] for call in calls if call[:2] == ["-m", "pytest"]]
    assert len(runs) == 1, calls
    # ruff format, ruff check and mypy ran first.
    assert [call[:2] for call in calls[:3]] == [["-m", "ruff"], ["-m", "ruff"], ["-m", "mypy"]]
    return runs[0]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], ["-m", "not docker"]),
        (["-m", "not slow"], ["-m", "(not slow) and not docker"]),
        (["-mnot slow"], ["-m", "(not slow) and not docker"]),
        (["-m=not slow"], ["-m", "(not slow) and not docker"]),
        (["-m", "redis or postgres"], ["-m", "(redis or postgres) and not docker"]),
        (["-m", "slow", "-m", "redis"], ["-m", "(redis) and not docker"]),  # the last counts
        (["-m", ""], ["-m", "not docker"]),
        (
            ["-x", "-m", "not slow", "-k", "redis", "tests/unit"],
            ["-m", "(not slow) and not docker", "-x", "-k", "redis", "tests/unit"],
        ),
        (["-k", "not slow", "-q"], ["-m", "not docker", "-k", "not slow", "-q"]),
        (["-xm", "not slow"], ["-m", "(not slow) and not docker", "-x"]),
        (["-qvmslow", "-k", "x"], ["-m", "(slow) and not docker", "-qv", "-k", "x"]),
        (["-xs"], ["-m", "not docker", "-xs"]),
        (["--", "-m"], ["-m", "not docker", "--", "-m"]),  # after --, a file name
        (["-m"], ["-m", "not docker", "-m"]),  # pytest reports the missing value
    ],
)
def test_without_docker_a_marker_expression_is_combined(
    tmp_path: Path, given: list[str], expected: list[str]
) -> None:
    assert _pytest_args(tmp_path, *given) == expected


def test_with_docker_the_arguments_go_to_pytest_unchanged(tmp_path: Path) -> None:
    given = ["-m", "not slow", "-x", "--", "tests/x.py"]
    assert _pytest_args(tmp_path, *given, docker=True) == given
    assert _pytest_args(tmp_path, docker=True) == []


@pytest.mark.parametrize(
    ("given", "docker", "expected"),
    [
        ([], False, ["-m", "not docker", "-n", "2"]),
        ([], True, ["-n", "2"]),
        (["-xm", "not slow"], False, ["-m", "(not slow) and not docker", "-n", "2", "-x"]),
        (["-k", "redis", "-q"], True, ["-n", "2", "-k", "redis", "-q"]),
        (["-p", "no:cacheprovider"], True, ["-n", "2", "-p", "no:cacheprovider"]),
        (["-pno:randomly", "-x"], True, ["-n", "2", "-pno:randomly", "-x"]),
    ],
)
def test_the_whole_suite_runs_in_workers(
    tmp_path: Path, given: list[str], docker: bool, expected: list[str]
) -> None:
    assert _pytest_args(tmp_path, *given, docker=docker, workers="2") == expected


@pytest.mark.parametrize(
    "given",
    [
        ["tests/unit"],
        ["tests/harness/test_harness_test_script.py", "-k", "workers"],
        ["-x", "tests/harness/test_harness_test_script.py::test_the_whole_suite_runs_in_workers"],
        ["--", "tests/x.py"],
        ["-n", "0"],
        ["-n4"],
        ["--numprocesses=3"],
        ["--dist", "loadfile"],
        ["-p", "no:xdist"],
        ["-q", "-pno:xdist"],
        ["-p", "xdist", "-p", "no:cacheprovider"],
        ["--pdb"],
    ],
)
def test_a_test_path_or_a_choice_of_workers_runs_as_given(tmp_path: Path, given: list[str]) -> None:
    assert _pytest_args(tmp_path, *given, docker=True, workers="2") == given


def test_workers_default_to_the_cpus_at_most_two(tmp_path: Path) -> None:
    cpus = min(len(os.sched_getaffinity(0)), 2)
    expected = ["-n", str(cpus)] if cpus >= 2 else []
    assert _pytest_args(tmp_path, docker=True, workers=None) == expected
    assert _pytest_args(tmp_path, docker=True, workers="0") == []


def test_a_bad_worker_count_is_refused(tmp_path: Path) -> None:
    done, log = _run_script(tmp_path, workers="many")
    assert done.returncode == 2
    assert "FLEETMEM_TEST_WORKERS" in done.stderr
    assert not log.exists()  # nothing ran
