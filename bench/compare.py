"""Compare the ratios of saved benchmark runs side by side: ``python bench/compare.py A B``.

Each file is a ``fleetmem bench --json`` report. For every ratio (fleetmem's median over a
reference's, per workload) the table shows the figure of each run; ``--labels before,after``
names the columns. Interleave the runs (before, after, before, after) and read a change as real
only where it exceeds the spread between runs of the same code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from suite.report import load_report, ratios

Row = tuple[str, str, list[float | None]]


def compare(paths: list[Path]) -> list[Row]:
    """(workload, reference, ratio per run or None where a run lacks it), in first-seen order."""
    per_run = [{(w, ref): r for w, ref, _text, r in ratios(load_report(p))} for p in paths]
    keys: dict[tuple[str, str], None] = {}
    for run in per_run:
        keys.update(dict.fromkeys(run))
    return [(w, ref, [run.get((w, ref)) for run in per_run]) for w, ref in keys]


def format_table(rows: list[Row], labels: list[str]) -> str:
    """A Markdown table of ``rows``."""
    head = "| workload | vs | " + " | ".join(labels) + " |"
    lines = [head, "|" + " --- |" * (2 + len(labels))]
    for workload, ref, figures in rows:
        cells = " | ".join("—" if f is None else f"{f:.2f}" for f in figures)
        lines.append(f"| {workload} | {ref} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compare.py", description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path, help="fleetmem bench --json files")
    parser.add_argument("--labels", help="comma-separated column names (default: file names)")
    parser.add_argument(
        "--only", help="keep workloads starting with one of these (comma-separated)"
    )
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.reports]
    if len(labels) != len(args.reports):
        parser.error("give one label per report")
    rows = compare(args.reports)
    if args.only:
        prefixes = tuple(args.only.split(","))
        rows = [row for row in rows if row[0].startswith(prefixes)]
    try:
        print(format_table(rows, labels), flush=True)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as a Unix filter does, and keep the
        # interpreter's final flush from raising again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
