"""RedisStore's ``allow_eviction`` option and the script flags, without a server."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from fleetmem import ConfigurationError
from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis.scripts import FLAGS, LIBRARY, SCRIPTS

#: Nothing listens there: a store that tried I/O would fail differently.
URL = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "False"])
def test_allow_eviction_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="allow_eviction"):
        RedisStore.from_url(URL, allow_eviction=value)


def test_allow_eviction_of_an_injected_client_is_checked_too() -> None:
    client = aioredis.Redis.from_url(URL)
    with pytest.raises(ConfigurationError, match="allow_eviction"):
        RedisStore(client=client, allow_eviction="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, False])
def test_allow_eviction_builds_without_io(value: bool) -> None:
    store = RedisStore.from_url(URL, allow_eviction=value)
    assert store.closed is False


def test_reads_cannot_write_and_only_freeing_calls_run_at_maxmemory() -> None:
    """The flags are on both forms: the library's functions and the plain scripts."""
    assert FLAGS["get_entry"] == FLAGS["get_entries"] == FLAGS["exists_many"] == ("no-writes",)
    for name in ("delete_many", "clear", "scan", "prune"):
        assert FLAGS[name] == ("allow-oom",)
    for name in ("set", "set_many", "set_batch", "set_if_absent", "compare_and_set", "incr"):
        assert name not in FLAGS  # may add data: refused by a full server
    for name, script in SCRIPTS.items():
        # A fenced twin (fenced_set, ...) carries the flags of the script it wraps.
        name = name.removeprefix("fenced_")
        flags = ",".join(FLAGS.get(name, ()))
        assert script.source.startswith(
            b"#!lua flags=" + flags.encode() + b"\n" if flags else b"#!lua\n"
        )
        expected = b"{" + b", ".join(b"'" + f.encode() + b"'" for f in FLAGS.get(name, ())) + b"}"
        _, _, rest = LIBRARY.partition(b"function_name='" + script.function + b"'")
        assert rest, name
        assert rest.split(b"end, flags=", 1)[1].startswith(expected + b"}"), name
