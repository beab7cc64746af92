"""``python cli.py ckascope ...`` / ``python cli.py msun ...``: both tools from a checkout."""

from __future__ import annotations

import click

import ckascope.cli
import msun.cli
from ckascope.cliutils import FriendlyGroup


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ckascope (cross-scale CKA) and msun (Multi-scale Unified Network)."""


main.add_command(ckascope.cli.main, name="ckascope")
main.add_command(msun.cli.main, name="msun")

if __name__ == "__main__":
    main()
