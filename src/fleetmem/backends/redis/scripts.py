"""The Lua scripts of the Redis backend: one library that several primitives join.

Scripts come in named groups, one folder each: ``lua/kv/`` holds the key-value scripts,
``lua/leases/`` the lease and agent scripts, ``lua/queues/`` the work queue scripts,
``lua/changes/`` the change feed's, ``lua/snapshots/`` the named snapshots'. A group is an
optional prelude, ``_lib.lua`` (its key layout and shared helpers), followed by the files it
shares with other groups (``shared``: ``lua/changes/_feed.lua``, the feed's layout and
recording, is in the key-value prelude too, since every write records its changes), and one
file per script. A :class:`ScriptLibrary` is built from groups once, at import; the same code
is then served two ways:

* as ONE Redis 7 function library (``FCALL``), used on a standalone server: the library is
  compiled once per server, so a call does not rebuild the helpers (about 4 us less per call).
  Each group sits in its own ``do ... end`` block, so the locals of two preludes never meet.
  The library's name carries a hash of everything in it (every group's code and flags), so
  two fleetmem versions never replace each other's functions. Nothing is loaded up front:
  when the server answers "Function not found" (first use, restart without persistence,
  ``FUNCTION FLUSH``) the connector loads the library and sends the call again.
* as plain scripts (``EVALSHA``), used on a Redis Cluster (redis-py asks the server for the
  keys of every ``FCALL`` there, one more round trip) and where ``FUNCTION LOAD`` is refused.
  Each is the group's prelude followed by the script's file; the SHA1 is computed here; on
  ``NOSCRIPT`` the call goes out once more as ``EVAL``.

Both forms carry the same Redis 7 script flags (``FUNCTION`` flags in the library, a
``#!lua flags=...`` shebang on each plain script), which decide what a server at ``maxmemory``
under ``noeviction`` still runs:

* ``no-writes``: pure reads (``get_entry``, ``get_entries``, ``exists_many``, ``ns_live``,
  ``ns_ready``, ``ns_due``, the feed's ``head``).
  Redis runs them whatever the memory use (``no-writes`` implies ``allow-oom``) and refuses
  any write in them.
* ``allow-oom``: calls whose writes only remove data (``delete_many``, ``clear``, and the
  reads that drop index members of natively expired entries on the way: ``scan`` behind
  ``keys`` / ``search``, ``prune`` behind ``partitions`` / ``stats`` / ``cleanup_expired``,
  ``ns_forget`` dropping an empty namespace from the registry behind ``namespaces``; the
  feed's ``read``, which trims its log, and ``disable``), and
  ``ns_backfill``, which adds to the registry the names of namespaces that already hold
  entries (a few bytes each, bounded by the data it describes), so that a listing still
  answers on a full server that lost its registry. A full store stays readable and can be
  emptied. ``delete_many`` and ``clear`` record their changes when the namespace's feed is
  enabled: a small entry per key deleted (one per ``clear``), written even on a full server.
* no flag: every call that may add data (``set``, ``set_many``, ``import``, ``incr``,
  ``expire``, ...).
  A server over ``maxmemory`` refuses it before it runs (``OOM`` reply, nothing written). The
  plain scripts still get a bare ``#!lua`` shebang, so they are refused up front like the
  functions instead of at their first memory-growing command (which a script that first
  dropped a stale index member would already be past).

The lease and agent scripts follow the same rule (:data:`LEASE_FLAGS`): reads ``no-writes``,
``renew`` / ``release`` / ``agent_deregister`` / ``agent_list`` ``allow-oom`` (they overwrite
numbers of an existing record or remove index members), grants and registrations no flag. So do
the work queue scripts (:data:`QUEUE_FLAGS`).

Fenced writes: each key-value write named in :data:`FENCED` has a twin ``fenced_<name>``,
made here from ``lua/kv/_fence.lua`` followed by the write's unchanged body, in both forms and
with the same flags. The fence pops the lease name and token from the end of ``ARGV`` and
refuses the call (error ``FMLEASELOST``, which the connector turns into ``LeaseLostError``)
unless that lease is live with that token on the server's ``TIME``, before the body decides
anything. A separate script rather than an optional argument keeps unfenced calls exactly as
they were: not one command or argument more.

A prelude may mark lines with ``-- <bind>`` / ``-- </bind>``: a plain script runs them as they
are; the library replaces them with the group's ``bind`` code (run by every function first).
To add a primitive: put its files in ``lua/<group>/`` and its :class:`ScriptGroup` in
``GROUPS`` below (one library, so one ``FUNCTION LOAD`` serves every primitive).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

__all__ = [
    "CHANGES_GROUP",
    "CHANGE_FLAGS",
    "CHANGE_SCRIPTS",
    "FENCED",
    "FLAGS",
    "GROUPS",
    "KV_GROUP",
    "LEASES_GROUP",
    "LEASE_FLAGS",
    "LEASE_SCRIPTS",
    "LIBRARY",
    "QUEUES_GROUP",
    "QUEUE_FLAGS",
    "QUEUE_SCRIPTS",
    "SCRIPTS",
    "SCRIPT_LIBRARY",
    "SNAPSHOTS_GROUP",
    "SNAPSHOT_FLAGS",
    "SNAPSHOT_SCRIPTS",
    "Script",
    "ScriptGroup",
    "ScriptLibrary",
]

_BIND_START, _BIND_END = b"-- <bind>\n", b"-- </bind>\n"


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name, full source (with its ``#!lua`` shebang), SHA1 (hex, as
    bytes), function name (in the library) and Redis script flags, and its group's name."""

    name: str
    source: bytes
    sha: bytes
    function: bytes
    flags: tuple[str, ...] = ()
    group: str = ""


