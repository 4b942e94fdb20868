"""The ``fleetmem`` command line: inspect and change any store, run the demo, manage schemas.

The store comes from ``--url`` or, without it, from the ``FLEETMEM_*`` settings (default: the
embedded ``sqlite:///./fleetmem.db``). Output is a readable table on a terminal and JSON
otherwise; ``--json`` / ``--table`` force one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fleetmem.errors import FleetmemError
from fleetmem.factory import open_store
from fleetmem.protocol import Entry, MemoryStore

__all__ = ["main"]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot print {type(value).__name__}")


class _Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, table: Callable[[], str] | None = None) -> None:
        if self.as_json or table is None:
            print(
                json.dumps(
                    data,
                    default=_json_default,
                    ensure_ascii=False,
                    indent=None if not sys.stdout.isatty() else 2,
                )
            )
        else:
            print(table())


def _rows(rows: Sequence[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=_json_default)
    return text if len(text) <= 100 else text[:97] + "..."


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


def _parse_value(text: str, raw: bool) -> Any:
    if raw:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise FleetmemError(
            f"value {text!r} is not JSON: quote strings ('\"text\"') or pass --raw"
        ) from None


async def _with_store(
    args: argparse.Namespace, action: Callable[[MemoryStore], Coroutine[Any, Any, int]]
) -> int:
    async with open_store(args.url, namespace=args.namespace) as store:
        return await action(store)


async def _cmd_get(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        entry = await store.get_entry(args.key)
        if entry is None:
            print(f"key {args.key!r} not found", file=sys.stderr)
            return 1
        data = _entry_dict(entry)
        out.emit(data, lambda: _rows([(k, _short(v)) for k, v in data.items()]))
        return 0

    return await _with_store(args, run)


async def _cmd_set(args: argparse.Namespace, out: _Output) -> int:
    value = _parse_value(args.value, args.raw)

    async def run(store: MemoryStore) -> int:
        entry = await store.set(args.key, value, ttl=args.ttl, partition=args.partition)
        data = _entry_dict(entry)
        out.emit(data, lambda: _rows([(k, _short(v)) for k, v in data.items()]))
        return 0

    return await _with_store(args, run)


async def _cmd_del(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        deleted = await store.delete_many(args.keys)
        out.emit({"deleted": deleted}, lambda: f"deleted {deleted}")
        return 0 if deleted else 1

    return await _with_store(args, run)


async def _cmd_keys(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        keys = await store.keys(
            args.prefix, partition=args.partition, limit=args.limit, after=args.after
        )
        out.emit(keys, lambda: "\n".join(keys) if keys else "(none)")
        return 0

    return await _with_store(args, run)


async def _cmd_search(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        found = await store.search(args.pattern, partition=args.partition, limit=args.limit)
        out.emit(found, lambda: _rows([(k, _short(v)) for k, v in found.items()]))
        return 0

    return await _with_store(args, run)


async def _cmd_ttl(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        left = await store.ttl(args.key)
        out.emit(
            {"key": args.key, "ttl": left},
            lambda: "persistent" if left is None else f"{left:.3f} s",
        )
        return 0

    return await _with_store(args, run)


async def _cmd_stats(args: argparse.Namespace, out: _Output) -> int:
    async def run(store: MemoryStore) -> int:
        stats = await store.stats()
        data = {
            "namespace": stats.namespace,
            "backend": stats.backend,
            "keys": stats.keys,
            "partitions": stats.partitions,
            "expired_pending": stats.expired_pending,
            "bytes": stats.bytes,
        }
        out.emit(
            data,
            lambda: _rows(
                [(k, str(v)) for k, v in data.items() if k != "partitions"]
                + [(f"partition {p}", str(n)) for p, n in stats.partitions.items()]
            ),
        )
        return 0

    return await _with_store(args, run)


async def _cmd_health(args: argparse.Namespace, out: _Output) -> int:
    store = await open_store(args.url, namespace=args.namespace)
    try:
        health = await store.health()
    finally:
        await store.close()
    data = {
        "ok": health.ok,
        "backend": health.backend,
        "latency_ms": health.latency_ms,
        "details": health.details,
    }
    out.emit(
        data,
        lambda: _rows(
            [
                ("ok", "yes" if health.ok else "NO"),
                ("backend", health.backend),
                ("latency", "-" if health.latency_ms is None else f"{health.latency_ms:.2f} ms"),
            ]
            + [(k, _short(v)) for k, v in health.details.items()]
        ),
    )
    return 0 if health.ok else 1


async def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    from fleetmem.demo import format_report, run_demo

    def progress(message: str) -> None:
        if not out.as_json:
            print(message, file=sys.stderr, flush=True)

    report = await run_demo(
        args.url,
        namespace=args.namespace if args.namespace_given else "demo",
        agents=args.agents,
        items=args.items,
        processes=args.processes,
        progress=progress,
    )
    if out.as_json:
        out.emit(
            {
                "store": report.url,
                "namespace": report.namespace,
                "agents": report.agents,
                "processes": report.processes,
                "items": report.items,
                "results": report.results,
                "seconds": report.seconds,
                "operations": report.operations,
                "claims_lost": report.tally.lost_claims,
                "cas_conflicts": report.tally.cas_conflicts,
                "crashes": report.tally.crashes,
                "takeovers": report.tally.takeovers,
                "partitions": report.partitions,
                "consistent": report.consistent,
                "problems": report.problems,
            }
        )
    else:
        print(format_report(report))
    return 0 if report.consistent else 1


def _cmd_db(args: argparse.Namespace, out: _Output) -> int:
    try:
        from fleetmem.backends.postgres import migrate
    except ImportError as exc:
        raise FleetmemError(
            "fleetmem db needs the PostgreSQL extra: pip install 'fleetmem[postgres]'"
        ) from exc
    return int(migrate.run_db_command(args))


def _parser() -> argparse.ArgumentParser:
    # The common options are accepted before and after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="store URL (default: FLEETMEM_URL, else sqlite:///./fleetmem.db)",
    )
    common.add_argument(
        "--namespace",
        "-n",
        default=argparse.SUPPRESS,
        help="namespace (default: default; demo: demo)",
    )
    fmt = common.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        dest="fmt",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help="print JSON",
    )
    fmt.add_argument(
        "--table",
        dest="fmt",
        action="store_const",
        const="table",
        default=argparse.SUPPRESS,
        help="print a readable table",
    )
    parser = argparse.ArgumentParser(
        prog="fleetmem", description=__doc__.split("\n")[0], parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    original_add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return original_add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("get", help="print an entry")
    p.add_argument("key")
    p = sub.add_parser("set", help="store a JSON value")
    p.add_argument("key")
    p.add_argument("value", help="a JSON value (strings quoted), or any text with --raw")
    p.add_argument("--ttl", type=float, default=None, help="seconds to live")
    p.add_argument("--partition", default=None)
    p.add_argument("--raw", action="store_true", help="store VALUE as a plain string")
    p = sub.add_parser("del", help="delete keys")
    p.add_argument("keys", nargs="+")
    p = sub.add_parser("keys", help="list keys by prefix")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--partition", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--after", default=None, help="exclusive cursor: the last key of a page")
    p = sub.add_parser("search", help="find entries by glob pattern")
    p.add_argument("pattern")
    p.add_argument("--partition", default=None)
    p.add_argument("--limit", type=int, default=None)
    p = sub.add_parser("ttl", help="seconds left before a key expires")
    p.add_argument("key")
    sub.add_parser("stats", help="counts and sizes of the namespace")
    sub.add_parser("health", help="check the backend (exit 1 when unhealthy)")
    p = sub.add_parser("demo", help="run a fleet of simulated agents on the store")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--processes", type=int, default=1)
    sub.add_parser(
        "bench",
        help="benchmarks against the raw drivers, from a source checkout (fleetmem bench -h)",
        add_help=False,
    )
    # db actions take --url too, but --table there names the PostgreSQL table.
    db_common = argparse.ArgumentParser(add_help=False)
    db_common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="PostgreSQL URL (default: FLEETMEM_POSTGRES_URL or FLEETMEM_URL)",
    )
    p = sub.add_parser("db", help="PostgreSQL schema migrations (alembic)")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, text in (
        ("upgrade", "migrate the schema up (default: head)"),
        ("downgrade", "migrate the schema down to REVISION"),
        ("current", "print the schema's revision"),
        ("sql", "print the SQL of an upgrade, for a DBA to apply"),
    ):
        q = dbsub.add_parser(name, help=text, parents=[db_common])
        q.add_argument(
            "revision",
            nargs="?" if name != "downgrade" else None,
            default="head" if name in ("upgrade", "sql") else None,
        )
        q.add_argument("--schema", default="fleetmem")
        q.add_argument("--table", default="entries")
    return parser


_COMMANDS: dict[str, Callable[[argparse.Namespace, _Output], Coroutine[Any, Any, int]]] = {
    "get": _cmd_get,
    "set": _cmd_set,
    "del": _cmd_del,
    "keys": _cmd_keys,
    "search": _cmd_search,
    "ttl": _cmd_ttl,
    "stats": _cmd_stats,
    "health": _cmd_health,
    "demo": _cmd_demo,
}


def _bench_dir() -> Path:
    """The ``bench/`` directory of the source checkout this package runs from (an editable
    install: ``<checkout>/src/fleetmem/cli.py``); a wheel's site-packages has none."""
    return Path(__file__).resolve().parents[2] / "bench"


