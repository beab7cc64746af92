from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_root_cli_combines_both_groups() -> None:
    done = _run("cli.py", "--help")
    assert done.returncode == 0
    assert "ckascope" in done.stdout
    assert "msun" in done.stdout
    assert "compare" in _run("cli.py", "ckascope", "--help").stdout


def test_module_entry_points_and_unknown_command() -> None:
    assert _run("-m", "ckascope", "--version").stdout.strip() == "ckascope, version 0.1.0"
    assert _run("-m", "msun", "--help").returncode == 0
    bad = _run("-m", "ckascope", "frobnicate")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "Error: No such command 'frobnicate'. (see 'python -m ckascope --help')"
    ]


def test_cli_module_is_not_installed_as_top_level_package() -> None:
    import importlib.metadata

    files = importlib.metadata.files("ckascope") or []
    assert not any(str(f) == "cli.py" for f in files)


def test_models_listing() -> None:
    from ckascope.cli import main

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "resnet50" in result.stdout.split()
