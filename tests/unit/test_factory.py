"""open_store(), the scheme table and FleetmemSettings."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
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
from fleetmem._urls import redact_url, split_hybrid_url


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


@pytest.fixture
def unimportable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """``unimportable(driver)`` makes ``driver`` unimportable for this test (a None entry in
    sys.modules means "not installed"), with every fleetmem backend module forgotten; the
    modules imported meanwhile are dropped afterwards, the original ones put back."""
    before = set(sys.modules)

    def make(driver: str) -> None:
        for name in list(sys.modules):
            if name == driver or name.startswith((f"{driver}.", "fleetmem.backends.")):
                monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, driver, None)
        for name in ("HybridStore", "PostgresStore", "RedisStore"):
            monkeypatch.delitem(vars(fleetmem), name, raising=False)

    yield make
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.parametrize("driver", ["asyncpg", "redis"])
async def test_hybrid_missing_driver_names_both_extras(
    unimportable: Callable[[str], None], driver: str
) -> None:
    unimportable(driver)
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]") as info:
        await open_store(hybrid=("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0"))
    assert info.value.package == driver
    assert info.value.extra == "postgres,redis"


def test_hybrid_class_missing_driver_names_both_extras(
    unimportable: Callable[[str], None],
) -> None:
    unimportable("redis")
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]"):
        _ = fleetmem.HybridStore


def test_hybrid_from_urls_missing_postgres_driver(unimportable: Callable[[str], None]) -> None:
    from fleetmem.backends.hybrid import HybridStore

    unimportable("asyncpg")
    with pytest.raises(MissingDependencyError, match=r"fleetmem\[postgres,redis\]"):
        HybridStore.from_urls("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0")


def test_hide_passwords_in_a_driver_message() -> None:
    from fleetmem._urls import hide_passwords

    url = "postgresql://u:p%40ss@h/db?password=other"
    assert hide_passwords("bad p@ss, p%40ss or other", url) == "bad ***, *** or ***"
    assert hide_passwords("nothing secret", "redis://h:6379/0") == "nothing secret"
    assert hide_passwords("text", None) == "text"


@pytest.mark.parametrize(
    ("url", "postgres_url", "cache_url", "options"),
    [
        (
            "hybrid+postgresql://u:pw@pg:5432/db?cache=redis://:rpw@cache:6379/0",
            "postgresql://u:pw@pg:5432/db",
            "redis://:rpw@cache:6379/0",
            {},
        ),
        (  # the cache URL's own parameters stay its own; hybrid options are taken out
            "HYBRID+POSTGRES://u@pg/db?sslmode=require&cache=rediss://c:6380/0"
            "?ssl_cert_reqs=none&ssl_check_hostname=false&cache_ttl=60",
            "postgres://u@pg/db?sslmode=require",
            "rediss://c:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
            {"cache_ttl": 60.0},
        ),
        (  # a cache URL without a query: a later parameter can only be PostgreSQL's
            "hybrid+postgresql://u@pg/db?cache=redis://c/1&sslmode=disable&allow_stale_reads=yes",
            "postgresql://u@pg/db?sslmode=disable",
            "redis://c/1",
            {"allow_stale_reads": True},
        ),
        (  # percent-encoded: anywhere among the parameters
            "hybrid+postgresql://u@pg/db?cache=redis%3A%2F%2F%3Ap%2540w%40c%3A6379%2F2"
            "&cache_deadline=0.5&sslmode=disable",
            "postgresql://u@pg/db?sslmode=disable",
            "redis://:p%40w@c:6379/2",
            {"cache_deadline": 0.5},
        ),
        (
            "hybrid+postgresql://u@pg/db?cache=unix:///run/redis.sock?db=3",
            "postgresql://u@pg/db",
            "unix:///run/redis.sock?db=3",
            {},
        ),
    ],
)
def test_split_hybrid_url(
    url: str, postgres_url: str, cache_url: str, options: dict[str, object]
) -> None:

    parts = split_hybrid_url(url)
    assert (parts.postgres_url, parts.cache_url, parts.options) == (
        postgres_url,
        cache_url,
        options,
    )


def test_redact_url_hides_both_passwords_of_a_hybrid_url() -> None:
    assert (
        redact_url("hybrid+postgresql://u:pg-secret@pg/db?cache=redis://:redis-secret@c:6379/0")
        == "hybrid+postgresql://u:***@pg/db?cache=redis://:***@c:6379/0"
    )
    encoded = "hybrid+postgres://u:pg-secret@pg/db?cache=redis%3A%2F%2F%3Aredis-secret%40c%2F0"
    assert redact_url(encoded) == "hybrid+postgres://u:***@pg/db?cache=redis://:***@c/0"
    broken = "hybrid+postgresql://u:pg-secret@pg/db?x=redis://a:redis-secret@c"
    assert "secret" not in redact_url(broken)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Nothing to hide: printed exactly as written, slashes and all.
        ("sqlite:////var/lib/fleet/a.db", "sqlite:////var/lib/fleet/a.db"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        # A password holding an unencoded "/" or "#" ends urlsplit's authority early.
        ("postgresql://u:pa/ss-secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:pa#ss-secret@h/db", "postgresql://u:***@h/db"),
        ("unix://:secret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://h/0?password=secret&x=1", "redis://h/0?password=***&x=1"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        # The cache URL percent-encoded: no "@" or "password=" appears as written.
        "hybrid+postgresql://127.0.0.1:1/db?cache=redis%3A%2F%2F%3Asecret99%40127.0.0.1%3A1%2F0",
        "hybrid+postgresql://u@h/db?cache=redis://c:6379/0?password=secret99",
    ],
)
def test_a_hybrid_urls_cache_password_never_shows(url: str) -> None:
    from fleetmem._where import describe

    for shown in (redact_url(url), describe(url)):
        assert "secret99" not in shown and "***" in shown


@pytest.mark.parametrize(
    "url",
    [
        "hybrid+postgresql://u@h/db?cache=redis://c:6379/0?password=secret99&cache_ttl=abc",
        "hybrid+postgresql://u@h/db?cache=redis%3A%2F%2F%3Asecret99%40c%2F0&cache_ttl=abc",
        "hybrid+postgresql://u:secret99@h/db?password=secret99",
    ],
)
def test_a_bad_hybrid_urls_error_shows_no_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        split_hybrid_url(url)
    assert "secret99" not in str(info.value)
    assert "secret99" not in redact_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("hybrid+postgresql://u:s3cret@pg/db", "has no cache=: add the Redis cache's URL"),
        ("hybrid+postgresql://u:s3cret@pg/db?sslmode=disable", "has no cache="),
        (
            "hybrid+postgresql://u:s3cret@pg/db?cache=memcached://u:s3cret@c",
            "the hybrid's cache must be a redis://, rediss:// or unix:// URL",
        ),
        (
            "hybrid+postgresql://u:s3cret@pg/db?cache=postgresql://u:s3cret@c/db",
            "the hybrid's cache must be a redis://",
        ),
        (
            "hybrid+postgresql://u:s3cret@pg/db?cache=redis://:s3cret@c/0&cache_ttl=soon",
            "invalid cache_ttl='soon'",
        ),
    ],
)
async def test_bad_hybrid_url_is_a_configuration_error_before_io(url: str, message: str) -> None:
    # Every host here is unresolvable: an attempt to connect would fail differently.
    with pytest.raises(ConfigurationError, match=re.escape(message)) as info:
        await open_store(url)
    assert "s3cret" not in str(info.value)


def test_store_class_of_a_hybrid_url() -> None:
    from fleetmem.backends.hybrid import HybridStore
    from fleetmem.factory import store_class

    assert store_class("hybrid+postgresql://u@pg/db?cache=redis://c/0") is HybridStore
    assert store_class("hybrid+postgres://u@pg/db?cache=redis://c/0") is HybridStore


async def test_hybrid_from_url_builds_both_tiers_without_io() -> None:
    from fleetmem.backends.hybrid import HybridStore

    store = HybridStore.from_url(
        "hybrid+postgresql://u@127.0.0.1:1/db?cache=redis://127.0.0.1:1/0&cache_deadline=0.5",
        namespace="ns",
        cache_ttl=12,
    )
    try:
        assert store.namespace == "ns"
        assert "127.0.0.1:1/db" in repr(store) and "127.0.0.1:1/0" in repr(store)
    finally:
        await store.close()
