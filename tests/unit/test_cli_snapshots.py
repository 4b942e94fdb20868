"""``fleetmem snapshot create|list|diff|restore|delete`` and ``fleetmem export --snapshot``, run
in-process on SQLite files (a command's store outlives it) and on memory."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fleetmem import open_store
from fleetmem.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def fill(url: str, entries: dict[str, Any], namespace: str = "fleet") -> None:
    async def go() -> None:
        async with open_store(url, namespace=namespace) as store:
            for key, value in entries.items():
                await store.set(key, value, partition="big" if key == "p" else None)

    asyncio.run(go())


def change(url: str, namespace: str = "fleet") -> None:
    """From ``{a, b, c, p}``: ``a`` changed, ``b`` deleted, ``d`` added, ``p`` moved to another
    partition with the same value."""

    async def go() -> None:
        async with open_store(url, namespace=namespace) as store:
            await store.set("a", {"n": 10})
            await store.delete("b")
            await store.set("d", "new")
            await store.set("p", "same", partition="other")

    asyncio.run(go())


def contents(url: str, namespace: str = "fleet") -> dict[str, tuple[Any, str]]:
    async def go() -> dict[str, tuple[Any, str]]:
        async with open_store(url, namespace=namespace) as store:
            found = {}
            for key in await store.keys():
                entry = await store.get_entry(key)
                assert entry is not None
                found[key] = (entry.value, entry.partition)
            return found

    return asyncio.run(go())


START = {"a": {"n": 1}, "b": [1, 2], "c": "été", "p": "same"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    store = f"sqlite:///{tmp_path}/snap.db"
    fill(store, START)
    return store


def snap(url: str, *argv: str) -> list[str]:
    return ["--url", url, "-n", "fleet", "snapshot", *argv]


# ------------------------------------------------------------------------ each action


def test_create_list_diff_restore_delete(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *snap(url, "create", "before"))
    assert (code, err) == (0, "")
    created = json.loads(out)
    assert set(created) == {"name", "created_at", "keys", "bytes"}
    assert (created["name"], created["keys"]) == ("before", 4)
    assert created["bytes"] > 0
    assert datetime.fromisoformat(created["created_at"]).utcoffset() is not None

    change(url)
    code, out, _ = run(capsys, *snap(url, "create", "after"))
    assert code == 0 and json.loads(out)["keys"] == 4

    code, out, err = run(capsys, *snap(url, "list"))
    assert (code, err) == (0, "")
    listed = json.loads(out)
    assert [s["name"] for s in listed] == ["before", "after"]  # oldest first
    assert listed[0] == created
    assert set(listed[1]) == {"name", "created_at", "keys", "bytes"}

    code, out, _ = run(capsys, *snap(url, "diff", "before", "after"))
    assert code == 0
    assert json.loads(out) == {"added": ["d"], "removed": ["b"], "changed": ["a", "p"]}
    code, out, _ = run(capsys, *snap(url, "diff", "after", "before"))
    assert json.loads(out) == {"added": ["b"], "removed": ["d"], "changed": ["a", "p"]}

    # Without B: against the live namespace.
    run(capsys, "--url", url, "-n", "fleet", "set", "z", "1")
    code, out, _ = run(capsys, *snap(url, "diff", "after"))
    assert code == 0
    assert json.loads(out) == {"added": ["z"], "removed": [], "changed": []}

    code, out, err = run(capsys, *snap(url, "restore", "before"))
    assert (code, err) == (0, "")
    assert json.loads(out) == {"restored": 4}
    assert contents(url) == {k: (v, "big" if k == "p" else "default") for k, v in START.items()}
    code, out, _ = run(capsys, *snap(url, "diff", "before"))
    assert json.loads(out) == {"added": [], "removed": [], "changed": []}

    code, out, err = run(capsys, *snap(url, "delete", "after"))
    assert (code, err) == (0, "")
    assert json.loads(out) == {"deleted": True}
    code, out, _ = run(capsys, *snap(url, "list"))
    assert [s["name"] for s in json.loads(out)] == ["before"]
    # The snapshots are the namespace's own.
    code, out, _ = run(capsys, "--url", url, "-n", "other", "snapshot", "list")
    assert (code, json.loads(out)) == (0, [])


def test_delete_of_an_unknown_snapshot_exits_1_saying_so(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As ``del`` of keys that do not exist: ``{"deleted": false}`` and exit 1 (a script that
    deletes what is not there learns it)."""
    code, out, err = run(capsys, *snap(url, "delete", "nope"))
    assert code == 1
    assert json.loads(out) == {"deleted": False}
    assert err == "fleetmem: namespace 'fleet' has no snapshot 'nope'\n"


