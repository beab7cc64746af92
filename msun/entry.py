"""The ``msun`` console script (see ``ckascope.entry`` for why entry points are separate)."""

from __future__ import annotations

from ckascope.platform import run


def main() -> None:
    """The ``msun`` command."""
    run("msun.cli")
