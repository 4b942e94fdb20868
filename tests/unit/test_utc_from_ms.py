"""``utc_from_ms`` is exact to the millisecond over the whole range an expiry can take."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from fleetmem._codec import utc_from_ms

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
YEAR_9999_END_MS = 253_402_300_799_999


def test_exact_at_the_ends_of_the_range() -> None:
    assert utc_from_ms(YEAR_9999_END_MS) == datetime(
        9999, 12, 31, 23, 59, 59, 999_000, tzinfo=timezone.utc
    )
    assert utc_from_ms(0) == EPOCH
    assert utc_from_ms(-1) == EPOCH - timedelta(milliseconds=1)


def test_exact_everywhere_between() -> None:
    rng = random.Random(20261204)
    for _ in range(50_000):
        ms = rng.randrange(-(2**44), YEAR_9999_END_MS + 1)
        assert utc_from_ms(ms) == EPOCH + timedelta(milliseconds=ms), ms