def test_readable_output(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *snap(url, "--table", "list"))
    assert (code, out) == (0, "(none)\n")
    code, out, _ = run(capsys, *snap(url, "create", "before", "--table"))
    assert code == 0
    assert "snapshot before of namespace fleet" in out and "keys" in out
    change(url)
    code, out, _ = run(capsys, *snap(url, "list", "--table"))
    header, row = out.splitlines()
    assert header.split() == ["NAME", "CREATED", "AT", "KEYS", "BYTES"]
    assert row.split()[0] == "before" and row.split()[2] == "4"
    code, out, _ = run(capsys, *snap(url, "diff", "before", "--table"))
    assert out.splitlines() == [
        "~ a",
        "- b",
        "+ d",
        "~ p",
        "1 added, 1 removed, 2 changed from snapshot before to namespace fleet",
    ]
    code, out, _ = run(capsys, *snap(url, "restore", "before", "--table"))
    assert out == "restored 4 entries of snapshot before into namespace fleet\n"
    code, out, _ = run(capsys, *snap(url, "delete", "before", "--table"))
    assert out == "deleted snapshot before\n"


def test_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """memory:// lives as long as the command: each one sees an empty namespace."""
    code, out, _ = run(capsys, "--url", "memory://", "snapshot", "list")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = run(capsys, "--url", "memory://", "snapshot", "create", "empty")
    assert code == 0
    assert (json.loads(out)["name"], json.loads(out)["keys"]) == ("empty", 0)
    code, _, err = run(capsys, "--url", "memory://", "snapshot", "restore", "empty")
    assert code == 1 and "no snapshot 'empty'" in err


# ------------------------------------------------------------------------ errors


def test_create_of_a_taken_name_exits_1_and_changes_nothing(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *snap(url, "create", "before"))[0] == 0
    change(url)
    code, out, err = run(capsys, *snap(url, "create", "before"))
    assert (code, out) == (1, "")
    assert (
        err == "fleetmem: SnapshotExistsError: namespace 'fleet' already has a snapshot 'before'\n"
    )
    code, out, _ = run(capsys, *snap(url, "diff", "before"))
    assert json.loads(out)["removed"] == ["b"]  # still the first snapshot


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["restore", "nope"], "nope"),
        (["diff", "nope"], "nope"),
        (["diff", "nope", "there"], "nope"),
        (["diff", "there", "nope"], "nope"),
    ],
)
def test_an_unknown_snapshot_exits_1_naming_it(
    argv: list[str], missing: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *snap(url, "create", "there"))[0] == 0
    run(capsys, "--url", url, "-n", "fleet", "set", "a", "0")
    code, out, err = run(capsys, *snap(url, *argv))
    assert (code, out) == (1, "")
    assert (
        err == f"fleetmem: SnapshotNotFoundError: namespace 'fleet' has no snapshot '{missing}'\n"
    )
    assert contents(url)["a"] == (0, "default")  # a failed restore wrote nothing


