"""The fleetmem command line, run in-process on memory and SQLite stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fleetmem import cli
from fleetmem.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_set_get_keys_search_ttl_del_on_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    code, out, _ = run(capsys, "--url", url, "set", "agents/a1", '{"state": "idle"}', "--ttl", "60")
    assert code == 0
    assert json.loads(out)["version"] == 1
    code, out, _ = run(
        capsys, "--url", url, "set", "agents/a2", "plain text", "--raw", "--partition", "p2"
    )
    assert code == 0
    code, out, _ = run(capsys, "--url", url, "--json", "get", "agents/a1")
    assert code == 0
    assert json.loads(out)["value"] == {"state": "idle"}
    code, out, _ = run(capsys, "--url", url, "keys", "agents/")
    assert json.loads(out) == ["agents/a1", "agents/a2"]
    code, out, _ = run(capsys, "--url", url, "search", "agents/a?", "--partition", "p2")
    assert json.loads(out) == {"agents/a2": "plain text"}
    code, out, _ = run(capsys, "--url", url, "ttl", "agents/a1")
    assert 0 < json.loads(out)["ttl"] <= 60
    code, out, _ = run(capsys, "--url", url, "stats")
    stats = json.loads(out)
    assert stats["keys"] == 2
    assert stats["partitions"] == {"default": 1, "p2": 1}
    code, out, _ = run(capsys, "--url", url, "del", "agents/a1", "agents/zz")
    assert code == 0
    assert json.loads(out) == {"deleted": 1}
    code, _, err = run(capsys, "--url", url, "get", "agents/a1")
    assert code == 1
    assert "not found" in err


def test_table_output_and_namespaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    assert run(capsys, "--url", url, "-n", "other", "set", "k", "1")[0] == 0
    code, out, _ = run(capsys, "--url", url, "--table", "-n", "other", "get", "k")
    assert code == 0
    assert "version" in out and "partition" in out
    code, out, _ = run(capsys, "--url", url, "keys")
    assert json.loads(out) == []


def test_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--url", "memory://", "set", "k", "{not json")
    assert code == 2
    assert "not JSON" in err
    code, _, err = run(capsys, "--url", "memory://", "ttl", "missing")
    assert code == 2
    assert "KeyNotFoundError" in err
    code, _, err = run(capsys, "--url", "nope://x", "stats")
    assert code == 2
    assert "ConfigurationError" in err


def test_health(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", "memory://", "health")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["backend"] == "memory"


def test_demo_on_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLEETMEM_URL", raising=False)
    code, out, _ = run(capsys, "demo", "--agents", "8", "--items", "40", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["consistent"] is True
    assert report["results"] == 40
    assert report["store"].startswith("sqlite")
    assert (tmp_path / "fleetmem.db").exists()


def test_demo_readable_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--url", "memory://", "demo", "--agents", "5", "--items", "20")
    assert code == 0
    assert "items done     20 / 20" in out
    assert "consistent     yes" in out


#: The checkout's benchmarks (``bench/run.py`` and its ``suite`` package): not in the package.
CHECKOUT_BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_runs_the_checkouts_bench_run_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a checkout (an editable install) ``fleetmem bench`` runs ``bench/run.py``; here on a
    saved run (``--from-json``), which measures nothing and needs no server."""
    if Path(cli.__file__).resolve().parents[2] == CHECKOUT_BENCH.parent:  # editable install
        assert cli._bench_dir() == CHECKOUT_BENCH
    monkeypatch.setattr(cli, "_bench_dir", lambda: CHECKOUT_BENCH)
    monkeypatch.setattr(sys, "path", [*sys.path])  # the command puts bench/ on it
    saved = tmp_path / "run.json"
    rows = [
        {"workload": "redis get p50", "subject": "raw", "unit": "us", "values": [100.0, 110.0]},
        {"workload": "redis get p50", "subject": "fleetmem", "unit": "us", "values": [105.0]},
    ]
    saved.write_text(
        json.dumps(
            {
                "started": "2026-12-04T00:00:00+00:00",
                "machine": "test",
                "command": "fleetmem bench",
                "rows": rows,
                "notes": ["a note"],
            }
        )
    )
    code, out, _ = run(capsys, "bench", "--from-json", str(saved))
    assert code == 0
    assert out.startswith("fleetmem bench — 2026-12-04T00:00:00+00:00 — test")
    assert "redis get p50 vs raw: latency ≤ 1.10x raw" in out
    assert out.rstrip().endswith("note: a note")


def test_bench_outside_a_checkout_says_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installed from a wheel there is no ``bench/`` next to the package: exit 2, saying why."""
    monkeypatch.setattr(cli, "_bench_dir", lambda: tmp_path / "bench")
    code, out, err = run(capsys, "bench", "--quick")
    assert code == 2
    assert out == ""
    assert "fleetmem bench runs from a source checkout" in err
    assert "python bench/run.py" in err
