"""Tiny ``msun train`` runs (resnet18 on 32-px synthetic images, seconds each) through the CLI,
shared by the tests of msun.train, msun.runstate, msun.data and msun.config."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from msun.cli import main
from tests import tinyrun

#: A tiny run without its length: 32 training images at lr 0.05.
TINY = [*tinyrun.MODEL, "--num-train", "32", "--lr", "0.05"]


def train_tiny(out: Path, *extra: str) -> Result:
    """``msun train`` of a tiny run into ``out`` in this process, with ``extra`` options."""
    return CliRunner().invoke(main, ["train", *TINY, "--out", str(out), *extra])
