"""The change feed: ``store.changes`` (enable, disable, cursor, read, watch).

Every rule of ``CHANGES.md``, as tests of the ``store`` fixture through the public
:class:`~fleetmem.changes.Changes` API only. Each test that enables the feed disables it again
when it is done (:meth:`ChangesConformance.feed`), so the fixture's teardown records nothing and
no log is left behind.

Timing is never assumed: a watch is consumed by a task of its own (:class:`WatchTask`) and every
wait polls what it has received up to a generous bound, so a loaded machine makes a test slower,
never wrong. The start of a ``watch(since=None)`` (the head *when the watch first reads*) is not
observable from outside, so the test of it writes probes until one arrives instead of sleeping.
Retention is checked with a short retention and a poll: the contract keeps a change at least
``retention`` seconds and trims it at most 10 seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import reprlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

import fleetmem
import fleetmem.errors
from fleetmem.changes import Changes
from fleetmem.errors import (
    ChangesExpiredError,
    ChangesNotEnabledError,
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
    LeaseLostError,
    NotANumberError,
    SerializationError,
    StoreClosedError,
    ValueTooLargeError,
    VersionConflictError,
)
from fleetmem.protocol import Change, ChangeBatch, MemoryStore
from fleetmem.testing.conformance._base import (
    BAD_PARTITIONS,
    ConformanceBase,
    assert_same_json,
    assert_utc,
    utcnow,
)
from fleetmem.testing.conformance._search import BAD_PATTERNS
from fleetmem.testing.conformance._values import ROUND_TRIP_VALUES

#: Retentions ``enable`` refuses with ``InvalidArgumentError`` (a ``ValueError``), before I/O.
BAD_RETENTIONS: list[Any] = [
    0,
    0.0,
    -1,
    -0.5,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    "60",
    b"60",
    [60],
    timedelta(0),
    timedelta(seconds=-1),
    10**400,  # too large for a float: refused, not an OverflowError
]
#: ``since`` values that are not cursors (``None`` is fine: "from the oldest" / "from the head").
BAD_CURSORS: list[Any] = [
    "",
    "garbage",
    "0",
    "-",
    "\x00",
    "\ud800",
    "x" * 10_000,
    1,
    0,
    1.5,
    True,
    b"cursor",
    ["cursor"],
    {"cursor": 1},
]
#: Read limits refused with ``InvalidArgumentError``.
BAD_LIMITS: list[Any] = [0, -1, 10_001, 2**64, True, False, 1.5, 10.0, "10", None, b"1"]

#: Two timestamps of one write agree to this many seconds (a backend may round to ms).
_SAME_MOMENT = 0.002


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def assert_change(
    change: Change,
    op: str,
    key: str | None,
    partition: str | None,
    version: int | None,
    what: str = "change",
) -> None:
    """``change`` has this op, key, partition and version (``value`` ``None`` unless a set)."""
    got = (change.op, change.key, change.partition, change.version)
    assert got == (op, key, partition, version), f"{what}: expected {op} {key!r} " + (
        f"partition={partition!r} version={version}, got {change!r}"
    )
    if op != "set":
        assert change.value is None, f"{what}: a {op} change carries a value: {change!r}"


def assert_moment(actual: datetime | None, expected: datetime | None, what: str) -> None:
    """``actual`` is ``expected`` (``None`` or within :data:`_SAME_MOMENT`)."""
    if expected is None:
        assert actual is None, f"{what}: expected None, got {actual!r}"
        return
    assert actual is not None, f"{what}: expected {expected}, got None"
    assert_utc(actual, what)
    assert abs(_seconds(actual, expected)) <= _SAME_MOMENT, f"{what}: {actual} != {expected}"


def assert_feed_order(changes: list[Change], since: str | None = None) -> None:
    """Cursors strictly increase (as ``str``) from ``since``; versions of a key strictly
    increase between its deletes (a ``delete`` or ``clear`` ends a key's run)."""
    previous = since
    for change in changes:
        assert isinstance(change.cursor, str), change
        if previous is not None:
            assert change.cursor > previous, f"cursor {change.cursor!r} after {previous!r}"
        previous = change.cursor
    last: dict[str, int] = {}
    for change in changes:
        if change.op == "clear":
            last.clear()
        elif change.op == "delete":
            assert change.key is not None
            last.pop(change.key, None)
        elif change.key is not None and change.version is not None:
            before = last.get(change.key)
            if change.op == "set":
                assert before is None or change.version > before, (
                    f"{change.key!r}: version {change.version} after {before}"
                )
            else:  # ttl: the version is unchanged
                assert before is None or change.version == before, change
            last[change.key] = change.version


async def read_all(
    changes: Changes,
    since: str | None,
    *,
    pattern: str | None = None,
    partition: str | None = None,
    limit: int = 1000,
) -> tuple[list[Change], str]:
    """Every change after ``since`` (paged by ``limit``) and the cursor at the end."""
    out: list[Change] = []
    batch = await changes.read(since=since, limit=limit, pattern=pattern, partition=partition)
    for _ in range(100_000):
        assert isinstance(batch, ChangeBatch), batch
        assert len(batch.changes) <= limit, f"read(limit={limit}) returned {len(batch.changes)}"
        if not batch.changes:
            return out, batch.cursor
        # The cursor continues after the last change returned (a filtered read may have
        # scanned past non-matching ones).
        assert batch.cursor >= batch.changes[-1].cursor, batch
        out.extend(batch.changes)
        batch = await changes.read(
            since=batch.cursor, limit=limit, pattern=pattern, partition=partition
        )
    raise AssertionError("read never reached the head")  # pragma: no cover


async def first_watched(changes: Changes, *args: Any, **kwargs: Any) -> Change:
    """The first change of ``changes.watch(*args, **kwargs)`` (which may raise at once)."""
    return await first_of(changes.watch(*args, **kwargs))


async def first_of(iterator: AsyncIterator[Change]) -> Change:
    """The first change a watch yields (for the tests where it must raise instead)."""
    try:
        return await anext(iterator)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def refused(
    error: type[BaseException],
    what: str,
    call: Callable[..., Awaitable[object]],
    *args: Any,
    **kwargs: Any,
) -> BaseException:
    """Assert ``call(*args, **kwargs)`` raises ``error``; return it (the message names the
    call)."""
    try:
        result = await call(*args, **kwargs)
    except error as exc:
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what} raised {type(exc).__name__}: {exc}, expected {error.__name__}"
        ) from exc
    raise AssertionError(f"{what} returned {result!r}, expected {error.__name__}")


