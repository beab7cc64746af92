from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckascope.cli import main
from ckascope.result import CKAResult

SMALL = [
    "--weights",
    "none",
    "--num-classes",
    "10",
    "--image-size",
    "48",
    "--resize-size",
    "56",
    "--scales",
    "16",
    "48",
    "--batch-size",
    "8",
    "--num-images",
    "16",
    "--layers",
    "stages",
]
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_compare_writes_result_figures_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["compare", "--model", "resnet18", *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Cross-scale CKA" in result.stdout
    assert "layer4" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "cka.csv",
        "curve.pdf",
        "curve.png",
        "heatmap.pdf",
        "heatmap.png",
        "matrices.npz",
        "result.json",
    ]
    saved = CKAResult.load(out)
    assert saved.settings["model"] == "resnet18"
    assert saved.settings["scales"] == [16, 48]
    assert saved.settings["weights"] == "none"
    assert saved.settings["images_used"] == 16
    assert saved.settings["memory_format"] == "channels_last"  # auto, for a CNN on a CPU
    assert saved.settings["precision"] == "float32"


def test_compare_two_models(tmp_path: Path) -> None:
    out = tmp_path / "two"
    args = [
        "compare",
        "--model",
        "resnet18",
        "--model-b",
        "resnet34",
        "--weights-b",
        "none",
        "--scale",
        "32",
    ]
    small = SMALL[:8] + SMALL[11:]  # everything but --scales 16 48
    layout = ["--memory-format", "contiguous", "--precision", "bf16"]
    result = CliRunner().invoke(main, [*args, *small, *layout, "--out", str(out), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "Best match per layer" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["cka.csv", "matrices.npz", "result.json"]
    settings = CKAResult.load(out).settings
    assert settings["model_b"] == "resnet34"
    assert (settings["memory_format"], settings["precision"]) == ("contiguous", "bf16")


def test_two_models_at_a_scale_run_at_that_scale_and_the_title_says_what_ran(
    tmp_path: Path,
) -> None:
    from ckascope.plot import _title

    out = tmp_path / "two"
    args = ["compare", "--model", "resnet18", "--model-b", "resnet34", "--weights", "none"]
    args += ["--weights-b", "none", "--num-classes", "10", "--scale", "32", "--batch-size", "8"]
    args += ["--num-images", "16", "--layers", "stages", "--out", str(out), "--no-figures"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = CKAResult.load(out)
    assert (saved.settings["image_size"], saved.settings["scales"]) == (32, [32, 32])
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # like any folder the user makes
    title = _title(saved)
    assert "at 32 px" in title
    assert "random weights" in title
    assert "synthetic images" in title


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--model", "resnet5O"], 2, "did you mean 'resnet50'"),
        (["--model", "resnet18", "--scales", "0", "224"], 2, "range"),
        (["--model", "resnet18", "--scales", "32"], 2, "'--scales'"),
        (["--model", "resnet18", "--layers", "layer9"], 2, "unknown layer"),
        (["--model", "resnet18", "--batch-size", "2"], 2, "at least 4"),
        (["--model", "resnet18", "--device", "cuda:0"], 2, "CUDA is not available"),
        (["--model", "resnet18", "--data", "/no/such/folder"], 2, "does not exist"),
        (["--model", "resnet18", "--model-b", "resnet34", "--scales", "32", "224"], 2, "--scale S"),
        ([], 2, "no model given"),
    ],
)
def test_bad_input_one_line_no_traceback_no_files(
    tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", "--weights", "none", *args, "--out", str(out)])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_vit_at_another_image_size_is_told_the_size_it_takes(tmp_path: Path) -> None:
    args = ["compare", "--model", "vit_b_16", "--weights", "none", "--image-size", "32"]
    args += ["--num-images", "8", "--batch-size", "8", "--layers", "encoder.layers.encoder_layer_0"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Hint: this model takes 224-px inputs only: pass --image-size 224" in result.stderr
    assert "needs --protocol upsample" not in result.stderr  # upsample is already the default


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--scale", "16"], "--scale is the one scale two models"),  # was dropped
        (["--model-b", "resnet34", "--scales", "16", "32"], "Hint: use --scale S"),
        (["--checkpoint-b", "{missing}", "--scales", "16", "32"], "Hint: use --scale S"),
        (["--layers-b", "stages"], "--layers-b names the second model's layers"),
        (["--weights-b", "default"], "--weights-b sets the second model's weights"),  # a default
        (["--ci", "0.95"], "--ci sets the coverage of the bootstrap interval"),  # typed out
        (["--sigma-frac", "1.0"], "--sigma-frac sets the RBF kernel's bandwidth"),
        (["--bandwidth", "first"], "--bandwidth chooses how the RBF kernel's bandwidth"),
        (["--annotate", "--no-figures"], "--annotate prints each cell's CKA in the heatmap"),
        (
            ["--checkpoint", "{missing}", "--weights", "default"],
            "--weights loads pretrained weights, and --checkpoint's weights are the ones",
        ),
        (
            ["--model-b", "resnet34", "--checkpoint-b", "{missing}", "--weights-b", "default"],
            "--weights-b loads pretrained weights, and --checkpoint-b's weights are the ones",
        ),
        (
            ["--checkpoint", "{missing}", "--num-classes", "5"],
            "--num-classes sets the classes of a model built from its name, and every model",
        ),
        (
            ["--checkpoint", "{missing}", "--checkpoint-b", "{missing}", "--num-classes", "1000"],
            "--num-classes sets the classes",  # 1000: the default, typed out
        ),
    ],
)
def test_an_option_that_does_not_apply_is_refused_before_any_work(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    from tests.refusals import assert_refused

    missing = str(tmp_path / "missing.pt")  # refused before the checkpoint is read
    argv = ["compare", "--model", "resnet18", "--weights", "none", "--out", str(tmp_path / "o")]
    line = assert_refused(
        main, [*argv, *(a.format(missing=missing) for a in args)], needle, tmp_path
    )
    assert "does not exist" not in line
    assert "Hint: " in line


def test_overwrite_without_out_is_refused_a_default_folder_replaces_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.refusals import assert_refused

    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--model", "resnet18", "--weights", "none", "--overwrite"]
    line = assert_refused(main, argv, "--overwrite lets --out replace an earlier result", tmp_path)
    assert "Hint: add --out FOLDER, or drop --overwrite" in line


def test_options_count_when_given_and_defaults_never_trigger_the_check() -> None:
    from ckascope.config import CompareConfig, check_applies
    from ckascope.errors import InputError

    check_applies(CompareConfig(model="resnet18"), explicit=set())  # every default
    check_applies(CompareConfig(model="resnet18"))  # a Python caller: nothing changed
    given = {
        "model": "resnet18",
        "model_b": "resnet34",
        "weights_b": "none",
        "scale": 16,
        "layers_b": "stages",
        "kernel": "rbf",
        "sigma_frac": 0.5,
        "bandwidth": "first",
        "bootstrap": 10,
        "ci": 0.9,
        "annotate": True,
    }
    check_applies(CompareConfig(**given), explicit=given.keys())  # each of them applies
    one_built = {"checkpoint": Path("a.pt"), "model_b": "resnet34", "num_classes": 5}
    check_applies(CompareConfig(**one_built))  # --model-b is built from its name: it applies
    with pytest.raises(InputError, match="--scale is the one scale"):
        check_applies(CompareConfig(model="resnet18", scale=16))  # changed: the API can tell
    check_applies(CompareConfig(model="resnet18", ci=0.95))  # the default, not given
    with pytest.raises(InputError, match="--ci sets the coverage"):
        check_applies(CompareConfig(model="resnet18", ci=0.95), explicit={"model", "ci"})


def test_foreign_output_folder_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not touch")
    result = CliRunner().invoke(main, ["compare", "--model", "resnet18", *SMALL, "--out", str(out)])
    assert result.exit_code == 2
    assert "not an earlier ckascope result" in result.stderr
    assert "--overwrite" not in result.stderr  # it would not help: never suggested
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_subprocess_and_torchrun_two_processes_equal_one(tmp_path: Path) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    cmd = [
        "compare",
        "--model",
        "resnet18",
        *SMALL,
        "--num-images",
        "32",
        "--repeats",
        "2",
        "--no-figures",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "ckascope", *cmd, "--out", str(single)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ckascope",
    ]
    two = subprocess.run(
        [*run, *cmd, "--out", str(double)], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr
    a, b = CKAResult.load(single), CKAResult.load(double)
    assert b.settings["world_size"] == 2
    assert a.settings["world_size"] == 1
    assert a.settings["images_used"] == b.settings["images_used"] == 64
    np.testing.assert_allclose(b.matrices, a.matrices, rtol=0, atol=1e-12)


def test_a_default_output_folder_never_replaces_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--model", "resnet18", *SMALL, "--no-figures"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    default = Path("ckascope-out/resnet18_16-48")
    before = (default / "result.json").read_bytes()
    second = CliRunner().invoke(main, [*args, "--kernel", "rbf"])
    assert second.exit_code == 0, second.output
    assert "result written to ckascope-out/resnet18_16-48-2/" in second.output
    assert (default / "result.json").read_bytes() == before
    assert CKAResult.load(Path("ckascope-out/resnet18_16-48-2")).settings["kernel"] == "rbf"
    explicit = CliRunner().invoke(main, [*args, "--out", str(default)])
    assert explicit.exit_code == 2
    assert "earlier ckascope result" in explicit.stderr
    assert (default / "result.json").read_bytes() == before
    replaced = CliRunner().invoke(main, [*args, "--out", str(default), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output


def test_one_sweep_prints_no_std_column_and_pipes_are_not_cut(tmp_path: Path) -> None:
    args = ["compare", "-m", "resnet18", *SMALL, "--no-figures", "--out"]
    one = CliRunner().invoke(main, [*args, str(tmp_path / "a")])
    assert one.exit_code == 0, one.output
    assert "± std" not in one.output
    long = tmp_path / ("b" * 90)  # rich cuts at 80 columns when not on a terminal
    two = CliRunner().invoke(main, [*args, str(long), "--repeats", "2"])
    assert "± std" in two.output
    assert f"  {long / 'matrices.npz'}\n" in two.output


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_checkpoint_result_keeps_its_architecture_apart_from_its_label(tmp_path: Path) -> None:
    import torchvision

    from ckascope.models import CHECKPOINT_FORMAT

    run = tmp_path / "my-run"
    run.mkdir()
    net = torchvision.models.resnet18(num_classes=10)
    config = {"arch": "resnet18", "num_classes": 10}
    payload = {"format": CHECKPOINT_FORMAT, "builder": "torchvision", "config": config}
    torch.save({**payload, "state_dict": net.state_dict()}, run / "last.pt")
    out = tmp_path / "cka"
    args = ["compare", "--checkpoint", str(run / "last.pt"), *SMALL[4:], "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--no-figures"])
    assert result.exit_code == 0, result.output
    saved = CKAResult.load(out)
    assert (saved.settings["model"], saved.arch) == ("my-run", "resnet18")
    split = CliRunner().invoke(main, ["suggest-split", "--from", str(out), "--json"])
    assert split.exit_code == 0, split.output  # resnet18's split points, not "my-run"'s


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_checkpoint_sets_the_image_size_and_scales_it_was_trained_at(tmp_path: Path) -> None:
    import torchvision

    from ckascope.models import CHECKPOINT_FORMAT

    net = torchvision.models.resnet18(num_classes=10)
    config = {"arch": "resnet18", "num_classes": 10}
    inputs = {"image_size": 32, "scales": [8, 16, 32], "data": "fashionmnist"}
    payload = {"format": CHECKPOINT_FORMAT, "builder": "torchvision", "config": config}
    torch.save({**payload, "state_dict": net.state_dict(), "inputs": inputs}, tmp_path / "a.pt")
    common = ["compare", "--checkpoint", str(tmp_path / "a.pt"), "--no-figures"]
    common += ["--num-images", "8", "--batch-size", "8", "--resize-size", "37"]
    runs = {
        "own": [],  # the training image size, smallest and largest training scale
        "scales": ["--scales", "16", "32"],
        "size": ["--image-size", "24", "--resize-size", "28"],  # its own default scales
    }
    expected = {"own": (32, [8, 32]), "scales": (32, [16, 32]), "size": (24, [3, 24])}
    for name, extra in runs.items():
        result = CliRunner().invoke(main, [*common, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        settings = CKAResult.load(tmp_path / name).settings
        assert (settings["image_size"], settings["scales"]) == expected[name], name
        assert settings["weights"] is None  # the checkpoint's, not --weights' default
        assert "trained on fashionmnist; these are the synthetic images" in result.stderr
        assert "Hint: --data fashionmnist" in result.stderr


def test_results_written_before_the_architecture_was_recorded_still_name_it() -> None:
    old = CKAResult(np.eye(2), ["a", "b"], ["a", "b"], settings={"model": "resnet50"})
    assert old.arch == "resnet50"


def test_the_compare_flags_are_the_config_fields_with_their_defaults() -> None:
    from dataclasses import fields

    from ckascope.cli import compare, suggest_split_command
    from ckascope.config import CompareConfig

    for command in (compare, suggest_split_command):
        ctx = command.make_context(command.name or "", [])
        assert CompareConfig.from_options(ctx.params) == CompareConfig()
    names = {p.name for p in compare.params}
    assert names == {f.name for f in fields(CompareConfig)}
    ctx = compare.make_context(
        "compare", ["--scales", "8", "16", "--image-size", "32", "--antialias", "--overwrite"]
    )
    cfg = CompareConfig.from_options(ctx.params)
    assert (cfg.scales, cfg.image_size, cfg.antialias, cfg.overwrite) == ((8, 16), 32, True, True)
    assert isinstance(
        CompareConfig.from_options(compare.make_context("compare", ["--out", "x"]).params).out, Path
    )


def test_resolving_the_config_returns_a_new_one_and_refuses_scales_with_two_models() -> None:
    from ckascope.commands import resolve_config
    from ckascope.config import CompareConfig
    from ckascope.errors import InputError

    given = CompareConfig(model="resnet18", weights="none", data="fashionmnist")
    resolved = resolve_config(given)
    assert given.image_size is None  # untouched
    assert (resolved.image_size, resolved.scales, resolved.scale) == (28, (4, 28), 28)
    with pytest.raises(InputError, match="--scale S"):
        resolve_config(CompareConfig(model="a", model_b="b", scales=(8, 16)))


def test_the_option_generator_refuses_fields_it_cannot_make_an_option_of() -> None:
    from dataclasses import dataclass, field

    from ckascope.cliutils import config_field, config_options

    @dataclass
    class Many:
        sizes: tuple[int, ...] = config_field((1, 2), "a list")

    @dataclass
    class Either:
        value: int | str = config_field(1, "a union")

    @dataclass
    class Made:
        items: list[int] = field(default_factory=list, metadata={"help": "a factory"})

    for config in (Many, Either):
        with pytest.raises(TypeError, match="option"):
            config_options(config)
    with pytest.raises(TypeError, match="plain default"):
        config_options(Made)
    config_options(Many, overrides={"sizes": {"type": str}})  # an override makes it one


def test_the_option_generator_makes_required_and_renamed_options() -> None:
    from dataclasses import dataclass

    import click

    from ckascope.cliutils import REQUIRED, config_field, config_options

    @dataclass
    class Config:
        name: str = config_field(REQUIRED, "must be given")
        num_workers: int = config_field(0, None, min=0, option="--workers")

    @click.command()
    @config_options(Config)
    def command(**values: object) -> None:
        """A command."""

    with pytest.raises(click.MissingParameter) as missing:
        command.make_context("command", [])
    assert "'--name'" in missing.value.format_message()
    ctx = command.make_context("command", ["--name", "x", "--workers", "2"])
    assert Config(**ctx.params) == Config("x", 2)  # the value under the field's name
    workers = next(p for p in command.params if p.name == "num_workers")
    assert (workers.opts, workers.help) == (["--workers"], None)


def test_results_written_before_the_image_size_rename_load_with_the_new_name(
    tmp_path: Path,
) -> None:
    import json

    CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"mode": "scales", "base_size": 64}).save(
        tmp_path / "old"
    )
    meta = json.loads((tmp_path / "old" / "result.json").read_text())
    assert meta["settings"]["base_size"] == 64  # as an older ckascope wrote it
    assert CKAResult.load(tmp_path / "old").settings["image_size"] == 64


@pytest.mark.parametrize(
    ("rank", "world", "shown"),
    [
        ("0", "1", ["note: for the job", "note: bad.jpg"]),
        ("0", "2", ["note: for the job", "note: rank 0: bad.jpg"]),
        ("1", "2", ["note: rank 1: bad.jpg"]),  # rank 0 says what holds for the job
    ],
)
def test_under_torchrun_a_note_for_the_job_is_shown_once_and_each_rank_names_its_own(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rank: str,
    world: str,
    shown: list[str],
) -> None:
    from ckascope.cliutils import warnings_as_notes
    from ckascope.errors import warn

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with warnings_as_notes():
        warn("for the job")
        warn("bad.jpg", local=True)
    assert capsys.readouterr().err.splitlines() == shown


def test_an_unreadable_image_is_a_note_of_the_process_that_met_it() -> None:
    from ckascope.data import Skipped, warn_skipped
    from ckascope.errors import LocalWarning

    with pytest.warns(LocalWarning, match="skipped unreadable image x.jpg"):
        warn_skipped([Skipped("x.jpg", "bad")])


def test_one_model_at_one_scale_is_refused_two_models_at_one_scale_run(tmp_path: Path) -> None:
    from tests.refusals import assert_refused

    argv = ["compare", "--model", "resnet18", "--weights", "none", "--image-size", "16"]
    line = assert_refused(main, [*argv, "--scales", "8", "8"], "both scales are 8 px", tmp_path)
    assert line == (
        "Error: both scales are 8 px: one model at one scale is compared with itself, and every "
        "same-layer CKA is 1. Hint: give two different --scales (e.g. --scales 8 16), or add "
        "--model-b NAME to compare two models at --scale 8"
    )
    two = [*argv, "--model-b", "resnet18", "--weights-b", "none", "--scale", "8"]
    two += ["--num-images", "8", "--batch-size", "8", "--layers", "stages", "--no-figures"]
    done = CliRunner().invoke(main, [*two, "--out", str(tmp_path / "two")])
    assert done.exit_code == 0, done.output


def test_the_help_example_on_fashion_mnist_is_the_readmes() -> None:
    """The --help and the README show one command for Fashion-MNIST (its default scales)."""
    shown = CliRunner().invoke(main, ["compare", "--help"]).output
    example = next(line.strip() for line in shown.splitlines() if "--data fashionmnist" in line)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert example in readme
    assert example.endswith("--scales 4 28")  # config.default_scales(28)
