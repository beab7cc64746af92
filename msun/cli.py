"""The ``msun`` command line."""

from __future__ import annotations

import click

from ckascope.cliutils import FriendlyGroup
from msun import __version__


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msun")
def main() -> None:
    """Multi-scale Unified Network: build, train, evaluate and count FLOPs."""


if __name__ == "__main__":  # torchrun --nproc_per_node N -m msun.cli train ...
    main()
