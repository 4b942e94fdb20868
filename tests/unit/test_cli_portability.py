"""``fleetmem export``, ``import`` and ``copy``, run in-process and through real pipes, on
memory and SQLite stores."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetmem import cli, open_store
from fleetmem.cli import main

ENTRIES: dict[str, Any] = {
    "notes/a": {"text": "first"},
    "notes/b": 2**70,  # beyond 64 bits: written exactly
    "notes/été": ["ünïcode", 1.5],
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def fill(url: str, namespace: str = "src") -> None:
    """The entries of :data:`ENTRIES`, one with a TTL and one in a partition of its own."""

    async def go() -> None:
        async with open_store(url, namespace=namespace) as store:
            await store.set("notes/a", ENTRIES["notes/a"], ttl=3600)
            await store.set("notes/b", ENTRIES["notes/b"], partition="big")
            await store.set("notes/été", ENTRIES["notes/été"])

    asyncio.run(go())


def entries(url: str, namespace: str) -> dict[str, tuple[Any, str, bool]]:
    """``{key: (value, partition, has an expiry)}`` of a namespace."""

    async def go() -> dict[str, tuple[Any, str, bool]]:
        async with open_store(url, namespace=namespace) as store:
            found = {}
            for key in await store.keys():
                entry = await store.get_entry(key)
                assert entry is not None
                found[key] = (entry.value, entry.partition, entry.expires_at is not None)
            return found

    return asyncio.run(go())


EXPECTED = {
    "notes/a": ({"text": "first"}, "default", True),
    "notes/b": (2**70, "big", False),
    "notes/été": (["ünïcode", 1.5], "default", False),
}


def lines_of(path: Path) -> list[bytes]:
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return list(f)


def cli_process(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """``fleetmem ARGV`` in a fresh interpreter, its stdout and stderr pipes."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEETMEM_")}
    return subprocess.run(
        [sys.executable, "-m", "fleetmem.cli", *argv],
        capture_output=True,
        timeout=120,
        check=False,
        env=clean,
        **kwargs,
    )


