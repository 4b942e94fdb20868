"""The Lua scripts of ``RedisStore``: read once from ``lua/*.lua``, called by SHA.

Each script is ``_lib.lua`` (the key layout and the shared write/index helpers) followed by the
script's own file. The SHA1 is computed here, so nothing has to be loaded up front: a call goes
out as ``EVALSHA`` and, when the server answers ``NOSCRIPT`` (restart, ``SCRIPT FLUSH``, a new
cluster node), once more as ``EVAL``, which also caches the script on that server.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["SCRIPTS", "Script"]

_NAMES = (
    "set",
    "set_if_absent",
    "compare_and_set",
    "incr",
    "get_entry",
    "set_many",
    "delete_many",
    "expire",
    "scan",
    "clear",
    "prune",
)


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name, full source and SHA1 (hex)."""

    name: str
    source: bytes
    sha: str


def _load() -> dict[str, Script]:
    folder = resources.files(__package__).joinpath("lua")
    lib = folder.joinpath("_lib.lua").read_bytes()
    scripts: dict[str, Script] = {}
    for name in _NAMES:
        source = lib + folder.joinpath(f"{name}.lua").read_bytes()
        scripts[name] = Script(name, source, hashlib.sha1(source).hexdigest())  # noqa: S324
    return scripts


#: Every script by name.
SCRIPTS: dict[str, Script] = _load()
