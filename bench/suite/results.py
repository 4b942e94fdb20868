"""What a run measured: one figure per workload and subject, the report, the progress line."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field


@dataclass
class Measurement:
    """One figure for one subject over several repetitions."""

    workload: str
    subject: str  # "fleetmem", "raw", "raw-merged", "langgraph", ...
    unit: str  # "us" (lower is better) or "ops/s" / "keys/s" (higher is better) or "bytes"
    values: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lower_is_better(self) -> bool:
        return self.unit in ("us", "bytes", "ms")


@dataclass
class Report:
    started: str
    machine: str
    command: str
    rows: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, workload: str, subject: str) -> Measurement | None:
        for row in self.rows:
            if row.workload == workload and row.subject == subject:
                return row
        return None

    def add(self, row: Measurement) -> Measurement:
        self.rows.append(row)
        return row


class Progress:
    """A one-line progress display on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()

    def step(self, text: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
