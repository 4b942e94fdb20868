"""URL helpers: the scheme of a store URL, and a form of it that is safe to print."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

__all__ = ["hide_passwords", "redact_url", "url_scheme"]


def url_scheme(url: str) -> str:
    """The lower-cased scheme of ``url`` (``""`` when it has none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if has_password else f"{user}@{hostinfo}"
    query = parts.query
    if "password=" in query.lower():
        query = "&".join(
            "password=***" if item.lower().startswith("password=") else item
            for item in query.split("&")
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
