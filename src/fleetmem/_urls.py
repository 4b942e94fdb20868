"""URL helpers: the scheme of a store URL, a form of it that is safe to print, and the two URLs
inside a hybrid URL."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from fleetmem.errors import ConfigurationError

__all__ = [
    "HYBRID_OPTIONS",
    "HYBRID_SCHEMES",
    "HybridURL",
    "hide_passwords",
    "is_hybrid_url",
    "redact_url",
    "split_hybrid_url",
    "sqlite_url_parts",
    "url_scheme",
]

#: The schemes of a hybrid URL: ``hybrid+`` and the durable tier's PostgreSQL scheme.
HYBRID_SCHEMES = ("hybrid+postgresql", "hybrid+postgres")
#: The hybrid's own options a hybrid URL may carry as parameters, and their types.
HYBRID_OPTIONS: dict[str, type] = {
    "cache_ttl": float,
    "cache_deadline": float,
    "allow_stale_reads": bool,
}
_CACHE_SCHEMES = ("redis", "rediss", "unix")
# A password written with an unencoded ``/``, ``?`` or ``#`` ends the URL's authority early for
# ``urlsplit``; for redaction, everything from the user's ``:`` to the next ``@`` is the password.
_LOOSE_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):[^@]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def url_scheme(url: str) -> str:
    """The lower-cased scheme of ``url`` (``""`` when it has none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (both of a hybrid URL's)."""
    if is_hybrid_url(url):
        try:
            return split_hybrid_url(url).redacted()
        except ConfigurationError:
            return _hybrid_head(url)
    return _redact_one(url)


def _hybrid_head(url: str) -> str:
    """A hybrid URL that could not be parsed, safe to print: its PostgreSQL part without a
    password and without parameters (the cache URL may be among them, percent-encoded)."""
    head, qmark, _ = url.partition("?")
    return _redact_one(head) + ("?..." if qmark else "")


def _redact_one(url: str) -> str:
    """One URL (not a hybrid's pair) with its password replaced by ``***``, and otherwise
    exactly as written (``sqlite:////abs/path.db`` keeps its four slashes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    out = url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            out = out.replace(netloc, f"{user}:***@{hostinfo}", 1)
    elif "@" in url:
        # ``postgresql://u:pa/ss@host/db``: the password's ``/`` cut the authority short.
        out = _LOOSE_PASSWORD.sub(r"\1:***@", out, count=1)
    if "password=" in parts.query.lower() or "password=" in out.lower():
        out = _QUERY_PASSWORD.sub(r"\1***", out)
    return out


def sqlite_url_parts(url: str) -> tuple[str, dict[str, str]]:
    """The database path (``":memory:"`` for an in-memory database) and query options of a
    ``sqlite://`` URL; :class:`ConfigurationError` for any other URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a sqlite:// URL: {redact_url(url)!r}")
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    if rest == "":
        return ":memory:", dict(parse_qsl(query))
    if not rest.startswith("/"):
        raise ConfigurationError(
            f"a SQLite URL has no host: use sqlite:///relative.db or sqlite:////absolute.db, "
            f"not {redact_url(url)!r}"
        )
    path = unquote(rest[1:])
    return (path or ":memory:"), dict(parse_qsl(query))


def hide_passwords(text: str, url: str | None) -> str:
    """``text`` (a driver's message about ``url``) with ``url``'s passwords replaced by ``***``:
    the one in the user part, as written and percent-decoded, and a ``password=`` parameter."""
    if not url:
        return text
    secrets: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            secrets.update((parts.password, unquote(parts.password)))
        secrets.update(v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v)
    except ValueError:
        return text
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def is_hybrid_url(url: str) -> bool:
    """Whether ``url`` is a hybrid URL (``hybrid+postgresql://...``)."""
    return url_scheme(url) in HYBRID_SCHEMES


class HybridURL:
    """The parts of a hybrid URL: the durable PostgreSQL URL, the Redis cache URL, and the
    hybrid's options given as parameters (converted: ``cache_ttl=60`` -> ``60.0``)."""

    __slots__ = ("cache_url", "options", "postgres_url")

    def __init__(self, postgres_url: str, cache_url: str, options: dict[str, Any]) -> None:
        self.postgres_url = postgres_url
        self.cache_url = cache_url
        self.options = options

    def redacted(self) -> str:
        """The URL without passwords, in its canonical form (the cache URL last, unencoded)."""
        head = redact_url(self.postgres_url)
        extra = "".join(f"&{name}={_option_text(v)}" for name, v in self.options.items())
        glue = "&" if urlsplit(head).query else "?"
        return f"hybrid+{head}{glue}cache={redact_url(self.cache_url)}{extra}"

    def __repr__(self) -> str:
        return f"HybridURL({self.redacted()!r})"


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option(name: str, text: str, url: str) -> Any:
    kind = HYBRID_OPTIONS[name]
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    raise ConfigurationError(
        f"invalid {name}={text!r} in the hybrid URL {_hybrid_head(url)}: "
        "expected a " + ("boolean (true or false)" if kind is bool else "number of seconds")
    )


def split_hybrid_url(url: str) -> HybridURL:
    """The PostgreSQL URL, the Redis URL and the options of a hybrid URL (no I/O)::

        hybrid+postgresql://user:pw@pg:5432/db?sslmode=require&cache=redis://:pw@cache:6379/0

    The scheme is ``hybrid+postgresql`` or ``hybrid+postgres``; everything but ``cache=`` and
    the hybrid's options (``cache_ttl``, ``cache_deadline``, ``allow_stale_reads``) is the
    PostgreSQL URL. ``cache=`` is the Redis cache's URL (``redis://``, ``rediss://`` or
    ``unix://``), given either

    * as it is, **last**: everything after ``cache=`` belongs to the cache URL, its own ``?``
      and ``&`` parameters included (``cache=rediss://h:6380/0?ssl_cert_reqs=required``), except
      a hybrid option (``&cache_ttl=60``), and, when the cache URL has no ``?`` of its own, a
      ``&name=value`` (which then can only be the PostgreSQL URL's); or
    * percent-encoded (``cache=redis%3A%2F%2Fcache%3A6379%2F0``), anywhere among the parameters.

    A missing ``cache=``, or a cache URL that is not Redis, raises :class:`ConfigurationError`.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in HYBRID_SCHEMES:
        raise ConfigurationError(
            f"not a hybrid URL: {_hybrid_head(url)!r} (expected hybrid+postgresql://...)"
        )
    durable_scheme = scheme.lower().removeprefix("hybrid+")
    location, qmark, query = rest.partition("?")
    found = re.search(r"(?:^|&)cache=", query) if qmark else None
    if found is None:
        raise ConfigurationError(
            f"the hybrid URL {_hybrid_head(url)} has no cache=: add the Redis "
            "cache's URL, as in "
            "hybrid+postgresql://user@host:5432/db?cache=redis://host:6379/0"
        )
    outer = [item for item in query[: found.start()].split("&") if item]
    tail = query[found.end() :]
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", tail):
        # As written, last: the cache URL runs to the end, less the hybrid's options (and the
        # PostgreSQL URL's parameters, when the cache URL has no query of its own).
        first, *more = tail.split("&")
        cache = first
        for item in more:
            name = item.partition("=")[0]
            if name in HYBRID_OPTIONS or "?" not in cache:
                outer.append(item)
            else:
                cache += "&" + item
    else:
        encoded, _, after = tail.partition("&")
        cache = unquote(encoded)
        outer.extend(item for item in after.split("&") if item)
    if url_scheme(cache) not in _CACHE_SCHEMES:
        shown = _redact_one(cache) if "://" in cache else cache
        raise ConfigurationError(
            f"the hybrid's cache must be a redis://, rediss:// or unix:// URL, not {shown!r} "
            f"(in {_redact_one(durable_scheme + '://' + location)}?cache=...)"
        )
    options: dict[str, Any] = {}
    durable_query: list[str] = []
    for item in outer:
        name, _, value = item.partition("=")
        if name in HYBRID_OPTIONS:
            options[name] = _option(name, unquote(value), url)
        else:
            durable_query.append(item)
    postgres_url = f"{durable_scheme}://{location}"
    if durable_query:
        postgres_url += "?" + "&".join(durable_query)
    return HybridURL(postgres_url, cache, options)