# ------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", ["fleet.jsonl", "fleet.jsonl.gz"])
def test_export_writes_the_format_and_prints_its_summary(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / name
    code, out, err = run(capsys, "--url", url, "-n", "src", "export", "-o", str(path))
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert summary["namespace"] == "src" and summary["count"] == 3
    assert summary["consistency"] == "snapshot" and summary["file"] == str(path)
    assert path.read_bytes().startswith(b"\x1f\x8b") == name.endswith(".gz")
    lines = lines_of(path)
    header, trailer = json.loads(lines[0]), json.loads(lines[-1])
    assert (header["format"], header["version"], header["namespace"]) == (
        "fleetmem-export",
        1,
        "src",
    )
    assert header["backend"] == "sqlite"
    assert trailer == {
        "end": True,
        "count": 3,
        "sha256": hashlib.sha256(b"".join(lines[1:-1])).hexdigest(),
    }
    assert summary["sha256"] == trailer["sha256"]
    assert [json.loads(line)["key"] for line in lines[1:-1]] == sorted(ENTRIES)
    assert b"1180591620717411303424" in lines[2]  # 2**70, exactly


def test_export_with_prefix_and_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "big.jsonl"
    code, out, _ = run(
        capsys, "--url", url, "-n", "src", "export", "-o", str(path), "--partition", "big"
    )
    assert code == 0 and json.loads(out)["count"] == 1
    assert json.loads(lines_of(path)[1])["key"] == "notes/b"
    code, out, _ = run(
        capsys, "--url", url, "-n", "src", "export", "-o", str(path), "--prefix", "notes/é"
    )
    assert code == 0 and json.loads(out)["count"] == 1
    assert json.loads(lines_of(path)[1])["key"] == "notes/été"


@pytest.mark.parametrize("dash", [[], ["-o", "-"]])
def test_export_to_stdout_puts_the_summary_on_stderr(
    dash: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    code, out, err = run(capsys, "--url", url, "-n", "src", "export", *dash)
    assert code == 0
    lines = out.splitlines()
    assert json.loads(lines[0])["format"] == "fleetmem-export"
    assert json.loads(lines[-1])["count"] == 3
    assert len(lines) == 5
    summary = json.loads(err)  # one JSON line
    assert summary["file"] == "-" and summary["count"] == 3
    assert summary["sha256"] == json.loads(lines[-1])["sha256"]


def test_export_into_a_missing_directory_exits_2_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    target = tmp_path / "no" / "such" / "dir" / "x.jsonl"
    code, out, err = run(capsys, "--url", url, "-n", "src", "export", "-o", str(target))
    assert code == 2
    assert out == ""
    assert err.startswith("fleetmem: cannot write ") and str(target) in err
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------ import


def test_import_in_each_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "fleet.jsonl.gz"
    assert run(capsys, "--url", url, "-n", "src", "export", "-o", str(path))[0] == 0

    code, out, err = run(capsys, "--url", url, "-n", "dst", "import", str(path))
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "namespace": "dst",
        "file": str(path),
        "mode": "merge",
        "written": 3,
        "skipped_expired": 0,
        "skipped_existing": 0,
    }
    assert entries(url, "dst") == EXPECTED

    # The destination changes: one entry overwritten, one key of its own.
    run(capsys, "--url", url, "-n", "dst", "set", "notes/a", '"changed"')
    run(capsys, "--url", url, "-n", "dst", "set", "mine", "1")
    code, out, _ = run(capsys, "--url", url, "-n", "dst", "import", str(path), "--mode", "missing")
    assert code == 0
    assert (json.loads(out)["written"], json.loads(out)["skipped_existing"]) == (0, 3)
    assert entries(url, "dst")["notes/a"][0] == "changed"

    code, out, _ = run(capsys, "--url", url, "-n", "dst", "import", str(path), "--mode", "merge")
    assert code == 0 and json.loads(out)["written"] == 3
    assert entries(url, "dst") == {**EXPECTED, "mine": (1, "default", False)}

    code, out, _ = run(capsys, "--url", url, "-n", "dst", "import", str(path), "--mode", "replace")
    assert code == 0 and json.loads(out)["mode"] == "replace"
    assert entries(url, "dst") == EXPECTED


def test_import_readable_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "fleet.jsonl"
    run(capsys, "--url", url, "-n", "src", "export", "-o", str(path))
    code, out, _ = run(capsys, "--url", url, "-n", "dst", "--table", "import", str(path))
    assert code == 0
    assert "imported" in out and "3 entries into namespace dst" in out
    assert "skipped, existing" in out


def test_an_unknown_mode_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--url", "memory://", "import", str(tmp_path / "x.jsonl"), "--mode", "upsert"])
    assert raised.value.code == 2
    assert "invalid choice: 'upsert'" in capsys.readouterr().err


def _export_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, list[bytes]]:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "good.jsonl"
    assert run(capsys, "--url", url, "-n", "src", "export", "-o", str(path))[0] == 0
    return url, lines_of(path)


@pytest.mark.parametrize(
    ("damage", "line", "words"),
    [
        # A value changed after the export: the checksum names the trailer's line.
        (lambda ls: [ls[0], ls[1].replace(b"first", b"FIRST"), *ls[2:]], 5, "checksum"),
        (lambda ls: ls[:-1], 5, "no trailer"),  # the trailer is missing
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 3, "ascending"),
        (lambda ls: [ls[0], b"{not json}\n", *ls[2:]], 2, "JSON"),
        (lambda ls: [ls[0], b"\n", *ls[1:]], 2, "empty line"),
        (lambda ls: [*ls, ls[1]], 6, "follows the trailer"),
        (lambda ls: [b'{"format":"something-else","version":1}\n', *ls[1:]], 1, "header"),
    ],
)
def test_an_invalid_export_exits_2_naming_the_line_and_writes_nothing(
    damage: Any, line: int, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, lines = _export_lines(tmp_path, capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(damage(lines)))
    code, out, err = run(capsys, "--url", url, "-n", "dst", "--json", "import", str(bad))
    assert code == 2
    assert err.startswith(f"fleetmem: InvalidExportError: line {line}: "), err
    assert words in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    failure = json.loads(out)
    assert failure["ok"] is False and failure["error"] == "InvalidExportError"
    assert failure["line"] == line
    assert entries(url, "dst") == {}


def test_a_truncated_gzip_export_says_truncated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "fleet.jsonl.gz"
    run(capsys, "--url", url, "-n", "src", "export", "-o", str(path))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes()[:-12])  # the gzip trailer (CRC, size) and a little more
    code, _, err = run(capsys, "--url", url, "-n", "dst", "import", str(cut))
    assert code == 2
    assert "InvalidExportError" in err and "truncated" in err
    assert entries(url, "dst") == {}


