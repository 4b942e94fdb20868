"""``RedisStore``: the ``MemoryStore`` contract on Redis 7 (standalone or Cluster).

Key layout (see ``lua/_lib.lua``): every key of a namespace starts with ``fm:{<ns>}:`` -- the
namespace is the cluster hash tag, so all of a namespace lives in one slot and each multi-key
script runs there; a ``{`` inside a user key comes after the tag and cannot move it.

* ``fm:{ns}:e:<key>`` -- one STRING per entry: a 19-byte binary header (partition name length,
  version, created, updated), the partition name and the JSON. Native TTL is the expiry. A
  plain ``GET`` reads it in one round trip.
* ``fm:{ns}:b:<lo>`` and ``fm:{ns}:d`` -- the sorted key index, split into buckets of under
  128 members (small sorted sets, every score 0, ordered by the key's UTF-8 bytes = code-point
  order) that Redis keeps as compact listpacks; ``d`` holds each bucket's lower bound. ``keys``
  and ``search`` read a ``BYLEX`` range bucket after bucket, so their cost follows the result.
* ``fm:{ns}:x`` -- a sorted set of the keys that have (or had) a TTL, scored by expiry: entries
  that Redis expired natively are found there and dropped from the index lazily (never for
  correctness: every read path checks that the entry key still exists).
* ``fm:{ns}:c`` -- a hash of live entries per partition (exact once ``x`` is pruned).

Every write is one Lua script (a function called with ``FCALL`` on a standalone server,
``EVALSHA`` on a cluster; see ``scripts.py``), so value, version, index, counts and TTL change
atomically; timestamps come from the server's ``TIME``. Concurrent single-key calls beyond
``coalesce_max_inflight`` are merged into one ``MGET`` or one script call per batch.

Failure handling: each call runs under a deadline (``timeout``, default 2 s) with redis-py's own
retry switched off. Reads, and writes that provably never left the client (the connection could
not be opened), are retried ``retries`` times within that deadline; a write whose connection
died or timed out while in flight raises :class:`~fleetmem.errors.OutcomeUnknownError`.

A full server (``maxmemory`` reached under ``noeviction``) stays readable and deletable: the
reads are ``no-writes`` scripts or plain commands, the deletes and the index upkeep of reads
``allow-oom`` scripts (see ``scripts.py``). A write that would add data is refused by Redis
before it runs and raises :class:`~fleetmem.errors.BackendUnavailableError` (nothing written),
as PostgreSQL's "disk full" does. ``connect()`` refuses a server whose ``maxmemory-policy``
may evict fleetmem's keys (anything but ``noeviction``) unless ``allow_eviction=True``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import compress, repeat
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleetmem._codec import decode_value, needs_exact_decoder
from fleetmem._urls import redact_url, url_scheme
from fleetmem._validate import (
    DEFAULT_PARTITION,
    GlobPattern,
    check_non_negative_int,
    check_positive_number,
)
from fleetmem.backends.redis.scripts import LIBRARY, SCRIPTS, Script
from fleetmem.backends.seam import MISSING, EntryMeta, KVBackend, SetOp
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
    NotANumberError,
    OutcomeUnknownError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["RedisKV", "pack_command"]

_log = logging.getLogger("fleetmem.redis")

_SOURCE_BY_SHA = {s.sha: s.source for s in SCRIPTS.values()}
_SHA_BY_FUNCTION = {s.function: s.sha for s in SCRIPTS.values()}
_SET, _SET_IF_ABSENT, _CAS, _INCR = (
    SCRIPTS["set"],
    SCRIPTS["set_if_absent"],
    SCRIPTS["compare_and_set"],
    SCRIPTS["incr"],
)
_GET_ENTRY, _GET_ENTRIES = SCRIPTS["get_entry"], SCRIPTS["get_entries"]
_EXISTS_MANY, _SET_MANY = SCRIPTS["exists_many"], SCRIPTS["set_many"]
_SET_BATCH, _DELETE_MANY = SCRIPTS["set_batch"], SCRIPTS["delete_many"]
_EXPIRE, _SCAN = SCRIPTS["expire"], SCRIPTS["scan"]
_CLEAR, _PRUNE = SCRIPTS["clear"], SCRIPTS["prune"]

#: Keys per MGET / script call in the batch operations.
_BATCH = 10_000
#: Items per ``set_many`` script call: the packed command is the driver's copy of the values,
#: so a slice keeps it a fifth of a ``set_many`` chunk (the round trips it adds cost ~2%).
_SET_MANY_SLICE = 2000
#: Merged ``set`` calls per script call (five arguments each).
_OPS_BATCH = 1000
#: Index members a ``scan`` / ``clear`` / ``prune`` call looks at before handing back a cursor.
_SCAN_BUDGET = 5000
#: Errors raised before a command was written to a socket (safe to retry, even for a write).
_UNSENT = ("connecting to", "Timeout connecting", "Too many connections")
#: What Redis says when a command is refused at maxmemory (a redis-py OutOfMemoryError, or a
#: script error carrying it).
_OOM = "command not allowed when used memory"
#: The only eviction policy under which Redis never drops a key by itself.
_SAFE_POLICY = "noeviction"
_POLICY_IN_INFO = re.compile(rb"maxmemory_policy:([a-z-]+)")
_KIND = {b'"': "str", b"{": "dict", b"[": "list", b"t": "bool", b"f": "bool", b"n": "NoneType"}
_UTC = timezone.utc


_hiredis_pack: Any
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # the redis extra installs hiredis; without it, the packer below
    _hiredis_pack = None


def _pack_in_python(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, as hiredis's ``pack_command`` writes it (str as UTF-8)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            arg = repr(arg).encode()
        elif not isinstance(arg, (bytes, memoryview)):
            raise TypeError(f"cannot pack a {type(arg).__name__} into a Redis command")
        out.append(b"$%d\r\n" % len(arg))
        out.append(bytes(arg))
        out.append(b"\r\n")
    return b"".join(out)


#: ``pack_command(args)``: one command (a tuple of bytes, str or numbers) as the RESP bytes
#: to write on a connection; in C with hiredis, in Python without it.
pack_command: Any = _hiredis_pack if _hiredis_pack is not None else _pack_in_python

#: Commands up to this many bytes of arguments are packed by hiredis in C; larger ones by
#: redis-py, which sends big arguments without copying them.
_C_PACK_LIMIT = 1 << 20
_SIZED = (str, bytes, memoryview)


class _PackInC(AbstractConnection):
    """Put before a redis-py connection class: its ``pack_command`` runs in C.

    redis-py builds every command in Python: ~1.5 us an argument, so a merged batch of 64
    ``set`` calls spends ~90 us packing and a 10,000-key ``MGET`` ~15 ms. hiredis's
    ``pack_command`` writes the same bytes 5-6x faster. Anything it refuses (a bool, a
    bytearray, a str it cannot encode) goes to redis-py's packer, which raises its own error.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            # As redis-py does: a command name of two words ("SCRIPT LOAD") is two.
            args = (*args[0].split(), *args[1:])
        try:
            size = sum(map(len, args))
        except TypeError:  # numbers among the arguments: count the rest (in C iterators)
            size = sum(map(len, compress(args, map(isinstance, args, repeat(_SIZED)))))
        if size <= _C_PACK_LIMIT:
            try:
                return [_hiredis_pack(args)]
            except (TypeError, ValueError):
                pass
        return super().pack_command(*args)


