"""msun.config: YAML values read as their options' types, and bad msun train input refused in one
line."""

from __future__ import annotations

import sys
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
def test_bad_input_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
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


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_runs_own_config_trains_a_baseline_once_none_unsets_msuns_options(
    tmp_path: Path,
) -> None:
    first = train_tiny(tmp_path / "first", "--epochs", "1")
    assert first.exit_code == 0, first.output
    assert "| 1 epoch on cpu" in first.stdout  # one epoch, not "1 epochs"
    saved = tmp_path / "first" / "config.yaml"
    base = ["train", "--config", str(saved), "--method", "vanilla"]
    refused = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert f"--split-at layer2 (from {saved})" in refused.stderr
    assert f"give --split-at none --si-threshold none to unset what {saved} sets" in (
        refused.stderr
    )
    assert not (tmp_path / "refused").exists()
    unset = ["--split-at", "none", "--si-threshold", "none", "--out", str(tmp_path / "vanilla")]
    vanilla = CliRunner().invoke(main, [*base, *unset])
    assert vanilla.exit_code == 0, vanilla.output
    written = yaml.safe_load((tmp_path / "vanilla" / "config.yaml").read_text())
    assert (written["method"], written["split_at"], written["si_threshold"]) == (
        "vanilla",
        None,
        None,
    )


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_an_auto_runs_config_repeats_its_chosen_split_and_trains_a_baseline(
    tmp_path: Path,
) -> None:
    """The README's two uses of a run's config.yaml, for a --split-at auto run: its cka_from
    records where its split came from, and asks for no analysis when the file is read again."""
    import numpy as np

    from ckascope.result import CKAResult

    layers = ["maxpool", *(f"layer{s}.{i}" for s in range(1, 5) for i in range(2))]
    settings = {"mode": "scales", "model": "resnet18", "arch": "resnet18", "scales": [16, 32]}
    CKAResult(np.full((1, 9, 9), 0.9), layers, layers, settings).save(tmp_path / "cka")
    auto = ["--split-at", "auto", "--cka-from", str(tmp_path / "cka")]
    assert train_tiny(tmp_path / "auto", "--epochs", "1", *auto).exit_code == 0
    saved = tmp_path / "auto" / "config.yaml"
    chosen = yaml.safe_load(saved.read_text())["split_at"]
    assert chosen != "auto"
    again = CliRunner().invoke(
        main, ["train", "--config", str(saved), "--out", str(tmp_path / "r")]
    )
    assert again.exit_code == 0, again.output
    repeated = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (repeated["split_at"], repeated["cka_from"]) == (chosen, None)
    assert not (tmp_path / "r" / "split-analysis").exists()  # no analysis: the split is chosen
    baseline = ["--method", "vanilla", "--split-at", "none", "--si-threshold", "none"]
    base = ["train", "--config", str(saved), *baseline, "--out", str(tmp_path / "vanilla")]
    vanilla = CliRunner().invoke(main, base)
    assert vanilla.exit_code == 0, vanilla.output
    written = yaml.safe_load((tmp_path / "vanilla" / "config.yaml").read_text())
    assert (written["method"], written["split_at"], written["cka_from"]) == ("vanilla", None, None)


@pytest.mark.parametrize(
    ("file", "flags", "needle"),
    [
        ("cka_from: cka\n", [], "--cka-from cka (from {file}) is the analysis behind"),
        ("split_at: layer2\ncka_from: cka\n", ["--cka-from", "x"], "--cka-from is the analysis"),
        # a recipe of the user's (not a run's config.yaml): its cka_from is a request
        ("split_at: layer2\ncka_from: cka\n", [], "--cka-from cka (from {file}) is the analysis"),
    ],
    ids=["set-by-a-file-without-a-split", "given-on-the-command-line", "a-recipe-with-a-split"],
)
def test_cka_from_without_split_at_auto_is_refused(
    tmp_path: Path, file: str, flags: list[str], needle: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(file)
    result = train_tiny(tmp_path / "run", "--config", str(config), *flags)
    assert result.exit_code == 2, result.output
    assert needle.format(file=config) in result.stderr
    assert "Hint: add --split-at auto" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_the_config_file_is_named_a_folder(tmp_path: Path) -> None:
    from ckascope.platform import InputError
    from msun.config import load_yaml

    with pytest.raises(InputError, match=r"is a folder, not a YAML file\. Hint: give the YAML"):
        load_yaml(tmp_path)
    (tmp_path / "config.yaml").write_text("epochs: 1\n")  # a run folder: its own options
    with pytest.raises(InputError, match=f"Hint: give {tmp_path / 'config.yaml'}, the options"):
        load_yaml(tmp_path)


def test_none_is_a_word_of_the_command_line_only(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("split_at: none\n")  # a file's value is read as it always was
    result = train_tiny(tmp_path / "run", "--config", str(config))
    assert result.exit_code == 2
    assert "'none' is not a split point of resnet18" in result.stderr
    bad = train_tiny(tmp_path / "run", "--si-threshold", "tiny")
    assert bad.exit_code == 2
    assert "'tiny' is not a number (or none)" in bad.stderr


def test_a_resume_asking_for_another_network_names_only_what_was_asked(tmp_path: Path) -> None:
    from ckascope.platform import InputError
    from msun.config import TrainConfig, dump_yaml, run_options

    run = TrainConfig(model="resnet18", method="msun", split_at="layer2", data="fashionmnist")
    (tmp_path / "config.yaml").write_text(dump_yaml(run))
    with pytest.raises(InputError, match=r"another network \(method: 'msun' -> 'vanilla'\)\."):
        run_options(tmp_path, {"model": "resnet18", "method": "vanilla"})
    kept = run_options(tmp_path, {"model": "resnet18"})  # the same network: its own options
    assert (kept["split_at"], kept["data"]) == ("layer2", "fashionmnist")


def test_a_run_keeps_its_precision_on_resume_while_a_new_one_is_refused_fp16_on_a_cpu() -> None:
    from ckascope.platform import InputError
    from msun.config import TrainConfig, check

    cfg = TrainConfig(model="resnet18", amp="fp16", device="cpu")
    with pytest.raises(InputError, match="--amp fp16 is mixed precision for CUDA GPUs"):
        check(cfg)
    check(cfg, resume=True)  # a GPU run in fp16 may go on on a CPU: its checkpoint decides
