"""Console-script entry points: Ctrl-C handled from the first instant, OpenMP set for sharing.

Importing the command line takes seconds (torch); a Ctrl-C in that time would otherwise end in
a KeyboardInterrupt traceback. Until the command line is imported, SIGINT exits quietly with
130 (one line, from rank 0 alone under torchrun); then ``FriendlyGroup`` handles it (the same).

Before torch loads, the commands tell its OpenMP runtime (libgomp) to spin only briefly before
a waiting thread sleeps (``GOMP_SPINCOUNT``), unless the environment sets a policy itself. With
libgomp's own spinning, a training step on 2 cores took 3.7x as long as on a quiet machine when
another process kept one core busy; with this setting 2.0x, for 1.11x when quiet
(benchmarks/bench_threads.py, benchmarks/README.md).
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

#: Busy-wait iterations of an idle OpenMP thread before it sleeps (libgomp's own: 300 000).
SPINCOUNT = "1000"


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # torchrun sends Ctrl-C to every process: rank 0 says it for the job (as cliutils.fail)
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write("Error: interrupted\n")
    raise SystemExit(130)


def share_cores() -> None:
    """Sets libgomp's spin count before torch loads, unless a policy is set already."""
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT


def run(module: str) -> None:
    """Imports ``module`` (defining the click group ``main``) under the quiet handler; runs it."""
    share_cores()
    signal.signal(signal.SIGINT, _interrupted)
    cli = __import__(module, fromlist=["main"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.main()


def ckascope() -> None:
    """The ``ckascope`` command."""
    run("ckascope.cli")
