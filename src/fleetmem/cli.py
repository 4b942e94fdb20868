"""The fleetmem command line: inspect and change any store, run the demo, manage schemas.

The store comes from --url or, without it, from the FLEETMEM_* settings (default: the SQLite
file ./fleetmem.db in the current directory). Output is a readable table on a terminal and JSON
otherwise; --json / --table force one. docs/cli.md describes every command.

Only what every command needs is imported here: a command imports its own modules (the
demo, the migrations, rich for tables and progress) when it runs, so ``fleetmem --help`` and a
quick ``fleetmem get`` do not pay for them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from fleetmem.errors import FleetmemError
    from fleetmem.protocol import Entry, MemoryStore, Snapshot
    from fleetmem.store import Store

__all__ = ["EXIT_CONFLICT", "EXIT_FAILED", "EXIT_OK", "EXIT_PIPE", "EXIT_USAGE", "main"]

#: Exit statuses, the same for every command (``fleetmem --help`` and docs/cli.md list them).
EXIT_OK = 0
#: Not found, false, a version conflict, unhealthy, an inconsistent demo.
EXIT_CONFLICT = 1
#: A usage error: the command line, a value that is not JSON, an invalid key, the configuration.
EXIT_USAGE = 2
#: The backend failed: unreachable, timed out, the outcome of a write unknown, any other error.
EXIT_FAILED = 3
#: stdout was closed before everything was written (``fleetmem keys | head``): 128 + SIGPIPE,
#: the status a shell shows for a Unix tool a closed pipe ends.
EXIT_PIPE = 141
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
fleetmem: shared memory for fleets of AI agents. Inspect and change any store, run
the demo, manage the PostgreSQL schema."""

_EPILOG = """\
global options (--url, -n, --json, --table) go before or after the command.

stores (--url URL, else $FLEETMEM_URL, else the default):
  sqlite:///./fleetmem.db      the default: a SQLite file in the CURRENT directory, so
                               each directory has its own (stats and health print the
                               absolute path of the file they use)
  sqlite:////abs/path.db       a SQLite file by absolute path (sqlite:// is in memory)
  memory://                    a dict in this process, gone when the command ends
  postgresql://USER:PASSWORD@HOST:5432/DB
  redis://HOST:6379/0          also rediss:// (TLS) and unix:///path/to/redis.sock
  hybrid+postgresql://USER@HOST/DB?cache=redis://HOST:6379/0
                               the hybrid: PostgreSQL, with Redis as its cache
  $FLEETMEM_BACKEND=hybrid with $FLEETMEM_POSTGRES_URL and $FLEETMEM_REDIS_URL is the
  hybrid too. The namespace is -n NS, else $FLEETMEM_NAMESPACE, else "default".

output: a table on a terminal, JSON when piped; --json or --table forces one.

exit status:
  0    done
  1    not found, false or a conflict: get/ttl/del/expire/persist of a missing key,
       set --if-version on another version, health not ok, demo not consistent, a
       copy whose destination does not hold what was copied; a snapshot that does
       not exist (snapshot diff/restore/delete, export --snapshot) or, for snapshot
       create, already exists
  2    usage error: the command line, a value that is not JSON, an invalid key,
       pattern or snapshot name, a URL or setting fleetmem cannot use, a missing
       extra, an import file that is missing or not a valid export (nothing written)
  3    the backend failed: unreachable, timed out, a write whose outcome is unknown,
       a schema to upgrade, any other store error
  130  interrupted (Ctrl-C)
  141  stdout was closed early (| head): the rest of the output is dropped quietly
"""

_FORMATS = {"json", "table"}


class _UsageError(Exception):
    """A command line fleetmem cannot run (exit 2)."""


# ------------------------------------------------------------------------ output


def _json_default(value: Any) -> Any:
    from datetime import datetime

    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot print {type(value).__name__}")


def _to_json(data: Any, *, pretty: bool = False) -> str:
    import json

    return json.dumps(data, default=_json_default, ensure_ascii=False, indent=2 if pretty else None)


def _text(value: Any) -> str:
    """A value as a table cell: its JSON text, whole (a table never cuts a value)."""
    return _to_json(value)


def _rich_console(stderr: bool = False) -> Any:
    """A rich ``Console`` on stdout (or stderr), ``None`` without rich (the ``cli`` extra)."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=stderr, soft_wrap=False, highlight=False)


def _plain_rows(rows: Sequence[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class _Output:
    """Prints a command's result: JSON, or rows of a table (rich on a terminal when installed,
    plain aligned text otherwise; values are never cut)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def json(self, data: Any) -> None:
        print(_to_json(data, pretty=sys.stdout.isatty()))

    def rows(self, data: Any, rows: Sequence[tuple[str, str]]) -> None:
        if self.as_json:
            self.json(data)
            return
        console = _rich_console() if sys.stdout.isatty() and rows else None
        if console is None:
            print(_plain_rows(rows))
            return
        from rich.table import Table
        from rich.text import Text

        # No column is cut: a value wider than the terminal folds onto the next lines.
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(Text(key), Text(value))
        console.print(table)

    def table(
        self,
        data: Any,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        numeric: Sequence[int] = (),
    ) -> None:
        """Rows of several columns under a header: rich on a terminal when installed, plain
        aligned columns otherwise (values never cut; the ``numeric`` columns right-aligned),
        ``(none)`` without rows."""
        if self.as_json:
            self.json(data)
            return
        if not rows:
            print("(none)")
            return
        console = _rich_console() if sys.stdout.isatty() else None
        if console is None:
            widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                cells = [
                    c.rjust(w) if i in numeric else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                ]
                print("  ".join(cells).rstrip())
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, header_style="bold")
        for i, name in enumerate(header):
            table.add_column(name, overflow="fold", justify="right" if i in numeric else "left")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)

    def lines(self, data: Any, lines: Sequence[str]) -> None:
        if self.as_json:
            self.json(data)
        else:
            print("\n".join(lines) if lines else "(none)")

    def line(self, data: Any, text: str) -> None:
        if self.as_json:
            self.json(data)
        else:
            print(text)


def _entry_dict(entry: Entry) -> dict[str, Any]:
    return {
        "key": entry.key,
        "value": entry.value,
        "partition": entry.partition,
        "version": entry.version,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "expires_at": entry.expires_at,
    }


def _emit_entry(out: _Output, entry: Entry) -> None:
    data = _entry_dict(entry)
    out.rows(data, [(k, "-" if v is None else _text(v)) for k, v in data.items()])


def _say(text: str) -> None:
    """A message for the person at the terminal (stderr)."""
    print(f"fleetmem: {text}", file=sys.stderr)


# ------------------------------------------------------------------------ store commands


def _parse_value(text: str, raw: bool) -> Any:
    if raw:
        return text
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _UsageError(
            f"value {text!r} is not JSON: quote strings ('\"text\"') or pass --raw"
        ) from None


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise _UsageError(f"--by {text!r} is not a number") from None


def _namespace(args: argparse.Namespace) -> str | None:
    """-n, else FLEETMEM_NAMESPACE (also with --url), else the store's default."""
    return args.namespace or os.environ.get("FLEETMEM_NAMESPACE") or None


