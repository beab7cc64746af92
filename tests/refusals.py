"""The rule every refused command-line call keeps (tests/test_reliability.py, tests/test_hostile.py):
a non-zero exit, exactly one line on stderr naming the problem, no traceback, no new file."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner


def snapshot(root: Path) -> set[Path]:
    """Every path under ``root`` but the (offline, empty) torch cache a weights lookup may make."""
    return {p for p in root.rglob("*") if "torch-home" not in p.relative_to(root).parts}


def assert_refused(command: click.Command, argv: list[str], needle: str, root: Path) -> str:
    """Runs ``command argv`` and checks the rule; returns the one line."""
    before = snapshot(root)
    result = CliRunner().invoke(command, argv)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (result.exit_code, result.output, result.exception)
    assert lines[0].startswith("Error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(root) - before == set()
    return lines[0]