def _bench(argv: list[str]) -> int:
    """``fleetmem bench``: the benchmarks are not in the package; run the checkout's
    ``bench/run.py`` (the same as ``python bench/run.py ARGS``)."""
    import importlib.util

    bench_dir = _bench_dir()
    runner = bench_dir / "run.py"
    if not runner.is_file():
        print(
            "fleetmem bench runs from a source checkout, not from an installed package: "
            "git clone the fleetmem repository, then in it: pip install -e '.[bench]'; "
            "python bench/run.py (or fleetmem bench)",
            file=sys.stderr,
        )
        return 2
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))  # run.py imports its ``suite`` package from there
    spec = importlib.util.spec_from_file_location("_fleetmem_bench_run", runner)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ImportError(f"cannot load {runner}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status: int = module.main(argv)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    for name in ("url", "namespace", "fmt"):
        if not hasattr(args, name):
            setattr(args, name, None)
    args.namespace_given = args.namespace is not None
    # The demo prints its readable summary unless --json; other commands print JSON when piped.
    piped = not sys.stdout.isatty() and args.command != "demo"
    out = _Output(as_json=args.fmt == "json" or (args.fmt is None and piped))
    try:
        if args.command == "db":
            return _cmd_db(args, out)
        return asyncio.run(_COMMANDS[args.command](args, out))
    except FleetmemError as exc:
        print(f"fleetmem: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