_RUN_ID = re.compile(rb"run_id:([0-9a-f]+)")
# Recent redis-py versions run on_connect_check_health on connect, older ones on_connect.
_CONNECT_HOOK = (
    "on_connect_check_health"
    if hasattr(AbstractConnection, "on_connect_check_health")
    else "on_connect"
)


class _TracksRunId(AbstractConnection):
    """Put before a redis-py connection class: every (re)connection asks the server for its
    ``run_id`` and keeps it as ``fleetmem_run_id`` (None when ``INFO`` is refused). A restarted
    server breaks every connection, so a connection's ``run_id`` is that of the server it talks
    to: the hybrid tier compares it with the one its cache epoch was published under."""

    fleetmem_run_id: bytes | None = None

    async def _connected(self, *args: Any, **kwargs: Any) -> None:
        self.fleetmem_run_id = None
        await getattr(super(), _CONNECT_HOOK)(*args, **kwargs)
        await self.send_command("INFO", "server", check_health=False)
        try:
            info = await self.read_response()
        except rexc.ResponseError:  # INFO not allowed for this user: no run_id
            return
        found = _RUN_ID.search(info if isinstance(info, bytes) else str(info).encode())
        self.fleetmem_run_id = found.group(1) if found else None


setattr(_TracksRunId, _CONNECT_HOOK, _TracksRunId._connected)

_COMPOSED: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _in_front(mixin: type[Any], base: type[Any]) -> type[Any]:
    """``base`` (a redis-py connection class) with ``mixin`` in front, made once per pair."""
    composed = _COMPOSED.get((mixin, base))
    if composed is None:
        composed = _COMPOSED[(mixin, base)] = type(base.__name__, (mixin, base), {})
    return composed


# A stored JSON that holds a run of 19+ digits (a number orjson might not read exactly) is
# written as "!" + JSON and read back with decode_value; any other is read with orjson directly,
# which skips decode_value's scan of every value read.
def _mark(payload: bytes) -> bytes:
    """``payload`` as stored: "!"-prefixed when only ``decode_value`` reads it exactly."""
    return b"!" + payload if needs_exact_decoder(payload) else payload


def _value(raw: bytes) -> Any:
    """The value of an entry string (19-byte header, partition name, stored JSON)."""
    start = 19 + raw[0]
    if raw[start] == 33:  # "!"
        return decode_value(raw[start + 1 :])
    return orjson.loads(memoryview(raw)[start:])


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, _UTC)


