"""The Lua scripts of ``RedisStore``: read once from ``lua/*.lua``, called by name or SHA.

Each script is ``_lib.lua`` (the key layout and the shared write/index helpers) followed by the
script's own file. The same code is served two ways:

* as a Redis 7 function library (``FCALL``), used on a standalone server: the library is
  compiled once per server, so a call does not rebuild the helpers (about 4 us less per call).
  The library's name carries a hash of its code, so two fleetmem versions never replace each
  other's functions. Nothing is loaded up front: when the server answers "Function not found"
  (first use, restart without persistence, ``FUNCTION FLUSH``) the store loads the library and
  sends the call again.
* as plain scripts (``EVALSHA``), used on a Redis Cluster (redis-py asks the server for the
  keys of every ``FCALL`` there, one more round trip) and where ``FUNCTION LOAD`` is refused.
  The SHA1 is computed here; on ``NOSCRIPT`` the call goes out once more as ``EVAL``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["LIBRARY", "SCRIPTS", "Script"]

_NAMES = (
    "set",
    "set_if_absent",
    "compare_and_set",
    "incr",
    "get_entry",
    "get_entries",
    "exists_many",
    "set_many",
    "set_batch",
    "delete_many",
    "expire",
    "scan",
    "clear",
    "prune",
)

_BIND_START, _BIND_END = b"-- <bind>\n", b"-- </bind>\n"
_BIND_FUNCTION = b"""local P, DIR, XZ, CNT, TMP, PENDING, EPFX, BPFX
local function bind(keys)
  if keys[1] == P then return end -- the same namespace as the last call: names still bound
  P = keys[1]
  DIR, XZ, CNT, TMP, PENDING = P .. 'd', P .. 'x', P .. 'c', P .. 't', P .. 'g'
  EPFX, BPFX = P .. 'e:', P .. 'b:'
end
"""


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name, full source, SHA1 (hex, as bytes) and function name."""

    name: str
    source: bytes
    sha: bytes
    function: bytes


def _load() -> tuple[dict[str, Script], bytes]:
    folder = resources.files(__package__).joinpath("lua")
    lib = folder.joinpath("_lib.lua").read_bytes()
    bodies = {name: folder.joinpath(f"{name}.lua").read_bytes() for name in _NAMES}
    # The tag names the library: it covers every byte the library is built from.
    tag = hashlib.sha1(_BIND_FUNCTION + lib + b"".join(bodies.values())).hexdigest()[:12]  # noqa: S324
    start, end = lib.index(_BIND_START), lib.index(_BIND_END) + len(_BIND_END)
    parts = [b"#!lua name=fleetmem_" + tag.encode() + b"\n", lib[:start], _BIND_FUNCTION, lib[end:]]
    scripts: dict[str, Script] = {}
    for name, body in bodies.items():
        source = lib + body
        function = f"fm_{tag}_{name}".encode()
        sha = hashlib.sha1(source).hexdigest().encode()  # noqa: S324
        scripts[name] = Script(name, source, sha, function)
        parts.append(
            b"redis.register_function('" + function + b"', function(KEYS, ARGV)\nbind(KEYS)\n"
        )
        parts.append(body)
        parts.append(b"\nend)\n")
    return scripts, b"".join(parts)


#: Every script by name, and the function library holding them all.
SCRIPTS, LIBRARY = _load()
