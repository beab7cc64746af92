"""msun.config: YAML values read as their options' types, and bad msun train input refused in one
line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from msun.cli import main
from tests.msun.runs import TINY, train_tiny


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "distill"], "'--method'"),
        (["--data", "/no/such/dir"], "does not exist"),
        (["--batch-size", "1"], "at least 2 images"),
        (["--split-at", "layer9"], "layer1"),
        (["--scales", "32", "16"], "increasing"),
        (["--linear-probe"], "--init-from"),
        (["--eval-sizes", "a:b"], "start:stop:step"),
        (["--resume"], "does not exist"),
        (["--tensorboard"], "tensorboard"),
    ],
)
def test_bad_input_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    if "--tensorboard" in args and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: the option works")
    result = train_tiny(tmp_path / "bad", "--epochs", "1", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_yaml_values_are_read_as_their_option_types(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("lr: 2e-2\nscales: 16 32\nepochs: 1\nmethod: msun\n")
    flags = [
        "--model",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--num-train",
        "32",
        "--num-val",
        "8",
        "--eval-sizes",
        "16,32",
    ]
    result = CliRunner().invoke(
        main, ["train", *flags, "--config", str(config), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 0.02
    assert saved["scales"] == [16, 32]
    config.write_text("epochs: 1.5\n")
    bad = CliRunner().invoke(
        main, ["train", *TINY, "--config", str(config), "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code == 2
    assert "epochs takes int" in bad.stderr
