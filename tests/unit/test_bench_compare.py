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
