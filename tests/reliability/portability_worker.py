"""The writer process of ``test_portability_faults.py``: rounds over one family of keys.

Run as ``python portability_worker.py '<json spec>'``. It opens the store the spec names (see
:func:`change_worker.open_store`), prints ``{"event": "ready"}`` and waits for ``go`` on stdin.
Then it writes rounds ``r = 1, 2, ...``: in round ``r`` it sets ``<family>a00``, ``<family>a01``,
... ``<family>a99`` to ``r``, one ``set`` at a time, in ascending key order, each waiting for the
one before; after each round it prints ``{"event": "round", "r": r, "t": <when>}`` (``t`` on
the machine's monotonic clock, which every process on Linux shares). So at any instant the
family reads ``r`` up to some key and ``r - 1`` after it: along the key order the values never
increase and differ by at most 1, and a point-in-time view shows exactly that.

It stops after the round during which ``stop`` arrived on stdin (or stdin closed, or
``seconds`` passed) and prints ``{"event": "done", "r": <last complete round>}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from change_worker import open_store

#: The keys of a family, in ascending order (after its prefix).
FAMILY_KEYS = tuple(f"a{n:02d}" for n in range(100))


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _listen(go: threading.Event, stop: threading.Event) -> None:
    """Read stdin on a daemon thread (it never holds the process up at exit)."""
    for line in sys.stdin:
        word = line.strip()
        if word == "go":
            go.set()
        elif word == "stop":
            break
    go.set()
    stop.set()


async def write_rounds(store: Any, family: str, seconds: float, stop: threading.Event) -> int:
    """Write rounds until ``stop`` is set or ``seconds`` passed; the last complete round."""
    keys = [family + key for key in FAMILY_KEYS]
    deadline = time.monotonic() + seconds
    done = 0
    while not stop.is_set() and time.monotonic() < deadline:
        round_number = done + 1
        for key in keys:
            await store.set(key, round_number)
        done = round_number
        _emit({"event": "round", "r": done, "t": time.monotonic()})
    return done


async def main(spec: dict[str, Any]) -> None:
    go, stop = threading.Event(), threading.Event()
    threading.Thread(target=_listen, args=(go, stop), daemon=True).start()
    async with open_store(spec) as store:
        await store.exists(spec["family"] + FAMILY_KEYS[0])  # connected before the start
        _emit({"event": "ready"})
        while not go.is_set():
            await asyncio.sleep(0.01)
        last = await write_rounds(store, spec["family"], spec.get("seconds", 60.0), stop)
    _emit({"event": "done", "r": last})


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