async def refuses_bad_arguments(
    changes: Changes, good: str, mangled: list[str], where: str
) -> None:
    """``read`` and ``watch`` of ``changes`` refuse every bad cursor, limit, pattern and
    partition with the argument's error (``good`` is a cursor of the namespace)."""
    for cursor in [*BAD_CURSORS, *mangled]:
        what = f"{where} (since={reprlib.repr(cursor)})"
        await refused(InvalidArgumentError, "read" + what, changes.read, since=cursor)
        await refused(
            InvalidArgumentError, "read filtered" + what, changes.read, since=cursor, pattern="k*"
        )
        await refused(InvalidArgumentError, "watch" + what, first_watched, changes, since=cursor)
    for limit in BAD_LIMITS:
        await refused(
            InvalidArgumentError,
            f"{where} read(limit={reprlib.repr(limit)})",
            changes.read,
            good,
            limit,
        )
    for pattern in [*BAD_PATTERNS, 1, b"k*", ["k*"]]:
        what = f"{where} ({reprlib.repr(pattern)})"
        await refused(InvalidPatternError, "read" + what, changes.read, pattern=pattern)
        await refused(InvalidPatternError, "watch" + what, first_watched, changes, pattern)
    for partition in BAD_PARTITIONS:
        what = f"{where} (partition={reprlib.repr(partition)})"
        await refused(InvalidKeyError, "read" + what, changes.read, partition=partition)
        await refused(InvalidKeyError, "watch" + what, first_watched, changes, partition=partition)


async def expired_everywhere(changes: Changes, cursor: str) -> ChangesExpiredError:
    """``read`` (plain and filtered) and ``watch`` from ``cursor`` raise
    ``ChangesExpiredError``; the first error."""
    error = await refused(
        ChangesExpiredError, f"read(since={cursor!r})", lambda: changes.read(since=cursor)
    )
    await refused(
        ChangesExpiredError,
        f"read(since={cursor!r}, pattern='k', partition='default')",
        lambda: changes.read(since=cursor, pattern="k", partition="default"),
    )
    await refused(
        ChangesExpiredError,
        f"watch(since={cursor!r})",
        lambda: first_of(changes.watch(since=cursor)),
    )
    assert isinstance(error, ChangesExpiredError)
    return error


class WatchTask:
    """A watch consumed by a task of its own: what it yielded, when, and how it ended."""

    def __init__(self, iterator: AsyncIterator[Change]) -> None:
        self._iterator = iterator
        self.got: list[Change] = []
        self.arrivals: list[float] = []  # the loop's clock when each change arrived
        self._loop = asyncio.get_running_loop()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for change in self._iterator:
            self.got.append(change)
            self.arrivals.append(self._loop.time())

    def keys(self) -> list[str | None]:
        return [change.key for change in self.got]

    async def wait_for(self, done: Callable[[list[Change]], bool], timeout: float) -> bool:
        """Whether ``done(changes received)`` became true within ``timeout`` seconds."""
        deadline = self._loop.time() + timeout
        while not done(self.got):
            if self.task.done():
                self.task.result()  # raises what ended the watch
                raise AssertionError(f"the watch ended; it yielded {self.got!r}")
            if self._loop.time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def until(self, done: Callable[[list[Change]], bool], timeout: float, what: str) -> None:
        if not await self.wait_for(done, timeout):
            raise AssertionError(f"{what}: not within {timeout} s; the watch yielded {self.got!r}")

    async def until_count(self, count: int, timeout: float) -> None:
        await self.until(lambda got: len(got) >= count, timeout, f"{count} changes")

    async def ended(self, timeout: float) -> None:
        """The watch finished by itself (normally) within ``timeout`` seconds."""
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        assert done, f"the watch did not end within {timeout} s"
        self.task.result()

    async def stop(self) -> None:
        """Cancel the watch (again, if a cancellation was lost: that is
        ``test_changes_watch_ends_when_cancelled``'s business, not every test's) and close
        its iterator; raise what it raised, if anything but the cancellation."""
        for _ in range(100):
            if self.task.done():
                break
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=0.1)
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()
        if self.task.done() and not self.task.cancelled():
            self.task.result()


@contextlib.asynccontextmanager
async def watching(iterator: AsyncIterator[Change]) -> AsyncIterator[WatchTask]:
    """A :class:`WatchTask` of ``iterator``, stopped on the way out."""
    watch = WatchTask(iterator)
    try:
        yield watch
    finally:
        await watch.stop()


