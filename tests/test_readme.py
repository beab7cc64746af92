"""The README's examples run as written: every Python block, and the shell commands that are
cheap enough for the suite (the others state their cost in the README)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ckascope.idxdata import SYSTEM_COPIES

README = Path(__file__).parents[1] / "README.md"
BIN = Path(sys.executable).parent  # the environment's ckascope and msun commands

#: Commands run as the README writes them, in this order (a later one may read an earlier output).
CHEAP = [
    "msun flops --model resnet18 --scales 4 16 28",
    "msun split-points densenet121",
    "ckascope compare --model resnet18 --weights none --scales 32 64 --num-images 192 "
    "--batch-size 16 --bootstrap 200 --permutations 20 --out ckascope-out/calibrated",
    "ckascope plot ckascope-out/calibrated --out slides/cka --annotate",
    "ckascope suggest-split --from ckascope-out/calibrated",
]
FASHION = [
    "ckascope compare --model resnet18 --weights none --data fashionmnist --scales 4 28 "
    "--num-images 1280",
    "msun train --model resnet18 --data fashionmnist --image-size 28 --scales 4 16 28 "
    "--batch-size 32 --steps-per-epoch 5 --epochs 1 --out runs/first",
    "msun eval runs/first/last.pt --num-val 1000",
]


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    lines = (line.split("#")[0].strip() for line in joined.splitlines())
    return [" ".join(line.split()) for line in lines if line]


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool, *args = shlex.split(command)
    return subprocess.run(
        [str(BIN / tool), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_every_python_block_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]


def _run_as_written(commands: list[str], cwd: Path) -> str:
    """Runs each command, which must be in the README verbatim; returns the last one's output."""
    written = shell_commands()
    for command in commands:
        assert command in written, f"the README no longer has: {command}"
        done = _run(command, cwd)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "warning" not in done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_the_cheap_commands_run_as_written(tmp_path: Path) -> None:
    stability = _run_as_written(CHEAP, tmp_path)  # suggest-split on the calibrated result
    assert (tmp_path / "slides" / "cka" / "heatmap.pdf").is_file()  # drawn again, annotated
    assert "stability:" in stability
    assert "too few to judge" not in stability  # 12 minibatches: enough to judge


@pytest.mark.skipif(
    not SYSTEM_COPIES["fashionmnist"][0].is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_the_fashion_mnist_commands_run_as_written(tmp_path: Path) -> None:
    _run_as_written(FASHION, tmp_path)
    assert (tmp_path / "msun-eval" / "figure4.png").is_file()
