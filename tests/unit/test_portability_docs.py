"""The examples of ``docs/portability.md`` run as written and do what the page says: the Python
example, the shell commands, the format's sample lines (a valid export), the export written by
hand, and the migration from SQLite to PostgreSQL to the hybrid (on the harness's servers)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from fleetmem import open_store

DOC = Path(__file__).resolve().parents[2] / "docs" / "portability.md"
#: The directory of this interpreter's scripts: the ``fleetmem`` command of this checkout.
BIN = Path(sys.executable).parent


def _blocks(language: str) -> list[str]:
    pattern = rf"```{language}\n(.*?)```"
    return re.findall(pattern, DOC.read_text(encoding="utf-8"), flags=re.S)


def _env(cwd: Path) -> dict[str, str]:
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd)}


def _python(program: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env(cwd),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _shell(script: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_env(cwd),
    )
    assert done.returncode == 0, done.stderr
    return done


def _namespace_entries(url: str, namespace: str) -> dict[str, tuple[Any, str, bool]]:
    async def go() -> dict[str, tuple[Any, str, bool]]:
        async with open_store(url, namespace=namespace) as store:
            found = {}
            for key in await store.keys():
                entry = await store.get_entry(key)
                assert entry is not None
                found[key] = (entry.value, entry.partition, entry.expires_at is not None)
            return found

    return asyncio.run(go())


def test_the_move_a_namespace_example_runs_as_written(tmp_path: Path) -> None:
    blocks = [b for b in _blocks("python") if "asyncio.run(main())" in b]
    assert len(blocks) == 1
    assert _python(blocks[0], tmp_path).splitlines() == [
        "2 snapshot",
        "ImportReport(written=2, skipped_expired=0, skipped_existing=0)",
        "{'step': 1, 'id': 1180591620717411303424} planner",
        "True",
        "CopyReport(copied=2, skipped_expired=0, verified=True)",
    ]
    assert (tmp_path / "ci.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_the_shell_example_runs_as_written(tmp_path: Path) -> None:
    blocks = [b for b in _blocks("sh") if b.startswith("fleetmem -n fleet-1 set")]
    assert len(blocks) == 1
    _shell(blocks[0], tmp_path)
    here, other = f"sqlite:///{tmp_path}/fleetmem.db", f"sqlite:///{tmp_path}/other.db"
    expected = {
        "plans/p-1": ({"step": 1}, "planner", False),
        "results/t-1": ({"passed": True}, "default", True),
    }
    assert _namespace_entries(here, "fleet-1") == expected
    assert _namespace_entries(here, "fleet-1-restored") == expected
    assert _namespace_entries(other, "fleet-1") == expected
    assert _namespace_entries(other, "fleet-1-copy") == expected


def test_the_sample_lines_of_the_format_are_a_valid_export() -> None:
    """The header, the two entry lines and the trailer shown on the page, put together, are
    an export fleetmem imports (the trailer's checksum is the real one)."""
    samples = [b.strip() for b in _blocks("json")]
    assert len(samples) == 3
    header, body, trailer = samples
    data = (header + "\n" + body + "\n" + trailer + "\n").encode()
    entry_lines = [json.loads(line) for line in body.splitlines()]
    assert [e["key"] for e in entry_lines] == sorted(e["key"] for e in entry_lines)
    expiry = datetime.fromisoformat(entry_lines[1]["expires_at"].replace("Z", "+00:00"))
    expired = int(expiry <= datetime.now(timezone.utc))

    async def go() -> None:
        async with open_store("memory://", namespace="docs") as store:
            report = await store.import_from(io.BytesIO(data))
            assert (report.written, report.skipped_expired) == (2 - expired, expired)
            entry = await store.get_entry("plans/p-1")
            assert entry is not None
            assert (entry.value, entry.partition) == ({"step": 1, "id": 2**70}, "planner")

    asyncio.run(go())


def test_an_export_written_by_hand_imports(tmp_path: Path) -> None:
    blocks = [b for b in _blocks("python") if "def stamp(" in b]
    assert len(blocks) == 1
    _python(blocks[0], tmp_path)
    command = "fleetmem -n notes import notes.jsonl.gz"
    assert f"`{command}`" in DOC.read_text(encoding="utf-8")
    done = _shell(command, tmp_path)
    report = json.loads(done.stdout)
    assert (report["written"], report["skipped_expired"]) == (3, 0)
    assert _namespace_entries(f"sqlite:///{tmp_path}/fleetmem.db", "notes") == {
        "notes/1": ({"text": "first"}, "handmade", True),
        "notes/2": ({"text": "second"}, "handmade", False),
        "notes/été": (2**70, "handmade", False),
    }


# ------------------------------------------------------------------------ the migration


async def _create_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _clear_hybrid(hybrid: str, namespaces: list[str]) -> None:
    """Remove what the migration's hybrid left in the shared Redis (its copies and epochs)."""
    for namespace in namespaces:
        async with open_store(hybrid, namespace=namespace) as store:
            await store.clear()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.hybrid
def test_the_migration_runs_as_written_on_real_servers(
    tmp_path: Path, fleetmem_postgres_server: Any, fleetmem_redis_server: Any
) -> None:
    """The migration block, with its two example addresses replaced by the harness's servers
    (a database of its own on the PostgreSQL server, dropped afterwards)."""
    pytest.importorskip("asyncpg")
    pytest.importorskip("redis")
    blocks = [b for b in _blocks("sh") if "fleetmem db upgrade" in b]
    assert len(blocks) == 1
    script = blocks[0]
    database = f"fm_docs_{secrets.token_hex(4)}"
    admin = fleetmem_postgres_server.dsn_for("postgres")
    pg = fleetmem_postgres_server.dsn_for(database)
    cache = fleetmem_redis_server.url
    for name, url in (("PG", pg), ("CACHE", cache)):
        script, replaced = re.subn(rf"^{name}='[^']*'$", f"{name}='{url}'", script, flags=re.M)
        assert replaced == 1, name
    sqlite = f"sqlite:///{tmp_path}/fleetmem.db"

    async def seed() -> None:
        async with open_store(sqlite, namespace="fleet-1") as store:
            await store.set("results/t-1", {"passed": True}, ttl=3600)
            await store.set("plans/p-1", {"step": 1}, partition="planner")
            await store.with_namespace("fleet-2").set_many({f"k{i}": i for i in range(50)})

    asyncio.run(seed())
    asyncio.run(_create_database(admin, database))
    hybrid = f"hybrid+postgresql://{pg.removeprefix('postgresql://')}?cache={cache}"
    try:
        done = _shell(script, tmp_path, timeout=300)
        # The last command lists the namespaces through the hybrid.
        assert done.stdout.split()[-2:] == ["fleet-1", "fleet-2"]
        for namespace in ("fleet-1", "fleet-2"):
            assert _namespace_entries(pg, namespace) == _namespace_entries(sqlite, namespace)
            assert _namespace_entries(hybrid, namespace) == _namespace_entries(sqlite, namespace)
    finally:
        try:
            asyncio.run(_clear_hybrid(hybrid, ["fleet-1", "fleet-2"]))
        finally:
            asyncio.run(_drop_database(admin, database))
