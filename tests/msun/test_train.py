from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from click.testing import CliRunner, Result

from ckascope import models
from ckascope.result import CKAResult
from msun import MSUN, build_msun, save_checkpoint
from msun.cli import main
from msun.config import TrainConfig
from msun.objective import Objective
from msun.runstate import RunLock
from msun.train import build_network
from tests import tinyrun

ROOT = Path(__file__).resolve().parents[2]
TINY = [*tinyrun.MODEL, "--num-train", "32", "--lr", "0.05"]


def _train(out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["train", *TINY, "--out", str(out), *extra])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _subprocess(*args: str) -> list[str]:
    return [sys.executable, "-m", "msun", "train", *TINY, *args]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_training_and_validation_report_progress_without_a_terminal(tmp_path: Path) -> None:
    result = _train(tmp_path / "run", "--method", "msun", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "epoch 1/1 loss" in result.output
    assert ": 4/4 (" in result.output  # 32 images, batch 8: the epoch's last step is reported
    assert "validation (2 sizes): 1/1 (" in result.output


@pytest.mark.parametrize("method", ["msun", "mst", "vanilla"])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_each_method_trains_and_writes_its_run_folder(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    result = _train(out, "--method", method, "--epochs", "2")
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


@pytest.mark.parametrize("method", ["msun", "mst", "vanilla"])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_loss_decreases_on_a_fixed_batch(method: str) -> None:
    cfg = TrainConfig(
        model="resnet18",
        method=method,
        scales=(16, 32),
        image_size=32,
        num_classes=4,
        si_threshold=0.0,
    )
    model = build_network(cfg)
    objective = Objective(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    losses = []
    for _ in range(12):
        loss, terms = objective(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(terms) == (
        {"ce_16", "ce_32", "si"}
        if method == "msun"
        else {"ce_16", "ce_32"}
        if method == "mst"
        else {"ce"}
    )


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
@pytest.mark.parametrize("bn", ["shared", "private"])
def test_two_gloo_processes_equal_one_process_with_accumulation(tmp_path: Path, bn: str) -> None:
    common = [
        *["--method", "msun", "--bn", bn, "--epochs", "1", "--steps-per-epoch", "3"],
        *["--workers", "0"],
    ]
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
    a, b = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    params = [
        k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    torch.manual_seed(0)  # the runs' initialisation (seed 0): training must have moved away from it
    start = build_msun("resnet18", scales=(16, 32), num_classes=10, bn=bn).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in params) > 1e-4
    for key in params:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rngs = [torch.load(tmp_path / r / "last.pt")["rng"]["ranks"] for r in ("one", "two")]
    assert [len(r) for r in rngs] == [1, 2]  # every process's generators, not rank 0's only


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
def test_eval_refuses_checkpoints_of_other_data_or_sizes_unless_told_which(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(model, tmp_path / "a.pt", train_config={"data": "shapes", "image_size": 32})
    save_checkpoint(model, tmp_path / "b.pt", train_config={"data": "shapes", "image_size": 48})
    args = ["eval", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--num-val", "8"]
    args += ["--eval-sizes", "16,32", "--out", str(tmp_path / "eval")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "different image sizes (32, 48)" in refused.output
    assert "--image-size" in refused.output
    assert not (tmp_path / "eval").exists()
    told = CliRunner().invoke(main, [*args, "--image-size", "32", "--batch-size", "4"])
    assert told.exit_code == 0, told.output


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_numbers_match_a_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    msun_model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(msun_model, tmp_path / "msun.pt")
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(tmp_path / "msun.pt"),
            "--eval-sizes",
            "16,24,32",
            "--image-size",
            "32",
            "--num-val",
            "12",
            "--batch-size",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    from ckascope.data import build_dataset, eval_transform, subset_indices

    data = build_dataset("shapes", "val", eval_transform(32, 37), num_images=12, synthetic_size=32)
    idx = subset_indices(len(data), None, 0)
    images = torch.stack([data[i][0] for i in idx])
    labels = torch.tensor([data[i][1] for i in idx])
    with torch.no_grad():
        for i, size in enumerate([16, 24, 32]):
            x = (
                torch.nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False
                )
                if size != 32
                else images
            )
            for k in range(2):
                pred = msun_model.forward_path(x, k).argmax(1)
                assert summary["top1_per_path"][i][k] == pytest.approx(
                    100 * float((pred == labels).float().mean())
                )
            assert summary["path"][i] == (0 if size <= 16 else 1)
    assert summary["mean_top1"] == pytest.approx(np.mean(summary["top1"]))
    assert summary["memory_format"] == "channels_last"  # auto on a CPU; the reference: contiguous
    assert {p.name for p in out.iterdir()} == {
        "eval.csv",
        "eval.json",
        "figure4.png",
        "figure4.pdf",
    }


def test_evaluation_in_channels_last_scores_alike_and_gives_the_model_back() -> None:
    from msun.evaluate import evaluate

    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).train()
    before = [(n, t.data_ptr(), t.stride(), t.clone()) for n, t in model.state_dict().items()]
    batches = [(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for _ in range(2)]
    run = {"sizes": [12, 32], "image_size": 32}
    plain = evaluate(model, batches, memory_format="contiguous", **run)
    fast = evaluate(model, batches, memory_format="channels_last", **run)
    np.testing.assert_allclose(fast.top1, plain.top1)
    np.testing.assert_allclose(fast.top5, plain.top5)
    assert (plain.info, fast.info) == (
        {"memory_format": "contiguous"},
        {"memory_format": "channels_last"},
    )
    after = model.state_dict()
    for name, ptr, stride, value in before:
        assert (after[name].data_ptr(), after[name].stride()) == (ptr, stride), name
        assert torch.equal(after[name], value), name
    assert model.training


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_resume_with_a_different_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1").exit_code == 0
    result = _train(out, "--epochs", "1", "--resume", "--seed", "3")
    assert result.exit_code == 2
    assert "seed: 0 -> 3" in result.stderr
    again = _train(out, "--epochs", "1")
    assert again.exit_code == 2
    assert "--resume" in again.stderr


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_second_run_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with RunLock(out):
        result = _train(out, "--epochs", "1")
    assert result.exit_code == 2
    assert "in use" in result.stderr
    assert _train(out, "--epochs", "1").exit_code == 0  # the lock went with its holder
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


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    result = _train(
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


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_fine_tune_and_linear_probe_from_a_checkpoint(tmp_path: Path) -> None:
    assert _train(tmp_path / "src", "--epochs", "1").exit_code == 0
    src = tmp_path / "src" / "last.pt"
    probe = tmp_path / "probe"
    result = _train(
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
        _train(
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
    result = _train(tmp_path / "bad", "--epochs", "1", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def test_class_mismatch_between_train_and_val(tmp_path: Path) -> None:
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "0.png")
    result = _train(tmp_path / "out", "--data", str(tmp_path / "d"))
    assert result.exit_code == 2
    assert "different classes" in result.stderr


def test_an_image_folder_without_train_and_val_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / c / "0.png")
    result = _train(tmp_path / "out", "--data", str(tmp_path / "flat"))
    assert result.exit_code == 2
    assert "has no train/ folder" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_fine_tuning_takes_the_architecture_from_the_checkpoint(tmp_path: Path) -> None:
    assert _train(tmp_path / "src", "--method", "vanilla", "--epochs", "1").exit_code == 0
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
    tuned = models.load_checkpoint(tmp_path / "ft" / "last.pt")
    assert isinstance(tuned, torchvision.models.ResNet)
    assert len(tuned.layer1) == 2
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["model"] == "resnet18"


def test_num_classes_must_match_the_data(tmp_path: Path) -> None:
    result = _train(tmp_path / "out", "--num-classes", "5")
    assert result.exit_code == 2
    assert "holds 10 classes" in result.stderr


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


def test_split_at_auto_refusals_write_nothing(tmp_path: Path) -> None:
    analysis = CKAResult(
        np.eye(2),
        ["maxpool", "layer1.0"],
        ["maxpool", "layer1.0"],
        {"mode": "scales", "model": "resnet18"},
    )
    analysis.save(tmp_path / "analysis")
    out = tmp_path / "run"
    result = _train(
        out, "--split-at", "auto", "--cka-from", str(tmp_path / "analysis"), "--batch-size", "1"
    )
    assert result.exit_code == 2
    assert "at least 2 images" in result.stderr
    assert not out.exists()


def test_a_micro_batch_of_only_unreadable_images_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / "d" / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                if split == "train":
                    (folder / f"{i}.png").write_bytes(b"not an image")
                else:
                    Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    result = _train(tmp_path / "out", "--data", str(tmp_path / "d"), "--num-train", "8")
    assert result.exit_code == 1
    assert "every image of a micro-batch was unreadable" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_deterministic_fixes_the_cublas_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    result = _train(tmp_path / "out", "--epochs", "1", "--steps-per-epoch", "1", "--deterministic")
    assert result.exit_code == 0, result.output
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_num_val_scores_the_images_the_runs_validation_scored(tmp_path: Path) -> None:
    """One subset rule: ``msun eval --num-val N`` draws the run's own validation images."""
    from PIL import Image

    from ckascope.data import subset_indices
    from msun.data import validation_seed, validation_subset

    pool = list(range(40))
    picked = validation_subset(pool, 7, seed=3)  # type: ignore[arg-type]
    assert [pool[i] for i in picked.indices] == subset_indices(40, 7, validation_seed(3))  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 24)):
        for c in ("a", "b", "c"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "d" / split / c / f"{i}.png")
    args = ["train", "--model", "resnet18", "--method", "vanilla", "--data", str(tmp_path / "d")]
    args += ["--image-size", "32", "--batch-size", "8", "--num-val", "9", "--eval-sizes", "8,16,32"]
    args += ["--epochs", "1", "--lr", "0.05", "--seed", "4", "--out", str(tmp_path / "run")]
    assert CliRunner().invoke(main, args).exit_code == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "eval"
    scored = ["eval", str(tmp_path / "run" / "last.pt"), "--num-val", "9", "--batch-size", "8"]
    result = CliRunner().invoke(main, [*scored, "--memory-format", "contiguous", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    assert summary["top1"] == pytest.approx([row[f"val_top1_{s}"] for s in (8, 16, 32)])
