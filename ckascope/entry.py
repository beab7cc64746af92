"""Console-script entry points: Ctrl-C is handled from the first instant.

Importing the command line takes seconds (torch); a Ctrl-C in that time would otherwise end in
a KeyboardInterrupt traceback. Until the command line is imported, SIGINT exits quietly with
130; then ``FriendlyGroup`` handles it (one line, exit 130).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("Error: interrupted\n")
    raise SystemExit(130)


def run(module: str) -> None:
    """Imports ``module`` (defining the click group ``main``) under the quiet handler; runs it."""
    signal.signal(signal.SIGINT, _interrupted)
    cli = __import__(module, fromlist=["main"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli.main()


def ckascope() -> None:
    """The ``ckascope`` command."""
    run("ckascope.cli")