def _store_url(args: argparse.Namespace) -> str | None:
    """The URL to open: --url, else FLEETMEM_URL or the default read without pydantic when
    no other setting is set, else ``None`` (``open_store`` reads the settings)."""
    if args.url is not None:
        return str(args.url)
    from fleetmem._where import plain_settings_url

    return plain_settings_url()


def _where(args: argparse.Namespace) -> str:
    from fleetmem._where import describe, effective_url

    return describe(effective_url(args.url))


_StoreAction = Callable[["Store[Any]"], Coroutine[Any, Any, int]]


async def _with_store(args: argparse.Namespace, action: _StoreAction) -> int:
    from fleetmem.factory import open_store

    async with open_store(_store_url(args), namespace=_namespace(args)) as store:
        return await action(store)


async def _cmd_get(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        entry = await store.get_entry(args.key)
        if entry is None:
            _say(f"key {args.key!r} not found")
            return EXIT_CONFLICT
        _emit_entry(out, entry)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_set(args: argparse.Namespace, out: _Output) -> int:
    value = _parse_value(args.value, args.raw)

    async def run(store: MemoryStore) -> int:
        from fleetmem.errors import VersionConflictError

        if args.if_version is None:
            entry = await store.set(args.key, value, ttl=args.ttl, partition=args.partition)
        else:
            try:
                entry = await store.compare_and_set(
                    args.key, value, version=args.if_version, ttl=args.ttl, partition=args.partition
                )
            except VersionConflictError as exc:
                _say(str(exc))
                if out.as_json:
                    out.json(
                        {
                            "key": args.key,
                            "conflict": True,
                            "expected_version": exc.expected,
                            "current_version": exc.current_version,
                        }
                    )
                return EXIT_CONFLICT
        _emit_entry(out, entry)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_del(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        deleted = await store.delete_many(args.keys)
        out.line({"deleted": deleted}, f"deleted {deleted}")
        return EXIT_OK if deleted else EXIT_CONFLICT

    return await _with_store(args, run)


async def _cmd_keys(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        keys = await store.keys(
            args.prefix, partition=args.partition, limit=args.limit, after=args.after
        )
        out.lines(keys, keys)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_search(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        found = await store.search(args.pattern, partition=args.partition, limit=args.limit)
        out.rows(found, [(k, _text(v)) for k, v in found.items()])
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_ttl(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        from fleetmem.errors import KeyNotFoundError

        try:
            left = await store.ttl(args.key)
        except KeyNotFoundError:
            _say(f"key {args.key!r} not found")
            return EXIT_CONFLICT
        out.line({"key": args.key, "ttl": left}, "persistent" if left is None else f"{left:.3f} s")
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_expire(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        found = await store.expire(args.key, args.seconds)
        if not found:
            _say(f"key {args.key!r} not found")
        out.line(
            {"key": args.key, "ttl": args.seconds, "found": found},
            f"{args.key} expires in {args.seconds:g} s" if found else "not found",
        )
        return EXIT_OK if found else EXIT_CONFLICT

    return await _with_store(args, run)


async def _cmd_persist(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        found = await store.persist(args.key)
        if not found:
            _say(f"key {args.key!r} not found")
        out.line(
            {"key": args.key, "found": found},
            f"{args.key} is persistent" if found else "not found",
        )
        return EXIT_OK if found else EXIT_CONFLICT

    return await _with_store(args, run)


async def _cmd_incr(args: argparse.Namespace, out: _Output) -> int:
    amount = _parse_number(args.by)

    async def run(store: MemoryStore) -> int:
        value = await store.incr(args.key, amount, ttl=args.ttl, partition=args.partition)
        out.line({"key": args.key, "value": value}, str(value))
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_clear(args: argparse.Namespace, out: _Output) -> int:
    if not args.yes:
        what = f"partition {args.partition!r} of" if args.partition else "every entry of"
        raise _UsageError(
            f"clear deletes {what} namespace {_namespace(args) or 'default'!r} on "
            f"{_where(args)}: add --yes to do it"
        )

    async def run(store: MemoryStore) -> int:
        if args.partition is None:
            deleted = await store.clear()
        else:
            deleted = await store.clear_partition(args.partition)
        data = {"namespace": store.namespace, "partition": args.partition, "deleted": deleted}
        out.line(data, f"deleted {deleted}")
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_partitions(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        names = await store.partitions()
        out.lines(names, names)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_namespaces(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        names: list[str] = await store.namespaces(args.prefix, limit=args.limit, after=args.after)
        out.lines(names, names)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_holder(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        lease = await store.leases.holder(args.name)
        if lease is None:
            _say(f"lease {args.name!r} is free")
            return EXIT_CONFLICT
        data = {
            "name": lease.name,
            "owner": lease.owner,
            "token": lease.token,
            "acquired_at": lease.acquired_at,
            "expires_at": lease.expires_at,
        }
        out.rows(data, [(k, _text(v)) for k, v in data.items()])
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_agents(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        agents = await store.agents.list(args.prefix, limit=args.limit, after=args.after)
        data = [
            {
                "id": a.id,
                "generation": a.generation,
                "registered_at": a.registered_at,
                "last_seen": a.last_seen,
                "expires_at": a.expires_at,
                "info": a.info,
            }
            for a in agents
        ]
        lines = [
            f"{a.id}  generation {a.generation}  expires {_text(a.expires_at)}  {_text(a.info)}"
            for a in agents
        ]
        out.lines(data, lines)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_queues(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        data = []
        for name in await store.list_queues():
            st = await store.queue(name).stats()
            data.append(
                {
                    "queue": name,
                    "ready": st.ready,
                    "delayed": st.delayed,
                    "claimed": st.claimed,
                    "dead": st.dead,
                    "done": st.done,
                }
            )
        lines = [
            f"{d['queue']}  ready {d['ready']}  delayed {d['delayed']}  claimed {d['claimed']}"
            f"  dead {d['dead']}  done {d['done']}"
            for d in data
        ]
        out.lines(data, lines)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_dead(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        jobs = await store.queue(args.queue).dead(limit=args.limit, after=args.after)
        data = [
            {
                "id": j.id,
                "attempts": j.attempts,
                "max_attempts": j.max_attempts,
                "last_error": j.last_error,
                "consumer": j.consumer,
                "enqueued_at": j.enqueued_at,
                "payload": j.payload,
            }
            for j in jobs
        ]
        lines = [
            f"{j.id}  attempts {j.attempts}/{j.max_attempts}  error {_text(j.last_error)}"
            f"  {_text(j.payload)}"
            for j in jobs
        ]
        out.lines(data, lines)
        return EXIT_OK

    return await _with_store(args, run)


def _change_dict(change: Any) -> dict[str, Any]:
    return {
        "cursor": change.cursor,
        "op": change.op,
        "key": change.key,
        "partition": change.partition,
        "version": change.version,
        "value": change.value,
        "expires_at": change.expires_at,
        "at": change.at,
    }


def _change_line(change: Any) -> str:
    what = change.key if change.key is not None else f"(partition {_text(change.partition)})"
    version = "" if change.version is None else f"  v{change.version}"
    value = "" if change.op != "set" else f"  {_text(change.value)}"
    return f"{change.cursor}  {change.op}  {what}{version}{value}"


async def _cmd_changes(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        feed = store.changes
        if args.changes_command == "enable":
            await feed.enable(args.retention)
            out.line({"enabled": True, "retention": args.retention}, "enabled")
        elif args.changes_command == "disable":
            await feed.disable()
            out.line({"enabled": False}, "disabled")
        elif args.changes_command == "status":
            on = await feed.enabled()
            data: dict[str, Any] = {"enabled": on}
            if on:
                data["cursor"] = await feed.cursor()
            out.line(data, f"enabled, head {data['cursor']}" if on else "not enabled")
        else:  # read
            batch = await feed.read(args.since, args.limit, args.pattern, args.partition)
            data = {"changes": [_change_dict(c) for c in batch.changes], "cursor": batch.cursor}
            lines = [_change_line(c) for c in batch.changes] + [f"next: --since {batch.cursor}"]
            out.lines(data, lines)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_watch(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: Any) -> int:
        seen = 0
        async for change in store.changes.watch(args.pattern, args.partition, args.since):
            if out.as_json:  # one JSON object per line, flushed: a stream to pipe on
                print(_to_json(_change_dict(change), pretty=False), flush=True)
            else:
                print(_change_line(change), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_stats(args: argparse.Namespace, out: _Output) -> int:
    where = _where(args)

    async def run(store: MemoryStore) -> int:
        stats = await store.stats()
        data = {
            "store": where,
            "namespace": stats.namespace,
            "backend": stats.backend,
            "keys": stats.keys,
            "partitions": stats.partitions,
            "expired_pending": stats.expired_pending,
            "bytes": stats.bytes,
        }
        out.rows(
            data,
            [(k, str(v)) for k, v in data.items() if k != "partitions"]
            + [(f"partition {p}", str(n)) for p, n in stats.partitions.items()],
        )
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_health(args: argparse.Namespace, out: _Output) -> int:
    """The health report, also when the store cannot even be opened (``ok`` no, exit 1).

    A URL or setting fleetmem cannot use (or a missing extra) is a usage error (exit 2): the
    report is about a store, and there is none to report on.
    """
    from fleetmem._where import backend_of, effective_url
    from fleetmem.errors import ConfigurationError, FleetmemError, MissingDependencyError
    from fleetmem.factory import open_store

    where = _where(args)
    try:
        store = await open_store(_store_url(args), namespace=_namespace(args))
    except (ConfigurationError, MissingDependencyError):
        raise
    except FleetmemError as exc:
        data: dict[str, Any] = {
            "ok": False,
            "backend": backend_of(effective_url(args.url)),
            "store": where,
            "latency_ms": None,
            "details": {"error": f"{type(exc).__name__}: {exc}"},
        }
    else:
        try:
            health = await store.health()
        finally:
            await store.close()
        data = {
            "ok": health.ok,
            "backend": health.backend,
            "store": where,
            "latency_ms": health.latency_ms,
            "details": health.details,
        }
    latency = data["latency_ms"]
    out.rows(
        data,
        [
            ("ok", "yes" if data["ok"] else "no"),
            ("backend", data["backend"]),
            ("store", where),
            ("latency", "-" if latency is None else f"{latency:.2f} ms"),
        ]
        + [(k, v if isinstance(v, str) else _text(v)) for k, v in data["details"].items()],
    )
    return EXIT_OK if data["ok"] else EXIT_CONFLICT


# ------------------------------------------------------------------------ export, import, copy

#: What each phase of an export, import or copy is called on its progress bar.
_PHASES = {"export": "export", "check": "check", "import": "import", "verify": "verify"}


def _rich_rate_columns() -> list[Any]:
    """rich columns for a count of entries: ``12,000/40,000`` (or ``12,000`` while the total
    is unknown) and the rate over rich's recent samples, ``8,512 entries/s``."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class CountColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            done = int(task.completed)
            if task.total is None:
                return Text(f"{done:,}")
            return Text(f"{done:,}/{int(task.total):,}")

    class RateColumn(ProgressColumn):
        """The recent rate while a phase runs, its average once it is done."""

        def render(self, task: Task) -> Text:
            seconds = task.finished_time if task.finished else task.elapsed
            speed = None if task.finished else task.speed
            if speed is None and seconds:
                speed = task.completed / seconds
            return Text("" if speed is None else f"{speed:,.0f} entries/s")

    return [CountColumn(), RateColumn()]


class _TransferProgress:
    """The ``progress=`` callback of an export, import or copy: on a terminal (stderr) with
    rich installed (the ``cli`` extra), one rich progress bar per phase with its count and
    rate; otherwise nothing (piped, the command prints its JSON summary only). rich is
    imported only when the bar is shown.

    A phase's total is the count the previous phase ended with (an import's check pass counts
    the entries it then writes; a copy's export counts what it checks), so only the first
    phase runs without one. Called with ``(phase, entries done so far)``.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.bar: Any = None
        self.phases: dict[str, Any] = {}
        self._last = 0

    def __enter__(self) -> _TransferProgress:
        if not self.enabled:
            return self
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return self
        self.bar = Progress(
            TextColumn("{task.description:<7}"),
            BarColumn(),
            *_rich_rate_columns(),
            TimeElapsedColumn(),
            console=_rich_console(stderr=True),
        )
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self._finish_phases()
            self.bar.__exit__(None, None, None)

    def _finish_phases(self) -> None:
        for task in self.phases.values():
            done = self.bar.tasks[task].completed
            self.bar.update(task, total=done, completed=done)

    def __call__(self, phase: str, done: int) -> None:
        if self.bar is None:
            return
        task = self.phases.get(phase)
        if task is None:
            self._finish_phases()
            total = self._last if self.phases and self._last else None
            task = self.bar.add_task(_PHASES.get(phase, phase), total=total)
            self.phases[phase] = task
        self.bar.update(task, completed=done)
        self._last = done


def _summary(out: _Output, data: dict[str, Any], rows: list[tuple[str, Any]]) -> None:
    """A command's summary on stdout, as every command prints: JSON when piped or --json,
    readable rows on a terminal."""
    out.rows(data, [(k, v if isinstance(v, str) else _text(v)) for k, v in rows])


def _summary_on_stderr(
    args: argparse.Namespace, data: dict[str, Any], rows: list[tuple[str, Any]]
) -> None:
    """The summary of an export written to stdout: on stderr, one JSON line unless stderr is
    a terminal (readable rows there) or --json / --table says otherwise."""
    as_json = args.fmt == "json" or (args.fmt is None and not sys.stderr.isatty())
    if as_json:
        print(_to_json(data), file=sys.stderr, flush=True)
    else:
        text = [(k, v if isinstance(v, str) else _text(v)) for k, v in rows]
        print(_plain_rows(text), file=sys.stderr, flush=True)


def _file_error(exc: OSError, verb: str, name: str) -> Exception:
    """An ``OSError`` on the export file as a one-line error: a file that cannot be found,
    opened or created is a usage error (exit 2); anything else (a full disk) a failure."""
    usage = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    text = f"cannot {verb} {name}: {exc.strerror or exc}"
    return _UsageError(text) if isinstance(exc, usage) else _FileFailed(text)


class _FileFailed(Exception):
    """The export file failed while it was read or written (exit 3)."""


def _portability_failure(out: _Output, exc: Exception) -> int:
    """An import whose input is not a valid export (exit 2) or a copy that did not verify
    (exit 1): one line on stderr naming the line or the keys, and as JSON on stdout when the
    output is JSON."""
    from fleetmem.errors import InvalidExportError

    _say(f"{type(exc).__name__}: {_error_text(exc)}")
    if out.as_json:
        data: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, InvalidExportError):
            data["line"] = exc.line
        else:
            data["keys"] = list(getattr(exc, "keys", []))
        out.json(data)
    return EXIT_USAGE if isinstance(exc, InvalidExportError) else EXIT_CONFLICT


def _error_text(exc: Exception) -> str:
    """``str(exc)``, sure to name the line of an ``InvalidExportError`` and the keys of a
    ``VerificationError``."""
    text = str(exc)
    line = getattr(exc, "line", None)
    if isinstance(line, int) and f"line {line}" not in text:
        text = f"line {line}: {text}"
    keys = getattr(exc, "keys", None)
    if isinstance(keys, list) and keys and not all(str(k) in text for k in keys):
        text = f"{text} (keys: {', '.join(map(str, keys))})"
    return text


async def _cmd_export(args: argparse.Namespace, out: _Output) -> int:
    to_stdout = args.output in (None, "-")
    target = "-" if to_stdout else str(args.output)

    async def run(store: Store[Any]) -> int:
        # The bar would be drawn over an export printed on the same terminal.
        with _TransferProgress(enabled=not (to_stdout and sys.stdout.isatty())) as progress:
            try:
                if to_stdout:
                    sys.stdout.flush()
                    report = await store.export_to(
                        sys.stdout.buffer,
                        prefix=args.prefix,
                        partition=args.partition,
                        snapshot=args.snapshot,
                        progress=progress,
                    )
                    sys.stdout.buffer.flush()
                else:
                    report = await store.export_to(
                        target,
                        prefix=args.prefix,
                        partition=args.partition,
                        snapshot=args.snapshot,
                        progress=progress,
                    )
            except BrokenPipeError:
                raise
            except OSError as exc:
                raise _file_error(exc, "write", target) from None
        data = {
            "namespace": report.namespace,
            "snapshot": args.snapshot,
            "file": target,
            "count": report.count,
            "sha256": report.sha256,
            "exported_at": report.exported_at,
            "consistency": report.consistency,
        }
        what = f"namespace {report.namespace}"
        if args.snapshot is not None:
            what = f"snapshot {args.snapshot} of {what}"
        rows = [
            ("exported", f"{report.count:,} entries of {what}"),
            ("to", "stdout" if to_stdout else target),
            ("consistency", report.consistency),
            ("sha256", report.sha256),
            ("exported at", report.exported_at.isoformat()),
        ]
        if to_stdout:
            _summary_on_stderr(args, data, rows)
        else:
            _summary(out, data, rows)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_import(args: argparse.Namespace, out: _Output) -> int:
    from fleetmem.errors import InvalidExportError

    source = str(args.file)

    async def run(store: Store[Any]) -> int:
        with _TransferProgress() as progress:
            try:
                src: Any = sys.stdin.buffer if source == "-" else source
                report = await store.import_from(src, mode=args.mode, progress=progress)
            except InvalidExportError as exc:
                return _portability_failure(out, exc)
            except OSError as exc:
                raise _file_error(exc, "read", "stdin" if source == "-" else source) from None
        data = {
            "namespace": store.namespace,
            "file": source,
            "mode": args.mode,
            "written": report.written,
            "skipped_expired": report.skipped_expired,
            "skipped_existing": report.skipped_existing,
        }
        rows = [
            ("imported", f"{report.written:,} entries into namespace {store.namespace}"),
            ("from", "stdin" if source == "-" else source),
            ("mode", args.mode),
            ("skipped, expired", f"{report.skipped_expired:,}"),
            ("skipped, existing", f"{report.skipped_existing:,}"),
        ]
        _summary(out, data, rows)
        return EXIT_OK

    return await _with_store(args, run)


async def _cmd_copy(args: argparse.Namespace, out: _Output) -> int:
    from fleetmem import copy_namespace
    from fleetmem._where import describe, effective_url
    from fleetmem.errors import InvalidExportError, VerificationError
    from fleetmem.factory import open_store

    source_url = args.from_url if args.from_url is not None else _store_url(args)
    namespace = _namespace(args)
    to_namespace = args.to_namespace or namespace
    shown_from = describe(args.from_url if args.from_url is not None else effective_url(args.url))
    if source_url == args.to_url and to_namespace == namespace:
        raise _UsageError(
            f"copy --from and --to name the same namespace of the same store ({shown_from}): "
            "give --to-namespace NS2 to copy into another namespace"
        )
    async with (
        open_store(source_url, namespace=namespace) as src,
        open_store(args.to_url, namespace=to_namespace) as dst,
    ):
        with _TransferProgress() as progress:
            try:
                report = await copy_namespace(
                    src, dst, mode=args.mode, verify=not args.no_verify, progress=progress
                )
            except (InvalidExportError, VerificationError) as exc:
                return _portability_failure(out, exc)
            except OSError as exc:  # the spooled copy of the export, in the temporary directory
                raise _FileFailed(f"copy's temporary file: {exc.strerror or exc}") from None
        data = {
            "from": shown_from,
            "to": describe(args.to_url),
            "namespace": src.namespace,
            "to_namespace": dst.namespace,
            "mode": args.mode,
            "copied": report.copied,
            "skipped_expired": report.skipped_expired,
            "verified": report.verified,
        }
        rows = [
            ("copied", f"{report.copied:,} entries"),
            ("from", f"{shown_from}, namespace {src.namespace}"),
            ("to", f"{data['to']}, namespace {dst.namespace}"),
            ("mode", args.mode),
            ("skipped, expired", f"{report.skipped_expired:,}"),
            ("verified", "yes" if report.verified else "no (--no-verify)"),
        ]
        _summary(out, data, rows)
    return EXIT_OK


# ------------------------------------------------------------------------ snapshots


@contextlib.contextmanager
def _working(text: str) -> Iterator[None]:
    """Show ``text`` while a snapshot command runs, on stderr when it is a terminal: a rich
    spinner (gone when the work is done), one plain line without rich; nothing when stderr is
    not a terminal. rich is imported only then."""
    if not sys.stderr.isatty():
        yield
        return
    try:
        from rich.text import Text
    except ImportError:
        print(f"{text} ...", file=sys.stderr, flush=True)
        yield
        return
    console = _rich_console(stderr=True)
    with console.status(Text(text)):
        yield


def _snapshot_dict(snap: Snapshot) -> dict[str, Any]:
    return {
        "name": snap.name,
        "created_at": snap.created_at,
        "keys": snap.keys,
        "bytes": snap.bytes,
    }


async def _cmd_snapshot(args: argparse.Namespace, out: _Output) -> int:
    action = args.snapshot_command

    async def run(store: Store[Any]) -> int:
        snaps = store.snapshots
        ns = store.namespace
        if action == "create":
            with _working(f"creating snapshot {args.snapshot} of namespace {ns}"):
                snap = await snaps.create(args.snapshot)
            rows: list[tuple[str, Any]] = [
                ("created", f"snapshot {snap.name} of namespace {ns}"),
                ("keys", f"{snap.keys:,}"),
                ("bytes", f"{snap.bytes:,} stored beyond the earlier snapshots"),
                ("created at", snap.created_at.isoformat()),
            ]
            _summary(out, _snapshot_dict(snap), rows)
        elif action == "list":
            found = await snaps.list()
            out.table(
                [_snapshot_dict(s) for s in found],
                ("NAME", "CREATED AT", "KEYS", "BYTES"),
                [(s.name, s.created_at.isoformat(), f"{s.keys:,}", f"{s.bytes:,}") for s in found],
                numeric=(2, 3),
            )
        elif action == "diff":
            target = f"namespace {ns}" if args.other is None else f"snapshot {args.other}"
            with _working(f"comparing snapshot {args.snapshot} with {target}"):
                diff = await snaps.diff(args.snapshot, args.other)
            data = {"added": diff.added, "removed": diff.removed, "changed": diff.changed}
            marked = sorted(
                [(k, "+") for k in diff.added]
                + [(k, "-") for k in diff.removed]
                + [(k, "~") for k in diff.changed]
            )
            lines = [f"{mark} {key}" for key, mark in marked]
            lines.append(
                f"{len(diff.added):,} added, {len(diff.removed):,} removed, "
                f"{len(diff.changed):,} changed from snapshot {args.snapshot} to {target}"
            )
            out.lines(data, lines)
        elif action == "restore":
            with _working(f"restoring snapshot {args.snapshot} into namespace {ns}"):
                restored = await snaps.restore(args.snapshot)
            out.line(
                {"restored": restored},
                f"restored {restored:,} entries of snapshot {args.snapshot} into namespace {ns}",
            )
        else:  # delete
            deleted = await snaps.delete(args.snapshot)
            if not deleted:
                _say(f"namespace {ns!r} has no snapshot {args.snapshot!r}")
            out.line(
                {"deleted": deleted},
                f"deleted snapshot {args.snapshot}" if deleted else "not found",
            )
            return EXIT_OK if deleted else EXIT_CONFLICT
        return EXIT_OK

    return await _with_store(args, run)


# ------------------------------------------------------------------------ demo


def _demo_hint(args: argparse.Namespace, namespace: str) -> list[str]:
    """Commands that inspect what the demo left: runnable as printed, never with a password.

    The ``--url`` typed on the command line is carried as typed unless it holds a password,
    which is shown as ``***`` (put it back to run the command). A URL from ``FLEETMEM_URL`` is
    not repeated: the environment still applies.
    """
    import shlex

    from fleetmem._urls import redact_url as redact
    from fleetmem._where import effective_url, in_one_process

    resolved = effective_url(args.url)
    if in_one_process(resolved):
        return [f"nothing to inspect: {redact(resolved or '')} lived in this process only"]
    words = ["fleetmem"]
    if args.url is not None:
        words += ["--url", redact(args.url)]
    words += ["-n", namespace]
    base = " ".join(shlex.quote(w) for w in words)
    return [f"{base} keys results/ --limit 5", f"{base} queues", f"{base} stats"]


class _DemoProgress:
    """Items done, on stderr when it is a terminal: a rich progress bar (count and rate), plain
    lines without rich; nothing when stderr is piped."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.enabled = sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._start = 0.0

    def __enter__(self) -> _DemoProgress:
        import time

        self._start = time.monotonic()
        if not self.enabled:
            return self
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:
            return self
        self._bar = Progress(
            TextColumn("items"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=_rich_console(stderr=True),
            transient=True,
        )
        self._task = self._bar.add_task("items", total=self.items, rate="")
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        import time

        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = f"{done / elapsed:,.0f} items/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
        elif elapsed - self._last_line >= 1.0 or done >= total:
            self._last_line = elapsed
            print(f"items {done}/{total} ({rate})", file=sys.stderr, flush=True)


async def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    from fleetmem.demo import format_report, run_demo

    namespace = args.namespace or "demo"
    hint = _demo_hint(args, namespace)
    with _DemoProgress(args.items) as progress:
        report = await run_demo(
            _store_url(args),
            namespace=namespace,
            agents=args.agents,
            items=args.items,
            processes=args.processes,
            progress=progress.message,
            on_items=progress.update,
        )
    if out.as_json:
        out.json(
            {
                "store": report.url,
                "namespace": report.namespace,
                "agents": report.agents,
                "processes": report.processes,
                "items": report.items,
                "results": report.results,
                "seconds": report.seconds,
                "operations": report.operations,
                "queue": report.queue,
                "jobs_done": report.jobs_done,
                "jobs_dead": report.jobs_dead,
                "jobs_left": report.jobs_left,
                "acks_refused": report.tally.lost_claims,
                "cas_conflicts": report.tally.cas_conflicts,
                "crashes": report.tally.crashes,
                "takeovers": report.tally.takeovers,
                "partitions": report.partitions,
                "consistent": report.consistent,
                "problems": report.problems,
                "inspect": hint,
            }
        )
    else:
        print(format_report(report, inspect=hint))
    return EXIT_OK if report.consistent else EXIT_CONFLICT


# ------------------------------------------------------------------------ db and bench


def _cmd_db(args: argparse.Namespace, out: _Output) -> int:
    try:
        from fleetmem.backends.postgres import migrate
    except ImportError as exc:
        from fleetmem.errors import MissingDependencyError

        raise MissingDependencyError(exc.name or "alembic", "postgres") from exc
    return int(migrate.run_db_command(args))


_BENCH_HINT = (
    "run it from a fleetmem checkout with the benchmark dependencies: in the checkout,  "
    "pip install -e '.[bench]'  then  fleetmem bench  (or  python bench/run.py)"
)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP service until SIGTERM/SIGINT."""
    from fleetmem.service.context import ServiceSettings

    try:
        from fleetmem.service.server import serve
    except ImportError as exc:
        from fleetmem.errors import MissingDependencyError

        raise MissingDependencyError(exc.name or "litestar", "service") from None
    serve(
        _store_url(args),
        namespace=_namespace(args),
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        workers=args.workers,
        settings=ServiceSettings(
            request_timeout=args.request_timeout,
            max_in_flight=args.max_in_flight,
            max_body_bytes=args.max_body_bytes,
            max_import_bytes=args.max_import_bytes,
        ),
        metrics=not args.no_metrics,
        access_log=args.access_log,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    """``token new``: a fresh token on stdout's first line, its digest into the file."""
    from fleetmem.service.auth import append_entry, entry_text, make_entry, new_token

    token = new_token()
    globs = [g.strip() for g in args.namespaces.split(",") if g.strip()]
    entry = make_entry(token, globs, args.scope, args.name)
    if args.file is not None:
        append_entry(args.file, entry)
    print(token)
    if args.file is None:
        print(entry_text(entry), end="")
    else:
        _say(f"added the token's SHA-256 to {args.file}; the token is shown only now")
    return 0


def _bench_dir() -> Path:
    """The ``bench/`` directory of the source checkout this package runs from (an editable
    install: ``<checkout>/src/fleetmem/cli.py``); a wheel's site-packages has none."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "bench"


def _option_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def _bench_servers_from_url(url: str) -> dict[str, str]:
    """``fleetmem --url URL bench``: the ``FLEETMEM_BENCH_*_URL`` variables ``URL`` sets (a
    PostgreSQL URL, a Redis URL, or a hybrid URL for both)."""
    from fleetmem._urls import redact_url as redact
    from fleetmem._where import backend_of

    backend = backend_of(url)
    if backend == "postgres":
        return {"FLEETMEM_BENCH_POSTGRES_URL": url}
    if backend == "redis":
        return {"FLEETMEM_BENCH_REDIS_URL": url}
    if backend == "hybrid":
        from fleetmem._urls import split_hybrid_url

        parts = split_hybrid_url(url)
        return {
            "FLEETMEM_BENCH_POSTGRES_URL": parts.postgres_url,
            "FLEETMEM_BENCH_REDIS_URL": parts.cache_url,
        }
    raise _UsageError(
        f"fleetmem bench measures PostgreSQL and Redis: --url {redact(url)!r} is neither "
        "(give a postgresql://, redis:// or hybrid+postgresql://...?cache=redis://... URL)"
    )


def _bench(argv: list[str], url: str | None, fmt: str | None) -> int:
    """``fleetmem bench``: the benchmarks are not in the package; run the checkout's
    ``bench/run.py`` (the same as ``python bench/run.py ARGS``)."""
    import importlib.util

    wants_help = "-h" in argv or "--help" in argv
    if fmt == "json" and not wants_help:
        raise _UsageError(
            "fleetmem bench prints a report; to save the results as JSON give  "
            "fleetmem bench --json FILE"
        )
    bench_dir = _bench_dir()
    runner = bench_dir / "run.py"
    if not runner.is_file():
        print(
            "fleetmem bench runs from a source checkout, not from an installed package: "
            "git clone the fleetmem repository, then in it:  pip install -e '.[bench]'  then  "
            "fleetmem bench  (or  python bench/run.py)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    servers = _bench_servers_from_url(url) if url and not wants_help else {}
    if not wants_help and _option_value(argv, "--from-json") is None:
        only = set((_option_value(argv, "--only") or "postgres,redis,hybrid").split(","))
        needed = (["asyncpg"] if only & {"postgres", "hybrid"} else []) + (
            ["redis"] if only & {"redis", "hybrid"} else []
        )
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            _say(f"bench needs {' and '.join(missing)} (not installed): {_BENCH_HINT}")
            return EXIT_USAGE
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))  # run.py imports its ``suite`` package from there
    os.environ.update(servers)
    try:
        spec = importlib.util.spec_from_file_location("_fleetmem_bench_run", runner)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
            raise ImportError(f"cannot load {runner}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        status: int = module.main(argv)
    except ModuleNotFoundError as exc:
        _say(f"bench needs {exc.name} (not installed): {_BENCH_HINT}")
        return EXIT_USAGE
    return status


# ------------------------------------------------------------------------ the parser


def _add_global_options(parser: argparse.ArgumentParser, *, db_action: bool = False) -> None:
    """--url, -n, --json, --table on ``parser`` (the main parser and every command's).

    Defaults are suppressed, so an option given before the command is not reset by the
    command's parser. In a ``db`` action ``--table NAME`` names the PostgreSQL table (as
    ``--table-name``); there ``--json`` is the only format option.
    """
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="the store (default: $FLEETMEM_URL, else sqlite:///./fleetmem.db in the current "
        "directory); see the URL forms in fleetmem --help",
    )
    group.add_argument(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        metavar="NS",
        help="the namespace (default: $FLEETMEM_NAMESPACE, else 'default'; demo: 'demo')",
    )
    fmt = group.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        dest="fmt",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help="print JSON (the default when stdout is not a terminal)",
    )
    if not db_action:
        fmt.add_argument(
            "--table",
            dest="fmt",
            action="store_const",
            const="table",
            default=argparse.SUPPRESS,
            help="print a readable table (the default on a terminal)",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetmem",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text, **kwargs)
        _add_global_options(p)
        return p

    p = command("get", "print an entry (exit 1 when missing)")
    p.add_argument("key")
    p = command(
        "set",
        "store a JSON value; with --if-version N only if the entry is at version N "
        "(0: absent), else exit 1 saying the current version",
    )
    p.add_argument("key")
    p.add_argument(
        "value", help="a JSON value (strings quoted: '\"text\"'), or any text with --raw"
    )
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS", help="seconds to live")
    p.add_argument("--partition", default=None, help="the partition (default: 'default')")
    p.add_argument("--raw", action="store_true", help="store VALUE as a plain string")
    p.add_argument(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help="compare-and-set: write only if the entry's version is N (0: the key is absent); "
        "without --ttl the entry keeps its expiry",
    )
    p = command("del", "delete keys (exit 1 when none existed)")
    p.add_argument("keys", nargs="+", metavar="key")
    p = command("keys", "list keys by prefix, ascending")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--partition", default=None, help="only keys of this partition")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--after", default=None, help="exclusive cursor: the last key of a page")
    p = command("search", "find entries by glob pattern (* ? [abc] [!a] \\x)")
    p.add_argument("pattern")
    p.add_argument("--partition", default=None, help="only entries of this partition")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p = command("ttl", "seconds left before a key expires (exit 1 when missing)")
    p.add_argument("key")
    p = command("expire", "set a key's time to live (exit 1 when missing); version unchanged")
    p.add_argument("key")
    p.add_argument("seconds", type=float)
    p = command("persist", "remove a key's expiry (exit 1 when missing); version unchanged")
    p.add_argument("key")
    p = command("incr", "add to the number under a key (a missing key starts from 0)")
    p.add_argument("key")
    p.add_argument("--by", default="1", metavar="N", help="the amount, integer or float (1)")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS", help="seconds to live")
    p.add_argument("--partition", default=None, help="the partition of a new entry")
    p = command("clear", "delete every entry of the namespace (or of one partition); needs --yes")
    p.add_argument("--partition", default=None, help="clear only this partition")
    p.add_argument("--yes", action="store_true", help="yes, delete them")
    command("partitions", "list the namespace's partitions that hold a live entry")
    p = command("namespaces", "list the store's namespaces that hold a live entry")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--after", default=None, help="exclusive cursor: the last name of a page")
    p = command("holder", "print who holds a lease, with its token (exit 1 when it is free)")
    p.add_argument("name", help="the lease name")
    p = command("agents", "list the namespace's live agents, ascending by id")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--after", default=None, help="exclusive cursor: the last id of a page")
    command(
        "queues",
        "list the namespace's work queues with their ready, delayed, claimed, dead and done jobs",
    )
    p = command("dead", "list a work queue's dead jobs, ascending by id")
    p.add_argument("queue", help="the queue name")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    p.add_argument("--after", default=None, help="exclusive cursor: the last id of a page")
    p = command(
        "changes",
        "the namespace's change feed: enable (server-side, for every writer), disable, status, "
        "or read a page of changes",
    )
    changes_sub = p.add_subparsers(dest="changes_command", required=True, metavar="ACTION")

    def action(
        actions: Any, name: str, text: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = actions.add_parser(
            name, help=text, description=description or text
        )
        _add_global_options(q)
        return q

    q = action(changes_sub, "enable", "record every write of the namespace from now on")
    q.add_argument(
        "--retention",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep each change at least this long (default: 3600)",
    )
    action(changes_sub, "disable", "stop recording and drop the log")
    action(changes_sub, "status", "whether the feed is enabled, and its head cursor")
    q = action(changes_sub, "read", "print a page of changes and the next cursor")
    q.add_argument("--since", default=None, help="a cursor (default: the oldest retained)")
    q.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    q.add_argument("--pattern", default=None, help="only keys matching this glob")
    q.add_argument("--partition", default=None, help="only changes of this partition")
    p = command(
        "watch",
        "print the namespace's changes as they happen (with --json one object per line), "
        "until interrupted or --count",
    )
    p.add_argument("pattern", nargs="?", default="*", help="only keys matching this glob")
    p.add_argument("--partition", default=None, help="only changes of this partition")
    p.add_argument("--since", default=None, help="replay from this cursor first (default: now)")
    p.add_argument("--count", type=int, default=None, help="stop after this many changes")
    p = command(
        "export",
        "write the namespace's live entries (with --snapshot, those a snapshot holds) to FILE "
        "(gzip when it ends in .gz), ascending by key, in fleetmem's export format; without -o "
        "(or -o -) to stdout, the summary then on stderr",
    )
    p.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="the file (default, or -: stdout)"
    )
    p.add_argument("--prefix", default="", help="only keys that start with this")
    p.add_argument("--partition", default=None, help="only entries of this partition")
    p.add_argument(
        "--snapshot",
        default=None,
        metavar="NAME",
        help="export the entries snapshot NAME holds, as they were taken, instead of the live "
        "ones (exit 1 when there is no such snapshot)",
    )
    mode_help = (
        "merge: write every entry, leave other keys alone (default); missing: write only keys "
        "with no live entry; replace: afterwards the namespace holds exactly the entries imported"
    )
    p = command(
        "import",
        "check a whole export, then write its entries into the namespace (-n, whatever "
        "namespace the file came from); exit 2 naming the line when it is not a valid export, "
        "with nothing written",
    )
    p.add_argument("file", metavar="FILE", help="an export (gzip when it ends in .gz); - : stdin")
    p.add_argument(
        "--mode", choices=("merge", "missing", "replace"), default="merge", help=mode_help
    )
    p = command(
        "copy",
        "copy a namespace from one store to another (any two backends), then check that the "
        "destination holds every entry copied; exit 1 naming the keys that differ",
    )
    p.add_argument(
        "--from",
        dest="from_url",
        default=None,
        metavar="URL",
        help="the source store (default: the store --url or $FLEETMEM_URL names)",
    )
    p.add_argument("--to", dest="to_url", required=True, metavar="URL", help="the destination")
    p.add_argument(
        "--to-namespace",
        default=None,
        metavar="NS2",
        help="the destination's namespace (default: the source's, -n)",
    )
    p.add_argument(
        "--mode", choices=("merge", "missing", "replace"), default="merge", help=mode_help
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check of the destination after the copy",
    )
    p = command(
        "snapshot",
        "named, incremental snapshots of the namespace, kept in the store: create, list, diff, "
        "restore, delete",
    )
    snapshot_sub = p.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    q = action(
        snapshot_sub,
        "create",
        "take a snapshot of the namespace's live entries, named NAME (exit 1 when the "
        "namespace already has one of that name)",
    )
    q.add_argument("snapshot", metavar="NAME", help="the snapshot's name (the key rules)")
    action(
        snapshot_sub,
        "list",
        "list the namespace's snapshots, oldest first, with their keys and the bytes each stored",
    )
    q = action(
        snapshot_sub,
        "diff",
        "list the keys added, removed and changed from snapshot A to snapshot B, or to the "
        "live namespace without B (exit 1 when a snapshot does not exist)",
    )
    q.add_argument("snapshot", metavar="A", help="the snapshot to compare from")
    q.add_argument(
        "other",
        metavar="B",
        nargs="?",
        default=None,
        help="the snapshot to compare to (default: the live namespace)",
    )
    q = action(
        snapshot_sub,
        "restore",
        "make the namespace hold exactly snapshot NAME's entries, other keys deleted (exit 1 "
        "when there is no such snapshot)",
        "make the namespace hold exactly snapshot NAME's entries whose expiry has not passed, "
        "and delete every other key (in one transaction, except on Redis); versions keep "
        "growing and the change feed records each write (exit 1 when there is no such "
        "snapshot, with nothing changed)",
    )
    q.add_argument("snapshot", metavar="NAME", help="the snapshot to restore")
    q = action(
        snapshot_sub,
        "delete",
        "delete snapshot NAME, freeing what no other snapshot holds (exit 1 when there is none)",
    )
    q.add_argument("snapshot", metavar="NAME", help="the snapshot to delete")
    command("stats", "counts and sizes of the namespace, and which store (file or URL) it is")
    command("health", "check the store: prints the report; exit 1 when not ok")
    p = command(
        "demo",
        "run a fleet of simulated agents on the store and check the result (exit 1 when "
        "inconsistent); uses namespace 'demo' unless -n, and clears it first",
    )
    p.add_argument("--agents", type=int, default=20, help="simulated agents (default: 20)")
    p.add_argument(
        "--items", type=int, default=200, help="work items the agents share out (default: 200)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="operating-system processes the agents are spread over, all on the same store "
        "(default: 1; memory:// and in-memory SQLite live in one process only)",
    )
    p = command(
        "serve",
        "run the HTTP service (the 'service' extra): the whole store contract as JSON over "
        "HTTP, with tokens, /metrics and /docs; see docs/service.md",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument(
        "--tokens",
        default=os.environ.get("FLEETMEM_TOKENS"),
        metavar="FILE",
        help="the tokens file (TOML or JSON; default: $FLEETMEM_TOKENS). Without one the "
        "server answers everyone and listens on loopback only",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time limit of a request, streams excepted (default: 30)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=1024,
        metavar="N",
        help="requests served at once before answering 503 + Retry-After (default: 1024)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 1024 * 1024,
        metavar="N",
        help="largest batch or queue body (default: 16 MiB)",
    )
    p.add_argument(
        "--max-import-bytes",
        type=int,
        default=1024 * 1024 * 1024,
        metavar="N",
        help="largest import body (default: 1 GiB)",
    )
    p.add_argument("--no-metrics", action="store_true", help="no /metrics, no instrumentation")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    p.add_argument("--ssl-certfile", default=None, metavar="FILE", help="serve HTTPS with it")
    p.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="the certificate's key")
    p.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="behind a reverse proxy: trust X-Forwarded-* from these addresses",
    )
    p = command("token", "manage the service's tokens file")
    token_sub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    q = token_sub.add_parser(
        "new",
        help="print a new token (alone on the first line) and add its SHA-256 to the file",
        description="print a new token, alone on the first line of stdout (it is shown once: "
        "the file keeps only its SHA-256), and append its entry to --file (created if "
        "needed); without --file, print the entry to add after the token",
    )
    q.add_argument(
        "--namespaces",
        required=True,
        metavar="GLOB[,GLOB...]",
        help="namespaces the token may use; * and ? match whole names ('fleet-*')",
    )
    q.add_argument("--scope", required=True, choices=("read", "write", "admin"))
    q.add_argument("--file", default=None, help="the tokens file to append to")
    q.add_argument("--name", default="", help="a label for people (kept in the file)")
    sub.add_parser(
        "bench",
        help="benchmarks against the raw drivers, from a source checkout "
        "(servers and options: fleetmem bench --help)",
        add_help=False,
    )
    p = sub.add_parser(
        "db",
        help="PostgreSQL schema migrations (alembic): upgrade, downgrade, current, sql",
        description="PostgreSQL schema migrations (alembic). The URL is --url, else "
        "$FLEETMEM_POSTGRES_URL, else a PostgreSQL $FLEETMEM_URL.",
    )
    _add_global_options(p, db_action=True)
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (
        ("upgrade", "migrate the schema up (default: to head)"),
        ("downgrade", "migrate the schema down to REVISION ('base' drops the table and data)"),
        ("current", "print the schema's revision ('none' without fleetmem's table)"),
        ("sql", "print the SQL of an upgrade, for a DBA to apply (no database needed)"),
    ):
        q = dbsub.add_parser(name, help=text, description=text)
        _add_global_options(q, db_action=True)
        q.add_argument(
            "revision",
            nargs="?" if name != "downgrade" else None,
            default="head" if name in ("upgrade", "sql") else None,
        )
        q.add_argument("--schema", default="fleetmem", help="the schema (default: fleetmem)")
        q.add_argument(
            "--table-name",
            "--table",
            dest="table",
            default="entries",
            metavar="NAME",
            help="the table (default: entries); in a db action --table names the table, "
            "it is not the table output format",
        )
        if name == "sql":
            q.add_argument(
                "--from",
                dest="from_revision",
                default=None,
                help="the revision the database is at (default: empty)",
            )
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace, _Output], Coroutine[Any, Any, int]]] = {
    "get": _cmd_get,
    "set": _cmd_set,
    "del": _cmd_del,
    "keys": _cmd_keys,
    "search": _cmd_search,
    "ttl": _cmd_ttl,
    "expire": _cmd_expire,
    "persist": _cmd_persist,
    "incr": _cmd_incr,
    "clear": _cmd_clear,
    "partitions": _cmd_partitions,
    "namespaces": _cmd_namespaces,
    "holder": _cmd_holder,
    "agents": _cmd_agents,
    "queues": _cmd_queues,
    "dead": _cmd_dead,
    "changes": _cmd_changes,
    "watch": _cmd_watch,
    "export": _cmd_export,
    "import": _cmd_import,
    "copy": _cmd_copy,
    "snapshot": _cmd_snapshot,
    "stats": _cmd_stats,
    "health": _cmd_health,
    "demo": _cmd_demo,
}

_VALUED_GLOBALS = ("--url", "-n", "--namespace")


def _command_index(argv: Sequence[str]) -> int | None:
    """The position of the command in ``argv`` (after the global options), ``None`` if none."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUED_GLOBALS:
            i += 2
        elif arg in ("--json", "--table") or arg.startswith(("--url=", "--namespace=", "-n")):
            i += 1
        else:
            return i
    return None


def _split_bench(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``(global options, bench arguments)`` when the command is ``bench``, else ``None``.

    bench has its own parser: the global ``--url`` and ``-n`` given after it are moved before
    it; ``--json FILE`` after it is bench's own option (where to save the results).
    """
    index = _command_index(argv)
    if index is None or argv[index] != "bench":
        return None
    before, rest, after = list(argv[:index]), argv[index + 1 :], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in _VALUED_GLOBALS and i + 1 < len(rest):
            before += rest[i : i + 2]
            i += 2
            continue
        if arg.startswith(("--url=", "--namespace=")) or arg == "--table":
            before.append(arg)
        else:
            after.append(arg)
        i += 1
    return before, after


def _run(argv: list[str]) -> int:
    bench = _split_bench(argv)
    if bench is not None:
        global_parser = argparse.ArgumentParser(prog="fleetmem", add_help=False)
        _add_global_options(global_parser)
        options = global_parser.parse_args(bench[0])
        return _bench(bench[1], getattr(options, "url", None), getattr(options, "fmt", None))
    args = _parser().parse_args(argv)
    for name in ("url", "namespace", "fmt"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if args.command == "db":
        return _cmd_db(args, _Output(as_json=args.fmt == "json"))
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "token":
        return _cmd_token(args)
    # The demo prints its readable summary unless --json; other commands print JSON when piped.
    piped = not sys.stdout.isatty() and args.command != "demo"
    out = _Output(as_json=args.fmt == "json" or (args.fmt is None and piped))
    import asyncio

    return asyncio.run(_COMMANDS[args.command](args, out))


def exit_status(exc: FleetmemError) -> int:
    """The exit status of a command that raised ``exc`` (see ``fleetmem --help``)."""
    from fleetmem import errors

    conflict = (
        errors.KeyNotFoundError,  # also SnapshotNotFoundError
        errors.VersionConflictError,
        errors.VerificationError,
        errors.SnapshotExistsError,
    )
    if isinstance(exc, conflict):
        return EXIT_CONFLICT
    usage = (
        errors.InvalidExportError,
        errors.ConfigurationError,
        errors.MissingDependencyError,
        errors.InvalidKeyError,
        errors.InvalidPatternError,
        errors.InvalidArgumentError,
        errors.SerializationError,
        errors.NotANumberError,
    )
    return EXIT_USAGE if isinstance(exc, usage) else EXIT_FAILED


def _drop_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so that the interpreter's last flush
    does not fail again (the recipe of Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured output)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (see ``fleetmem --help``: 0, 1, 2, 3, 130, 141)."""
    from fleetmem.errors import FleetmemError

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            status = _run(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_PIPE
    except _UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except _FileFailed as exc:
        _say(str(exc))
        return EXIT_FAILED
    except FleetmemError as exc:
        _say(f"{type(exc).__name__}: {_error_text(exc)}")
        return exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if type(exc).__module__.startswith("pydantic"):  # FLEETMEM_* settings that do not parse
            _say(f"invalid FLEETMEM_* settings: {exc}")
            return EXIT_USAGE
        raise
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
