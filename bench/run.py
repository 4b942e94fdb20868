"""Run fleetmem's benchmarks: ``python bench/run.py [--quick] [--only postgres,redis,hybrid]``.

The same as ``fleetmem bench`` (which, from a source checkout, runs this file); see the
``suite`` package next to it for what is measured and how. The benchmarks are not part of the
fleetmem package: run them from a checkout, with ``pip install -e '.[bench]'`` for the peers.
"""

from __future__ import annotations

import sys

from suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