def test_importing_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.jsonl"
    code, out, err = run(capsys, "--url", "memory://", "import", str(missing))
    assert (code, out) == (2, "")
    assert err.startswith("fleetmem: cannot read ") and "nowhere.jsonl" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------ pipes


def test_export_pipes_into_import_from_stdin(tmp_path: Path) -> None:
    """``fleetmem export | fleetmem import -`` between two SQLite files, through real pipes:
    the export on the pipe, each command's JSON summary on its own stream."""
    source, target = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    fill(source)
    exporting = subprocess.Popen(
        [sys.executable, "-m", "fleetmem.cli", "--url", source, "-n", "src", "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    importing = cli_process("--url", target, "-n", "copied", "import", "-", stdin=exporting.stdout)
    assert exporting.stdout is not None and exporting.stderr is not None
    exporting.stdout.close()
    export_err = exporting.stderr.read().decode()
    exporting.stderr.close()
    assert exporting.wait(timeout=60) == 0, export_err
    assert importing.returncode == 0, importing.stderr.decode()
    assert importing.stderr == b""
    exported = json.loads(export_err)  # one JSON line on stderr
    assert exported["count"] == 3 and exported["file"] == "-"
    imported = json.loads(importing.stdout)
    assert (imported["file"], imported["written"], imported["namespace"]) == ("-", 3, "copied")
    assert entries(target, "copied") == EXPECTED


def test_an_export_whose_reader_goes_away_ends_quietly(tmp_path: Path) -> None:
    """``fleetmem export | head -c 10``: more than a pipe holds, the reader gone early; exit
    141 (128 + SIGPIPE) with nothing on stderr."""
    url = f"sqlite:///{tmp_path}/big.db"

    async def go() -> None:
        async with open_store(url) as store:
            await store.set_many({f"key/{i:06d}/{'x' * 40}": i for i in range(5000)})

    asyncio.run(go())
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetmem.cli", "--url", url, "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{"format":'
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def test_an_invalid_export_on_stdin_exits_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    done = cli_process("--url", url, "import", "-", input=b'{"format":"fleetmem-export"}\n')
    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.startswith("fleetmem: InvalidExportError: line 1: ") and "version" in err
    assert "Traceback" not in err
    assert json.loads(done.stdout)["error"] == "InvalidExportError"


def test_a_gzip_stream_on_stdin_is_refused_saying_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    fill(url)
    path = tmp_path / "fleet.jsonl.gz"
    assert cli_process("--url", url, "-n", "src", "export", "-o", str(path)).returncode == 0
    done = cli_process("--url", url, "-n", "dst", "import", "-", input=path.read_bytes())
    assert done.returncode == 2
    assert b"gzip" in done.stderr and b"line 1" in done.stderr
    ungzipped = cli_process(
        "--url", url, "-n", "dst", "import", "-", input=gzip.decompress(path.read_bytes())
    )
    assert ungzipped.returncode == 0, ungzipped.stderr
    assert json.loads(ungzipped.stdout)["written"] == 3


def test_piped_commands_do_not_import_rich(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    path = tmp_path / "fleet.jsonl"
    script = (
        "import sys\nfrom fleetmem.cli import main\n"
        f"codes = [main(['--url', {url!r}, '-n', 'src', 'export', '-o', {str(path)!r}]),\n"
        f"         main(['--url', {url!r}, '-n', 'dst', 'import', {str(path)!r}]),\n"
        f"         main(['--url', {url!r}, '-n', 'src', 'copy', '--to', {url!r},\n"
        "               '--to-namespace', 'third'])]\n"
        "print(codes, 'rich' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stderr.strip().splitlines()[-1] == "[0, 0, 0] False", done.stderr


# ------------------------------------------------------------------------ copy


def test_copy_between_two_sqlite_files_and_to_another_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    fill(source)
    code, out, err = run(capsys, "--url", source, "-n", "src", "copy", "--to", target)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report == {
        "from": f"sqlite file {tmp_path}/a.db",
        "to": f"sqlite file {tmp_path}/b.db",
        "namespace": "src",
        "to_namespace": "src",
        "mode": "merge",
        "copied": 3,
        "skipped_expired": 0,
        "verified": True,
    }
    assert entries(target, "src") == EXPECTED
    # --from instead of --url, another namespace of the same file, replace, no verification.
    run(capsys, "--url", source, "-n", "renamed", "set", "stale", "0")
    code, out, _ = run(
        capsys,
        *("copy", "--from", source, "-n", "src", "--to", source),
        *("--to-namespace", "renamed", "--mode", "replace", "--no-verify"),
    )
    assert code == 0
    report = json.loads(out)
    assert (report["to_namespace"], report["copied"], report["verified"]) == ("renamed", 3, False)
    assert entries(source, "renamed") == EXPECTED


def test_copy_from_sqlite_into_memory_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path}/a.db"
    fill(source)
    code, out, _ = run(capsys, "--url", source, "-n", "src", "--json", "copy", "--to", "memory://")
    assert code == 0
    report = json.loads(out)
    assert (report["to"], report["copied"], report["verified"]) == (
        "memory (this process only)",
        3,
        True,
    )


def test_copy_onto_itself_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    fill(url)
    code, out, err = run(capsys, "--url", url, "-n", "src", "copy", "--to", url)
    assert (code, out) == (2, "")
    assert "same namespace of the same store" in err and "--to-namespace" in err


def test_copy_to_a_failing_backend_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path}/a.db"
    fill(source)
    broken = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    code, _, err = run(capsys, "--url", source, "-n", "src", "copy", "--to", broken)
    assert code == 3
    assert "BackendUnavailableError" in err and "Traceback" not in err


def test_a_copy_that_does_not_verify_exits_1_naming_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's side of a failed verification (the verification itself is proved on
    every pair of backends in tests/integration/test_copy_between_backends.py)."""
    import fleetmem
    from fleetmem.errors import VerificationError

    async def differs(*args: Any, **kwargs: Any) -> Any:
        raise VerificationError("the destination differs", ["notes/a", "notes/b"])

    monkeypatch.setattr(fleetmem, "copy_namespace", differs)
    source = f"sqlite:///{tmp_path}/a.db"
    code, out, err = run(capsys, "--url", source, "copy", "--to", "memory://")
    assert code == 1
    assert err == "fleetmem: VerificationError: the destination differs (keys: notes/a, notes/b)\n"
    assert json.loads(out) == {
        "ok": False,
        "error": "VerificationError",
        "message": "the destination differs",
        "keys": ["notes/a", "notes/b"],
    }


# ------------------------------------------------------------------------ progress


def test_a_terminal_gets_a_progress_bar_per_phase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("rich")
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, "--url", url, "-n", "src", "--json", "copy", "--to", "memory://")
    assert code == 0
    assert json.loads(out)["copied"] == 3
    for phase in ("export", "check", "import", "verify"):
        assert phase in err
    assert "3/3" in err and "entries/s" in err

    # The bar's own bookkeeping: each phase's total is what the phase before it counted.
    with cli._TransferProgress() as progress:
        assert progress.bar is not None
        for phase, done in (("export", 500), ("export", 1000), ("check", 1000), ("import", 400)):
            progress(phase, done)
        tasks = {task.description: task for task in progress.bar.tasks}
        assert tasks["export"].total == 1000 and tasks["export"].completed == 1000
        assert tasks["check"].total == 1000
        assert (tasks["import"].total, tasks["import"].completed) == (1000, 400)


def test_without_rich_or_a_terminal_there_is_no_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    fill(url)
    with cli._TransferProgress() as progress:  # stderr is not a terminal here
        progress("export", 10)
        assert progress.bar is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # as if rich were not installed
    code, out, err = run(capsys, "--url", url, "-n", "src", "copy", "--to", "memory://")
    assert (code, err) == (0, "")
    assert json.loads(out)["copied"] == 3
