"""Which store a URL names, said in words that are safe to print (for the CLI and the demo).

The command line prints the store it works on (``stats``, ``health``, the demo's report): the
absolute path of a SQLite file, since the default ``sqlite:///./fleetmem.db`` follows the
working directory, and the URL of a server with any password replaced by ``***`` (also a
password inside the hybrid URL's ``cache=`` parameter). Nothing here opens a store.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleetmem._urls import redact_url, sqlite_url_parts, url_scheme
from fleetmem.errors import ConfigurationError

__all__ = [
    "DEFAULT_URL",
    "backend_of",
    "describe",
    "effective_url",
    "has_password",
    "in_one_process",
    "plain_settings_url",
    "sqlite_path",
]

#: URL scheme -> the backend's name (``Store.backend``); a ``hybrid+...`` scheme is the hybrid.
_BACKENDS = {
    "memory": "memory",
    "sqlite": "sqlite",
    "postgresql": "postgres",
    "postgres": "postgres",
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
}


#: :data:`fleetmem.settings.DEFAULT_URL`, without importing pydantic (a test keeps them equal).
DEFAULT_URL = "sqlite:///./fleetmem.db"
#: ``FLEETMEM_*`` variables that are not settings of a store (the test harness's, bench's).
_NOT_SETTINGS = ("FLEETMEM_TEST_", "FLEETMEM_BENCH_", "FLEETMEM_REQUIRE_")


def plain_settings_url() -> str | None:
    """The store URL of the environment when nothing but ``FLEETMEM_URL`` and
    ``FLEETMEM_NAMESPACE`` is set: ``FLEETMEM_URL``, else the embedded default. ``None`` when
    another ``FLEETMEM_*`` variable is set and the settings must be read in full.

    The CLI opens this URL directly, which spares a command the import of pydantic (about a
    tenth of a second) in the common case; names are matched without regard to case, as the
    settings match them.
    """
    url: str | None = None
    for name, value in os.environ.items():
        upper = name.upper()
        if not upper.startswith("FLEETMEM_") or upper.startswith(_NOT_SETTINGS):
            continue
        if upper == "FLEETMEM_URL":
            url = value
        elif upper != "FLEETMEM_NAMESPACE":
            return None
    return DEFAULT_URL if url is None else url


def effective_url(url: str | None) -> str | None:
    """``url``, else the URL the ``FLEETMEM_*`` settings give (``FLEETMEM_URL``, else the
    embedded default); ``None`` when the settings name a hybrid by its two tier URLs
    (``FLEETMEM_BACKEND=hybrid``) or cannot be read."""
    if url is not None:
        return url
    plain = plain_settings_url()
    if plain is not None:
        return plain
    try:
        from fleetmem.settings import DEFAULT_URL, FleetmemSettings

        cfg = FleetmemSettings()
    except Exception:  # invalid settings: open_store reports them
        return None
    if cfg.backend == "hybrid":
        return None
    return cfg.url.get_secret_value() if cfg.url is not None else DEFAULT_URL


def backend_of(url: str | None) -> str:
    """The backend a URL opens (``memory``, ``sqlite``, ``postgres``, ``redis``, ``hybrid``),
    ``"hybrid"`` for ``None`` (the settings' hybrid), ``"unknown"`` for another scheme."""
    if url is None:
        return "hybrid"
    scheme = url_scheme(url)
    if scheme.startswith("hybrid"):
        return "hybrid"
    return _BACKENDS.get(scheme, "unknown")


def sqlite_path(url: str) -> str | None:
    """The database file of a ``sqlite://`` URL as an absolute path, ``":memory:"`` for an
    in-memory database, ``None`` when ``url`` is not a SQLite URL this module can read."""
    try:
        path, _ = sqlite_url_parts(url)
    except ConfigurationError:
        return None
    return path if path == ":memory:" else str(Path(path).absolute())


def in_one_process(url: str | None) -> bool:
    """Whether the store of ``url`` lives inside one process (``memory://``, an in-memory
    SQLite database): other processes opening the same URL get a store of their own."""
    if url is None:
        return False
    return url_scheme(url) == "memory" or sqlite_path(url) == ":memory:"


def has_password(url: str) -> bool:
    """Whether printing ``url`` as it is would show a password."""
    return redact_url(url) != url


def describe(url: str | None) -> str:
    """Where a store of ``url`` lives, safe to print: ``sqlite file /abs/path.db``,
    ``sqlite in-memory database (this process only)``, ``memory (this process only)``, a
    redacted server URL, or the hybrid of ``FLEETMEM_POSTGRES_URL`` and ``FLEETMEM_REDIS_URL``."""
    if url is None:
        return "hybrid of FLEETMEM_POSTGRES_URL and FLEETMEM_REDIS_URL"
    if url_scheme(url) == "memory":
        return "memory (this process only)"
    path = sqlite_path(url)
    if path == ":memory:":
        return "sqlite in-memory database (this process only)"
    if path is not None:
        return f"sqlite file {path}"
    return redact_url(url)