@dataclass(frozen=True, slots=True)
class ScriptGroup:
    """The scripts of one primitive: ``lua/<name>/_lib.lua`` (optional) + ``<script>.lua``.

    ``flags`` gives the Redis script flags of a script (none when absent); ``bind`` replaces
    the prelude's ``<bind>`` lines in the function library. Each script named in ``fenced``
    also gets a fenced twin, ``fenced_<script>``: ``lua/<name>/_fence.lua`` followed by the
    script's body, with the same flags (see :data:`FENCED`). ``shared`` names files of
    ``lua/`` (``"<folder>/<file>.lua"``) appended to the prelude, in order: code that several
    groups run (each group's prelude defines what that code uses).
    """

    name: str
    scripts: tuple[str, ...]
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    bind: bytes = b""
    fenced: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()


class ScriptLibrary:
    """Every script of some groups: one function library, each script also a plain one.

    ``source`` is the code for ``FUNCTION LOAD`` (named ``<prefix>_<hash>``), :meth:`group`
    the scripts of a group by name; :meth:`source_of` / :meth:`sha_of` map the plain form and
    the function form of a script onto each other (the connector's fallbacks use them).
    """

    def __init__(
        self, package: str, groups: Sequence[ScriptGroup], *, prefix: str = "fleetmem"
    ) -> None:
        folder = resources.files(package).joinpath("lua")
        loaded: list[tuple[ScriptGroup, bytes, dict[str, bytes], dict[str, tuple[str, ...]]]]
        loaded = []
        digest = hashlib.sha1()  # noqa: S324 - a name, not a secret
        for group in groups:
            where = folder.joinpath(group.name)
            lib_file = where.joinpath("_lib.lua")
            lib = lib_file.read_bytes() if lib_file.is_file() else b""
            for path in group.shared:
                lib += folder.joinpath(*path.split("/")).read_bytes()
            bodies = {n: where.joinpath(f"{n}.lua").read_bytes() for n in group.scripts}
            flags_of = {n: tuple(group.flags.get(n, ())) for n in group.scripts}
            if group.fenced:
                fence = where.joinpath("_fence.lua").read_bytes()
                for n in group.fenced:
                    bodies[f"fenced_{n}"] = fence + bodies[n]
                    flags_of[f"fenced_{n}"] = flags_of[n]
            loaded.append((group, lib, bodies, flags_of))
            # The tag names the library: it covers every byte the library is built from.
            digest.update(group.name.encode() + b"\0")
            digest.update(repr(sorted(flags_of.items())).encode())
            digest.update(group.bind + lib + b"".join(bodies.values()))
        tag = digest.hexdigest()[:12]
        #: The library's name on the server.
        self.name = f"{prefix}_{tag}"
        parts = [b"#!lua name=" + self.name.encode() + b"\n"]
        self._groups: dict[str, dict[str, Script]] = {}
        for group, lib, bodies, flags_of in loaded:
            if _BIND_START in lib:
                start, end = lib.index(_BIND_START), lib.index(_BIND_END) + len(_BIND_END)
                prelude = lib[:start] + group.bind + lib[end:]
            else:
                prelude = lib
            parts += [b"do -- group ", group.name.encode(), b"\n", prelude]
            call_bind = b"bind(KEYS)\n" if group.bind else b""
            scripts: dict[str, Script] = {}
            for name, body in bodies.items():
                flags = flags_of[name]
                shebang = b"#!lua flags=" + ",".join(flags).encode() if flags else b"#!lua"
                source = shebang + b"\n" + lib + body
                function = f"fm_{tag}_{group.name}_{name}".encode()
                sha = hashlib.sha1(source).hexdigest().encode()  # noqa: S324
                scripts[name] = Script(name, source, sha, function, flags, group.name)
                parts.append(
                    b"redis.register_function{function_name='"
                    + function
                    + b"', callback=function(KEYS, ARGV)\n"
                    + call_bind
                )
                parts.append(body)
                parts.append(
                    b"\nend, flags={"
                    + b", ".join(b"'" + f.encode() + b"'" for f in flags)
                    + b"}}\n"
                )
            parts.append(b"end -- group " + group.name.encode() + b"\n")
            self._groups[group.name] = scripts
        #: The code for ``FUNCTION LOAD``.
        self.source: bytes = b"".join(parts)
        every = [s for scripts in self._groups.values() for s in scripts.values()]
        self._source_by_sha = {s.sha: s.source for s in every}
        self._sha_by_function = {s.function: s.sha for s in every}

    def group(self, name: str) -> dict[str, Script]:
        """The scripts of group ``name``, by script name."""
        return self._groups[name]

    def source_of(self, sha: bytes) -> bytes:
        """The plain script whose SHA1 is ``sha`` (for ``EVAL`` after ``NOSCRIPT``)."""
        return self._source_by_sha[sha]

    def sha_of(self, function: bytes) -> bytes:
        """The SHA1 of the plain form of library function ``function``."""
        return self._sha_by_function[function]


