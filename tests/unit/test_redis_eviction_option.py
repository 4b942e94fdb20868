"""RedisStore's script flags, without a server."""

from __future__ import annotations

from fleetmem.backends.redis.scripts import FLAGS, LIBRARY, SCRIPTS


def test_reads_cannot_write_and_only_freeing_calls_run_at_maxmemory() -> None:
    """The flags are on both forms: the library's functions and the plain scripts."""
    assert FLAGS["get_entry"] == FLAGS["get_entries"] == FLAGS["exists_many"] == ("no-writes",)
    for name in ("delete_many", "clear", "scan", "prune"):
        assert FLAGS[name] == ("allow-oom",)
    for name in ("set", "set_many", "set_batch", "set_if_absent", "compare_and_set", "incr"):
        assert name not in FLAGS  # may add data: refused by a full server
    for name, script in SCRIPTS.items():
        flags = ",".join(FLAGS.get(name, ()))
        assert script.source.startswith(
            b"#!lua flags=" + flags.encode() + b"\n" if flags else b"#!lua\n"
        )
        expected = b"{" + b", ".join(b"'" + f.encode() + b"'" for f in FLAGS.get(name, ())) + b"}"
        _, _, rest = LIBRARY.partition(b"function_name='" + script.function + b"'")
        assert rest, name
        assert rest.split(b"end, flags=", 1)[1].startswith(expected + b"}"), name
