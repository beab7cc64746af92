"""msun.data: image folders a run refuses (other classes in val, no train/ folder, only unreadable
images), the number of classes, and the one validation subset of msun train and msun eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from msun.cli import main
from tests.msun.runs import train_tiny


def test_class_mismatch_between_train_and_val(tmp_path: Path) -> None:
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "0.png")
    result = train_tiny(tmp_path / "out", "--data", str(tmp_path / "d"))
    assert result.exit_code == 2
    assert "different classes" in result.stderr


def test_an_image_folder_without_train_and_val_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / c / "0.png")
    result = train_tiny(tmp_path / "out", "--data", str(tmp_path / "flat"))
    assert result.exit_code == 2
    assert "has no train/ folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_num_classes_must_match_the_data(tmp_path: Path) -> None:
    result = train_tiny(tmp_path / "out", "--num-classes", "5")
    assert result.exit_code == 2
    assert "holds 10 classes" in result.stderr


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
    result = train_tiny(tmp_path / "out", "--data", str(tmp_path / "d"), "--num-train", "8")
    assert result.exit_code == 1
    assert "every image of a micro-batch was unreadable" in result.stderr
    assert "Traceback" not in result.output


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


def test_num_val_above_the_validation_set_is_refused_never_clamped() -> None:
    """One check for msun train and msun eval (``msun.data.check_num_val``)."""
    from ckascope.errors import InputError
    from msun.data import check_num_val

    for fits in (None, 1, 10):
        check_num_val(fits, 10, "imgs")
    with pytest.raises(
        InputError, match=r"--num-val 11 .* imgs holds: 10\. Hint: give --num-val 10"
    ):
        check_num_val(11, 10, "imgs")


def test_num_train_above_the_training_set_is_refused_never_clamped() -> None:
    """The same check as --num-val's (``msun.data.check_count``), for the training split."""
    from ckascope.errors import InputError
    from msun.data import check_count

    for fits in (None, 1, 60000):
        check_count("--num-train", fits, 60000, "training", "fashionmnist")
    with pytest.raises(
        InputError,
        match=r"--num-train 100000 asks for more training images than fashionmnist holds: "
        r"60000\. Hint: give --num-train 60000 or fewer",
    ):
        check_count("--num-train", 100000, 60000, "training", "fashionmnist")


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_validation_counts_its_unreadable_images_in_the_metrics_rows(tmp_path: Path) -> None:
    """As msun eval's skipped_images: a column after the ones there before it, in both logs."""
    import csv

    from PIL import Image

    for split, count in (("train", 16), ("val", 4)):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(
                    tmp_path / "d" / split / c / f"{i}.png"
                )
    (tmp_path / "d" / "val" / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    result = train_tiny(out, "--data", str(tmp_path / "d"), "--num-val", "9", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "val_skipped_images 1" in result.stdout  # the epoch's line says it too
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(row)[-1] == "val_skipped_images"
    assert row["val_skipped_images"] == 1
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[-1])[-1] == "val_skipped_images"
    assert rows[-1]["val_skipped_images"] == "1"
