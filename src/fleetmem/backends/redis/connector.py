"""``RedisConnector``: the Redis driver under a Redis backend, shared by a store and its views.

It owns everything that is about talking to Redis rather than about what is stored there:

* the client: made from a URL and options (standalone or Cluster, found out on ``connect()``)
  or injected, then never closed by fleetmem; its connections pack commands in C when hiredis
  is there (:func:`pack_command` is the same packer, in Python without hiredis) and, for the
  hybrid tier, learn their server's ``run_id`` (:meth:`RedisConnector.track_run_ids`); a new
  connection that reaches another server run (a restart, a failover) is told to listeners
  (:meth:`RedisConnector.on_new_server_run`: the key-value backend registers its namespaces
  again); :meth:`RedisConnector.scan_keys` walks the keyspace (every primary of a Cluster);
* the check of the server's ``maxmemory-policy`` on ``connect()`` (unless ``allow_eviction``);
* ONE choke point, :meth:`RedisConnector.execute`: every command runs there under a deadline
  (``timeout``, default 2 s) with redis-py's own retry switched off. Reads, and writes that
  provably never left the client (the connection could not be opened), are retried
  ``retries`` times within that deadline; a write whose connection died or timed out while in
  flight raises :class:`~fleetmem.errors.OutcomeUnknownError`; a server at ``maxmemory``
  refusing a write raises :class:`~fleetmem.errors.BackendUnavailableError`; a fenced write
  whose lease is lost (its script answers ``FMLEASELOST``) raises
  :class:`~fleetmem.errors.LeaseLostError` for the call's fence; a connection that
  could not be opened says why ("cannot connect to Redis at <url without password>: connection
  refused", "host not found", "timed out", "authentication failed"); a server refusing the
  URL's database index (``/99``: ``DB index is out of range``) raises
  :class:`~fleetmem.errors.ConfigurationError`, since trying again cannot help; every other
  redis-py error is translated there too;
* script calls (:meth:`RedisConnector.call`, and :meth:`RedisConnector.prepare` for a hot
  call's constant head): the choice between ``FCALL`` (a function of the one library of
  ``scripts.py``, on a standalone server) and ``EVALSHA`` (on a Cluster, or where ``FUNCTION
  LOAD`` is refused) is made in one place (:attr:`RedisConnector.form`), and a server that lost
  the library or its script cache ("Function not found", ``NOSCRIPT``) gets it again.

* the release listener of leases (``leases.ReleaseListener``, one pub/sub connection made by
  :meth:`RedisConnector.open_pubsub`, closed by :meth:`RedisConnector.aclose`) and the
  :class:`~fleetmem._notify.Notifier` of every view's lease waiters.

A backend's views hold the same connector object, so whatever ``connect()`` learns (the client,
Cluster or not, functions refused, the policy checked) is known to every view at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from itertools import compress, repeat
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from fleetmem._notify import Notifier
from fleetmem._urls import hide_passwords, redact_url, url_scheme
from fleetmem._validate import check_non_negative_int, check_positive_number
from fleetmem.backends.redis.scripts import SCRIPT_LIBRARY, Script, ScriptLibrary
from fleetmem.backends.seam import lease_lost
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    OutcomeUnknownError,
    StoreClosedError,
)

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "PreparedCall",
    "RedisConnector",
    "pack_command",
]

#: The deadline of every call in seconds, retries included.
DEFAULT_TIMEOUT = 2.0
#: How many times a read (or a write never sent) is tried again within the deadline.
DEFAULT_RETRIES = 1

_log = logging.getLogger("fleetmem.redis")

#: Errors raised before a command was written to a socket (safe to retry, even for a write).
_UNSENT = ("connecting to", "Timeout connecting", "Too many connections")
#: What Redis says when a command is refused at maxmemory (a redis-py OutOfMemoryError, or a
#: script error carrying it).
_OOM = "command not allowed when used memory"
#: The error a fenced write's script answers with when its lease is lost (lua/kv/_fence.lua).
_LEASE_LOST = "FMLEASELOST"
#: The only eviction policy under which Redis never drops a key by itself.
_SAFE_POLICY = "noeviction"
_POLICY_IN_INFO = re.compile(rb"maxmemory_policy:([a-z-]+)")

#: A script call's constant head in each form, indexed by :attr:`RedisConnector.form`:
#: ``(("FCALL", function, numkeys, *keys), ("EVALSHA", sha, numkeys, *keys))``.
PreparedCall = tuple[tuple[Any, ...], tuple[Any, ...]]
#: :attr:`RedisConnector.form` values.
FCALL, EVALSHA, UNDECIDED = 0, 1, -1


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
        self.fleetmem_run_id = await _ask_run_id(self)


async def _ask_run_id(conn: Any) -> bytes | None:
    """The ``run_id`` of the server at the other end of the new connection ``conn`` (None when
    ``INFO`` is refused or says none)."""
    await conn.send_command("INFO", "server", check_health=False)
    try:
        info = await conn.read_response()
    except rexc.ResponseError:  # INFO not allowed for this user: no run_id
        return None
    found = _RUN_ID.search(info if isinstance(info, bytes) else str(info).encode())
    return found.group(1) if found else None


setattr(_TracksRunId, _CONNECT_HOOK, _TracksRunId._connected)

_COMPOSED: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _in_front(mixin: type[Any], base: type[Any]) -> type[Any]:
    """``base`` (a redis-py connection class) with ``mixin`` in front, made once per pair."""
    composed = _COMPOSED.get((mixin, base))
    if composed is None:
        composed = _COMPOSED[(mixin, base)] = type(base.__name__, (mixin, base), {})
    return composed


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


#: What Redis answers when the URL's database index is not below its ``databases`` setting.
_NO_SUCH_DB = "DB index is out of range"
#: getaddrinfo's answers that mean "no such host" (as opposed to a lookup that failed).
_NO_SUCH_HOST = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
    if hasattr(socket, name)
)


def _why_not_connected(exc: BaseException) -> str | None:
    """Why a connection could not be opened ("connection refused", "host not found", ...), or
    None when ``exc`` is not a failure to open one. redis-py raises its ``ConnectionError``
    ("Error 111 connecting to host:port") from the socket's ``OSError``."""
    if isinstance(exc, rexc.TimeoutError) and "Timeout connecting" in str(exc):
        return "timed out"
    if isinstance(exc, rexc.AuthenticationError):
        said = str(exc)
        if "NOAUTH" in said or "client already authenticated" in said:
            said = "the server requires a password and none was given"
        return f"authentication failed ({said})"
    if not isinstance(exc, rexc.ConnectionError):
        return None
    if "connecting to" not in str(exc):
        return None
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, socket.gaierror):
        if cause.errno in _NO_SUCH_HOST:
            return "host not found"
        return f"host name lookup failed ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(exc)


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter is not None else value)


