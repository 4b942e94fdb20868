"""Durable work queues: ``store.queue(name)`` (see ``docs/queues.md``).

:class:`Queue` validates and encodes every argument before any I/O and calls the technology's
:class:`~fleetmem.backends.seam.QueueBackend`, which shares the store's connector. The
guarantees, identical on every backend:

* **at least once**: a job is given to one consumer at a time, under a lease; a consumer that
  dies loses the job to the next claim once the lease expires (the attempt counts);
* **claims are fenced**: every claim of a job gets a greater ``token``; ``ack``, ``nack`` and
  ``extend`` succeed only while the claim they carry is the job's latest (even after its lease
  expired, as long as nobody claimed the job since), so a superseded consumer can neither finish,
  fail nor extend a job someone else now holds;
* **order**: higher ``priority`` first, then earlier ``ready_at``, then earlier ``put``;
* a job whose attempts reach ``max_attempts`` goes to the dead letter, from the moment its last
  lease expires or its last ``nack``;
* ``claim(wait=...)`` and ``result(wait=...)`` are woken by a ``put`` / ``ack`` in another
  process (PostgreSQL ``LISTEN``, Redis pub/sub; on SQLite a poll of the file every 50 ms),
  polling no more than once a second as the fallback.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import socket
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from fleetmem._codec import encode_value
from fleetmem._validate import MAX_TTL_SECONDS, validate_name, validate_ttl, validate_wait
from fleetmem.backends.seam import (
    DEFAULT_JOB_LEASE,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RESULT_TTL,
    NewJob,
    QueueBackend,
    backoff_ms,
)
from fleetmem.errors import InvalidArgumentError
from fleetmem.protocol import Job, JobResult, QueueStats

__all__ = [
    "DEFAULT_JOB_LEASE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RESULT_TTL",
    "MAX_ERROR_BYTES",
    "MAX_QUEUE_NAME_BYTES",
    "Queue",
    "validate_queue_name",
]

#: The longest queue name, in UTF-8 bytes.
MAX_QUEUE_NAME_BYTES = 255
#: The longest ``nack`` error kept, in UTF-8 bytes.
MAX_ERROR_BYTES = 65536

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_MAX_TOKEN = 2**63 - 1
_JOB_ID = re.compile(r"[0-9a-f]{16}")
_DEFAULT_CONSUMER = f"{socket.gethostname()}:{os.getpid()}"


def validate_queue_name(name: object) -> str:
    """``name`` if it follows the key rules and is at most 255 UTF-8 bytes."""
    return validate_name(name, "queue name", MAX_QUEUE_NAME_BYTES)


def _consumer(consumer: object) -> str:
    if consumer is None:
        return _DEFAULT_CONSUMER
    return validate_name(consumer, "consumer")


def _duration_ms(value: object, what: str) -> int:
    """``value`` (seconds or ``timedelta``, finite, >= 0, at most 100 years) in whole
    milliseconds, rounded up (a delay never ends early)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise InvalidArgumentError(
            f"{what} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    try:
        seconds = float(seconds)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgumentError(f"{what} must be at most {MAX_TTL_SECONDS} seconds (100 years)")
    return math.ceil(seconds * 1000)


def _lease_ms(lease: object, what: str = "lease") -> int:
    """``lease`` (or another positive duration named ``what``) under the TTL rules, in ms."""
    try:
        return validate_ttl(lease)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(str(exc).replace("ttl", what, 1)) from None


def _priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidArgumentError(f"priority must be an int, not {type(priority).__name__}")
    if not _INT32_MIN <= priority <= _INT32_MAX:
        raise InvalidArgumentError(
            f"priority must fit in 32 bits (-2**31 .. 2**31 - 1), not {priority}"
        )
    return int(priority)  # an int subclass (IntEnum) would reach the wire as its repr


def _max_attempts(max_attempts: object) -> int:
    if max_attempts is None:
        return DEFAULT_MAX_ATTEMPTS
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise InvalidArgumentError(
            f"max_attempts must be an int or None, not {type(max_attempts).__name__}"
        )
    if not 1 <= max_attempts <= _INT32_MAX:
        raise InvalidArgumentError(f"max_attempts must be from 1 to 2**31 - 1, not {max_attempts}")
    return int(max_attempts)


def _job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
        raise InvalidArgumentError(
            f"not a job id: {job_id!r} (put() returns ids of 16 lowercase hex digits)"
        )
    return job_id


def _error(error: object) -> str | None:
    if error is None:
        return None
    if not isinstance(error, str):
        raise InvalidArgumentError(f"error must be a str or None, not {type(error).__name__}")
    if "\x00" in error:  # PostgreSQL text cannot hold U+0000; refused alike everywhere
        raise InvalidArgumentError("error must not contain U+0000 (NUL)")
    try:
        size = len(error.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError("error must be valid Unicode (no lone surrogates)") from None
    if size > MAX_ERROR_BYTES:
        raise InvalidArgumentError(
            f"error must be at most {MAX_ERROR_BYTES} UTF-8 bytes, not {size}"
        )
    return error


class Queue:
    """One durable work queue of a namespace: ``store.queue(name)``. Creating it does no I/O."""

    __slots__ = ("_backend", "_check_open", "_max_value_bytes", "_name")

    def __init__(
        self,
        backend: QueueBackend,
        name: str,
        check_open: Callable[[], None],
        max_value_bytes: int,
    ) -> None:
        self._backend = backend
        self._name = validate_queue_name(name)
        self._check_open = check_open
        self._max_value_bytes = max_value_bytes

    def __repr__(self) -> str:
        return f"<Queue {self._name!r} namespace={self._backend.namespace!r}>"

    @property
    def name(self) -> str:
        return self._name

    @property
    def namespace(self) -> str:
        return self._backend.namespace

    @property
    def backend(self) -> QueueBackend:
        """The technology's queue primitive (the typed seam)."""
        return self._backend

    # ------------------------------------------------------------------ producing

    async def put(
        self,
        payload: Any,
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        dedupe_key: str | None = None,
        max_attempts: int | None = None,
    ) -> str:
        """Enqueue one job and return its id (durable once this returns, on durable backends).

        ``delay``: not ready before that many seconds from now (server clock). ``dedupe_key``:
        while a job with that key is ready, delayed or claimed in this queue, return its id and
        change nothing; once it is done or dead the key is free again.
        """
        data = encode_value(payload, self._max_value_bytes)
        key = None if dedupe_key is None else validate_name(dedupe_key, "dedupe key")
        job = NewJob(
            data,
            _priority(priority),
            0 if delay is None else _duration_ms(delay, "delay"),
            _max_attempts(max_attempts),
            key,
        )
        self._check_open()
        ids = await self._backend.put(self._name, [job])
        return ids[0]

    async def put_many(
        self,
        payloads: Iterable[Any],
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
    ) -> list[str]:
        """Enqueue one job per payload, with the same options; their ids, in order.

        Every payload is validated first: one bad payload enqueues nothing. The jobs go in a few
        round trips (one statement or transaction on PostgreSQL and SQLite, one script per
        1,000 jobs on Redis), in order, so they are claimed in this order at equal priority.
        """
        if isinstance(payloads, (str, bytes, dict)):
            raise InvalidArgumentError(
                "payloads must be an iterable of job payloads, not a single "
                f"{type(payloads).__name__}"
            )
        try:
            items = list(payloads)
        except TypeError:
            raise InvalidArgumentError(
                f"payloads must be an iterable, not {type(payloads).__name__}"
            ) from None
        prio = _priority(priority)
        delay_ms = 0 if delay is None else _duration_ms(delay, "delay")
        attempts = _max_attempts(max_attempts)
        limit = self._max_value_bytes
        jobs = [NewJob(encode_value(p, limit), prio, delay_ms, attempts, None) for p in items]
        if not jobs:
            return []
        self._check_open()
        return await self._backend.put(self._name, jobs)

    # ------------------------------------------------------------------ consuming

    async def claim(
        self,
        *,
        consumer: str | None = None,
        lease: float | timedelta = DEFAULT_JOB_LEASE,
        wait: float | timedelta | None = None,
    ) -> Job | None:
        """Claim the next ready job for ``lease`` seconds, or ``None``.

        ``consumer`` names the claimer (default ``host:pid``); it is informational: what
        protects the job is the claim's ``token``. With ``wait``, waits up to that many seconds
        for a job: a ``put`` in any process wakes it within 100 ms.
        """
        jobs = await self._claim(1, consumer, lease, wait)
        return jobs[0] if jobs else None

    async def claim_many(
        self,
        n: int,
        *,
        consumer: str | None = None,
        lease: float | timedelta = DEFAULT_JOB_LEASE,
        wait: float | timedelta | None = None,
    ) -> list[Job]:
        """Claim up to ``n`` ready jobs in claim order, in one or a few round trips (``n=0``:
        ``[]``). With ``wait``, returns as soon as at least one job was claimed."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidArgumentError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise InvalidArgumentError(f"n must be >= 0, not {n}")
        return await self._claim(int(min(n, _INT32_MAX)), consumer, lease, wait)

    async def _claim(self, n: int, consumer: object, lease: object, wait: object) -> list[Job]:
        who = _consumer(consumer)
        lease_ms = _lease_ms(lease)
        wait_s = validate_wait(wait)
        self._check_open()
        if n == 0:
            return []
        backend = self._backend
        if not wait_s:
            jobs, _ = await backend.claim(self._name, who, lease_ms, n)
            return jobs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        await backend.listen()
        with backend.watch(backend.claim_key(self._name)) as watch:
            while True:
                self._check_open()  # a store closed while this waited: no claim from it
                jobs, next_ms = await backend.claim(self._name, who, lease_ms, n)
                if jobs:
                    watch.granted = True
                    return jobs
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                pause = min(remaining, backend.poll_interval)
                if next_ms is not None:
                    pause = min(pause, next_ms / 1000 + 0.002)
                await watch.wait(pause)

    def _claim_of(self, job: object) -> tuple[str, int]:
        """``job``'s id and token, checked to be a claim of this queue, before any I/O."""
        if not isinstance(job, Job):
            raise InvalidArgumentError(
                f"job must be a Job returned by claim(), not {type(job).__name__}"
            )
        if job.queue != self._name:
            raise InvalidArgumentError(
                f"job {job.id!r} is a job of queue {job.queue!r}, not of {self._name!r}"
            )
        if job.namespace != self._backend.namespace:
            raise InvalidArgumentError(
                f"job {job.id!r} is a job of namespace {job.namespace!r}, not of "
                f"{self._backend.namespace!r}"
            )
        token = job.token
        if isinstance(token, bool) or not isinstance(token, int) or not 1 <= token <= _MAX_TOKEN:
            raise InvalidArgumentError(
                f"job {job.id!r} is not a claim: its token must be an int from 1 to 2**63 - 1, "
                f"not {token!r}"
            )
        attempts = job.attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise InvalidArgumentError(
                f"job {job.id!r} is not a claim: its attempts must be an int >= 0, not {attempts!r}"
            )
        return _job_id(job.id), int(token)

    async def extend(self, job: Job, *, lease: float | timedelta = DEFAULT_JOB_LEASE) -> Job:
        """Extend ``job``'s claim: its lease now ends ``lease`` seconds from now. The updated
        job; :class:`~fleetmem.errors.LeaseLostError` when another claim superseded it or it
        is finished, dead or cancelled (nothing changed)."""
        job_id, token = self._claim_of(job)
        lease_ms = _lease_ms(lease)
        self._check_open()
        return await self._backend.extend(self._name, job_id, token, lease_ms)

    async def ack(
        self,
        job: Job,
        result: Any = None,
        *,
        result_ttl: float | timedelta = DEFAULT_RESULT_TTL,
    ) -> bool:
        """Finish ``job``: ``True`` if its claim still held (then ``result`` is readable through
        :meth:`result` for ``result_ttl`` seconds and the job is never claimed again);
        ``False`` if another claim superseded it or it is dead, changing nothing."""
        job_id, token = self._claim_of(job)
        data = encode_value(result, self._max_value_bytes)
        ttl_ms = _lease_ms(result_ttl, "result_ttl")
        self._check_open()
        return await self._backend.ack(self._name, job_id, token, data, ttl_ms)

    async def nack(
        self,
        job: Job,
        *,
        retry_in: float | timedelta | None = None,
        error: str | None = None,
    ) -> bool:
        """Give ``job`` back: ready again after ``retry_in`` seconds (default: the backoff
        ``min(2 ** (attempts - 1), 3600)`` s plus up to 10% jitter), or to the dead letter when
        its attempts reached ``max_attempts``; ``error`` is kept as its ``last_error``.
        ``True`` if its claim still held; ``False`` otherwise, changing nothing."""
        job_id, token = self._claim_of(job)
        if retry_in is None:
            retry_ms = backoff_ms(job.attempts, random.random() * 0.1)
        else:
            retry_ms = _duration_ms(retry_in, "retry_in")
        message = _error(error)
        self._check_open()
        return await self._backend.nack(self._name, job_id, token, retry_ms, message)

    # ------------------------------------------------------------------ inspecting

    async def cancel(self, job_id: str) -> bool:
        """Remove a job that is ready or delayed right now: it is never claimed, its dedupe key
        is free, :meth:`result` returns ``None``. ``False`` (nothing changed) for a job that is
        claimed under a live lease, done, dead or unknown."""
        jid = _job_id(job_id)
        self._check_open()
        return await self._backend.cancel(self._name, jid)

    async def result(
        self, job_id: str, *, wait: float | timedelta | None = None
    ) -> JobResult | None:
        """The :class:`JobResult` of a finished job (``status`` ``"done"`` or ``"dead"``), or
        ``None`` (unknown here, not finished yet, or its result expired). With ``wait``, waits
        up to that many seconds for it to finish: an ``ack`` in any process wakes it within
        100 ms."""
        jid = _job_id(job_id)
        wait_s = validate_wait(wait)
        self._check_open()
        backend = self._backend
        found = await backend.result(self._name, jid)
        if found is not None or not wait_s:
            return found
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        await backend.listen()
        with backend.watch(backend.result_key(jid)) as watch:
            await backend.await_result(self._name, jid)
            while True:
                self._check_open()
                found = await backend.result(self._name, jid)
                if found is not None:
                    watch.granted = True
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await watch.wait(min(remaining, backend.poll_interval))

    async def stats(self) -> QueueStats:
        """How many jobs of this queue are ready, delayed, claimed, dead, and done (results
        still held)."""
        self._check_open()
        return await self._backend.stats(self._name)

    async def dead(self, limit: int = 100, after: str | None = None) -> list[Job]:
        """Dead jobs of this queue, ascending by id, at most ``limit``; ``after``: the last id
        of the previous page."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidArgumentError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 0:
            raise InvalidArgumentError(f"limit must be >= 0, not {limit}")
        start = None if after is None else _job_id(after)
        self._check_open()
        if limit == 0:
            return []
        return await self._backend.dead(self._name, int(min(limit, _INT32_MAX)), start)

    async def retry_dead(self, ids: Iterable[str] | None = None) -> int:
        """Move dead jobs (all, or those of ``ids``) back to ready now with ``attempts`` reset
        to 0; how many moved. A dead job whose dedupe key another live job holds stays dead."""
        chosen: list[str] | None = None
        if ids is not None:
            if isinstance(ids, str):
                raise InvalidArgumentError("ids must be an iterable of job ids, not a single str")
            try:
                chosen = list(dict.fromkeys(_job_id(i) for i in ids))
            except TypeError:
                raise InvalidArgumentError(
                    f"ids must be an iterable of job ids, not {type(ids).__name__}"
                ) from None
            if not chosen:
                self._check_open()
                return 0
        self._check_open()
        return await self._backend.retry_dead(self._name, chosen)

    async def purge_dead(self) -> int:
        """Remove every dead job of this queue; how many."""
        self._check_open()
        return await self._backend.purge_dead(self._name)
