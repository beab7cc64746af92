"""``python cli.py ckascope ...`` / ``python cli.py msun ...``: both tools from a checkout."""

from __future__ import annotations

from ckascope.entry import share_cores

share_cores()  # before torch loads (ckascope.entry)

import click  # noqa: E402

import ckascope.cli  # noqa: E402
import msun.cli  # noqa: E402
from ckascope.cliutils import FriendlyGroup  # noqa: E402


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ckascope (cross-scale CKA) and msun (Multi-scale Unified Network)."""


main.add_command(ckascope.cli.main, name="ckascope")
main.add_command(msun.cli.main, name="msun")

if __name__ == "__main__":
    main()
