"""open_store(), the scheme table and FleetmemSettings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

import fleetmem
from fleetmem import (
    ConfigurationError,
    FleetmemSettings,
    InMemoryStore,
    InvalidKeyError,
    MemoryStore,
    MissingDependencyError,
    open_store,
)
from fleetmem._urls import redact_url


async def test_open_store_memory_is_awaitable_and_a_context_manager() -> None:
    store = await open_store("memory://", namespace="n1")
    assert isinstance(store, InMemoryStore)
    assert isinstance(store, MemoryStore)
    assert store.namespace == "n1"
    await store.close()
    async with open_store("memory://") as other:
        assert other.namespace == "default"
        assert not other.closed
    assert other.closed


async def test_default_is_the_embedded_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("FLEETMEM_URL", "FLEETMEM_BACKEND", "FLEETMEM_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    async with open_store() as store:
        assert store.backend == "sqlite"
        await store.set("k", 1)
    assert (tmp_path / "fleetmem.db").exists()
    async with open_store() as again:
        assert await again.get("k") == 1


async def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETMEM_URL", "memory://")
    monkeypatch.setenv("FLEETMEM_NAMESPACE", "from-env")
    monkeypatch.setenv("FLEETMEM_MAX_VALUE_BYTES", "100")
    async with open_store() as store:
        assert store.backend == "memory"
        assert store.namespace == "from-env"
        with pytest.raises(fleetmem.ValueTooLargeError):
            await store.set("k", "x" * 200)
    # An explicit namespace wins over the settings.
    async with open_store(namespace="explicit") as store:
        assert store.namespace == "explicit"


def test_settings_hide_passwords() -> None:
    settings = FleetmemSettings(url=SecretStr("redis://user:s3cret@host:6379/0"))
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://h:6379/0?password=pw") == "redis://h:6379/0?password=***"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown store URL scheme"):
        await open_store("mongodb://u:pw@host/db")
    with pytest.raises(ConfigurationError) as info:
        await open_store("ftp://u:hunter2@host/")
    assert "hunter2" not in str(info.value)


async def test_unknown_option_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="invalid option"):
        await open_store("memory://", no_such_option=1)


async def test_hybrid_settings_need_both_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETMEM_BACKEND", "hybrid")
    monkeypatch.delenv("FLEETMEM_POSTGRES_URL", raising=False)
    with pytest.raises(ConfigurationError, match="FLEETMEM_POSTGRES_URL"):
        await open_store()


async def test_url_and_hybrid_together_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        await open_store("memory://", hybrid=("postgresql://x/y", "redis://x"))


async def test_bad_namespace_is_refused_before_io() -> None:
    with pytest.raises(InvalidKeyError):
        await open_store("memory://", namespace="has space")


async def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the driver unimportable for this test only: the import system treats a None entry
    # in sys.modules as "not installed".
    for name in list(sys.modules):
        if name == "redis" or name.startswith(("redis.", "fleetmem.backends.redis")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[redis\]") as info:
        await open_store("redis://localhost:1/0")
    assert isinstance(info.value, ImportError)


def test_import_fleetmem_imports_no_optional_driver() -> None:
    import subprocess

    code = (
        "import sys, fleetmem; "
        "bad = [m for m in ('asyncpg', 'redis', 'sqlalchemy', 'alembic') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lazy_backend_names() -> None:
    assert fleetmem.InMemoryStore is InMemoryStore
    with pytest.raises(AttributeError):
        _ = fleetmem.NoSuchStore


def _unimportable(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    """Make ``driver`` unimportable for this test (a None entry in sys.modules means "not
    installed"), with every fleetmem backend module that imported it forgotten."""
    for name in list(sys.modules):
        if name == driver or name.startswith((f"{driver}.", "fleetmem.backends.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, driver, None)
    for name in ("HybridStore", "PostgresStore", "RedisStore"):
        monkeypatch.delitem(vars(fleetmem), name, raising=False)


@pytest.mark.parametrize("driver", ["asyncpg", "redis"])
async def test_hybrid_missing_driver_names_both_extras(
    monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    _unimportable(monkeypatch, driver)
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]") as info:
        await open_store(hybrid=("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0"))
    assert info.value.package == driver
    assert info.value.extra == "postgres,redis"


def test_hybrid_class_missing_driver_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    _unimportable(monkeypatch, "redis")
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]"):
        _ = fleetmem.HybridStore


def test_hybrid_from_urls_missing_postgres_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmem.backends.hybrid import HybridStore

    _unimportable(monkeypatch, "asyncpg")
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]"):
        HybridStore.from_urls("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0")


def test_hide_passwords_in_a_driver_message() -> None:
    from fleetmem._urls import hide_passwords

    url = "postgresql://u:p%40ss@h/db?password=other"
    assert hide_passwords("bad p@ss, p%40ss or other", url) == "bad ***, *** or ***"
    assert hide_passwords("nothing secret", "redis://h:6379/0") == "nothing secret"
    assert hide_passwords("text", None) == "text"
