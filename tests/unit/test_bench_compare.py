"""``bench/compare.py``: the ratios of saved runs, side by side (no servers: saved reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SAVED = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.json"


def _compare_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import compare

    return compare


def test_runs_side_by_side_and_a_missing_ratio(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compare = _compare_module(monkeypatch)
    data = json.loads(SAVED.read_text())
    halved = dict(data)
    halved["rows"] = [
        {**row, "values": [v / 2 for v in row["values"]]} if row["subject"] == "fleetmem" else row
        for row in data["rows"]
        if row["workload"] != "redis get p50"
    ]
    other = tmp_path / "halved.json"
    other.write_text(json.dumps(halved))
    rows = compare.compare([SAVED, other])
    assert rows, "no ratio compared"
    for workload, _ref, (first, second) in rows:
        if workload == "redis get p50":
            assert first is not None and second is None
        else:
            assert second == pytest.approx(first / 2)
    table = compare.format_table(rows, ["saved", "halved"])
    assert table.splitlines()[0] == "| workload | vs | saved | halved |"
    assert "| redis get p50 | raw |" in table and "| — |" in table


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    # ``python bench/compare.py ... | head -1``: the pipe closes after the first line.
    import subprocess
    import sys

    # 400 columns: a table larger than the pipe's buffer, so the writer meets the closed pipe.
    with subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "compare.py"), *[str(SAVED)] * 400],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader goes away before the table is written out
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    assert first.startswith(b"| workload |")
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
