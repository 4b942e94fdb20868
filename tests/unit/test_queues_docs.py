"""The worker loop of ``docs/queues.md`` runs as written and prints what the page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "queues.md"


def _runnable_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [b for b in blocks if "asyncio.run(main())" in b]


def test_the_worker_loop_example_runs_as_written(tmp_path: Path) -> None:
    blocks = _runnable_blocks()
    assert len(blocks) == 1
    done = subprocess.run(
        [sys.executable, "-c", blocks[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("JobResult(id=") and "status='done'" in lines[0]
    assert "value={'passed': True}" in lines[0]
    assert lines[1] == "QueueStats(ready=0, delayed=0, claimed=0, dead=0, done=11)"
    assert lines[2] == "10 jobs and the smoke test done"
    assert (tmp_path / "fleet.db").exists()


def test_the_readme_queue_snippet_runs_as_written(tmp_path: Path) -> None:
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "store.queue(" in b
    ]
    assert len(blocks) == 1
    body = "\n".join("    " + line for line in blocks[0].splitlines())
    program = (
        "import asyncio\nfrom fleetmem import open_store\n\n\nasync def main():\n"
        f"{body}\n\n\nasyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "QueueStats(ready=0, delayed=0, claimed=0, dead=0, done=2)\n"
