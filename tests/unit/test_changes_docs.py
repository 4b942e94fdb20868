"""The examples of ``docs/changes.md`` and the README's change-feed snippet run as written and
print what the pages say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "changes.md"


def _run(program: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_follow_a_prefix_example_runs_as_written(tmp_path: Path) -> None:
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
        if "asyncio.run(main())" in b
    ]
    assert len(blocks) == 1
    lines = _run(blocks[0], tmp_path).splitlines()
    assert lines == [
        "set results/t-0 {'passed': True}",
        "set results/t-1 {'passed': True}",
        "set results/t-2 {'passed': True}",
        "3 results recorded",
        "[]",
    ]
    assert (tmp_path / "fleet.db").exists()


def test_the_readme_change_feed_snippet_runs_as_written(tmp_path: Path) -> None:
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "store.changes." in b
    ]
    assert len(blocks) == 1
    body = "\n".join("    " + line for line in blocks[0].splitlines())
    program = (
        "import asyncio\nfrom fleetmem import open_store\n\n\nasync def main():\n"
        f"{body}\n\n\nasyncio.run(main())\n"
    )
    assert _run(program, tmp_path) == "[('set', 'results/t-1', 1)]\n"
