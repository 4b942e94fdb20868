"""``Entry``: a frozen dataclass whose ``__init__`` sets its slots directly."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import datetime, timezone

import pytest

from fleetmem import Entry

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_init_takes_the_fields_in_order_by_position_and_by_name() -> None:
    names = [f.name for f in dataclasses.fields(Entry)]
    assert list(inspect.signature(Entry).parameters) == names
    by_position = Entry("k", {"a": 1}, "p", 3, NOW, NOW, None)
    by_name = Entry(
        expires_at=None,
        updated_at=NOW,
        created_at=NOW,
        version=3,
        partition="p",
        value={"a": 1},
        key="k",
    )
    assert by_position == by_name
    assert dataclasses.astuple(by_position) == ("k", {"a": 1}, "p", 3, NOW, NOW, None)
    assert [getattr(by_position, n) for n in names] == ["k", {"a": 1}, "p", 3, NOW, NOW, None]


def test_it_stays_frozen_hashable_and_replaceable() -> None:
    entry = Entry("k", 1, "default", 1, NOW, NOW, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.version = 2  # type: ignore[misc]
    assert hash(entry) == hash(Entry("k", 1, "default", 1, NOW, NOW, None))
    moved = dataclasses.replace(entry, version=2, expires_at=NOW)
    assert (moved.version, moved.expires_at, moved.key) == (2, NOW, "k")
    assert "Entry(key='k', value=1" in repr(entry)
    with pytest.raises(TypeError):
        Entry("k", 1, "default", 1, NOW, NOW)  # type: ignore[call-arg]
