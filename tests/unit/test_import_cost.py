"""``import fleetmem`` imports only the contract, the errors and ``open_store``.

Every ``fleetmem`` CLI call and every script pays for what ``import fleetmem`` imports: pydantic
(the settings), the store front end and the backends are imported on first use. Checked through
``sys.modules`` of a fresh interpreter, not by timing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import fleetmem

#: Modules ``import fleetmem`` must leave unimported: the settings' pydantic, every driver, the
#: front end and every backend (the memory one too), the migrations' SQLAlchemy and asyncio.
NOT_AT_IMPORT = (
    "pydantic",
    "pydantic_settings",
    "asyncpg",
    "redis",
    "hiredis",
    "sqlite3",
    "sqlalchemy",
    "alembic",
    "orjson",
    "asyncio",
    "fleetmem.settings",
    "fleetmem.store",
    "fleetmem.backends.memory",
    "fleetmem.backends.sqlite",
    "fleetmem.backends.postgres",
    "fleetmem.backends.redis",
    "fleetmem.backends.hybrid",
)


def _modules_after(code: str) -> set[str]:
    """The top-level and fleetmem modules imported by a fresh interpreter running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_import_fleetmem_imports_no_backend_driver_or_pydantic() -> None:
    loaded = _modules_after("import fleetmem")
    assert "fleetmem.factory" in loaded  # the check sees what the import did
    assert sorted(loaded.intersection(NOT_AT_IMPORT)) == []


def test_names_are_imported_on_first_use() -> None:
    loaded = _modules_after(
        "from fleetmem import FleetmemSettings, InMemoryStore\n"
        "assert FleetmemSettings.__name__ == 'FleetmemSettings'\n"
        "assert InMemoryStore.__name__ == 'InMemoryStore'"
    )
    assert {"pydantic_settings", "fleetmem.backends.memory", "fleetmem.store"} <= loaded
    assert sorted(loaded.intersection({"asyncpg", "redis", "sqlite3"})) == []


def test_open_store_with_a_url_does_not_read_settings() -> None:
    loaded = _modules_after(
        "import asyncio, fleetmem\n"
        "async def main():\n"
        "    async with fleetmem.open_store('memory://') as store:\n"
        "        await store.set('k', 1)\n"
        "        assert await store.get('k') == 1\n"
        "asyncio.run(main())"
    )
    assert "fleetmem.backends.memory" in loaded
    assert sorted(loaded.intersection({"pydantic", "fleetmem.settings", "sqlite3"})) == []


def test_every_public_name_resolves_and_is_listed() -> None:
    listing = dir(fleetmem)
    for name in fleetmem.__all__:
        assert name in listing
        assert getattr(fleetmem, name) is not None
    assert fleetmem.InMemoryStore.__module__ == "fleetmem.backends.memory.store"
    assert fleetmem.FleetmemSettings is fleetmem.FleetmemSettings


def test_star_import_loads_no_driver_and_the_optional_stores_stay_importable() -> None:
    loaded = _modules_after(
        "from fleetmem import *\n"
        "assert 'open_store' in dir() and 'MissingDependencyError' in dir()\n"
        "assert 'PostgresStore' not in dir()\n"
        "import fleetmem\n"
        "assert {'PostgresStore', 'RedisStore', 'HybridStore'} <= set(dir(fleetmem))"
    )
    assert sorted(loaded.intersection({"asyncpg", "redis", "hiredis"})) == []
