"""msun.train: the training loop of each method, its progress reports, its stops (NaN, overflowing
weights, Ctrl-C), resume after SIGKILL, two processes, fine-tuning, and what it checks before
it writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner

from ckascope import models
from ckascope.result import CKAResult
from msun import MSUN
from msun.cli import main
from msun.config import load_yaml, merge
from msun.train import build_network
from tests import tinyrun
from tests.idxfiles import write_idx
from tests.msun.runs import TINY, train_tiny

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _subprocess(*args: str) -> list[str]:
    return [sys.executable, "-m", "msun", "train", *TINY, *args]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_training_and_validation_report_progress_without_a_terminal(tmp_path: Path) -> None:
    result = train_tiny(tmp_path / "run", "--method", "msun", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "epoch 1/1 loss" in result.output
    assert ": 4/4 (" in result.output  # 32 images, batch 8: the epoch's last step is reported
    assert "validation (2 sizes): 1/1 (" in result.output


@pytest.mark.parametrize("method", ["msun", "mst", "vanilla"])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_each_method_trains_and_writes_its_run_folder(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    result = train_tiny(out, "--method", method, "--epochs", "2")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.yaml"} <= names
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_top1_mean"] <= 100 for r in rows)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == method
    assert config["lr"] == 0.05
    assert config["epochs"] == 2
    assert config["num_classes"] == 10
    # the authors' tau for the ResNet family; other methods have no scale-invariance loss
    assert config["si_threshold"] == (0.01 if method == "msun" else None)
    assert config["grad_clip"] == (1.0 if method == "msun" else 0.0)
    model = models.load_checkpoint(out / "last.pt")
    assert isinstance(model, MSUN) == (method == "msun")
    if method == "msun":
        assert {"ce_16", "ce_32", "si"} <= set(rows[0])
        assert config["split_at"] == "layer2"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["progress"]["epoch"] == 2
    assert ckpt["train_config"] == config
    # what ckascope compare --checkpoint takes its defaults from; vanilla has no training scales
    scales = {} if method == "vanilla" else {"scales": [16, 32]}
    inputs = {"image_size": 32, "input_size": 32, "data": "shapes", **scales}
    assert models.read_inputs(out / "last.pt") == inputs


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    common = [
        "--epochs",
        "3",
        "--save-every",
        "1",
        "--deterministic",
        "--num-train",
        "64",
    ]  # 24 steps
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(
        _subprocess(*common, "--out", str(full)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        _subprocess(*common, "--out", str(killed)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # anywhere, even mid-save
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # it died mid-run, not after finishing
    assert torch.load(killed / "last.pt", weights_only=True)["progress"]["global_step"] < 24
    resumed = subprocess.run(
        _subprocess(*common, "--out", str(killed), "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(full / "last.pt"), _weights(killed / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.load(killed / "last.pt", weights_only=True)["progress"]["global_step"] == 24


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(
    "method",
    [
        ["--method", "msun", "--bn", "shared"],
        ["--method", "msun", "--bn", "private"],  # a BatchNorm set per path in the trunk
        ["--method", "mst", "--bn", "private", "--distill"],  # RS-Nets' network and loss
    ],
    ids=["msun", "msun-private", "mst-private-distill"],
)
def test_two_gloo_processes_equal_one_process_with_accumulation(
    tmp_path: Path, method: list[str]
) -> None:
    common = [*method, "--epochs", "1", "--steps-per-epoch", "3", "--workers", "0"]
    one = subprocess.run(
        _subprocess(*common, "--accum-steps", "2", "--out", str(tmp_path / "one")),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
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
        "msun",
        "train",
    ]
    two = subprocess.run(
        [*run, *TINY, *common, "--out", str(tmp_path / "two")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("run folder:") == 1  # the job's one folder, said by rank 0
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    params = [
        k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    # the runs' initialisation (build_network seeds it): training must have moved away from it
    start = build_network(merge(load_yaml(tmp_path / "one" / "config.yaml"))).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in params) > 1e-4
    for key in params:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rngs = [torch.load(tmp_path / r / "last.pt")["rng"]["ranks"] for r in ("one", "two")]
    assert [len(r) for r in rngs] == [1, 2]  # every process's generators, not rank 0's only


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    result = train_tiny(
        out,
        "--epochs",
        "2",
        "--lr",
        "1e6",
        "--grad-clip",
        "1e9",
        "--save-every",
        "1",
        "--warmup-epochs",
        "0",
    )
    assert result.exit_code == 1
    assert "NaN" in result.stderr
    assert re.search(r"(at|by) step \d+", result.stderr)  # the loss, or the weights before a save
    if (out / "last.pt").exists():
        assert all(
            torch.isfinite(t).all()
            for t in _weights(out / "last.pt").values()
            if t.is_floating_point()
        )


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(
    ("lr", "words"),
    [
        (["--lr", "1e30"], "loss became NaN/Inf at step "),  # huge weights overflow step 2
        # a step of float32's largest lr overflows the weights under step 1's finite loss
        (["--lr", "3e38", "--save-every", "1"], "the weights or the optimizer state became NaN"),
    ],
    ids=["loss", "weights"],
)
def test_a_nan_loss_or_nan_weights_under_torchrun_are_said_once_for_the_job(
    tmp_path: Path, lr: list[str], words: str
) -> None:
    """The checks are all-reduced: every process stops at the same step, and rank 0 says so."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--method", "vanilla", *lr, "--warmup-epochs", "0", "--epochs", "1"]
    done = subprocess.run(
        [*run, "-m", "msun", "train", *TINY, *args, "--workers", "0", "--out", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"Error: {words}"), errors[0]


def test_weights_that_overflow_under_a_finite_loss_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import msun.train

    step = msun.train._optimizer_step

    def overflowing(loop: msun.train.Loop) -> None:  # a step that overflows one weight
        step(loop)
        with torch.no_grad():
            next(loop.model.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(msun.train, "_optimizer_step", overflowing)
    out = tmp_path / "inf"
    result = CliRunner().invoke(
        main, ["train", *tinyrun.TRAIN, "--steps-per-epoch", "1", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "became NaN/Inf by step 1; nothing was saved" in result.output
    assert not (out / "last.pt").exists()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_interrupt_saves_a_checkpoint_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "int"
    proc = subprocess.Popen(
        _subprocess("--epochs", "50", "--out", str(out)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    # Mid-epoch as a rule; a signal that lands between metrics.jsonl's write and the end-of-epoch
    # check (a few ms, hit under load) stops the run after the epoch, last.pt saved either way.
    assert re.search(r"interrupted (at step|after epoch) \d+", err), err
    assert "Traceback" not in err
    progress = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert progress["global_step"] >= 4


#: A tiny run of 2 epochs, each 4 steps and a validation of 4 batches.
TWO_EPOCHS = ["--epochs", "2", "--num-val", "32"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_tiny(out, *TWO_EPOCHS).exit_code == 0
    return out


@contextlib.contextmanager
def _ctrl_c_at(check: int, checks: list[int]) -> Iterator[Callable[[], bool]]:
    """``interrupt_flag`` with Ctrl-C pressed before its ``check``-th check (kept in ``checks``)."""

    def stop() -> bool:
        checks.append(len(checks) + 1)
        return len(checks) >= check

    yield stop


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(
    ("check", "stands", "again"),
    [
        (5, (0, 4), []),  # resumed with the run's own options (config.yaml)
        (4, (0, 4), [*TINY, *TWO_EPOCHS]),  # with every option repeated, as scripts do
        (11, (1, 2), []),
    ],
    # the flag is checked at epoch 1's 4 steps, its 4 validation batches, after the epoch
    # (9), then at epoch 2's steps
    ids=["in-validation", "at-an-epochs-last-step", "mid-epoch"],
)
def test_an_interrupted_run_resumed_ends_and_logs_as_an_uninterrupted_one(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: Path,
    check: int,
    stands: tuple[int, int],
    again: list[str],
) -> None:
    import msun.train

    out, checks = tmp_path / "cut", []
    with monkeypatch.context() as m:
        m.setattr(msun.train, "interrupt_flag", lambda: _ctrl_c_at(check, checks))
        cut = train_tiny(out, *TWO_EPOCHS)
    assert cut.exit_code == 130, cut.output
    assert len(checks) == check  # it stopped at the check that saw Ctrl-C, in validation too
    progress = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == stands
    resumed = CliRunner().invoke(main, ["train", *again, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = _weights(uninterrupted / "last.pt"), _weights(out / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _untimed_rows(out) == _untimed_rows(uninterrupted)  # every step's loss terms too
    for row in _rows(out):  # the time of both parts of the resumed epoch, and all its images
        assert row["images_per_s"] * row["train_seconds"] == pytest.approx(32)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_tensorboard_logs_every_number_of_every_metrics_row(tmp_path: Path) -> None:
    """Each column but epoch and step is a curve over epochs, the skipped images' count too."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    result = train_tiny(out, "--epochs", "2", "--tensorboard")
    assert result.exit_code == 0, result.output
    assert "metrics.jsonl, config.yaml, tensorboard/)" in result.stdout  # the run folder's line
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {
        tag: [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    rows = _rows(out)
    wanted = {
        key: [(row["epoch"], float(row[key])) for row in rows if key in row]
        for key in rows[-1]
        if key not in ("epoch", "step")
    }
    assert "val_skipped_images" in wanted
    assert logged == wanted


def _untimed_rows(run: Path) -> list[dict[str, Any]]:
    """``run``'s metrics rows without their timings, which no two runs share."""
    timing = ("train_seconds", "images_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in _rows(run)]


def _as_written_before(run: Path, **values: Any) -> None:
    """Makes ``run`` look written by an older version: its config.yaml and last.pt record
    ``values`` (``num_val=None``: before ``default_num_val``, every validation image)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, **values}, sort_keys=False))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["train_config"].update(values)
    torch.save(ckpt, run / "last.pt")


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_run_that_recorded_num_val_null_resumes_validating_every_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such a run validated the whole set; resumed, it still does (no --num-val says "null"),
    and ends as a run that validated the whole set from its start."""
    import msun.train

    write_idx(tmp_path / "fm", 32, gz=True)  # 32 training images, 16 validation images
    data = f"fashionmnist:{tmp_path / 'fm'}"
    args = ["--method", "vanilla", "--data", data, "--epochs", "2", "--num-val", "16"]
    whole = tmp_path / "whole"
    assert train_tiny(whole, *args).exit_code == 0
    old = tmp_path / "old"
    with monkeypatch.context() as m:  # 4 steps, 2 validation batches, then after epoch 1
        m.setattr(msun.train, "interrupt_flag", lambda: _ctrl_c_at(7, []))
        assert train_tiny(old, *args).exit_code == 130
    assert torch.load(old / "last.pt", weights_only=True)["progress"]["epoch"] == 1
    _as_written_before(old, num_val=None)
    resumed = CliRunner().invoke(main, ["train", "--out", str(old), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert yaml.safe_load((old / "config.yaml").read_text())["num_val"] is None  # as written
    a, b = _weights(whole / "last.pt"), _weights(old / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _untimed_rows(old) == _untimed_rows(whole)  # epoch 2 validated the same 16 images


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(("option", "clamped"), [("num_train", 40), ("num_val", 20)])
def test_a_run_whose_count_was_clamped_then_resumes_and_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, clamped: int
) -> None:
    """Older versions clamped --num-train 40 on a 32-image set to its 32 images (--num-val 20
    on 16 to its 16), and recorded 40 (20): resumed or reused, the run goes on with those
    images, and ends as a run of 32 (validating 16)."""
    import msun.train

    write_idx(tmp_path / "fm", 32, gz=True)  # 32 training images, 16 validation images
    data = f"fashionmnist:{tmp_path / 'fm'}"
    args = ["--method", "vanilla", "--data", data, "--epochs", "2", "--num-val", "16"]
    assert train_tiny(tmp_path / "whole", *args).exit_code == 0  # TINY: --num-train 32
    old = tmp_path / "old"
    with monkeypatch.context() as m:  # 4 steps, 2 validation batches, then after epoch 1
        m.setattr(msun.train, "interrupt_flag", lambda: _ctrl_c_at(7, []))
        assert train_tiny(old, *args).exit_code == 130
    _as_written_before(old, **{option: clamped})
    resumed = CliRunner().invoke(main, ["train", "--out", str(old), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = _weights(tmp_path / "whole" / "last.pt"), _weights(old / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _untimed_rows(old) == _untimed_rows(tmp_path / "whole")
    own = merge(load_yaml(old / "config.yaml"))
    assert getattr(own, option) == clamped
    assert msun.train.train_or_reuse(own) == old / "last.pt"  # reused as it is


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_finished_run_on_pretrained_weights_resumed_offline_says_it_is_finished(
    tmp_path: Path, offline: Path
) -> None:
    """Its weights are its checkpoint's: nothing is downloaded, and no missing file refused."""
    out = tmp_path / "run"
    assert train_tiny(out, "--method", "vanilla", "--epochs", "1").exit_code == 0
    _as_written_before(out, weights="default")  # as if trained from ImageNet's weights
    resumed = CliRunner().invoke(main, ["train", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"{out} is finished (1 of 1 epochs); nothing to resume" in " ".join(
        resumed.output.split()
    )
    assert not any(offline.rglob("*.pth"))  # nothing was fetched


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize("network", [["vanilla"], ["msun"], ["mst", "--bn", "private"]])
def test_an_unfinished_run_on_pretrained_weights_resumes_offline(
    tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch, network: list[str]
) -> None:
    """Its checkpoint holds every weight: resumed offline, nothing is fetched and it ends as a
    run that was never stopped (it failed for want of ImageNet's file before)."""
    import msun.train

    args = ["--method", *network, "--epochs", "2", "--deterministic"]
    assert train_tiny(tmp_path / "whole", *args).exit_code == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # stopped after epoch 1's checkpoint, before epoch 2's
        m.setattr(msun.train, "interrupt_flag", lambda: _ctrl_c_at(7, []))
        assert train_tiny(out, *args).exit_code == 130
    _as_written_before(out, weights="default")  # as if started from ImageNet's weights
    assert torch.load(out / "last.pt", weights_only=True)["progress"]["epoch"] == 1
    resumed = CliRunner().invoke(main, ["train", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = _weights(tmp_path / "whole" / "last.pt"), _weights(out / "last.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not any(offline.rglob("*.pth"))  # nothing was fetched


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_fine_tune_and_linear_probe_from_a_checkpoint(tmp_path: Path) -> None:
    assert train_tiny(tmp_path / "src", "--epochs", "1").exit_code == 0
    src = tmp_path / "src" / "last.pt"
    probe = tmp_path / "probe"
    result = train_tiny(
        probe,
        "--epochs",
        "1",
        "--init-from",
        str(src),
        "--num-classes",
        "10",
        "--linear-probe",
        "--image-size",
        "16",
        "--eval-sizes",
        "16",
    )
    assert result.exit_code == 0, result.output
    before, after = _weights(src), _weights(probe / "last.pt")
    changed = {
        k
        for k in after
        if k in before
        and before[k].shape == after[k].shape
        and not torch.equal(before[k], after[k])
    }
    assert changed == {"head.fc.weight", "head.fc.bias"}
    tuned = tmp_path / "tuned"
    assert (
        train_tiny(
            tuned,
            "--epochs",
            "1",
            "--init-from",
            str(src),
            "--image-size",
            "16",
            "--eval-sizes",
            "16",
        ).exit_code
        == 0
    )
    after_ft = _weights(tuned / "last.pt")
    assert not torch.equal(
        before["subnets.0.conv1.weight"], after_ft["subnets.0.conv1.weight"]
    )  # routed: 16 px -> path 0
    assert torch.equal(before["subnets.1.conv1.weight"], after_ft["subnets.1.conv1.weight"])


def _fine_tuned_loop(
    tmp_path: Path, source: dict[str, Any], saved_inputs: dict[str, int] | None = None
) -> Any:
    """The Loop of a 16-px fine-tuning of a resnet18 checkpoint carrying ``source``; with
    ``saved_inputs``, as resumed from a checkpoint that recorded them."""
    from ckascope.distributed import DistInfo
    from msun.checkpoint import model_payload
    from msun.config import TrainConfig
    from msun.train import _build, _configure

    torch.manual_seed(0)
    payload = model_payload(torchvision.models.resnet18(num_classes=10), "resnet18")
    torch.save({**payload, **source}, tmp_path / "src.pt")
    cfg = TrainConfig(
        model="resnet18",
        init_from=str(tmp_path / "src.pt"),
        image_size=16,
        eval_sizes="8,16",
        batch_size=8,
        num_train=8,
        num_val=8,
        epochs=1,
        out=str(tmp_path / "run"),
    )
    info = DistInfo(0, 1, torch.device("cpu"))
    cfg, train, val, init = _configure(cfg, info, None, ())
    saved = (
        None if saved_inputs is None else {"train_config": cfg.to_dict(), "inputs": saved_inputs}
    )
    return _build(cfg, info, train, val, init, saved)


def _fed_sides(loop: Any) -> dict[str, set[int]]:
    """The input sides the network receives in a training step and in a validation pass."""
    from ckascope.progress import make_progress
    from msun.train import validate

    fed: dict[str, set[int]] = {"training": set(), "validation": set()}
    phase = "training"
    loop.model.register_forward_pre_hook(lambda m, args: fed[phase].add(args[0].shape[-1]))
    loop.objective(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    phase = "validation"
    with make_progress(False) as bar:
        validate(loop, bar)
    return fed


@pytest.mark.parametrize(
    "source",
    [
        {"train_config": {"image_size": 32}},
        # itself fine-tuned on 24-px crops, each resized to the 32 px it was fed
        {"train_config": {"image_size": 24}, "inputs": {"image_size": 24, "input_size": 32}},
    ],
    ids=["trained", "fine-tuned"],
)
def test_a_fine_tuned_plain_network_is_validated_at_the_size_it_trains_at(
    tmp_path: Path, source: dict[str, Any]
) -> None:
    """Its 16-px crops reach it resized to the 32 px its checkpoint was fed; validation must
    measure it there too, not at --image-size (where it once saw every test image)."""
    loop = _fine_tuned_loop(tmp_path, source)
    assert _fed_sides(loop) == {"training": {32}, "validation": {32}}


@pytest.mark.parametrize(
    ("recorded", "side"),
    [({"input_size": 32}, 32), ({}, 16)],
    ids=["recorded", "written-before-the-key"],
)
def test_a_resumed_fine_tuned_plain_network_is_validated_and_recorded_as_its_run_was(
    tmp_path: Path, recorded: dict[str, int], side: int
) -> None:
    """Trained at its --init-from's 32 px either way; validated (and recorded) at the side its
    own checkpoint says: one written before ``input_size`` was recorded validated at its
    16-px --image-size, and goes on doing so, so best.pt compares epochs scored alike."""
    from msun.runstate import TrainState
    from msun.train import _save

    source = {"train_config": {"image_size": 32}}
    loop = _fine_tuned_loop(tmp_path, source, {"image_size": 16, **recorded})
    assert _fed_sides(loop) == {"training": {32}, "validation": {side}}
    (tmp_path / "run").mkdir()
    _save(loop, TrainState())
    assert models.read_inputs(tmp_path / "run" / "last.pt")["input_size"] == side


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_fine_tuning_takes_the_architecture_from_the_checkpoint(tmp_path: Path) -> None:
    assert train_tiny(tmp_path / "src", "--method", "vanilla", "--epochs", "1").exit_code == 0
    args = [
        "train",
        "--init-from",
        str(tmp_path / "src" / "last.pt"),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--num-train",
        "16",
        "--num-val",
        "8",
        "--eval-sizes",
        "32",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "ft"),
    ]
    result = CliRunner().invoke(main, args)  # no --model: the default resnet50 must not leak in
    assert result.exit_code == 0, result.output
    assert "vanilla resnet18, fine-tuning of " in result.output  # what the run trains
    tuned = models.load_checkpoint(tmp_path / "ft" / "last.pt")
    assert isinstance(tuned, torchvision.models.ResNet)
    assert len(tuned.layer1) == 2
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["model"] == "resnet18"
    for flag, value in (("--model", "resnet50"), ("--method", "msun")):  # asked for, not defaults
        out = tmp_path / f"ft{flag}"
        refused = CliRunner().invoke(main, [*args[:-1], str(out), flag, value])
        assert refused.exit_code == 2, refused.output
        assert f"a resnet18 vanilla network; {flag} {value} asks for another" in refused.stderr
        assert f"Hint: drop {flag}" in refused.stderr
        assert not out.exists()
    same = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "ft2"), "--model", "resnet18"])
    assert same.exit_code == 0, same.output  # the checkpoint's own value is no conflict


def test_split_at_auto_refusals_write_nothing(tmp_path: Path) -> None:
    analysis = CKAResult(
        np.eye(2),
        ["maxpool", "layer1.0"],
        ["maxpool", "layer1.0"],
        {"mode": "scales", "model": "resnet18"},
    )
    analysis.save(tmp_path / "analysis")
    out = tmp_path / "run"
    result = train_tiny(
        out, "--split-at", "auto", "--cka-from", str(tmp_path / "analysis"), "--batch-size", "1"
    )
    assert result.exit_code == 2
    assert "at least 2 images" in result.stderr
    assert not out.exists()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_deterministic_fixes_the_cublas_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    result = train_tiny(
        tmp_path / "out", "--epochs", "1", "--steps-per-epoch", "1", "--deterministic"
    )
    assert result.exit_code == 0, result.output
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_training_scales_above_the_image_size_are_noted(tmp_path: Path) -> None:
    result = train_tiny(
        tmp_path / "r", "--scales", "16", "48", "--epochs", "1", "--steps-per-epoch", "1"
    )
    assert result.exit_code == 0, result.output
    assert (
        "note: --scales 48 above --image-size 32: each 32-px crop is upsampled to it, which adds "
        "no detail (msun's default --scales end at the image size: 5 18 32)"
    ) in result.stderr
    assert "note: --scales" not in train_tiny(tmp_path / "s", "--epochs", "1").stderr


def test_a_run_announces_what_it_trains() -> None:
    from msun.config import TrainConfig
    from msun.train import network_words

    def words(**values: object) -> str:
        return network_words(TrainConfig(model="resnet18", scales=(4, 16, 28), **values))

    assert words(method="vanilla") == "vanilla resnet18"
    assert words(method="mst") == "mst resnet18 at scales [4, 16, 28]"
    assert words(method="mst", bn="private", distill=True) == (
        "mst resnet18 at scales [4, 16, 28], a BatchNorm set per scale, ensemble distillation"
    )
    assert words(method="msun", split_at="layer2", bn="private") == (
        "msun resnet18 split at layer2, scales [4, 16, 28], a BatchNorm set per path in the trunk"
    )
    assert words(method="vanilla", init_from="a.pt", linear_probe=True, image_size=32) == (
        "vanilla resnet18, linear probe of a.pt at 32 px"
    )
    assert words(method="mst", bn="private", init_from="a.pt", image_size=32) == (
        "mst resnet18, a BatchNorm set per scale, fine-tuning of a.pt at 32 px"
    )  # a fine-tuned network runs at one size, not at its training scales
    plain = TrainConfig(model="resnet18", method="vanilla", init_from="sd.pt", image_size=28)
    assert network_words(plain, 224) == (
        "vanilla resnet18, fine-tuning of sd.pt at 224 px (28-px images resized)"
    )  # a plain state dict is fed ImageNet's side, as its checkpoints record
    assert network_words(plain, 28).endswith("fine-tuning of sd.pt at 28 px")