_BIND_KV = b"""local P, DIR, XZ, CNT, TMP, PENDING, EPFX, BPFX, FEED, LOG
local function bind(keys)
  if keys[1] == P then return end -- the same namespace as the last call: names still bound
  P = keys[1]
  DIR, XZ, CNT, TMP, PENDING = P .. 'd', P .. 'x', P .. 'c', P .. 't', P .. 'g'
  EPFX, BPFX = P .. 'e:', P .. 'b:'
  FEED, LOG = P .. 'f', P .. 's'
end
"""

#: Redis 7 script flags per key-value script (see the module docstring); the others have none.
FLAGS: dict[str, tuple[str, ...]] = {
    "get_entry": ("no-writes",),
    "get_entries": ("no-writes",),
    "exists_many": ("no-writes",),
    "scan": ("allow-oom",),
    "prune": ("allow-oom",),
    "delete_many": ("allow-oom",),
    "clear": ("allow-oom",),
    "ns_live": ("no-writes",),
    "ns_forget": ("allow-oom",),
    "ns_ready": ("no-writes",),
    "ns_due": ("no-writes",),
    "ns_backfill": ("allow-oom",),
}

#: The key-value writes that take a fence: each has a twin ``fenced_<name>`` whose ARGV ends
#: with the lease name and token, checked first (``lua/kv/_fence.lua``). The twin keeps the
#: script's flags: ``fenced_delete_many`` still runs on a full server, the others are refused
#: there before they run, as their unfenced forms are. Unfenced calls are untouched.
#: ``set_batch`` (merged concurrent ``set`` calls) has none: a fenced write is never merged.
FENCED: tuple[str, ...] = (
    "set",
    "set_many",
    "set_if_absent",
    "compare_and_set",
    "incr",
    "delete_many",
)