class RedisConnector:
    """The client of a Redis backend and the one place its commands run (see the module).

    Build it with :meth:`from_url` or from an injected ``redis.asyncio.Redis`` /
    ``RedisCluster`` client (created with ``decode_responses=False``), which it never closes.
    ``library`` is the script library whose functions :meth:`call` runs.
    """

    def __init__(
        self,
        *,
        client: aioredis.Redis | RedisCluster | None = None,
        url: str | None = None,
        cluster: bool | None = None,
        client_options: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        allow_eviction: bool = False,
        library: ScriptLibrary = SCRIPT_LIBRARY,
    ) -> None:
        check_positive_number("timeout", timeout)
        check_non_negative_int("retries", retries)
        if not isinstance(allow_eviction, bool):
            raise ConfigurationError(
                f"allow_eviction must be True or False, not {type(allow_eviction).__name__}"
            )
        #: True: any maxmemory-policy is accepted (a cache). False: connect() checks it.
        self._allow_eviction = allow_eviction
        #: The server's eviction policy has been checked (by connect()).
        self._policy_checked = False
        #: Set by aclose(): final, nothing makes a client again.
        self._closed = False
        self._timeout = float(timeout)
        self._retries = retries
        self._url = url
        self._client_options = client_options or {}
        self._owns_client = client is None
        self._library = library
        if client is not None:
            if not isinstance(client, (aioredis.Redis, RedisCluster)):
                raise ConfigurationError(
                    "client must be a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster"
                )
            encoder = client.get_encoder()
            if getattr(encoder, "decode_responses", False):
                raise ConfigurationError("RedisStore needs a client with decode_responses=False")
            cluster = isinstance(client, RedisCluster)
        elif url is None:
            raise ConfigurationError("RedisStore needs a client or a URL (use from_url)")
        self._client: Any = client
        self._cluster = cluster
        #: Scripts run as Redis functions (FCALL) until the server refuses FUNCTION LOAD.
        self._functions = True
        #: Connections learn their server's run_id (see ``track_run_ids``).
        self._track_run_id = False
        #: Called on a new server run (see ``on_new_server_run``); the run_id last learnt.
        self._run_listeners: list[Callable[[], None]] = []
        self._server_run_id: bytes | None = None
        #: How scripts are called: FCALL, EVALSHA, or UNDECIDED until the kind of server is
        #: known (see ``_refresh_form``, the one place that decides).
        self.form = UNDECIDED
        #: The waiters of this connector's leases (every view's), woken by releases made here
        #: and by the release listener (``leases.ReleaseListener``, made by the first waiting
        #: ``acquire`` and closed by :meth:`aclose`).
        self.notifier = Notifier()
        self.release_listener: Any = None
        #: ``(namespace, lease name)`` -> the ``acquire`` call of that lease in flight (see
        #: ``RedisLeases.acquire``).
        self.lease_attempts: dict[tuple[str, str], Any] = {}
        #: This connector's id in release notifications (its listener skips its own).
        self.origin = os.urandom(8).hex().encode()
        #: How many pub/sub connections were opened on a Cluster (each on the next node).
        self._pubsub_turn = -1
        if client is None and cluster is not None:
            self._client = self._make_client(cluster)
        self._refresh_form()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        socket_timeout: float | None = None,
        connect_timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
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
    ) -> RedisConnector:
        """A connector for ``url`` (no I/O; ``connect()`` opens it).

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
            url=url,
            cluster=cluster,
            client_options=options,
            timeout=timeout,
            retries=retries,
            allow_eviction=allow_eviction,
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
            if self._run_listeners:
                pool.connection_kwargs["redis_connect_func"] = self._connection_made
            return client
        except (ValueError, TypeError, rexc.RedisError) as exc:
            raise ConfigurationError(
                f"invalid Redis URL or option for {redact_url(self._url)!r}: {type(exc).__name__}"
            ) from None

    async def _connection_made(self, conn: Any) -> None:
        """Set up a new connection as redis-py would (AUTH, SELECT...), then learn its server's
        run_id (one ``INFO``; the hybrid's connections learnt it already) and tell
        :meth:`_saw_run_id`. Installed as the pool's ``redis_connect_func`` (the connection
        class stays redis-py's) once a listener wants it (see :meth:`on_new_server_run`)."""
        await getattr(conn, _CONNECT_HOOK)()
        if isinstance(conn, _TracksRunId):
            run_id = conn.fleetmem_run_id
        else:
            run_id = await _ask_run_id(conn)
        self._saw_run_id(run_id)

    def _saw_run_id(self, run_id: bytes | None) -> None:
        """A new connection learnt its server's run_id: tell the listeners when it is not the
        one the last connection learnt (a restart or a failover), or unknown (INFO refused:
        every new connection may then be to a new server run)."""
        previous, self._server_run_id = self._server_run_id, run_id
        if run_id is None or (previous is not None and previous != run_id):
            for listener in self._run_listeners:
                listener()

    def on_new_server_run(self, listener: Callable[[], None]) -> bool:
        """Have ``listener`` called whenever a new connection of this connector reaches a
        server run other than the last one seen (a restart, a failover), or one whose run_id
        it cannot read (``INFO`` refused): state that the server may have lost with a restart
        without persistence is then to be forgotten. It runs in the connection's setup, before
        the command that made the connection is sent. Costs one ``INFO`` per connection made,
        never per command. Only for a standalone client this connector makes from its URL:
        False (the listener is kept but never called) for an injected client or a Cluster."""
        self._run_listeners.append(listener)
        if self._url is None or self._cluster:
            return False
        if self._client is not None:
            # Made, perhaps not used yet: the connections the pool makes from now on tell.
            self._client.connection_pool.connection_kwargs["redis_connect_func"] = (
                self._connection_made
            )
        return True

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
            if self._closed:
                raise StoreClosedError("the store is closed")
            self._cluster = bool(self._cluster)
            self._client = self._make_client(self._cluster)
            self._refresh_form()
        return self._client

    def _refresh_form(self) -> None:
        """Decide how scripts are called (the one place): ``FCALL`` on a standalone server
        that takes functions, ``EVALSHA`` on a Cluster or where ``FUNCTION LOAD`` was refused,
        UNDECIDED until the kind of server is known."""
        if self._cluster is None:
            self.form = UNDECIDED
        elif self._cluster is False and self._functions:
            self.form = FCALL
        else:
            self.form = EVALSHA

    @staticmethod
    def prepare(script: Script, keys: tuple[bytes, ...]) -> PreparedCall:
        """The constant head of calls of ``script`` on ``keys`` in both forms, encoded once:
        a hot call sends ``*prepared[connector.form], *args`` through :meth:`execute` once
        :attr:`form` is not UNDECIDED (else it goes through :meth:`call`)."""
        numkeys = str(len(keys)).encode()
        return (
            ("FCALL", script.function, numkeys, *keys),
            ("EVALSHA", script.sha, numkeys, *keys),
        )

    @property
    def where(self) -> str:
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

    @property
    def timeout(self) -> float:
        """The deadline of every call, in seconds (retries included)."""
        return self._timeout

    def describe(self) -> str:
        """The server for a store's ``repr`` (never a password)."""
        where = self.where
        kind = " cluster" if self._cluster else ""
        return f" url={where!r}{kind} timeout={self._timeout}"

    async def connect(self) -> None:
        """Reach the server (and find out whether it is a Cluster), then check its eviction
        policy unless ``allow_eviction``. A store used without ``connect()`` connects on its
        first call; an injected client is checked only by an explicit ``connect()``.
        After :meth:`aclose`, ``StoreClosedError``."""
        if self._closed:
            raise StoreClosedError("the store is closed")
        detected = self._client is None
        if detected:
            await self._detect_cluster()
        await self.execute(False, "PING")
        if not self._allow_eviction and not self._policy_checked:
            try:
                await self._check_eviction_policy()
            except ConfigurationError:
                if detected and self._owns_client and self._client is not None:
                    # Made by this connect(): drop it, so that a store used without
                    # connect() meets the same refusal on its next call, not a working store.
                    client, self._client, self._cluster = self._client, None, None
                    self._refresh_form()
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
            where = self.where
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
                raise self.unavailable("connect", exc) from exc
            policy = _policy_of(reply)
            if policy is not None:
                return policy
        return None

    async def _detect_cluster(self) -> None:
        probe = self._make_client(False)
        try:
            info = await asyncio.wait_for(probe.execute_command("INFO", "cluster"), self._timeout)
        except Exception as exc:
            refusal = await self._refusal(exc)
            raise (refusal or self.unavailable("connect", exc)) from exc
        finally:
            await probe.aclose()
        enabled = bool(int(info.get("cluster_enabled", 0))) if isinstance(info, dict) else False
        if self._client is None:  # a concurrent connect() may have won
            self._cluster = enabled
            self._client = self._make_client(enabled)
            self._refresh_form()

    async def aclose(self) -> None:
        self._closed = True
        listener, self.release_listener = self.release_listener, None
        if listener is not None:
            await listener.aclose()
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    # ---------------------------------------------------------------- the one choke point

    async def execute(self, write: bool, *args: Any) -> Any:
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
        """The slow path of :meth:`execute`: NOSCRIPT, retries, translation."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout - (time.monotonic() - start)
        exc: Exception = first
        attempt = 0
        loaded = False
        while True:
            if isinstance(exc, rexc.ResponseError) and str(exc).startswith(_LEASE_LOST):
                # A fenced write whose lease is lost (its script refused it before writing):
                # the fence's name and token are the call's last two arguments.
                name, token = args[-2], args[-1]
                raise lease_lost(
                    name.decode() if isinstance(name, bytes) else str(name), int(token)
                ) from exc
            if isinstance(exc, rexc.NoScriptError) and args and args[0] == "EVALSHA":
                # The server lost its script cache (restart, SCRIPT FLUSH, failover): EVAL
                # runs the script and caches it again.
                args = ("EVAL", self._library.source_of(args[1]), *args[2:])
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
                    args = ("EVALSHA", self._library.sha_of(args[1]), *args[2:])
            elif isinstance(exc, rexc.ResponseError) and (
                isinstance(exc, rexc.OutOfMemoryError) or _OOM in str(exc)
            ):
                # Refused before it ran (a script that may add data is refused whole): nothing
                # was written, and trying again cannot help until memory is freed.
                raise self.full(args[0]) from exc
            elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not isinstance(
                exc, rexc.RedisError
            ):
                raise self.unavailable(args[0], exc, in_flight=write) from exc
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
                    raise self.unavailable(args[0], exc) from exc
                unsent = any(marker in str(exc) for marker in _UNSENT)
                if write and not unsent and not isinstance(exc, rexc.BusyLoadingError):
                    raise self.unavailable(args[0], exc, in_flight=True) from exc
                attempt += 1
                if attempt > self._retries or loop.time() >= deadline - 0.001:
                    raise self.unavailable(args[0], exc) from exc
                await asyncio.sleep(min(0.02 * attempt, max(0.0, deadline - loop.time())))
            elif isinstance(exc, rexc.ResponseError):
                refusal = await self._refusal(exc)
                raise (refusal or FleetmemError(f"Redis refused {args[0]}: {exc}")) from exc
            else:
                raise self.unavailable(args[0], exc) from exc
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
                self._client.execute_command("FUNCTION", "LOAD", "REPLACE", self._library.source),
                remaining,
            )
        except rexc.OutOfMemoryError:
            # A full server refuses FUNCTION LOAD: this call goes out as a script (a read or a
            # delete still runs); the library is loaded by a call made once memory is free.
            return False
        except rexc.ResponseError:
            # No FUNCTION command (Redis < 7) or not allowed for this user: use EVALSHA.
            self._functions = False
            self._refresh_form()
            return False
        except Exception as exc:
            raise self.unavailable(what, exc) from exc
        return True

    async def _refusal(self, exc: BaseException) -> ConfigurationError | None:
        """``exc`` as a :class:`ConfigurationError` when the server refused the URL's database
        index (not below its ``databases`` setting), else None: trying again cannot help, so
        it is never "unavailable"."""
        where = self.where
        if isinstance(exc, rexc.ResponseError) and _NO_SUCH_DB in str(exc):
            db, limit = await self._database_limit()
            which = f"database {db}" if db is not None else "the URL's database"
            if limit is not None:
                has = f"its `databases` setting is {limit}: indexes 0 to {limit - 1}"
            else:
                has = "its `databases` setting is lower"
            return ConfigurationError(
                f"cannot use Redis at {where}: the server has no {which} ({_NO_SUCH_DB}; {has})"
            )
        return None

    async def _database_limit(self) -> tuple[int | None, int | None]:
        """The database index this client selects and the server's ``databases`` setting, the
        latter asked on database 0 (None where ``CONFIG GET`` is refused or for an injected
        client)."""
        if self._url is None:
            kwargs = getattr(
                getattr(self._client, "connection_pool", None), "connection_kwargs", {}
            )
            return kwargs.get("db"), None
        probe = aioredis.Redis.from_url(self._url, **self._client_options)
        kwargs = probe.connection_pool.connection_kwargs
        db = kwargs.get("db")
        kwargs["db"] = 0  # no connection exists yet: every one the probe makes uses 0
        try:
            reply: Any = await asyncio.wait_for(probe.config_get("databases"), self._timeout)
        except Exception:
            return db, None
        finally:
            await probe.aclose()
        value: Any = None
        if isinstance(reply, dict):
            value = reply.get(b"databases", reply.get("databases"))
        try:
            return db, int(value) if value is not None else None
        except ValueError:
            return db, None

    def full(self, what: Any) -> BackendUnavailableError:
        name = what.decode() if isinstance(what, bytes) else str(what)
        where = self.where
        return BackendUnavailableError(
            f"Redis ({where}) is full (used memory > maxmemory, nothing it may evict): it "
            f"refused the write ({name}); nothing was written. Reads and deletes still work: "
            "delete entries, or raise maxmemory"
        )

    def unavailable(
        self, what: Any, exc: BaseException, *, in_flight: bool = False
    ) -> BackendUnavailableError:
        name = what.decode() if isinstance(what, bytes) else str(what)
        where = self.where
        if not in_flight:
            # A connection that never opened: say why, as for PostgreSQL.
            why = _why_not_connected(exc)
            if (
                why is None
                and name == "connect"
                and isinstance(exc, (TimeoutError, rexc.TimeoutError))
            ):
                why = f"timed out: no answer within {self._timeout:g} s"
            if why is not None:
                return BackendUnavailableError(
                    f"cannot connect to Redis at {where}: {hide_passwords(why, self._url)}"
                )
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not isinstance(
            exc, rexc.RedisError
        ):
            detail = f"no reply within the {self._timeout:g} s deadline"
        if in_flight:
            return OutcomeUnknownError(
                f"Redis ({where}) connection failed while a write ({name}) was in flight; "
                f"it may or may not have been applied: {detail}"
            )
        return BackendUnavailableError(f"Redis ({where}) unavailable during {name}: {detail}")

    async def scan_keys(self, match: bytes, *, count: int = 1000) -> AsyncIterator[list[bytes]]:
        """The keys matching the glob ``match``, a ``SCAN`` page at a time (on a Cluster, on
        every primary known now, one after the other). ``SCAN``'s guarantee holds: a key that
        exists for the whole walk is returned (maybe twice); one made or deleted meanwhile may
        or may not be; on a Cluster, a key whose slot migrates during the walk may be missed.
        Each page is a read, retried and translated like :meth:`execute`'s."""
        if self._client is None:
            await self.connect()
        if not self._cluster:
            cursor: Any = 0
            while True:
                cursor, keys = await self.execute(
                    False, "SCAN", cursor, "MATCH", match, "COUNT", count
                )
                yield list(keys)
                if int(cursor) == 0:
                    return
        for node in list(self._client.get_primaries()):
            cursor = 0
            while True:
                try:
                    cursors, keys = await asyncio.wait_for(
                        self._client.scan(
                            cursor=cursor, match=match, count=count, target_nodes=node
                        ),
                        self._timeout,
                    )
                except Exception as exc:
                    raise self.unavailable("SCAN", exc) from exc
                yield list(keys)
                cursor = cursors[node.name]
                if int(cursor) == 0:
                    break

    def is_closed(self) -> bool:
        return self._closed

    async def open_pubsub(self) -> tuple[Any, Any]:
        """A new ``redis.asyncio`` PubSub on a connection of its own, and the client to close
        after it (None: the PubSub's own ``aclose`` is enough). On a standalone server, from
        the client's pool; on a Cluster, on a plain client of one node (another one each time,
        from the nodes known now): a classic ``PUBLISH`` reaches the subscribers of every node
        of a Cluster, so one node is enough."""
        if self._client is None:
            await self.connect()
        client = self._client
        if not self._cluster:
            return client.pubsub(), None
        nodes = list(client.get_nodes())
        if not nodes:  # an injected client not used yet
            await client.initialize()
            nodes = list(client.get_nodes())
        self._pubsub_turn += 1
        node = nodes[self._pubsub_turn % len(nodes)]
        kwargs = {
            k: v
            for k, v in node.connection_kwargs.items()
            if k not in ("redis_connect_func", "event_dispatcher")
        }
        pool = aioredis.ConnectionPool(connection_class=node.connection_class, **kwargs)
        plain = aioredis.Redis(connection_pool=pool)
        return plain.pubsub(), pool

    async def call(self, script: Script, keys: tuple[bytes, ...], *args: Any, write: bool) -> Any:
        """Run ``script`` (of this connector's library) on ``keys`` with ``args``, as a function
        or a plain script (see :attr:`form`); ``write``: it may change data (see
        :meth:`execute` for what that changes on a failure)."""
        if self._client is None:
            await self.connect()
        numkeys = b"%d" % len(keys)
        if self.form == FCALL:
            return await self.execute(write, "FCALL", script.function, numkeys, *keys, *args)
        return await self.execute(write, "EVALSHA", script.sha, numkeys, *keys, *args)
