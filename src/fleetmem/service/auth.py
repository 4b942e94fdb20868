"""Tokens for the HTTP service: a file of SHA-256 digests, namespace globs and scopes.

The tokens file (TOML or JSON, chosen by its suffix; ``.toml`` unless it ends in ``.json``)
holds one table per token::

    [[tokens]]
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    namespaces = ["fleet-*", "shared"]
    scope = "write"
    name = "ci agents"          # optional, a label for people; never logged with the token

The file never holds a token, only its digest. A glob matches the *whole* namespace name with
``*`` (any run of characters, also empty) and ``?`` (one character); every other character is
itself, so ``fleet-*`` matches ``fleet-a`` but not ``fleet`` or ``xfleet-a``, and ``fleet``
matches only ``fleet``. Scopes nest: ``read`` < ``write`` < ``admin``.

This module imports nothing beyond the standard library, so ``fleetmem token new`` works
without the ``service`` extra.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetmem.errors import ConfigurationError

__all__ = [
    "Principal",
    "Scope",
    "TokenEntry",
    "TokenTable",
    "append_entry",
    "digest",
    "entry_text",
    "glob_matches",
    "load_tokens",
    "new_token",
]

# A namespace glob may use the namespace alphabet plus ``*`` and ``?``.
_GLOB_RE = re.compile(r"[A-Za-z0-9_.\-*?]{1,64}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_TOKEN_PREFIX = "fm_"  # noqa: S105 - a prefix, not a secret


class Scope(enum.IntEnum):
    """What a token may do; each scope includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: object) -> Scope:
        if isinstance(text, str):
            try:
                return cls[text.upper()]
            except KeyError:
                pass
        raise ConfigurationError(f"scope must be one of read, write, admin, not {text!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


def digest(token: str) -> str:
    """The SHA-256 of ``token`` (UTF-8), as 64 lowercase hex digits: what the file stores."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh token: ``fm_`` and 43 URL-safe characters (256 random bits)."""
    return _TOKEN_PREFIX + secrets.token_urlsafe(32)


def _compile_glob(glob: str) -> re.Pattern[str]:
    if not isinstance(glob, str) or _GLOB_RE.fullmatch(glob) is None:
        raise ConfigurationError(
            f"namespace glob {glob!r} is not valid: 1-64 characters of A-Z a-z 0-9 _ . - "
            "and the wildcards * and ?"
        )
    parts = ("[^\n]*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in glob)
    return re.compile("".join(parts))


def glob_matches(glob: str, namespace: str) -> bool:
    """Whether ``glob`` matches the whole of ``namespace`` (``*``, ``?``; nothing else)."""
    return _compile_glob(glob).fullmatch(namespace) is not None


@dataclass(frozen=True)
class TokenEntry:
    """One token of the file: its digest, the namespace globs it may use, its scope."""

    sha256: str
    namespaces: tuple[str, ...]
    scope: Scope
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or _DIGEST_RE.fullmatch(self.sha256) is None:
            raise ConfigurationError(
                "a token's sha256 must be 64 lowercase hex digits (the file holds the digest "
                "of each token, never the token)"
            )
        if not self.namespaces:
            raise ConfigurationError("a token needs at least one namespace glob")
        for glob in self.namespaces:
            _compile_glob(glob)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sha256": self.sha256,
            "namespaces": list(self.namespaces),
            "scope": self.scope.label,
        }
        if self.name:
            data["name"] = self.name
        return data


@dataclass(frozen=True)
class Principal:
    """What an authenticated request may do: the token's label, scope and namespace globs."""

    name: str
    scope: Scope
    globs: tuple[str, ...]
    _patterns: tuple[re.Pattern[str], ...]
    key: str  # identifies the token for per-token caps (its digest; never the token)

    def allows(self, namespace: str, scope: Scope) -> bool:
        """Whether this principal may use ``namespace`` at ``scope``."""
        if scope > self.scope:
            return False
        return any(p.fullmatch(namespace) is not None for p in self._patterns)

    def sees(self, namespace: str) -> bool:
        return any(p.fullmatch(namespace) is not None for p in self._patterns)


# The principal of a server started without tokens (loopback only): everything allowed.
OPEN_ACCESS = Principal("anonymous", Scope.ADMIN, ("*",), (re.compile("[^\n]*"),), "-")


class TokenTable:
    """The tokens a server accepts. Lookups compare digests in constant time."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        digests = [e.sha256 for e in self._entries]
        if len(set(digests)) != len(digests):
            raise ConfigurationError("the tokens file lists the same token twice")
        self._principals = tuple(
            (
                bytes.fromhex(e.sha256),
                Principal(
                    e.name or f"token {i + 1}",
                    e.scope,
                    e.namespaces,
                    tuple(_compile_glob(g) for g in e.namespaces),
                    e.sha256,
                ),
            )
            for i, e in enumerate(self._entries)
        )

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None``. Every entry is compared (with
        :func:`hmac.compare_digest`), so the time taken does not depend on which one matched."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for stored, principal in self._principals:
            if hmac.compare_digest(stored, presented):
                found = principal
        return found


def _parse_entries(data: object, source: str) -> list[TokenEntry]:
    if not isinstance(data, dict) or not isinstance(data.get("tokens", []), list):
        raise ConfigurationError(f"{source}: expected a list of tables under 'tokens'")
    entries = []
    for i, item in enumerate(data.get("tokens", [])):
        if not isinstance(item, dict):
            raise ConfigurationError(f"{source}: token {i + 1} is not a table")
        unknown = set(item) - {"sha256", "namespaces", "scope", "name"}
        if unknown:
            raise ConfigurationError(
                f"{source}: token {i + 1} has unknown fields: {', '.join(sorted(unknown))}"
            )
        if "token" in item:  # pragma: no cover - caught as unknown above; kept for clarity
            raise ConfigurationError(f"{source}: store the sha256 of a token, not the token")
        globs = item.get("namespaces")
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
            raise ConfigurationError(f"{source}: token {i + 1}: namespaces must be a list")
        name = item.get("name", "")
        if not isinstance(name, str):
            raise ConfigurationError(f"{source}: token {i + 1}: name must be a string")
        try:
            entries.append(
                TokenEntry(
                    str(item.get("sha256")), tuple(globs), Scope.parse(item.get("scope")), name
                )
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: token {i + 1}: {exc}") from None
    return entries


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def load_tokens(path: str | Path) -> TokenTable:
    """Read a tokens file (JSON if it ends in ``.json``, else TOML)."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the tokens file {str(file)!r}: {exc}") from None
    try:
        data = json.loads(raw) if _is_json(file) else _toml_loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"the tokens file {str(file)!r} is not valid: {exc}") from None
    return TokenTable(_parse_entries(data, str(file)))


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ConfigurationError(
                "reading a TOML tokens file on Python 3.10 needs tomli "
                "(pip install 'fleetmem[service]'), or use a .json file"
            ) from None
    data: dict[str, Any] = tomllib.loads(text)
    return data


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def entry_text(entry: TokenEntry, *, json_format: bool = False) -> str:
    """``entry`` as it appears in a tokens file (a TOML table, or a JSON object)."""
    if json_format:
        return json.dumps(entry.to_dict())
    lines = [
        "[[tokens]]",
        f"sha256 = {_toml_string(entry.sha256)}",
        "namespaces = [" + ", ".join(_toml_string(g) for g in entry.namespaces) + "]",
        f"scope = {_toml_string(entry.scope.label)}",
    ]
    if entry.name:
        lines.append(f"name = {_toml_string(entry.name)}")
    return "\n".join(lines) + "\n"


def append_entry(path: str | Path, entry: TokenEntry) -> None:
    """Add ``entry`` to the tokens file at ``path``, creating it (mode 0600) if needed.

    The existing file is read first, so a file that is not valid is left as it is and the
    call fails; a token already listed fails too."""
    file = Path(path)
    existing = load_tokens(file).entries if file.exists() else ()
    TokenTable([*existing, entry])  # refuses a duplicate before anything is written
    if _is_json(file):
        data = {"tokens": [e.to_dict() for e in (*existing, entry)]}
        text = json.dumps(data, indent=2) + "\n"
        _write_private(file, text, append=False)
        return
    prefix = ""
    if file.exists():
        current = file.read_text("utf-8")
        prefix = "\n" if current and not current.endswith("\n\n") else ""
        if current and not current.endswith("\n"):
            prefix = "\n\n"
    _write_private(file, prefix + entry_text(entry), append=True)


def _write_private(file: Path, text: str, *, append: bool) -> None:
    import os

    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(file, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def make_entry(token: str, namespaces: Sequence[str], scope: str, name: str = "") -> TokenEntry:
    """The file entry for ``token`` (its digest), checked like a loaded one."""
    return TokenEntry(digest(token), tuple(namespaces), Scope.parse(scope), name)
