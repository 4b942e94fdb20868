"""The history checker on hand-made histories: it passes clean ones and catches each anomaly.

The last tests run the real multi-process runner against a SQLite file shared by spawned
processes (no server needed).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fleetmem.testing.history import (
    Fault,
    Nemesis,
    Op,
    StoreSpec,
    WorkerError,
    WorkerSpec,
    check_history,
    read_final,
    run_history,
)


def w(
    value: int, invoke: float, complete: float, *, key: str = "k", error: str | None = None
) -> Op:
    return Op(1, "write", key, value, invoke, complete, error)


def r(
    value: object,
    invoke: float,
    complete: float,
    *,
    key: str = "k",
    process: int = 2,
    error: str | None = None,
) -> Op:
    return Op(process, "read", key, value, invoke, complete, error)


def test_a_clean_sequential_history_passes() -> None:
    ops = [
        r(None, 0.0, 0.1),
        w(1, 1.0, 1.1),
        r(1, 1.2, 1.3),
        w(2, 2.0, 2.1),
        r(2, 2.2, 2.3),
        r(2, 3.0, 3.1, process=3),
    ]
    report = check_history(ops, {"k": 2})
    assert report.ok
    assert (report.operations, report.reads, report.writes) == (6, 4, 2)
    assert report.acknowledged_writes == 2
    assert (report.stale_reads, report.lost_writes, report.impossible_reads) == (0, 0, 0)
    assert report.anomalies == []
    assert report.final_checked


def test_a_read_concurrent_with_a_write_may_see_either_value() -> None:
    # The read began before the write of 2 was acknowledged: 1 and 2 are both fine.
    ops = [w(1, 0.0, 0.1), w(2, 1.0, 2.0), r(1, 1.5, 1.6), r(2, 1.5, 1.7, process=3)]
    report = check_history(ops, {"k": 2})
    assert report.ok, report.describe()


def test_a_stale_read_is_caught() -> None:
    ops = [w(1, 0.0, 0.1), w(2, 1.0, 1.1), r(1, 1.2, 1.3)]  # 2 was acked before the read
    report = check_history(ops, {"k": 2})
    assert report.stale_reads == 1
    assert not report.ok
    (anomaly,) = report.anomalies
    assert anomaly.kind == "stale read"
    assert (anomaly.got, anomaly.low, anomaly.high) == (1, 2, 2)
    assert "stale read" in report.describe()


def test_reading_nothing_after_an_acknowledged_write_is_stale() -> None:
    report = check_history([w(1, 0.0, 0.1), r(None, 0.2, 0.3)])
    assert report.stale_reads == 1


def test_a_lost_write_is_caught() -> None:
    ops = [w(1, 0.0, 0.1), w(2, 1.0, 1.1), w(3, 2.0, 2.1)]
    report = check_history(ops, {"k": 2})  # 3 was acknowledged, the store holds 2
    assert report.lost_writes == 1
    assert not report.ok
    assert report.anomalies[0].kind == "lost write"
    assert check_history(ops, {}).lost_writes == 1  # absent after the run: lost too
    assert check_history(ops, {"k": 3}).ok


def test_a_failed_write_may_or_may_not_have_landed() -> None:
    ops = [
        w(1, 0.0, 0.1),
        w(2, 1.0, 1.1, error="OutcomeUnknownError"),
        w(3, 2.0, 2.1, error="BackendUnavailableError"),
    ]
    for final in (1, 2, 3):
        report = check_history(ops, {"k": final})
        assert report.ok, (final, report.describe())
    assert check_history(ops, {}).lost_writes == 1
    report = check_history(ops, {"k": 4})  # never written
    assert report.impossible_reads == 1
    assert report.write_failures == {"OutcomeUnknownError": 1, "BackendUnavailableError": 1}
    assert report.acknowledged_writes == 1


def test_a_value_never_written_or_not_yet_invoked_is_impossible() -> None:
    ops = [w(1, 0.0, 0.1), w(3, 2.0, 2.1), r(3, 1.0, 1.1), r(2, 3.0, 3.1), r("x", 3.0, 3.1)]
    report = check_history(ops, {"k": 3})
    assert report.impossible_reads == 3  # 3 before it was invoked, 2 never, "x" never
    assert report.stale_reads == 0
    assert not report.ok


def test_failed_reads_are_counted_by_class_and_never_judged() -> None:
    ops = [
        w(1, 0.0, 0.1),
        r(None, 0.2, 0.3, error="BackendUnavailableError"),
        r(None, 0.4, 0.5, error="BackendUnavailableError"),
        r(None, 0.6, 0.7, error="TimeoutError"),
    ]
    report = check_history(ops, {"k": 1}, faults=[Fault(0.15, "blackhole")])
    assert report.ok
    assert report.read_failures == {"BackendUnavailableError": 2, "TimeoutError": 1}
    assert report.failures == {"read BackendUnavailableError": 2, "read TimeoutError": 1}
    assert report.faults == 1
    line = report.summary("demo")
    assert line.startswith("[demo] 4 ops")
    assert "stale reads 0, lost writes 0" in line
    assert "read TimeoutError: 1" in line


def test_a_read_older_than_an_earlier_read_is_a_regression_not_a_stale_read() -> None:
    # The failed write of 2 landed: one reader saw it, a later reader saw 1 again.
    ops = [
        w(1, 0.0, 0.1),
        w(2, 1.0, 1.1, error="OutcomeUnknownError"),
        r(2, 1.2, 1.3),
        r(1, 1.4, 1.5, process=3),
    ]
    report = check_history(ops, {"k": 2})
    assert report.ok
    assert report.read_regressions == 1


def test_keys_are_checked_apart() -> None:
    ops = [w(5, 0.0, 0.1, key="a"), Op(7, "write", "b", 1, 0.0, 0.1), r(5, 0.2, 0.3, key="b")]
    report = check_history(ops, {"a": 5, "b": 1})
    assert report.impossible_reads == 1  # b never held 5
    assert report.keys == 2


@pytest.mark.parametrize(
    "ops",
    [
        [w(1, 0.0, 0.1), Op(9, "write", "k", 2, 1.0, 1.1)],  # two writers
        [w(2, 0.0, 0.1), w(1, 1.0, 1.1)],  # values going down
        [w(1, 0.0, 1.0), w(2, 0.5, 1.5)],  # overlapping writes
        [w(0, 0.0, 0.1)],  # not a positive integer
        [r(None, 1.0, 0.5)],  # completes before it starts
    ],
    ids=["two-writers", "decreasing", "overlapping", "zero", "backwards-time"],
)
def test_histories_the_checker_cannot_judge_are_refused(ops: list[Op]) -> None:
    with pytest.raises(ValueError):
        check_history(ops)


# -- the runner, on a SQLite file shared by spawned processes -----------------------------------


@pytest.mark.sqlite
async def test_run_history_across_processes_on_sqlite(tmp_path: Path) -> None:
    spec = StoreSpec(url=f"sqlite:///{tmp_path / 'h.db'}", namespace="history")
    keys = ("a", "b", "c")
    workers = [
        WorkerSpec(spec, write_keys=keys, clients=3, max_ops=150, seconds=20, pause=0.001),
        WorkerSpec(spec, read_keys=keys, clients=2, max_ops=150, seconds=20, seed=1),
        WorkerSpec(spec, read_keys=keys, clients=2, max_ops=150, seconds=20, seed=2),
    ]

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(0.1)
        clock.record("nothing, on time")

    history = await run_history(workers, nemesis)
    assert len(history.ops) == 450
    assert history.written_keys() == ["a", "b", "c"]
    assert [f.description for f in history.faults] == ["nothing, on time"]
    assert len({op.process for op in history.ops}) == 7
    store = await spec.open()
    try:
        final = await read_final(store, history.written_keys())
    finally:
        await store.close()
    report = history.check(final)
    print(report.summary("sqlite, 3 processes"))
    assert report.writes == 150
    assert report.reads == 300
    assert report.ok, report.describe()
    # Each key holds its writer's last value.
    last = {op.key: op.value for op in history.ops if op.kind == "write" and op.ok}
    assert final == last


async def test_a_worker_that_cannot_open_its_store_fails_the_run() -> None:
    spec = StoreSpec(url="nosuchscheme://x", namespace="history")
    with pytest.raises(WorkerError, match="worker 0 failed"):
        await run_history([WorkerSpec(spec, read_keys=("k",))], start_timeout=60)


@pytest.mark.sqlite
async def test_the_workers_stop_soon_after_the_nemesis(tmp_path: Path) -> None:
    spec = StoreSpec(url=f"sqlite:///{tmp_path / 'h.db'}", namespace="history")
    workers = [
        WorkerSpec(spec, write_keys=("a",), max_ops=10**9, seconds=600, pause=0.01),
        WorkerSpec(spec, read_keys=("a",), max_ops=10**9, seconds=600, pause=0.01),
    ]

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(0.5)
        clock.record("done")

    history = await run_history(workers, nemesis, stop_after_nemesis=0.5, timeout=120)
    assert 0 < history.end - history.start < 60
    assert history.faults[0].time - history.start >= 0.5
    assert [op for op in history.ops if op.invoke > history.faults[0].time]
    assert history.check().ok


@pytest.mark.sqlite
async def test_a_failing_nemesis_ends_the_run_and_its_workers(tmp_path: Path) -> None:
    spec = StoreSpec(url=f"sqlite:///{tmp_path / 'h.db'}", namespace="history")
    workers = [WorkerSpec(spec, write_keys=("a",), max_ops=10**9, seconds=600, pause=0.01)]

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(0.2)
        raise RuntimeError("the fault could not be injected")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="could not be injected"):
        await run_history(workers, nemesis, timeout=120)
    assert time.monotonic() - started < 60
