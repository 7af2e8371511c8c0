#!/usr/bin/env python3
"""authproxy benchmark: authproxy against nginx as a peer proxy and against no proxy at all.

One command, everything on 127.0.0.1, in a temporary work directory::

    python bench/run.py [--smoke] [--rounds N] [--duration S] [--out DIR] [--keep] [--workers]
    python -m bench ...                  # the same

It starts an upstream nginx (a ~200-byte JSON file, a large file, an upload
sink), a second nginx as the peer proxy a user would otherwise deploy, two
authproxy processes (a static header route and an OAuth2 client-credentials
route whose token comes from the getpaid fake in its own process), then runs
wrk at several concurrencies and curl for large downloads and uploads,
interleaved over several rounds. It prints a markdown report and writes
``bench-<UTC timestamp>.md`` and ``.json`` into ``--out``. See bench/README.md.

The harness is the `bench` package beside this file: `targets` (what runs),
`measure` (wrk, curl, /proc), `summary` and `report`; this file only starts it.

Exit codes: 0 done, 1 a failure (a target misbehaved, a process died), 2 usage
or a missing tool (nginx, wrk, curl), 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the package from the repository root, and keep
    # bench/ itself off the path (bench/profile.py would shadow the stdlib's).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.main import main

if __name__ == "__main__":
    sys.exit(main())
