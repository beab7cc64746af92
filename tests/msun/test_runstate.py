"""msun.runstate: each rank's generators on resume, a resume with other settings refused (the
run's own options taken where none are given), a run folder of other files refused, and the
lock that keeps a second run out of a run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

from ckascope.errors import InputError
from msun.cli import main
from msun.config import TrainConfig, default_warmup, dump_yaml, resolve
from msun.runstate import RunLock, check_new_run, check_resume, check_reuse
from tests import tinyrun
from tests.msun.runs import train_tiny


def test_each_rank_resumes_its_own_generators() -> None:
    from ckascope.distributed import DistInfo
    from msun.runstate import restore_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state()})
    cpu = torch.device("cpu")
    for rank in (0, 1):
        restore_rng({"ranks": states}, DistInfo(rank, 2, cpu))
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    restore_rng({"torch": states[1]["torch"], "cuda": []}, DistInfo(0, 1, cpu))  # older format
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_resume_with_a_different_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_tiny(out, "--epochs", "1").exit_code == 0
    result = train_tiny(out, "--epochs", "1", "--resume", "--seed", "3")
    assert result.exit_code == 2
    assert "seed: 0 -> 3" in result.stderr
    again = train_tiny(out, "--epochs", "1")
    assert again.exit_code == 2
    assert "--resume" in again.stderr


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_second_run_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with RunLock(out):
        result = train_tiny(out, "--epochs", "1")
    assert result.exit_code == 2
    assert "in use" in result.stderr
    assert train_tiny(out, "--epochs", "1").exit_code == 0  # the lock went with its holder
    assert not (out / ".lock").exists()  # a finished run leaves no lock file


def test_a_lock_file_removed_under_a_starting_process_is_not_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = RunLock(tmp_path / "run").__enter__()
    stale = os.open(first.path, os.O_RDWR)  # a second run opens the file ...
    first.__exit__(None)  # ... which its holder removes on leaving, then it locks that file
    second = RunLock(tmp_path / "run")
    opened = iter([stale])
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a: next(opened, None) or real_open(*a))
    assert second._lock() is None  # it notices the file is gone: no lock on a removed file
    fd = second._lock()  # and takes a fresh one
    assert fd is not None
    assert os.fstat(fd).st_ino == os.stat(second.path).st_ino
    os.close(fd)


def _resolved(**options: Any) -> TrainConfig:
    return resolve(TrainConfig(out="r", **options), num_classes=10)


def _run(cfg: TrainConfig, epoch: int, **saved: Any) -> dict[str, Any]:
    """A training checkpoint's entries the resume checks read: ``cfg`` saved, at ``epoch``."""
    return {"train_config": {**cfg.to_dict(), **saved}, "progress": {"epoch": epoch}}


def test_a_resume_refuses_other_validation_options() -> None:
    cfg = _resolved(epochs=3, num_val=16, eval_sizes="4:28:12")
    for saved, named in [({"num_val": 32}, "num_val: 32 -> 16"), ({"eval_sizes": "4,28"}, "4,28")]:
        with pytest.raises(InputError, match=named):
            check_resume(_run(cfg, 1, **saved), cfg)
        with pytest.raises(InputError, match=named):  # a script continuing it: the same
            check_reuse(_run(cfg, 1, **saved), cfg)
        check_reuse(_run(cfg, 3, **saved), cfg)  # finished: reused, nothing is validated again
    # the same sizes written another way, and an option that changes no number, are accepted
    check_resume(_run(cfg, 1, eval_sizes="4,16,28", workers=2, save_every=5), cfg)


def test_the_resume_hint_names_no_derived_value_as_an_older_default() -> None:
    saved = _resolved(epochs=3)  # its warm-up, 3 x 5/90 epochs, derived from its length
    with pytest.raises(InputError) as refused:
        check_resume(_run(saved, 1), _resolved(epochs=4))
    assert "epochs: 3 -> 4" in str(refused.value)
    assert "older defaults" not in str(refused.value)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_resume_takes_the_runs_own_options_and_says_when_it_is_finished(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_tiny(out, "--epochs", "1").exit_code == 0
    done = CliRunner().invoke(main, ["train", "--out", str(out), "--resume"])
    assert done.exit_code == 0, done.output
    assert f"{out} is finished (1 of 1 epochs); nothing to resume. Hint: msun eval" in done.stdout
    assert "global batch" not in done.stdout  # no run is announced
    longer = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert longer.exit_code == 2
    [line] = longer.stderr.strip().splitlines()
    assert f"differs from {out}/last.pt: epochs: 1 -> 2. Hint:" in line  # its one difference
    # a longer schedule is a new run, whose options the run's config.yaml repeats
    # its config.yaml holds the warm-up resolved for 1 epoch: the hint gives 2 epochs' own
    assert line.endswith(
        f"(the learning rate decays over a run's own --epochs: for 2 epochs train a new run with "
        f"its options, msun train --config {out}/config.yaml --epochs 2 --warmup-epochs 0.111111 "
        "--out NEW)"
    )
    again = ["train", "--config", str(out / "config.yaml"), "--epochs", "2"]
    new = CliRunner().invoke(
        main, [*again, "--warmup-epochs", "0.111111", "--out", str(tmp_path / "new")]
    )
    assert new.exit_code == 0, new.output
    written = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())
    assert written["warmup_epochs"] == pytest.approx(default_warmup(2), abs=1e-6)


def test_a_new_run_refuses_a_folder_of_other_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"best.pt": "my weights", "metrics.csv": "my,own", "config.yaml": "mine: 1"}
    for name, text in files.items():
        (mine / name).write_text(text)
    result = CliRunner().invoke(main, ["train", *tinyrun.TRAIN, "--out", str(mine)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "(best.pt, config.yaml, metrics.csv)" in line
    assert "Hint: choose another --out" in line
    assert {p.name: p.read_text() for p in mine.iterdir()} == files  # untouched, no lock left


def test_a_run_started_again_before_its_first_checkpoint_is_accepted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "split-analysis").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(_resolved(epochs=1)))
    for name in ("metrics.csv", "best.pt", ".lock", ".last.pt.x1y2.tmp"):  # killed mid-save
        (run / name).write_text("")
    check_new_run(run)
    (run / "config.yaml").write_text("model: resnet18\n")  # a recipe of the user's, not a run's
    with pytest.raises(InputError, match=r"\(best.pt, config.yaml, metrics.csv\)"):
        check_new_run(run)


def test_metrics_rows_of_an_older_run_keep_their_columns_beside_a_newer_one(
    tmp_path: Path,
) -> None:
    """A resumed run rewrites its logs from its checkpoint's rows: one written before a
    column existed lacks it (an empty cell), and every column keeps its name and place."""
    import csv
    import json

    from msun.runstate import write_metrics

    old = {"epoch": 1, "step": 2, "loss": 2.5, "val_top1_mean": 10.0, "val_top1_28": 10.0}
    new = {**old, "epoch": 2, "step": 4, "val_skipped_images": 3}
    write_metrics(tmp_path, [old, new])
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*old, "val_skipped_images"]
    assert [r["val_skipped_images"] for r in rows] == ["", "3"]
    assert [r["val_top1_28"] for r in rows] == ["10.0", "10.0"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "val_skipped_images" not in json.loads(lines[0])