#: The key-value scripts (``lua/kv/``): ``RedisKV``'s every multi-key operation.
KV_GROUP = ScriptGroup(
    "kv",
    (
        "set",
        "set_if_absent",
        "compare_and_set",
        "incr",
        "get_entry",
        "get_entries",
        "exists_many",
        "set_many",
        "set_batch",
        "import",
        "delete_many",
        "expire",
        "scan",
        "clear",
        "prune",
        "ns_live",
        "ns_register",
        "ns_suspect",
        "ns_forget",
        "ns_ready",
        "ns_backfill",
        "ns_due",
    ),
    FLAGS,
    _BIND_KV,
    FENCED,
    shared=("changes/_feed.lua",),
)

_BIND_LEASES = b"""local P
local function bind(keys) P = keys[1] end
"""

#: Redis 7 script flags of the lease and agent scripts. ``renew`` and ``release`` only
#: overwrite numbers of an existing record (and ``agent_deregister`` / ``agent_list`` only
#: remove index members): a full server still lets a holder keep or free its lease. Granting a
#: lease, registering an agent or a heartbeat (which may carry a larger ``info``) may add data.
LEASE_FLAGS: dict[str, tuple[str, ...]] = {
    "holder": ("no-writes",),
    "agent_get": ("no-writes",),
    "agent_count": ("no-writes",),
    "renew": ("allow-oom",),
    "release": ("allow-oom",),
    "agent_deregister": ("allow-oom",),
    "agent_list": ("allow-oom",),
}

#: The coordination scripts (``lua/leases/``): ``RedisLeases`` and ``RedisAgents``.
LEASES_GROUP = ScriptGroup(
    "leases",
    (
        "acquire",
        "renew",
        "release",
        "holder",
        "agent_register",
        "agent_heartbeat",
        "agent_deregister",
        "agent_get",
        "agent_list",
        "agent_count",
    ),
    LEASE_FLAGS,
    _BIND_LEASES,
)

_BIND_QUEUES = b"""local P, SEQ, NAMES, JPFX
local function bind(keys)
  if keys[1] == P then return end -- the same namespace as the last call: names still bound
  P = keys[1]
  SEQ, NAMES, JPFX = P .. 'qn', P .. 'qs', P .. 'j:'
end
"""

#: Redis 7 script flags of the work queue scripts. ``result`` and ``stats`` only read.
#: ``extend`` overwrites a number of an existing job; ``cancel`` and ``purge_dead`` remove
#: jobs; ``dead`` and ``list_queues`` only move members between sets (claims that died on
#: their last lease to the dead letter) or drop those of expired results and empty queues;
#: ``await_result`` sets a one-byte field of an existing job (a waiter on a full server is not
#: refused): on a full server a queue stays readable, a holder keeps its claim and jobs can be
#: removed. ``put``, ``claim`` (a consumer name per job), ``ack`` (a result), ``nack`` (an
#: error) and ``retry_dead`` may add data: no flag.
QUEUE_FLAGS: dict[str, tuple[str, ...]] = {
    "result": ("no-writes",),
    "stats": ("no-writes",),
    "extend": ("allow-oom",),
    "cancel": ("allow-oom",),
    "dead": ("allow-oom",),
    "purge_dead": ("allow-oom",),
    "list_queues": ("allow-oom",),
    "await_result": ("allow-oom",),
}

