"""The demo's change-feed check can fail: a result written without its change is caught."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetmem.backends.memory.kv import InMemoryKV
from fleetmem.demo import run_demo


def test_the_demo_checks_the_feed_against_the_store() -> None:
    report = asyncio.run(run_demo("memory://", agents=3, items=12, crash_rate=0.0))
    assert report.consistent, report.problems
    assert report.feed_results == report.watched_results == report.results == 12


def test_a_result_missing_from_the_feed_makes_the_run_inconsistent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = InMemoryKV._recorded_set
    dropped: list[str] = []

    def lossy(self: InMemoryKV, key: str, record: Any, now: float) -> None:
        if key.startswith("results/") and not dropped:
            dropped.append(key)  # this one write is not recorded
            return
        original(self, key, record, now)

    monkeypatch.setattr(InMemoryKV, "_recorded_set", lossy)
    monkeypatch.setattr("fleetmem.demo.FEED_PATIENCE", 1.0)
    report = asyncio.run(run_demo("memory://", agents=3, items=12, crash_rate=0.0))
    assert dropped
    assert not report.consistent
    assert any("change feed holds 11" in p for p in report.problems), report.problems
    assert any("watch saw 11 of 12" in p for p in report.problems), report.problems
