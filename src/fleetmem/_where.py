"""Which store a URL names, said in words that are safe to print (for the CLI and the demo).

The command line prints the store it works on (``stats``, ``health``, the demo's report): the
absolute path of a SQLite file, since the default ``sqlite:///./fleetmem.db`` follows the
working directory, and the URL of a server with any password replaced by ``***`` (also a
password inside the hybrid URL's ``cache=`` parameter). Nothing here opens a store.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from fleetmem._urls import redact_url, url_scheme

__all__ = [
    "backend_of",
    "describe",
    "effective_url",
    "has_password",
    "in_one_process",
    "redact",
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


def effective_url(url: str | None) -> str | None:
    """``url``, else the URL the ``FLEETMEM_*`` settings give (``FLEETMEM_URL``, else the
    embedded default); ``None`` when the settings name a hybrid by its two tier URLs
    (``FLEETMEM_BACKEND=hybrid``) or cannot be read."""
    if url is not None:
        return url
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
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        return None
    rest = rest.partition("?")[0].partition("#")[0]
    if rest == "":
        return ":memory:"
    if not rest.startswith("/"):
        return None
    path = unquote(rest[1:])
    if path in ("", ":memory:"):
        return ":memory:"
    return str(Path(path).absolute())


def in_one_process(url: str | None) -> bool:
    """Whether the store of ``url`` lives inside one process (``memory://``, an in-memory
    SQLite database): other processes opening the same URL get a store of their own."""
    if url is None:
        return False
    return url_scheme(url) == "memory" or sqlite_path(url) == ":memory:"


def has_password(url: str) -> bool:
    """Whether printing ``url`` as it is would show a password."""
    return redact(url) != url


def redact(url: str) -> str:
    """``url`` with every password replaced by ``***`` (both of a hybrid URL's); ``url``
    itself, as written, when it shows none."""
    if "@" not in url and "password=" not in url.lower():
        return url
    return redact_url(url)


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
    return redact(url)