@pytest.mark.parametrize("action", ["create", "restore", "diff", "delete", "export"])
@pytest.mark.parametrize(
    ("name", "words"),
    [("", "must not be empty"), ("a\x01b", "control character"), ("é" * 128, "255 bytes")],
)
def test_a_bad_name_is_a_usage_error(
    action: str, name: str, words: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if action == "export":
        argv = ["--url", url, "-n", "fleet", "export", "--snapshot", name]
    else:
        argv = snap(url, action, name)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("fleetmem: InvalidKeyError: snapshot name") and words in err, err


def test_an_action_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--url", "memory://", "snapshot"])
    assert raised.value.code == 2
    with pytest.raises(SystemExit) as raised:
        main(["--url", "memory://", "snapshot", "create"])
    assert raised.value.code == 2
    assert "NAME" in capsys.readouterr().err


# ------------------------------------------------------------------------ export --snapshot


def test_export_of_a_snapshot_imports_as_it_was_taken(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *snap(url, "create", "before"))[0] == 0
    change(url)
    path = tmp_path / "before.jsonl.gz"
    code, out, err = run(
        capsys, "--url", url, "-n", "fleet", "export", "--snapshot", "before", "-o", str(path)
    )
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert (summary["snapshot"], summary["namespace"], summary["count"]) == ("before", "fleet", 4)

    code, out, err = run(capsys, "--url", url, "-n", "copy", "import", str(path))
    assert (code, err) == (0, ""), err
    assert json.loads(out)["written"] == 4
    assert contents(url, "copy") == contents_of_start()

    # The live export is unchanged: no "snapshot" there, the live entries.
    code, out, err = run(capsys, "--url", url, "-n", "fleet", "export")
    lines = [json.loads(line) for line in out.splitlines()]
    assert "snapshot" not in lines[0] and json.loads(err)["snapshot"] is None
    assert [e["key"] for e in lines[1:-1]] == ["a", "c", "d", "p"]


def test_export_of_a_snapshot_to_stdout_names_it_in_the_header(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, *snap(url, "create", "before"))[0] == 0
    change(url)
    code, out, err = run(
        capsys, "--url", url, "-n", "fleet", "export", "--snapshot", "before", "--prefix", "b"
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["snapshot"] == "before"
    assert [e["key"] for e in lines[1:-1]] == ["b"]  # deleted since, held by the snapshot
    assert json.loads(err)["count"] == 1


@pytest.mark.parametrize("to_file", [True, False])
def test_export_of_an_unknown_snapshot_exits_1_and_writes_nothing(
    to_file: bool, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.jsonl"
    output = ["-o", str(path)] if to_file else []
    code, out, err = run(
        capsys, "--url", url, "-n", "fleet", "export", "--snapshot", "nope", *output
    )
    assert (code, out) == (1, "")
    assert err == "fleetmem: SnapshotNotFoundError: namespace 'fleet' has no snapshot 'nope'\n"
    assert not path.exists()


def contents_of_start() -> dict[str, tuple[Any, str]]:
    return {k: (v, "big" if k == "p" else "default") for k, v in START.items()}


# ------------------------------------------------------------------------ terminal, help


def test_a_terminal_gets_a_spinner_and_a_pipe_nothing(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("rich")
    code, _, err = run(capsys, *snap(url, "create", "quiet"))
    assert (code, err) == (0, "")  # stderr not a terminal: nothing added
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = run(capsys, *snap(url, "create", "shown"))
    assert code == 0 and json.loads(out)["name"] == "shown"
    assert "creating snapshot shown of namespace fleet" in err
    code, out, err = run(capsys, *snap(url, "restore", "shown"))
    assert code == 0 and json.loads(out) == {"restored": 4}
    assert "restoring snapshot shown into namespace fleet" in err
    # Without rich: one plain line.
    monkeypatch.setitem(sys.modules, "rich.text", None)
    code, out, err = run(capsys, *snap(url, "diff", "shown"))
    assert code == 0 and json.loads(out)["added"] == []
    assert err == "comparing snapshot shown with namespace fleet ...\n"


def test_piped_snapshot_commands_do_not_import_rich(url: str) -> None:
    script = (
        "import sys\nfrom fleetmem.cli import main\n"
        f"base = ['--url', {url!r}, '-n', 'fleet', 'snapshot']\n"
        "codes = [main(base + ['create', 's']), main(base + ['list']),\n"
        "         main(base + ['diff', 's']), main(base + ['restore', 's']),\n"
        "         main(base + ['delete', 's'])]\n"
        "print(codes, 'rich' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stderr.strip().splitlines()[-1] == "[0, 0, 0, 0, 0] False", done.stderr


def test_help_lists_the_snapshot_command_and_its_actions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "snapshot" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["snapshot", "--help"])
    out = capsys.readouterr().out
    for action in ("create", "list", "diff", "restore", "delete"):
        assert f"    {action} " in out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--snapshot NAME" in capsys.readouterr().out


def test_global_options_after_the_action(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``fleetmem snapshot list --url URL -n NS --json`` (and the same for ``changes``)."""
    assert run(capsys, "snapshot", "create", "late", "--url", url, "-n", "fleet")[0] == 0
    code, out, _ = run(capsys, "snapshot", "list", "--url", url, "-n", "fleet", "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["late"]
    code, out, _ = run(capsys, "changes", "status", "--url", url, "-n", "fleet", "--json")
    assert (code, json.loads(out)) == (0, {"enabled": False})
