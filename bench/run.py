"""Run fleetmem's benchmarks: ``python bench/run.py [--quick] [--only postgres,redis,hybrid]``.

The same as ``fleetmem bench``; see ``fleetmem.bench`` for what is measured and how.
"""

from __future__ import annotations

import sys

from fleetmem.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