def _part_arg(partition: str | None) -> str:
    """``partition`` as the scripts take it: "" keeps, "=<name>" sets ("=" for default)."""
    if partition is None:
        return ""
    return "=" if partition == DEFAULT_PARTITION else "=" + partition


def _part_name(raw: bytes | str) -> str:
    name = raw.decode() if isinstance(raw, bytes) else raw
    return name or DEFAULT_PARTITION


def _meta(ver: int, created: int, updated: int, part: bytes, expires: int) -> EntryMeta:
    return EntryMeta(
        _part_name(part),
        int(ver),
        _dt(created),
        _dt(updated),
        None if expires < 0 else _dt(expires),
    )


def _entry(key: str, raw: bytes, expires: int) -> Entry:
    """An ``Entry`` from an entry string and its ``PEXPIRETIME``."""
    from_bytes = int.from_bytes
    return Entry(
        key,
        _value(raw),
        *_meta(
            from_bytes(raw[1:7], "big"),
            from_bytes(raw[7:13], "big"),
            from_bytes(raw[13:19], "big"),
            raw[19 : 19 + raw[0]],
            expires,
        ),
    )


def _policy_of(reply: Any) -> str | None:
    """``maxmemory-policy`` out of a ``CONFIG GET`` (dict or flat list) or ``INFO`` reply."""
    if isinstance(reply, dict):
        for name in ("maxmemory-policy", b"maxmemory-policy", "maxmemory_policy"):
            if name in reply:
                value = reply[name]
                return value.decode() if isinstance(value, bytes) else str(value)
        return None
    if isinstance(reply, list) and len(reply) >= 2:
        value = reply[1]
        return value.decode() if isinstance(value, bytes) else str(value)
    if isinstance(reply, (bytes, str)):
        found = _POLICY_IN_INFO.search(reply if isinstance(reply, bytes) else reply.encode())
        return found.group(1).decode() if found else None
    return None


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter is not None else value)