#: The work queue scripts (``lua/queues/``): ``RedisQueues``, one script per transition.
QUEUES_GROUP = ScriptGroup(
    "queues",
    (
        "put",
        "claim",
        "extend",
        "ack",
        "nack",
        "cancel",
        "result",
        "stats",
        "dead",
        "retry_dead",
        "purge_dead",
        "list_queues",
        "await_result",
    ),
    QUEUE_FLAGS,
    _BIND_QUEUES,
)

_BIND_CHANGES = b"""local P, FEED, LOG
local function bind(keys)
  if keys[1] == P then return end -- the same namespace as the last call: names still bound
  P = keys[1]
  FEED, LOG = P .. 'f', P .. 's'
end
"""

#: Redis 7 script flags of the change feed's scripts. ``read`` trims the log (it only removes
#: changes and moves the floor) and ``disable`` drops it: both run on a full server, so a
#: reader keeps reading; ``enable`` may add data.
CHANGE_FLAGS: dict[str, tuple[str, ...]] = {
    "head": ("no-writes",),
    "read": ("allow-oom",),
    "disable": ("allow-oom",),
}

#: The change feed's scripts (``lua/changes/``): ``RedisChanges``. The writes that record
#: changes are the key-value scripts, whose prelude holds ``_feed.lua`` too.
CHANGES_GROUP = ScriptGroup(
    "changes",
    ("enable", "disable", "head", "read"),
    CHANGE_FLAGS,
    _BIND_CHANGES,
    shared=("changes/_feed.lua",),
)

_BIND_SNAPSHOTS = b"""local P, CAT, KIDX, HIST, USE, LOCK
local function bind(keys)
  if keys[1] == P then return end -- the same namespace as the last call: names still bound
  P = keys[1]
  CAT, KIDX, HIST, USE, LOCK = P .. 'Sc', P .. 'Sk', P .. 'Sh', P .. 'Su', P .. 'Sl'
end
"""

#: Redis 7 script flags of the snapshot scripts. ``read`` only reads; the lock's scripts only
#: set or drop one small string, ``shrink`` drops or rewrites records in place and ``catalog``
#: marks or removes a catalog row: a full server still deletes snapshots (freeing memory).
#: ``write`` and ``finish`` (a create's records and its catalog row) may add data.
SNAPSHOT_FLAGS: dict[str, tuple[str, ...]] = {
    "read": ("no-writes",),
    "lock": ("allow-oom",),
    "renew": ("allow-oom",),
    "unlock": ("allow-oom",),
    "shrink": ("allow-oom",),
    "catalog": ("allow-oom",),
}

#: The snapshot scripts (``lua/snapshots/``): ``RedisSnapshots``.
SNAPSHOTS_GROUP = ScriptGroup(
    "snapshots",
    ("lock", "renew", "unlock", "read", "write", "shrink", "finish", "catalog"),
    SNAPSHOT_FLAGS,
    _BIND_SNAPSHOTS,
)

#: Every group of the one library, in library order.
GROUPS: tuple[ScriptGroup, ...] = (
    KV_GROUP,
    LEASES_GROUP,
    QUEUES_GROUP,
    CHANGES_GROUP,
    SNAPSHOTS_GROUP,
)

#: The one library of every primitive's scripts.
SCRIPT_LIBRARY = ScriptLibrary(__package__ or "fleetmem.backends.redis", GROUPS)
#: The key-value scripts by name, and the function library code holding every group.
SCRIPTS = SCRIPT_LIBRARY.group("kv")
#: The lease and agent scripts by name.
LEASE_SCRIPTS = SCRIPT_LIBRARY.group("leases")
#: The work queue scripts by name.
QUEUE_SCRIPTS = SCRIPT_LIBRARY.group("queues")
#: The change feed's scripts by name.
CHANGE_SCRIPTS = SCRIPT_LIBRARY.group("changes")
#: The snapshot scripts by name.
SNAPSHOT_SCRIPTS = SCRIPT_LIBRARY.group("snapshots")
LIBRARY = SCRIPT_LIBRARY.source
