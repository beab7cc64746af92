"""The ``ckascope`` command line."""

from __future__ import annotations

import click

from ckascope import __version__
from ckascope.cliutils import FriendlyGroup


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckascope")
def main() -> None:
    """See how every layer of a CNN reacts when the same images arrive at another scale."""