class ChangesConformance(ConformanceBase):
    """The rules of ``CHANGES.md``: the namespace's ordered, resumable, lossless change feed.

    ``change_wake_slack``
        The bound (seconds) on a watcher in this process receiving a change after its write
        returned. The contract promises 100 ms (p99, light load) across processes; this suite
        runs on busy machines, so it checks a generous bound and proves delivery, not speed.
    ``change_retention``
        The short retention (seconds) the retention test enables.
    ``change_patience``
        How long (seconds) a test waits for something that is due -- a trim (the contract
        allows 10 s after the retention), a watch to end -- before it fails.
    """

    pytestmark = [pytest.mark.asyncio]

    change_wake_slack: float = 5.0
    change_retention: float = 0.5
    change_patience: float = 15.0

    @contextlib.asynccontextmanager
    async def feed(
        self, store: MemoryStore, retention: float | timedelta = 3600
    ) -> AsyncIterator[Changes]:
        """``store.changes``, enabled; disabled again afterwards (if the store is open)."""
        changes = store.changes
        await changes.enable(retention=retention)
        try:
            yield changes
        finally:
            if not store.closed:
                await changes.disable()

    # ------------------------------------------------------------ enable / disable / enabled

    async def test_changes_enable_is_idempotent_and_disable_drops_the_log(
        self, store: MemoryStore
    ) -> None:
        ch = store.changes
        assert ch.namespace == store.namespace
        assert await ch.enabled() is False
        await ch.disable()  # not enabled: nothing happens
        assert await ch.enabled() is False
        await ch.enable()
        assert await ch.enabled() is True
        start = await ch.cursor()
        assert isinstance(start, str) and start
        entry = await store.set("k", 1)
        head = await ch.cursor()
        assert head > start
        # A second enable only changes the retention: same epoch, same log, same cursors.
        await ch.enable()
        await ch.enable(retention=timedelta(hours=2))
        await ch.enable(retention=7200)
        await ch.enable(retention=0.75 * 3600)
        assert await ch.enabled() is True
        assert await ch.cursor() == head
        got, end = await read_all(ch, start)
        assert len(got) == 1 and end == head
        assert_change(got[0], "set", "k", "default", entry.version)
        assert (await ch.read(since=None)).changes == got
        # disable stops recording and drops the log; twice is fine.
        await ch.disable()
        assert await ch.enabled() is False
        await ch.disable()
        assert await ch.enabled() is False
        await store.set("k", 2)  # not recorded anywhere
        await ch.enable(retention=60)
        assert await ch.enabled() is True
        batch = await ch.read()
        assert batch.changes == [], "a write made while the feed was off was recorded"
        assert batch.cursor == await ch.cursor()
        await ch.disable()
        assert await ch.enabled() is False

    async def test_changes_bad_retention_is_refused_before_io(self, store: MemoryStore) -> None:
        ch = store.changes
        for retention in BAD_RETENTIONS:
            error = await refused(
                InvalidArgumentError, f"enable({reprlib.repr(retention)})", ch.enable, retention
            )
            assert isinstance(error, ValueError) and isinstance(error, FleetmemError)
        assert await ch.enabled() is False, "a refused enable() enabled the feed"
        # Refused before any I/O: a closed view of the namespace says "bad argument" too.
        view = store.with_namespace(store.namespace)
        await view.close()
        for retention in BAD_RETENTIONS:
            what = f"enable({reprlib.repr(retention)}) on a closed store"
            await refused(InvalidArgumentError, what, view.changes.enable, retention)
        await refused(StoreClosedError, "enable() on a closed store", view.changes.enable)
        # On an enabled feed, a refused retention changes nothing.
        async with self.feed(store) as ch:
            start = await ch.cursor()
            await store.set("k", 1)
            for retention in (0, -1, float("nan")):
                await refused(
                    InvalidArgumentError, f"enable({reprlib.repr(retention)})", ch.enable, retention
                )
            assert await ch.enabled() is True
            assert len((await ch.read(since=start)).changes) == 1
            # The smallest and a fractional retention are fine.
            await ch.enable(retention=0.001)
            await ch.enable(retention=3600.5)

    async def test_changes_not_enabled(self, store: MemoryStore) -> None:
        assert fleetmem.ChangesNotEnabledError is ChangesNotEnabledError
        assert fleetmem.ChangesExpiredError is ChangesExpiredError
        assert fleetmem.errors.ChangesNotEnabledError is ChangesNotEnabledError
        assert issubclass(ChangesNotEnabledError, FleetmemError)
        assert issubclass(ChangesExpiredError, FleetmemError)
        assert fleetmem.Change is Change and fleetmem.ChangeBatch is ChangeBatch
        ch = store.changes
        await store.set("k", 1)  # a namespace with data but no feed
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("cursor()", ch.cursor),
            ("read()", ch.read),
            ("read(limit=1, pattern='k*')", lambda: ch.read(limit=1, pattern="k*")),
            ("read(partition='p')", lambda: ch.read(partition="p")),
            ("watch()", lambda: first_of(ch.watch())),
            ("watch('k*')", lambda: first_of(ch.watch("k*", partition="default"))),
        ]
        for name, call in calls:
            await refused(ChangesNotEnabledError, name, call)
        # A cursor of a feed that was disabled since: not enabled (not expired).
        await ch.enable()
        stale = await ch.cursor()
        await ch.disable()
        for name, call in [
            ("read(since=stale)", lambda: ch.read(since=stale)),
            ("watch(since=stale)", lambda: first_of(ch.watch(since=stale))),
        ]:
            await refused(ChangesNotEnabledError, name, call)
        # The store itself is unaffected.
        assert await store.get("k") == 1

    # ------------------------------------------------------------ what is recorded

    async def test_changes_record_every_write_as_the_table_says(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            before = utcnow()
            a1 = await store.set("a", {"x": (1, 2)}, ttl=100, partition="p")
            assert await store.set_many({"b": 2**100, "c": 0.1}, partition="q") == 2
            assert await store.set_if_absent("d", "new", ttl=200) is True
            d = await store.get_entry("d")
            a2 = await store.compare_and_set("a", [1], version=a1.version)
            e = await store.compare_and_set("e", "made", version=0, partition="p")
            assert await store.incr("n", 5) == 5
            assert await store.incr("n", 0.5) == 5.5
            n = await store.get_entry("n")
            assert await store.expire("b", 50) is True
            b = await store.get_entry("b")
            assert await store.persist("a") is True
            assert await store.delete("a") is True
            assert await store.delete_many(["b", "c", "absent"]) == 2
            assert await store.set_many({"r1": 1, "r2": 2}, partition="r") == 2
            assert await store.clear_partition("r") == 2
            assert await store.clear() == 3  # d, e, n
            after = utcnow()
            got, end = await read_all(ch, start)
            assert end == await ch.cursor()
            assert d is not None and n is not None and b is not None
            ops = [(c.op, c.key) for c in got]
            assert len(got) == 17, ops
            assert_feed_order(got, start)
            # set: the new version, the stored value, the new expiry, the stored partition.
            assert_change(got[0], "set", "a", "p", a1.version, "set")
            assert_same_json(got[0].value, {"x": [1, 2]}, "set value")
            assert_moment(got[0].expires_at, a1.expires_at, "set expires_at")
            many = sorted(got[1:3], key=lambda c: str(c.key))
            assert_change(many[0], "set", "b", "q", 1, "set_many")
            assert_change(many[1], "set", "c", "q", 1, "set_many")
            assert_same_json(many[0].value, 2**100, "set_many value")
            assert_same_json(many[1].value, 0.1, "set_many value")
            assert many[0].expires_at is None and many[1].expires_at is None
            assert_change(got[3], "set", "d", "default", 1, "set_if_absent")
            assert_same_json(got[3].value, "new", "set_if_absent value")
            assert_moment(got[3].expires_at, d.expires_at, "set_if_absent expires_at")
            assert_change(got[4], "set", "a", "p", a2.version, "compare_and_set")
            assert a2.version == a1.version + 1
            assert_same_json(got[4].value, [1], "compare_and_set value")
            assert_moment(got[4].expires_at, a2.expires_at, "compare_and_set expires_at")
            assert_change(got[5], "set", "e", "p", e.version, "compare_and_set(version=0)")
            assert_same_json(got[5].value, "made", "compare_and_set value")
            assert_change(got[6], "set", "n", "default", 1, "incr")
            assert_same_json(got[6].value, 5, "incr value")
            assert_change(got[7], "set", "n", "default", n.version, "incr")
            assert n.version == 2
            assert_same_json(got[7].value, 5.5, "incr value")
            # ttl: the version unchanged, no value, the new expiry (None: persisted).
            assert_change(got[8], "ttl", "b", "q", b.version, "expire")
            assert b.expires_at is not None
            assert_moment(got[8].expires_at, b.expires_at, "expire expires_at")
            assert_change(got[9], "ttl", "a", "p", a2.version, "persist")
            assert got[9].expires_at is None
            # delete: the partition the key had.
            assert_change(got[10], "delete", "a", "p", None, "delete")
            gone = sorted(got[11:13], key=lambda c: str(c.key))
            assert_change(gone[0], "delete", "b", "q", None, "delete_many")
            assert_change(gone[1], "delete", "c", "q", None, "delete_many")
            assert {(c.op, c.key, c.partition) for c in got[13:15]} == {
                ("set", "r1", "r"),
                ("set", "r2", "r"),
            }
            # clear: one change per call, key None, partition the cleared one or None.
            assert_change(got[15], "clear", None, "r", None, "clear_partition")
            assert_change(got[16], "clear", None, None, None, "clear")
            for change in got[10:13] + got[15:]:
                assert change.expires_at is None, change
            skew = timedelta(seconds=self.clock_skew)
            for change in got:
                at = assert_utc(change.at, "at")
                assert before - skew <= at <= after + skew, change
            # ``at`` is the server time of the write: that of the entry it wrote.
            for change, entry in ((got[0], a1), (got[4], a2), (got[5], e)):
                assert abs(_seconds(change.at, entry.updated_at)) <= self.ttl_slack, (
                    change,
                    entry,
                )

    async def test_changes_carry_values_in_their_stored_form(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            values = {f"m/{i:03d}": v for i, v in enumerate(ROUND_TRIP_VALUES)}
            assert await store.set_many(values) == len(values)
            for i, value in enumerate(ROUND_TRIP_VALUES):
                await store.set(f"s/{i:03d}", value)
            got, _ = await read_all(ch, start)
            assert len(got) == 2 * len(values), [c.key for c in got]
            stored = await store.get_many([str(c.key) for c in got])
            for change in got:
                assert change.op == "set" and change.key is not None, change
                value = values[change.key.replace("s/", "m/")]
                assert_same_json(change.value, value, f"value of {change.key!r}")
                assert_same_json(change.value, stored[change.key], f"get({change.key!r})")

    async def test_changes_writes_that_change_nothing_record_nothing(
        self, store: MemoryStore
    ) -> None:
        async with self.feed(store) as ch:
            await store.set("k", 1, partition="kp")
            await store.set("text", "abc")
            await store.set_many({"short1": 1, "short2": 2}, ttl=self.expiry_ttl, partition="x")
            await store.set_many({"short3": 3, "short4": 4}, ttl=self.expiry_ttl, partition="y")
            lost = await store.leases.acquire("fence", owner="me", ttl=60)
            assert lost is not None and await store.leases.release(lost) is True
            await self.wait_for_expiry()
            start = await ch.cursor()
            assert await store.set_if_absent("k", 2) is False
            with pytest.raises(VersionConflictError):
                await store.compare_and_set("k", 3, version=99)
            with pytest.raises(VersionConflictError):
                await store.compare_and_set("absent", 3, version=5)
            assert await store.delete("absent") is False
            assert await store.delete_many(["absent1", "absent2"]) == 0
            assert await store.expire("absent", 10) is False
            assert await store.persist("absent") is False
            assert await store.clear_partition("nothing-here") == 0
            with pytest.raises(NotANumberError):
                await store.incr("text")
            with pytest.raises(SerializationError):
                await store.set("k", {1, 2})
            with pytest.raises(ValueTooLargeError):
                await store.set("k", "x" * (self.max_value_bytes + 1))
            with pytest.raises(InvalidKeyError):
                await store.set_many({"fine": 1, "": 2})
            # A lost fence refuses every write, changing nothing.
            for name, call in [
                ("set", lambda: store.set("k", 5, fence=lost)),
                ("set_many", lambda: store.set_many({"k": 5, "new": 1}, fence=lost)),
                ("set_if_absent", lambda: store.set_if_absent("new", 1, fence=lost)),
                ("compare_and_set", lambda: store.compare_and_set("k", 5, version=1, fence=lost)),
                ("incr", lambda: store.incr("n", fence=lost)),
                ("delete", lambda: store.delete("k", fence=lost)),
                ("delete_many", lambda: store.delete_many(["k"], fence=lost)),
            ]:
                await refused(LeaseLostError, f"{name} with a lost fence", call)
            # Expired keys: their expiry, and deleting, expiring or cleaning them, record
            # nothing; neither does clearing a partition that holds only expired entries.
            assert await store.delete("short1") is False
            assert await store.delete_many(["short2", "short3"]) == 0
            assert await store.expire("short2", 10) is False
            assert await store.persist("short3") is False
            assert await store.clear_partition("y") == 0
            assert await store.cleanup_expired() >= 0
            # Queue, lease and agent operations are not KV writes.
            q = store.queue("jobs")
            job_id = await q.put({"job": 1})
            job = await q.claim(lease=30)
            assert job is not None and job.id == job_id
            assert await q.ack(job, result="done") is True
            lease = await store.leases.acquire("l", owner="me", ttl=30)
            assert lease is not None
            await store.leases.renew(lease, ttl=30)
            assert await store.leases.release(lease) is True
            await store.agents.register("agent-1", info={"x": 1}, ttl=30)
            await store.agents.heartbeat("agent-1")
            assert await store.agents.deregister("agent-1") is True
            batch = await ch.read(since=start)
            assert batch.changes == [] and batch.cursor == start, batch
            assert await ch.cursor() == start
            # clear() of a namespace whose entries are all expired records nothing either.
            assert await store.delete("k") is True
            assert await store.delete("text") is True
            mark = await ch.cursor()
            assert await store.clear() == 0
            assert (await ch.read(since=mark)).changes == []
            got, _ = await read_all(ch, start)
            assert [(c.op, c.key, c.partition) for c in got] == [
                ("delete", "k", "kp"),
                ("delete", "text", "default"),
            ]

    async def test_changes_record_fenced_writes(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            lease = await store.leases.acquire("writer", owner="me", ttl=60)
            assert lease is not None
            start = await ch.cursor()
            a = await store.set("a", 1, fence=lease)
            assert await store.set_many({"b": 2, "c": 3}, fence=lease) == 2
            assert await store.set_if_absent("d", 4, fence=lease) is True
            a2 = await store.compare_and_set("a", 5, version=a.version, fence=lease)
            assert await store.incr("n", 2, fence=lease) == 2
            assert await store.delete("b", fence=lease) is True
            assert await store.delete_many(["c", "d"], fence=lease) == 2
            got, _ = await read_all(ch, start)
            assert [(c.op, c.key, c.version) for c in got[:1]] == [("set", "a", a.version)]
            assert sorted(str(c.key) for c in got[1:3]) == ["b", "c"]
            assert [(c.op, c.key, c.version) for c in got[3:6]] == [
                ("set", "d", 1),
                ("set", "a", a2.version),
                ("set", "n", 1),
            ]
            assert_same_json(got[4].value, 5)
            assert [(c.op, c.key) for c in got[6:7]] == [("delete", "b")]
            assert sorted(str(c.key) for c in got[7:]) == ["c", "d"]
            assert all(c.op == "delete" for c in got[7:]) and len(got) == 9

    async def test_changes_record_writers_that_never_used_the_feed(
        self, store: MemoryStore
    ) -> None:
        """Enabling is server-side: a store of the namespace opened before ``enable()`` and
        never touching ``changes`` is recorded too (another process would be alike)."""
        other = store.with_namespace(store.namespace)
        try:
            async with self.feed(store) as ch:
                start = await ch.cursor()
                await other.set("k", "from the other writer", partition="o")
                await store.set("k", "from this one")
                await other.delete("k")
                got, end = await read_all(ch, start)
                assert [(c.op, c.key, c.version, c.partition) for c in got] == [
                    ("set", "k", 1, "o"),
                    ("set", "k", 2, "o"),
                    ("delete", "k", None, "o"),
                ]
                # The other store sees the same feed: enabled, same cursors, same changes.
                assert await other.changes.enabled() is True
                assert await other.changes.cursor() == end
                assert (await other.changes.read(since=start)).changes == got
        finally:
            await other.close()

    async def test_changes_views_have_their_own_feed(self, store: MemoryStore) -> None:
        async with self.sibling_namespaces(store, "x") as (sibling,), self.feed(store) as ch:
            assert await sibling.changes.enabled() is False
            await refused(ChangesNotEnabledError, "sibling read()", sibling.changes.read)
            start = await ch.cursor()
            await sibling.set("k", 1)
            assert (await ch.read(since=start)).changes == []
            async with self.feed(sibling) as sch:
                sibling_start = await sch.cursor()
                await sibling.set("k", 2)
                await store.set("k", 3)
                mine = (await ch.read(since=start)).changes
                theirs = (await sch.read(since=sibling_start)).changes
                assert [(c.key, c.version) for c in mine] == [("k", 1)]
                assert [(c.key, c.version) for c in theirs] == [("k", 2)]
                assert_same_json(mine[0].value, 3)
                assert_same_json(theirs[0].value, 2)
                # A cursor of another namespace is refused, both ways, read and watch.
                for name, call in [
                    ("read(since=a sibling's cursor)", lambda: ch.read(since=sibling_start)),
                    ("read(since=our cursor)", lambda: sch.read(since=start)),
                    (
                        "watch(since=a sibling's cursor)",
                        lambda: first_of(ch.watch(since=theirs[0].cursor)),
                    ),
                ]:
                    await refused(InvalidArgumentError, name, call)
            # Disabling the sibling's feed leaves ours alone.
            assert await sibling.changes.enabled() is False
            assert await ch.enabled() is True
            assert len((await ch.read(since=start)).changes) == 1

    # ------------------------------------------------------------ order, cursors, reading

    async def test_changes_order_and_cursors(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            assert (await ch.read(since=start)).changes == []
            await store.set("k", 1)
            await store.set("k", 2)
            await store.set("j", 1)
            assert await store.delete("k") is True
            await store.set("k", "again")  # version 1 again, after the delete
            await store.incr("j")
            await store.expire("j", 60)
            await store.set("k", "more", keep_ttl=True)
            got, end = await read_all(ch, start)
            assert [(c.op, c.key, c.version) for c in got] == [
                ("set", "k", 1),
                ("set", "k", 2),
                ("set", "j", 1),
                ("delete", "k", None),
                ("set", "k", 1),
                ("set", "j", 2),
                ("ttl", "j", 2),
                ("set", "k", 2),
            ]
            assert_feed_order(got, start)
            cursors = [c.cursor for c in got]
            assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
            assert start < cursors[0] and end == cursors[-1] == await ch.cursor()
            # Reading from any cursor of the feed returns what follows it, each change once.
            for index, change in enumerate(got):
                rest, _ = await read_all(ch, change.cursor)
                assert rest == got[index + 1 :], f"read after change #{index}"
            assert (await ch.read(since=end)).changes == []

    async def test_changes_read_from_the_oldest_and_at_the_head(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            empty = await ch.read()  # since=None on an empty feed: nothing, at the head
            head = await ch.cursor()
            assert empty.changes == [] and empty.cursor == head
            # An empty batch keeps the cursor: the reader is at the head.
            again = await ch.read(since=head)
            assert again.changes == [] and again.cursor == head
            await store.set_many({f"k{i}": i for i in range(5)})
            oldest = await ch.read(since=None)
            assert len(oldest.changes) == 5 and oldest.changes[0].cursor > head
            assert (await ch.read(since=head)).changes == oldest.changes
            now = await ch.cursor()
            batch = await ch.read(since=now)
            assert batch.changes == [] and batch.cursor == now
            assert now == oldest.cursor == oldest.changes[-1].cursor
            # The cursor of a batch continues it, also when the batch was cut by its limit.
            first = await ch.read(limit=2)
            assert len(first.changes) == 2 and first.cursor >= first.changes[-1].cursor
            rest = await ch.read(since=first.cursor, limit=10_000)
            assert first.changes + rest.changes == oldest.changes

    async def test_changes_paging_returns_everything_once(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            for i in range(12):
                await store.set(f"k{i % 4}", i, partition=f"p{i % 2}")
            await store.set_many({f"bulk{i}": i for i in range(10)})
            await store.delete("k0")
            whole, end = await read_all(ch, start)
            assert len(whole) == 23
            for limit in (1, 2, 7, 22, 23, 24):
                paged, paged_end = await read_all(ch, start, limit=limit)
                assert paged == whole, f"paging by {limit}"
                assert paged_end == end
            # From the oldest too, and with a filter (limit counts the changes returned).
            assert (await read_all(ch, None, limit=5))[0] == whole
            matching = [c for c in whole if c.key is not None and c.key.startswith("k")]
            for limit in (1, 3, 1000):
                paged, _ = await read_all(ch, start, pattern="k*", limit=limit)
                assert paged == matching, f"paging k* by {limit}"

    async def test_changes_read_filters(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            await store.set("a/1", 1, partition="p")
            await store.set("a/2", 2, partition="q")
            await store.set("b/1", 3, partition="p")
            await store.set("a/3", 4, partition="p")
            await store.expire("a/3", 60)
            assert await store.delete("a/1") is True
            assert await store.clear_partition("q") == 1
            await store.set("a/4", 5)
            got, end = await read_all(ch, start)
            assert len(got) == 8
            cases: list[tuple[str | None, str | None, list[int]]] = [
                ("a/*", None, [0, 1, 3, 4, 5, 6, 7]),
                ("a/*", "p", [0, 3, 4, 5, 6]),
                (None, "p", [0, 2, 3, 4, 5, 6]),
                ("b/1", None, [2, 6]),  # no wildcard: that key only
                ("a/[13]", "p", [0, 3, 4, 5, 6]),
                ("?/?", "default", [6, 7]),
                ("zzz*", None, [6]),  # clear changes always pass
                ("*", None, list(range(8))),
                ("*", "none-such", [6]),
            ]
            for pattern, partition, expected in cases:
                what = f"read(pattern={pattern!r}, partition={partition!r})"
                batch = await ch.read(since=start, pattern=pattern, partition=partition)
                assert batch.changes == [got[i] for i in expected], what
                # limit counts the changes returned, and the cursor continues the filter.
                first = await ch.read(since=start, limit=1, pattern=pattern, partition=partition)
                assert first.changes == [got[expected[0]]], what
                assert first.cursor >= got[expected[0]].cursor, what
                rest, rest_end = await read_all(
                    ch, first.cursor, pattern=pattern, partition=partition, limit=2
                )
                assert rest == [got[i] for i in expected[1:]], what
                assert rest_end >= got[expected[-1]].cursor, what
            # A filtered read past only non-matching changes is empty: it is at the head, and
            # its cursor lets the next read see only what comes later.
            empty = await ch.read(since=got[6].cursor, pattern="b/*", partition="p")
            assert empty.changes == []
            assert got[6].cursor <= empty.cursor <= end
            await store.set("b/2", 6, partition="p")
            later = await ch.read(since=empty.cursor, pattern="b/*", partition="p")
            assert [(c.key, c.op) for c in later.changes] == [("b/2", "set")]

    async def test_changes_bad_arguments_are_refused_before_io(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            await store.set("k", 1)
            good = await ch.cursor()
            mangled = [good[:-1], good + "0", " " + good[1:], good[:-1] + "g", good + "\n"]
            if good.upper() != good:
                mangled.append(good.upper())
            view = store.with_namespace(store.namespace)
            await view.close()
            # On the open feed and on a closed store: the argument error, never I/O.
            await refuses_bad_arguments(ch, good, mangled, "open")
            await refuses_bad_arguments(view.changes, good, mangled, "closed")
            calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("cursor", view.changes.cursor),
                ("read", view.changes.read),
                ("enabled", view.changes.enabled),
                ("disable", view.changes.disable),
                ("watch", lambda: first_of(view.changes.watch())),
            ]
            for name, call in calls:
                await refused(StoreClosedError, f"{name} on a closed store", call)
            # The limits themselves are fine, and nothing was broken by the refusals.
            assert len((await ch.read(limit=10_000)).changes) == 1
            assert len((await ch.read(limit=1)).changes) == 1
            assert (await ch.read(since=good)).changes == []

    async def test_changes_fields(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            before = utcnow()
            entry = await store.set("k", [1, "two"], ttl=60, partition="p")
            await store.delete("k")
            await store.set("j", 1)
            await store.clear()
            after = utcnow()
            batch = await ch.read(since=start)
            assert isinstance(batch, ChangeBatch) and isinstance(batch.cursor, str)
            assert isinstance(batch.changes, list) and len(batch.changes) == 4
            skew = timedelta(seconds=self.clock_skew)
            for change in batch.changes:
                assert isinstance(change, Change), change
                assert type(change.cursor) is str and change.cursor, change
                assert change.op in ("set", "delete", "ttl", "clear"), change
                assert change.key is None or type(change.key) is str, change
                assert change.partition is None or type(change.partition) is str, change
                assert change.version is None or type(change.version) is int, change
                if change.expires_at is not None:
                    assert_utc(change.expires_at, "expires_at")
                at = assert_utc(change.at, "at")
                assert before - skew <= at <= after + skew, change
            first = batch.changes[0]
            assert_moment(first.expires_at, entry.expires_at, "expires_at")
            assert first.expires_at is not None
            assert abs(_seconds(first.expires_at, first.at) - 60) <= self.ttl_slack
            with pytest.raises(dataclasses.FrozenInstanceError):
                first.op = "delete"  # type: ignore[misc]
            with pytest.raises(dataclasses.FrozenInstanceError):
                batch.cursor = start  # type: ignore[misc]

    # ------------------------------------------------------------ expiry of cursors

    async def test_changes_disable_then_enable_expires_old_cursors(
        self, store: MemoryStore
    ) -> None:
        ch = store.changes
        await ch.enable()
        try:
            start = await ch.cursor()
            await store.set("k", 1)
            old = await ch.cursor()
            await ch.disable()
            await store.set("k", 2)  # not recorded
            await ch.enable()
            await expired_everywhere(ch, start)
            error = await expired_everywhere(ch, old)
            oldest = error.oldest
            assert isinstance(oldest, str)
            assert oldest > old, "the new epoch's cursors sort after the old one's"
            fresh = await ch.read(since=oldest)
            assert fresh.changes == [] and fresh.cursor == await ch.cursor()
            assert (await ch.read()).changes == []
            entry = await store.set("k", 3)
            got = (await ch.read(since=oldest)).changes
            assert [(c.op, c.key, c.version) for c in got] == [("set", "k", entry.version)]
            assert str(error), "ChangesExpiredError has a message"
        finally:
            await ch.disable()

    async def test_changes_retention_trims_old_changes(self, store: MemoryStore) -> None:
        loop = asyncio.get_running_loop()
        async with self.feed(store, retention=3600) as ch:
            start = await ch.cursor()
            written = loop.time()
            await store.set("old", 1)
            head = await ch.cursor()
            # A second enable changes only the retention: the change and its cursor stay.
            await ch.enable(retention=3600)
            assert [c.key for c in (await ch.read(since=start)).changes] == ["old"]
            await ch.enable(retention=self.change_retention)
            deadline = loop.time() + self.change_retention + self.change_patience
            expired: ChangesExpiredError | None = None
            while True:
                asked = loop.time()
                try:
                    batch = await ch.read(since=start)
                except ChangesExpiredError as exc:
                    expired = exc
                    break
                # Kept at least ``retention``: still there when read soon enough.
                if loop.time() - written < self.change_retention:
                    assert [c.key for c in batch.changes] == ["old"], batch
                assert loop.time() < deadline, (
                    f"a change was not trimmed {self.change_patience} s past its retention"
                )
                await asyncio.sleep(min(0.1, max(0.0, deadline - asked)))
            assert expired is not None
            trimmed_after = loop.time() - written
            assert trimmed_after >= self.change_retention - 0.05, trimmed_after
            oldest = expired.oldest
            assert isinstance(oldest, str) and oldest >= start, oldest
            # The oldest readable cursor reads; so does a cursor none of whose successors went.
            assert (await ch.read(since=oldest)).changes == []
            assert (await ch.read(since=head)).changes == []
            assert (await ch.read()).changes == []
            await refused(
                ChangesExpiredError,
                "watch(since=a trimmed cursor)",
                lambda: first_of(ch.watch(since=start)),
            )
            await refused(
                ChangesExpiredError,
                "read(since=a trimmed cursor, filtered)",
                lambda: ch.read(since=start, pattern="old", partition="default"),
            )
            await ch.enable(retention=3600)
            entry = await store.set("new", 2)
            got = (await ch.read(since=oldest)).changes
            assert [(c.key, c.version) for c in got] == [("new", entry.version)]
            assert (await ch.read()).changes == got
            assert (await ch.read(since=head)).changes == got

    # ------------------------------------------------------------ concurrency

    async def test_changes_concurrent_writers(self, store: MemoryStore) -> None:
        """Many coroutines writing overlapping keys through two stores of the namespace: one
        change per write, and every key's versions in the feed are 1, 2, 3, ... in order."""
        n = self.concurrency
        keys = [f"k{i}" for i in range(5)]
        other = store.with_namespace(store.namespace)
        try:
            async with self.feed(store) as ch:
                start = await ch.cursor()

                async def writer(i: int) -> None:
                    for j in range(4):
                        target = store if (i + j) % 2 else other
                        key = keys[(i * 3 + j) % len(keys)]
                        if j % 2:
                            await target.incr(key)
                        else:
                            await target.set(key, i)

                await asyncio.gather(*(writer(i) for i in range(n)))
                got, _ = await read_all(ch, start)
                assert len(got) == 4 * n, f"{len(got)} changes for {4 * n} writes"
                assert_feed_order(got, start)
                versions: dict[str | None, list[int | None]] = defaultdict(list)
                for change in got:
                    assert change.op == "set", change
                    versions[change.key].append(change.version)
                for key in keys:
                    entry = await store.get_entry(key)
                    assert entry is not None
                    assert versions[key] == list(range(1, entry.version + 1)), key
                    assert_same_json(
                        next(c.value for c in reversed(got) if c.key == key), entry.value
                    )
        finally:
            await other.close()

    # ------------------------------------------------------------ watch

    async def test_changes_watch_from_a_cursor_replays_then_follows(
        self, store: MemoryStore
    ) -> None:
        loop = asyncio.get_running_loop()
        async with self.feed(store) as ch:
            start = await ch.cursor()
            await store.set_many({f"old/{i}": i for i in range(5)})
            await store.delete("old/0")
            async with watching(ch.watch(since=start)) as w:
                await w.until_count(6, self.change_patience)
                latencies: list[float] = []
                for i in range(5):
                    began = loop.time()
                    await store.set(f"live/{i}", i)
                    await w.until_count(7 + i, self.change_patience)
                    latencies.append(w.arrivals[-1] - began)
                expected, _ = await read_all(ch, start)
                assert len(expected) == 11
                await asyncio.sleep(0.05)  # nothing more arrives
                assert w.got == expected
            assert max(latencies) <= self.change_wake_slack, latencies

    async def test_changes_watch_since_none_starts_at_the_head(self, store: MemoryStore) -> None:
        loop = asyncio.get_running_loop()
        async with self.feed(store) as ch:
            await store.set_many({"old/1": 1, "old/2": 2})
            async with watching(ch.watch()) as w:
                # The watch starts at the head when it first reads, which nothing outside it
                # can see: write probes until one arrives.
                deadline = loop.time() + self.change_patience
                probes = 0
                while not await w.wait_for(bool, 0.1):
                    assert loop.time() < deadline, "no probe arrived"
                    await store.set("probe", probes)
                    probes += 1
                await store.set("new", 1)
                await w.until(
                    lambda got: got[-1].key == "new", self.change_patience, "the new change"
                )
                keys = w.keys()
                assert "old/1" not in keys and "old/2" not in keys, keys
                assert keys[-1] == "new" and set(keys[:-1]) == {"probe"}, keys
                # The probes it got are the last ones, without a gap.
                seen = [c.version for c in w.got[:-1]]
                assert seen == list(range(probes - len(seen) + 1, probes + 1)), (seen, probes)

    async def test_changes_watch_filters(self, store: MemoryStore) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            await store.set("a/1", 1, partition="p")
            await store.set("a/2", 2, partition="q")
            await store.set("b/1", 3, partition="p")
            await store.expire("a/1", 60)
            assert await store.delete("a/1") is True
            assert await store.clear_partition("q") == 1
            async with (
                watching(ch.watch("a/*", partition="p", since=start)) as ap,
                watching(ch.watch("a/*", since=start)) as a,
                watching(ch.watch(partition="p", since=start)) as p,
                watching(ch.watch("nothing", since=start)) as nothing,
            ):
                await store.set("a/9", 9, partition="p")
                await store.set("a/8", 8, partition="q")
                await store.set("z", 0, partition="p")
                assert await store.clear() == 4
                await store.set("end", 0)
                got, _ = await read_all(ch, start)
                assert [(c.op, c.key) for c in got] == [
                    ("set", "a/1"),
                    ("set", "a/2"),
                    ("set", "b/1"),
                    ("ttl", "a/1"),
                    ("delete", "a/1"),
                    ("clear", None),
                    ("set", "a/9"),
                    ("set", "a/8"),
                    ("set", "z"),
                    ("clear", None),
                    ("set", "end"),
                ]
                for watch, expected in (
                    (ap, [0, 3, 4, 5, 6, 9]),
                    (a, [0, 1, 3, 4, 5, 6, 7, 9]),
                    (p, [0, 2, 3, 4, 5, 6, 8, 9]),
                    (nothing, [5, 9]),
                ):
                    await watch.until_count(len(expected), self.change_patience)
                for watch, expected in (
                    (ap, [0, 3, 4, 5, 6, 9]),
                    (a, [0, 1, 3, 4, 5, 6, 7, 9]),
                    (p, [0, 2, 3, 4, 5, 6, 8, 9]),
                    (nothing, [5, 9]),
                ):
                    assert watch.got == [got[i] for i in expected], watch.got

    async def test_changes_watch_delivers_every_change_exactly_once(
        self, store: MemoryStore
    ) -> None:
        async with self.feed(store) as ch:
            start = await ch.cursor()
            async with watching(ch.watch(since=start)) as w:

                async def writer(i: int) -> None:
                    for j in range(10):
                        await store.set(f"w/{i}/{j % 3}", j)

                await asyncio.gather(
                    *(writer(i) for i in range(20)),
                    store.set_many({f"bulk/{i}": i for i in range(100)}),
                )
                await w.until_count(300, self.change_patience)
                expected, _ = await read_all(ch, start)
                assert len(expected) == 300
                sentinel = await store.set("sentinel", 1)
                await w.until(
                    lambda got: got[-1].key == "sentinel", self.change_patience, "sentinel"
                )
                assert w.got[:300] == expected
                assert len(w.got) == 301, [c.key for c in w.got[300:]]
                assert_change(w.got[300], "set", "sentinel", "default", sentinel.version)
                assert len({c.cursor for c in w.got}) == 301

    async def test_changes_watch_ends_when_the_store_closes(self, store: MemoryStore) -> None:
        await store.changes.enable()
        start = await store.changes.cursor()
        view = store.with_namespace(store.namespace)
        async with (
            watching(store.changes.watch(since=start)) as mine,
            watching(view.changes.watch("k*", since=start)) as viewed,
        ):
            await store.set("k", 1)
            await mine.until_count(1, self.change_patience)
            await viewed.until_count(1, self.change_patience)
            # Closing a view ends its watches, not the store's.
            await view.close()
            await viewed.ended(self.change_patience)
            await store.set("k", 2)
            await mine.until_count(2, self.change_patience)
            assert [c.version for c in mine.got] == [1, 2]
            assert [c.version for c in viewed.got] == [1]
            idle = store.with_namespace(store.namespace)
            async with watching(idle.changes.watch()) as waiting:
                await asyncio.sleep(0.1)  # likely asleep, waiting for a change
                await store.close()
                await mine.ended(self.change_patience)
                await waiting.ended(self.change_patience)
            assert [c.version for c in mine.got] == [1, 2]

    async def test_changes_watch_ends_when_cancelled(self, store: MemoryStore) -> None:
        """Cancelling the task that iterates a watch ends it, also when a change (or another
        watcher leaving) wakes it at the same moment: the cancellation is never lost."""
        async with self.feed(store) as ch:
            start = await ch.cursor()
            await store.set("k", 0)
            tasks = [WatchTask(ch.watch(since=start)) for _ in range(4)]
            try:
                for watch in tasks:
                    await watch.until_count(1, self.change_patience)
                for index, watch in enumerate(tasks):
                    if index % 2:
                        await store.set("k", index)  # wakes the watchers still there
                    watch.task.cancel()
                    done, _ = await asyncio.wait({watch.task}, timeout=self.change_wake_slack)
                    assert done, f"watch #{index} went on after it was cancelled"
                    assert watch.task.cancelled(), watch.task
            finally:
                for watch in tasks:
                    await watch.stop()

    async def test_changes_watch_raises_when_iterated(self, store: MemoryStore) -> None:
        """A watch of a feed that is not enabled, or from an expired cursor, raises when it
        is iterated; the iterator it returned is not a change."""
        ch = store.changes
        iterator = ch.watch()
        await refused(ChangesNotEnabledError, "watch() not enabled", lambda: first_of(iterator))
        async with self.feed(store):
            stale = await ch.cursor()
        async with self.feed(store):
            await refused(
                ChangesExpiredError,
                "watch(since=a cursor of an earlier enable)",
                lambda: first_of(ch.watch(since=stale)),
            )