class RedisKV(KVBackend):
    """Entries on Redis 7 without modules, standalone or Redis Cluster.

    Build it with :meth:`from_url` (``redis://``, ``rediss://``, ``unix://``) or from an
    injected ``redis.asyncio.Redis`` / ``RedisCluster`` client (created with
    ``decode_responses=False``), which the store then never closes.
    """

    backend_name = "redis"
    #: Concurrent get / get_entry / exists / set / delete calls beyond this many in flight are
    #: merged: one MGET or one script call per batch (see ``fleetmem._coalesce``).
    coalesce_max_inflight = 2

    def __init__(
        self,
        *,
        client: aioredis.Redis | RedisCluster | None = None,
        namespace: str,
        timeout: float = 2.0,
        retries: int = 1,
        allow_eviction: bool = False,
        _url: str | None = None,
        _cluster: bool | None = None,
        _client_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(namespace=namespace)
        check_positive_number("timeout", timeout)
        check_non_negative_int("retries", retries)
        if not isinstance(allow_eviction, bool):
            raise ConfigurationError(
                f"allow_eviction must be True or False, not {type(allow_eviction).__name__}"
            )
        #: True: any maxmemory-policy is accepted (a cache). False: connect() checks it.
        self._allow_eviction = allow_eviction
        #: The server's eviction policy has been checked (by connect(); shared with views).
        self._policy_checked = False
        self._timeout = float(timeout)
        self._retries = retries
        self._url = _url
        self._client_options = _client_options or {}
        self._owns_client = client is None
        if client is not None:
            if not isinstance(client, (aioredis.Redis, RedisCluster)):
                raise ConfigurationError(
                    "client must be a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster"
                )
            encoder = client.get_encoder()
            if getattr(encoder, "decode_responses", False):
                raise ConfigurationError("RedisStore needs a client with decode_responses=False")
            _cluster = isinstance(client, RedisCluster)
        elif _url is None:
            raise ConfigurationError("RedisStore needs a client or a URL (use from_url)")
        self._client: Any = client
        self._cluster = _cluster
        #: Scripts run as Redis functions (FCALL) until the server refuses FUNCTION LOAD.
        self._functions = True
        #: Connections learn their server's run_id (see ``_track_run_ids``).
        self._track_run_id = False
        if client is None and _cluster is not None:
            self._client = self._make_client(_cluster)
        self._bind_namespace()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str,
        timeout: float = 2.0,
        socket_timeout: float | None = None,
        connect_timeout: float | None = None,
        retries: int = 1,
        cluster: bool | None = None,
        allow_eviction: bool = False,
        username: str | None = None,
        password: Any = None,
        max_connections: int | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_cert_reqs: str | None = None,
        ssl_check_hostname: bool | None = None,
        client_name: str | None = None,
    ) -> RedisKV:
        """A store for ``url`` (no I/O; ``connect()`` opens it).

        ``timeout`` is the deadline of every call in seconds, retries included;
        ``socket_timeout`` / ``connect_timeout`` default to half of it (a first attempt then
        fits in the deadline without a timer of its own). ``retries`` is how many times a
        read (or a write that was never sent) is tried again within that deadline.
        ``cluster=None`` asks the server on ``connect()`` whether it is a Redis Cluster.
        ``allow_eviction=False`` (the default) makes ``connect()`` refuse, with a
        :class:`~fleetmem.errors.ConfigurationError`, a server whose ``maxmemory-policy`` is
        not ``noeviction`` (on a Cluster: any primary's): such a server may drop entries and
        index keys by itself, losing acknowledged writes silently. ``True`` accepts any
        policy, for a Redis used as a cache (the hybrid tier's).
        ``username`` / ``password`` (a ``str`` or ``SecretStr``) override the URL's; the
        password never appears in a ``repr``, log line or error. ``ssl_*`` apply to
        ``rediss://``.
        """
        if not isinstance(url, str) or url_scheme(url) not in ("redis", "rediss", "unix"):
            raise ConfigurationError(
                f"RedisStore needs a redis://, rediss:// or unix:// URL, not "
                f"{redact_url(url) if isinstance(url, str) else type(url).__name__!r}"
            )
        check_positive_number("timeout", timeout)
        options: dict[str, Any] = {
            "socket_timeout": float(socket_timeout if socket_timeout is not None else timeout / 2),
            "socket_connect_timeout": float(
                connect_timeout if connect_timeout is not None else timeout / 2
            ),
            # redis-py's default retry turns a socket timeout into many seconds and may send a
            # write twice; the store retries by itself, within its deadline.
            "retry": Retry(NoBackoff(), 0),
        }
        if username is not None:
            options["username"] = username
        if password is not None:
            options["password"] = _secret(password)
        if max_connections is not None:
            options["max_connections"] = max_connections
        if client_name is not None:
            options["client_name"] = client_name
        for name, value in (
            ("ssl_ca_certs", ssl_ca_certs),
            ("ssl_certfile", ssl_certfile),
            ("ssl_keyfile", ssl_keyfile),
            ("ssl_cert_reqs", ssl_cert_reqs),
            ("ssl_check_hostname", ssl_check_hostname),
        ):
            if value is not None:
                if url_scheme(url) != "rediss":
                    raise ConfigurationError(f"{name} needs a rediss:// URL")
                options[name] = value
        if url_scheme(url) == "unix":
            if cluster:
                raise ConfigurationError("a Redis Cluster cannot be reached over unix://")
            cluster = False
        return cls(
            namespace=namespace,
            timeout=timeout,
            retries=retries,
            allow_eviction=allow_eviction,
            _url=url,
            _cluster=cluster,
            _client_options=options,
        )

    def _make_client(self, cluster: bool) -> Any:
        assert self._url is not None
        try:
            if cluster:
                return RedisCluster.from_url(self._url, **self._client_options)
            client = aioredis.Redis.from_url(self._url, **self._client_options)
            pool = client.connection_pool
            encoding = pool.connection_kwargs.get("encoding", "utf-8")
            if _hiredis_pack is not None and encoding.lower().replace("-", "") == "utf8":
                # No connection exists yet: every one the pool makes packs in C.
                pool.connection_class = _in_front(_PackInC, pool.connection_class)
            if self._track_run_id:
                pool.connection_class = _in_front(_TracksRunId, pool.connection_class)
            return client
        except (ValueError, TypeError, rexc.RedisError) as exc:
            raise ConfigurationError(
                f"invalid Redis URL or option for {redact_url(self._url)!r}: {type(exc).__name__}"
            ) from None

    def track_run_ids(self) -> bool:
        """Have every connection of a standalone client made from now on learn its server's
        ``run_id`` (``fleetmem_run_id``: one ``INFO`` per connection made). For the hybrid
        tier, before the client exists; False (and nothing changes) once it does."""
        if self._client is not None or self._url is None:
            return False
        self._track_run_id = True
        return True

    @property
    def client(self) -> Any:
        """The ``redis.asyncio`` client (a standalone one is made now if ``connect()`` has not
        decided yet); the hybrid tier runs its cache commands on it."""
        if self._client is None:
            self._cluster = bool(self._cluster)
            self._client = self._make_client(self._cluster)
            self._refresh_calls()
        return self._client

    def _bind_namespace(self) -> None:
        prefix = f"fm:{{{self._namespace}}}:"
        self._ep = prefix + "e:"
        # Constant arguments of every script call, encoded once: numkeys and KEYS[1], the
        # namespace prefix (it routes the call to the namespace's slot; the scripts derive
        # every key from it).
        self._nsargs = (b"1", prefix.encode())
        self._refresh_calls()

    def _refresh_calls(self) -> None:
        """Prepare the constant head of the common ``set`` call (None until the kind of
        server is known)."""
        self._fast_set: tuple[Any, ...] | None = None
        if self._cluster is False and self._functions:
            self._fast_set = ("FCALL", _SET.function, *self._nsargs)
        elif self._cluster is not None:
            self._fast_set = ("EVALSHA", _SET.sha, *self._nsargs)

    def _where(self) -> str:
        """The server, for messages: its URL without a password, or "injected client"."""
        return redact_url(self._url) if self._url is not None else "injected client"

    @property
    def cluster(self) -> bool:
        """Whether the server is a Redis Cluster (False until ``connect()`` has asked)."""
        return bool(self._cluster)

    @property
    def allow_eviction(self) -> bool:
        """Whether any ``maxmemory-policy`` is accepted: a Redis used as a cache (set by the
        hybrid tier on its cache before ``connect()``)."""
        return self._allow_eviction

    @allow_eviction.setter
    def allow_eviction(self, allowed: bool) -> None:
        self._allow_eviction = bool(allowed)

    def describe(self) -> str:
        where = self._where()
        kind = " cluster" if self._cluster else ""
        return f" url={where!r}{kind} timeout={self._timeout}"

    async def connect(self) -> None:
        """Reach the server (and find out whether it is a Cluster), then check its eviction
        policy unless ``allow_eviction``. A store used without ``connect()`` connects on its
        first call; an injected client is checked only by an explicit ``connect()``."""
        detected = self._client is None
        if detected:
            await self._detect_cluster()
        await self._exec(False, "PING")
        if not self._allow_eviction and not self._policy_checked:
            try:
                await self._check_eviction_policy()
            except ConfigurationError:
                if detected and self._owns_client and self._client is not None:
                    # Made by this connect(): drop it, so that a store used without
                    # connect() meets the same refusal on its next call, not a working store.
                    client, self._client, self._cluster = self._client, None, None
                    self._refresh_calls()
                    await client.aclose()
                raise
            self._policy_checked = True

    async def _check_eviction_policy(self) -> None:
        """Refuse a server (on a Cluster: any primary known now) that may evict keys."""
        if self._cluster:
            nodes: list[Any] = list(self._client.get_primaries())
        else:
            nodes = [None]
        for node in nodes:
            policy = await self._eviction_policy(node)
            where = self._where()
            if node is not None:
                where += f", cluster primary {node.host}:{node.port}"
            if policy is None:
                _log.warning(
                    "Redis (%s): could not read maxmemory-policy (CONFIG GET and INFO refused); "
                    "fleetmem needs noeviction, or entries and index keys may be evicted",
                    where,
                )
            elif policy != _SAFE_POLICY:
                raise ConfigurationError(
                    f"Redis ({where}) has maxmemory-policy {policy!r}: it may evict fleetmem's "
                    "entries and index keys by itself, losing acknowledged writes silently "
                    "and leaving keys()/stats() wrong. Set maxmemory-policy noeviction "
                    "(redis.conf, or CONFIG SET maxmemory-policy noeviction), or pass "
                    "allow_eviction=True if this Redis is a cache whose entries may vanish"
                )

    async def _eviction_policy(self, node: Any) -> str | None:
        """The ``maxmemory-policy`` of the server (or Cluster ``node``), None if not allowed to
        read it: ``CONFIG GET`` first, which managed services and ACLs often refuse, then
        ``INFO memory``."""
        options = {} if node is None else {"target_nodes": node}
        for command in (("CONFIG GET", "maxmemory-policy"), ("INFO", "memory")):
            try:
                reply = await asyncio.wait_for(
                    self._client.execute_command(*command, **options), self._timeout
                )
            except rexc.ResponseError:  # NOPERM, unknown (renamed) command
                continue
            except Exception as exc:
                raise self._unavailable("connect", exc) from exc
            policy = _policy_of(reply)
            if policy is not None:
                return policy
        return None

    async def _detect_cluster(self) -> None:
        probe = self._make_client(False)
        try:
            info = await asyncio.wait_for(probe.execute_command("INFO", "cluster"), self._timeout)
        except Exception as exc:
            raise self._unavailable("connect", exc) from exc
        finally:
            await probe.aclose()
        enabled = bool(int(info.get("cluster_enabled", 0))) if isinstance(info, dict) else False
        if self._client is None:  # a concurrent connect() may have won
            self._cluster = enabled
            self._client = self._make_client(enabled)
            self._refresh_calls()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    # ---------------------------------------------------------------- the one choke point

    async def _exec(self, write: bool, *args: Any) -> Any:
        """Run one command under the deadline; translate every driver error."""
        # The first attempt is bounded by the socket timeouts (connect and read, half the
        # deadline each by default): an asyncio timer per call would cost ~7 us on the hot path.
        start = time.monotonic()
        client = self._client
        if client is None:
            await self.connect()
            client = self._client
        try:
            return await client.execute_command(*args)
        except Exception as exc:
            return await self._recover(exc, write, args, start)

    async def _recover(
        self, first: Exception, write: bool, args: tuple[Any, ...], start: float
    ) -> Any:
        """The slow path of :meth:`_exec`: NOSCRIPT, retries, translation."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout - (time.monotonic() - start)
        exc: Exception = first
        attempt = 0
        loaded = False
        while True:
            if isinstance(exc, rexc.NoScriptError) and args and args[0] == "EVALSHA":
                # The server lost its script cache (restart, SCRIPT FLUSH, failover): EVAL
                # runs the script and caches it again.
                args = ("EVAL", _SOURCE_BY_SHA[args[1]], *args[2:])
            elif (
                isinstance(exc, rexc.ResponseError)
                and args[0] == "FCALL"
                and "function not found" in str(exc).lower()
                and not loaded
            ):
                # First use on this server, or it lost its functions (restart without
                # persistence, FUNCTION FLUSH): load the library; nothing ran, so send again.
                loaded = True
                if not await self._load_library(args[0], deadline):
                    args = ("EVALSHA", _SHA_BY_FUNCTION[args[1]], *args[2:])
            elif isinstance(exc, rexc.ResponseError) and (
                isinstance(exc, rexc.OutOfMemoryError) or _OOM in str(exc)
            ):
                # Refused before it ran (a script that may add data is refused whole): nothing
                # was written, and trying again cannot help until memory is freed.
                raise self._full(args[0]) from exc
            elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not isinstance(
                exc, rexc.RedisError
            ):
                raise self._unavailable(args[0], exc, in_flight=write) from exc
            elif isinstance(
                exc,
                (
                    rexc.ConnectionError,
                    rexc.TimeoutError,
                    rexc.TryAgainError,
                    rexc.ClusterDownError,
                    rexc.MasterDownError,
                ),
            ):
                if isinstance(exc, rexc.AuthenticationError):
                    raise self._unavailable(args[0], exc) from exc
                unsent = any(marker in str(exc) for marker in _UNSENT)
                if write and not unsent and not isinstance(exc, rexc.BusyLoadingError):
                    raise self._unavailable(args[0], exc, in_flight=True) from exc
                attempt += 1
                if attempt > self._retries or loop.time() >= deadline - 0.001:
                    raise self._unavailable(args[0], exc) from exc
                await asyncio.sleep(min(0.02 * attempt, max(0.0, deadline - loop.time())))
            elif isinstance(exc, rexc.ResponseError):
                raise FleetmemError(f"Redis refused {args[0]}: {exc}") from exc
            else:
                raise self._unavailable(args[0], exc) from exc
            try:
                return await asyncio.wait_for(
                    self._client.execute_command(*args), max(0.001, deadline - loop.time())
                )
            except Exception as again:
                exc = again

    async def _load_library(self, what: Any, deadline: float) -> bool:
        """Load the function library; False (and scripts from now on) if the server refuses."""
        remaining = max(0.001, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(
                self._client.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY), remaining
            )
        except rexc.OutOfMemoryError:
            # A full server refuses FUNCTION LOAD: this call goes out as a script (a read or a
            # delete still runs); the library is loaded by a call made once memory is free.
            return False
        except rexc.ResponseError:
            # No FUNCTION command (Redis < 7) or not allowed for this user: use EVALSHA.
            self._functions = False
            self._refresh_calls()
            return False
        except Exception as exc:
            raise self._unavailable(what, exc) from exc
        return True

    def _full(self, what: Any) -> BackendUnavailableError:
        name = what.decode() if isinstance(what, bytes) else str(what)
        where = self._where()
        return BackendUnavailableError(
            f"Redis ({where}) is full (used memory > maxmemory, nothing it may evict): it "
            f"refused the write ({name}); nothing was written. Reads and deletes still work: "
            "delete entries, or raise maxmemory"
        )

    def _unavailable(
        self, what: Any, exc: BaseException, *, in_flight: bool = False
    ) -> BackendUnavailableError:
        name = what.decode() if isinstance(what, bytes) else str(what)
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not isinstance(
            exc, rexc.RedisError
        ):
            detail = f"no reply within the {self._timeout:g} s deadline"
        where = self._where()
        if in_flight:
            return OutcomeUnknownError(
                f"Redis ({where}) connection failed while a write ({name}) was in flight; "
                f"it may or may not have been applied: {detail}"
            )
        return BackendUnavailableError(f"Redis ({where}) unavailable during {name}: {detail}")

    async def _script(self, write: bool, script: Script, *args: Any) -> Any:
        if self._client is None:
            await self.connect()
        if self._functions and not self._cluster:
            return await self._exec(write, "FCALL", script.function, *self._nsargs, *args)
        return await self._exec(write, "EVALSHA", script.sha, *self._nsargs, *args)

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Any:
        raw = await self._exec(False, "GET", self._ep + key)
        if raw is None:
            return MISSING
        return _value(raw)

    async def get_entry(self, key: str) -> Entry | None:
        res = await self._script(False, _GET_ENTRY, key)
        if res is None:
            return None
        return _entry(key, res[0], res[1])

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            res = await self._script(False, _GET_ENTRIES, *chunk)
            for i, key in enumerate(chunk):
                raw = res[2 * i]
                if raw is not None:
                    out[key] = _entry(key, raw, res[2 * i + 1])
        return out

    async def exists_batch(self, keys: list[str]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(keys), _BATCH):
            res = await self._script(False, _EXISTS_MANY, *keys[start : start + _BATCH])
            out.extend(flag == 1 for flag in res)
        return out

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ep = self._ep
        loads = orjson.loads
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            raws = await self._exec(False, "MGET", *[ep + k for k in chunk])
            for key, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    at = 19 + raw[0]  # _value(), inlined
                    out[key] = loads(raw[at:]) if raw[at] != 33 else decode_value(raw[at + 1 :])
        return out

    async def get_batch(self, keys: list[str]) -> list[Any]:
        """Values of merged ``get`` calls, in order (one MGET)."""
        ep = self._ep
        loads = orjson.loads
        out: list[Any] = []
        for start in range(0, len(keys), _BATCH):
            raws = await self._exec(False, "MGET", *[ep + k for k in keys[start : start + _BATCH]])
            for raw in raws:
                if raw is None:
                    out.append(MISSING)
                    continue
                at = 19 + raw[0]  # _value(), inlined
                out.append(loads(raw[at:]) if raw[at] != 33 else decode_value(raw[at + 1 :]))
        return out

    async def exists(self, key: str) -> bool:
        return bool(await self._exec(False, "EXISTS", self._ep + key))

    async def ttl(self, key: str) -> float | None:
        ms = await self._exec(False, "PTTL", self._ep + key)
        if ms == -2:
            raise KeyNotFoundError(f"key {key!r} does not exist")
        return None if ms < 0 else ms / 1000.0

    def _range(self, prefix: str, after: str | None) -> tuple[bytes, bytes]:
        encoded = prefix.encode()
        lo = b"[" + encoded if prefix else b"-"
        if after is not None and after >= prefix:
            # Members of `after` are "after" and "after\0<partition>": start just past them.
            lo = b"[" + after.encode() + b"\x01"
        hi = b"(" + encoded + b"\xff" if prefix else b"+"
        return lo, hi

    async def _scan_page(self, lo: bytes, hi: bytes, want: int, pf: str) -> tuple[bytes, list[str]]:
        res = await self._script(False, _SCAN, lo, hi, want, _SCAN_BUDGET, pf)
        return res[0], [k.decode() for k in res[1:]]

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        lo, hi = self._range(prefix, after)
        pf = "" if partition is None else _part_arg(partition)
        out: list[str] = []
        while True:
            want = 5000 if limit is None else min(limit - len(out), 5000)
            cursor, page = await self._scan_page(lo, hi, want, pf)
            out.extend(page)
            if not cursor or (limit is not None and len(out) >= limit):
                return out
            lo = cursor

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        lo, hi = self._range(pattern.prefix, None)
        pf = "" if partition is None else _part_arg(partition)
        out: dict[str, Any] = {}
        ep = self._ep
        matches = pattern.matches
        while True:
            want = 1000 if limit is None else min(1000, max(2 * (limit - len(out)), 100))
            cursor, page = await self._scan_page(lo, hi, want, pf)
            hits = [k for k in page if matches(k)]
            if hits:
                raws = await self._exec(False, "MGET", *[ep + k for k in hits])
                for key, raw in zip(hits, raws, strict=True):
                    if raw is not None:
                        out[key] = _value(raw)
                        if limit is not None and len(out) >= limit:
                            return out
            if not cursor:
                return out
            lo = cursor

    async def _prune(self, mode: str) -> list[Any]:
        """Drop the index members of natively expired entries; the last script reply."""
        for _ in range(100_000):
            res: list[Any] = await self._script(False, _PRUNE, _SCAN_BUDGET, mode)
            if int(res[1]):
                return res
        raise BackendUnavailableError("Redis: expired entries are pruned slower than they expire")

    async def partitions(self) -> list[str]:
        flat = (await self._prune("stats"))[2]
        return sorted(flat[i].decode() for i in range(0, len(flat), 2) if int(flat[i + 1]) > 0)

    async def stats(self) -> StoreStats:
        res = await self._prune("stats")
        flat = res[2]
        counts = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        counts = {name: n for name, n in sorted(counts.items()) if n > 0}
        total = sum(counts.values())
        size, sampled = int(res[3]), int(res[4])
        return StoreStats(
            namespace=self._namespace,
            keys=total,
            partitions=counts,
            expired_pending=int(res[5]),
            bytes=(size * total) // sampled if sampled else 0,
            backend=self.backend_name,
        )

    async def health(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._exec(False, "PING")
        return {
            "rtt_ms": round((loop.time() - start) * 1000.0, 3),
            "cluster": bool(self._cluster),
            "url": self._where(),
        }

    # ---------------------------------------------------------------- writes

    async def set(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None, keep_ttl: bool
    ) -> EntryMeta:
        if ttl_ms is None and partition is None and not keep_ttl and self._fast_set:
            # The common call, with its constant arguments ready.
            res = await self._exec(True, *self._fast_set, key, _mark(payload))
        else:
            res = await self._script(
                True,
                _SET,
                key,
                _mark(payload),
                ttl_ms or 0,
                _part_arg(partition),
                b"1" if keep_ttl else b"0",
            )
        return _meta(*res)

    async def set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        out: list[EntryMeta | BaseException] = []
        for start in range(0, len(ops), _OPS_BATCH):
            args: list[Any] = []
            for key, payload, ttl_ms, partition, keep_ttl in ops[start : start + _OPS_BATCH]:
                if ttl_ms is None and partition is None and not keep_ttl:
                    args += (key, _mark(payload), b"")
                else:
                    opts = f"{ttl_ms or 0} {1 if keep_ttl else 0} {_part_arg(partition)}"
                    args += (key, _mark(payload), opts)
            res = await self._script(True, _SET_BATCH, *args)
            now = res[0]
            updated = _dt(now)
            for i in range(1, len(res), 4):
                ver, c, part, exp = res[i : i + 4]
                out.append(
                    EntryMeta(
                        _part_name(part),
                        ver,
                        updated if c == now else _dt(c),
                        updated,
                        None if exp < 0 else _dt(exp),
                    )
                )
        return out

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
    ) -> int:
        count = 0
        parg = _part_arg(partition)
        mark = _mark
        for chunk in chunks:
            for start in range(0, len(chunk), _SET_MANY_SLICE):
                part = chunk[start : start + _SET_MANY_SLICE]
                args: list[Any] = [x for key, payload in part for x in (key, mark(payload))]
                count += await self._script(True, _SET_MANY, ttl_ms or 0, parg, *args)
        return count

    async def set_if_absent(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None
    ) -> bool:
        res = await self._script(
            True, _SET_IF_ABSENT, key, _mark(payload), ttl_ms or 0, _part_arg(partition)
        )
        return bool(res)

    async def compare_and_set(
        self, key: str, payload: bytes, version: int, ttl_ms: int | None, partition: str | None
    ) -> EntryMeta:
        res = await self._script(
            True, _CAS, key, _mark(payload), version, ttl_ms or 0, _part_arg(partition)
        )
        if not res[0]:
            raise VersionConflictError(key, version, int(res[1]))
        return _meta(*res[1:])

    async def incr(
        self, key: str, amount: int | float, ttl_ms: int | None, partition: str | None
    ) -> int | float:
        is_int = isinstance(amount, int)
        text = str(amount) if is_int else repr(float(amount))
        res = await self._script(
            True, _INCR, key, text, "i" if is_int else "f", ttl_ms or 0, _part_arg(partition)
        )
        status = res[0]
        if status == b"OK":
            result: bytes = res[1]
            if is_int and result.lstrip(b"-").isdigit():
                return int(result)
            return float(result)
        if status == b"NAN":
            kind = _KIND.get(bytes(res[1]), "value")
            raise NotANumberError(f"key {key!r} holds a {kind}, not a number")
        if status == b"FLOAT":
            raise InvalidArgumentError(f"incr of key {key!r} would overflow a float")
        raise InvalidArgumentError(f"incr of key {key!r} would leave the signed 64-bit range")

    async def delete(self, key: str) -> bool:
        res: list[int] = await self._script(True, _DELETE_MANY, key)
        return res[0] == 1

    async def delete_many(self, keys: list[str]) -> int:
        count = 0
        for start in range(0, len(keys), _BATCH):
            count += sum(await self._script(True, _DELETE_MANY, *keys[start : start + _BATCH]))
        return count

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        out: list[bool | BaseException] = []
        for start in range(0, len(keys), _BATCH):
            res = await self._script(True, _DELETE_MANY, *keys[start : start + _BATCH])
            out += [flag == 1 for flag in res]
        return out

    async def expire(self, key: str, ttl_ms: int | None) -> bool:
        return bool(await self._script(True, _EXPIRE, key, ttl_ms or 0))

    async def clear(self, partition: str | None) -> int:
        pf = "" if partition is None else _part_arg(partition)
        cursor: bytes | str = "-"
        count = 0
        for _ in range(10_000_000):
            res = await self._script(True, _CLEAR, pf, cursor, _SCAN_BUDGET)
            count += int(res[1])
            cursor = res[0]
            if not cursor:
                return count
        return count  # pragma: no cover - bounded loop

    async def cleanup_expired(self) -> int:
        return int((await self._prune("cleanup"))[2])
