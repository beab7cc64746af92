"""What ``msun eval --out`` may replace: an earlier eval output, never a training run's folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import msun
from ckascope.errors import InputError
from ckascope.result import check_output_dir
from msun.cli import main
from msun.evaluate import EVAL_OUTPUT, SUMMARY_KEYS, is_eval_dir
from tests.folders import contents, training_run

TINY = ["--image-size", "32", "--num-val", "8"]


def _eval_json(folder: Path, content: Any) -> Path:
    folder.mkdir()
    (folder / "eval.json").write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize(
    "content",
    [[], {"checkpoint": "m"}, [1, 2], [{"checkpoint": "m", "top1": [50.0]}]],
    ids=["empty", "a-dict", "numbers", "keys-missing"],
)
def test_an_eval_json_without_msun_summaries_marks_no_eval_output(
    tmp_path: Path, content: Any
) -> None:
    assert not is_eval_dir(_eval_json(tmp_path / "e", content))


def test_what_marks_an_eval_output(tmp_path: Path) -> None:
    summary = dict.fromkeys(SUMMARY_KEYS, 0)
    assert is_eval_dir(_eval_json(tmp_path / "e", [summary, summary]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval.json").write_bytes(b"\xff not json")
    assert not is_eval_dir(tmp_path / "bad")
    assert not is_eval_dir(training_run(tmp_path / "run"))


def test_an_eval_output_with_a_users_file_added_is_kept_whole(tmp_path: Path) -> None:
    folder = _eval_json(tmp_path / "e", [dict.fromkeys(SUMMARY_KEYS, 0)])
    check_output_dir(folder, True, EVAL_OUTPUT)  # an eval output alone: --overwrite replaces it
    (folder / "slides.pptx").write_bytes(b"mine")
    with pytest.raises(InputError, match=r"not an earlier msun eval output \(slides.pptx\)"):
        check_output_dir(folder, True, EVAL_OUTPUT)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_eval_never_replaces_a_training_run_folder(tmp_path: Path, overwrite: list[str]) -> None:
    """``msun eval run/last.pt --out run``: refused before the checkpoint is read."""
    run = training_run(tmp_path / "run")
    before = contents(run)
    done = CliRunner().invoke(main, ["eval", str(run / "last.pt"), "--out", str(run), *overwrite])
    assert done.exit_code == 2, done.output
    [line] = done.stderr.strip().splitlines()
    assert "holds files that are not an earlier msun eval output" in line
    assert "remove the folder yourself" in line
    assert "pass --overwrite" not in line
    assert contents(run) == before


def test_eval_refuses_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, ["eval", "missing.pt", "--out", ".", "--overwrite"])
    assert done.exit_code == 2, done.output
    assert "is the current folder or one above it" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_overwrite_replaces_an_earlier_eval_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    msun.save_checkpoint(
        msun.build_msun("resnet18", scales=(16, 32), num_classes=10), tmp_path / "m.pt"
    )
    out = tmp_path / "ev"
    args = ["eval", str(tmp_path / "m.pt"), *TINY, "--out", str(out)]
    first = CliRunner().invoke(main, [*args, "--eval-sizes", "16,32"])
    assert first.exit_code == 0, first.output
    assert is_eval_dir(out)  # what msun eval writes is what --overwrite may replace
    again = CliRunner().invoke(main, [*args, "--eval-sizes", "16"])
    assert again.exit_code == 2
    assert "holds an earlier msun eval output" in again.stderr
    replaced = CliRunner().invoke(main, [*args, "--eval-sizes", "16", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [s["sizes"] for s in json.loads((out / "eval.json").read_text())] == [[16]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev", "m.pt"]


def test_overwrite_without_out_is_refused_before_any_checkpoint_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.refusals import assert_refused

    monkeypatch.chdir(tmp_path)
    argv = ["eval", str(tmp_path / "none.pt"), "--overwrite"]
    line = assert_refused(main, argv, "Hint: add --out FOLDER, or drop --overwrite", tmp_path)
    assert "none.pt" not in line  # the checkpoint was never looked at


def test_eval_sizes_take_space_separated_values_with_checkpoints_around_them() -> None:
    """As msun train's --scales: `--eval-sizes 4 16`, and the checkpoints still count."""
    from msun.cli import eval_command, train

    argv = ["a.pt", "--eval-sizes", "4", "16", "b.pt", "--eval-sizes", "8,12", "24"]
    ctx = eval_command.make_context("eval", argv)
    assert ctx.params["checkpoints"] == (Path("a.pt"), Path("b.pt"))
    assert ctx.params["eval_sizes"] == "8,12,24"  # the last given, as click takes it
    ctx = eval_command.make_context("eval", ["a.pt", "--eval-sizes", "4:28:2", "16.pt"])
    assert (ctx.params["eval_sizes"], ctx.params["checkpoints"]) == (
        "4:28:2",
        (Path("a.pt"), Path("16.pt")),
    )
    ctx = train.make_context("train", ["--eval-sizes", "4", "8", "16", "--epochs", "1"])
    assert ctx.params["eval_sizes"] == "4,8,16"
