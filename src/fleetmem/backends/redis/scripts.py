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

Both forms carry the same Redis 7 script flags (``FUNCTION`` flags in the library, a
``#!lua flags=...`` shebang on each plain script), which decide what a server at ``maxmemory``
under ``noeviction`` still runs:

* ``no-writes``: pure reads (``get_entry``, ``get_entries``, ``exists_many``). Redis runs them
  whatever the memory use (``no-writes`` implies ``allow-oom``) and refuses any write in them.
* ``allow-oom``: calls whose writes only remove data (``delete_many``, ``clear``, and the
  reads that drop index members of natively expired entries on the way: ``scan`` behind
  ``keys`` / ``search``, ``prune`` behind ``partitions`` / ``stats`` / ``cleanup_expired``).
  A full store stays readable and can be emptied.
* no flag: every call that may add data (``set``, ``set_many``, ``incr``, ``expire``, ...).
  A server over ``maxmemory`` refuses it before it runs (``OOM`` reply, nothing written). The
  plain scripts still get a bare ``#!lua`` shebang, so they are refused up front like the
  functions instead of at their first memory-growing command (which a script that first
  dropped a stale index member would already be past).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["FLAGS", "LIBRARY", "SCRIPTS", "Script"]

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

#: Redis 7 script flags per script (see the module docstring); the others have none.
FLAGS: dict[str, tuple[str, ...]] = {
    "get_entry": ("no-writes",),
    "get_entries": ("no-writes",),
    "exists_many": ("no-writes",),
    "scan": ("allow-oom",),
    "prune": ("allow-oom",),
    "delete_many": ("allow-oom",),
    "clear": ("allow-oom",),
}

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
    """One Lua script: its name, full source (with its ``#!lua`` shebang), SHA1 (hex, as
    bytes), function name and Redis script flags."""

    name: str
    source: bytes
    sha: bytes
    function: bytes
    flags: tuple[str, ...] = ()


def _load() -> tuple[dict[str, Script], bytes]:
    folder = resources.files(__package__).joinpath("lua")
    lib = folder.joinpath("_lib.lua").read_bytes()
    bodies = {name: folder.joinpath(f"{name}.lua").read_bytes() for name in _NAMES}
    # The tag names the library: it covers every byte the library is built from.
    tag = hashlib.sha1(  # noqa: S324
        repr(sorted(FLAGS.items())).encode() + _BIND_FUNCTION + lib + b"".join(bodies.values())
    ).hexdigest()[:12]
    start, end = lib.index(_BIND_START), lib.index(_BIND_END) + len(_BIND_END)
    parts = [b"#!lua name=fleetmem_" + tag.encode() + b"\n", lib[:start], _BIND_FUNCTION, lib[end:]]
    scripts: dict[str, Script] = {}
    for name, body in bodies.items():
        flags = FLAGS.get(name, ())
        shebang = b"#!lua flags=" + ",".join(flags).encode() if flags else b"#!lua"
        source = shebang + b"\n" + lib + body
        function = f"fm_{tag}_{name}".encode()
        sha = hashlib.sha1(source).hexdigest().encode()  # noqa: S324
        scripts[name] = Script(name, source, sha, function, flags)
        parts.append(
            b"redis.register_function{function_name='"
            + function
            + b"', callback=function(KEYS, ARGV)\nbind(KEYS)\n"
        )
        parts.append(body)
        parts.append(
            b"\nend, flags={" + b", ".join(b"'" + f.encode() + b"'" for f in flags) + b"}}\n"
        )
    return scripts, b"".join(parts)


#: Every script by name, and the function library holding them all.
SCRIPTS, LIBRARY = _load()
