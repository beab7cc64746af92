"""MNIST-family idx files: the loader on files written here, and on Debian's real Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckascope import idxdata
from ckascope.cli import main as ckascope_main
from ckascope.data import build_dataset, default_resize, eval_transform, native_size
from ckascope.errors import InputError
from msun.cli import main as msun_main
from tests.idxfiles import write_idx

REAL = idxdata.SYSTEM_COPIES["fashionmnist"][0]
real_data = pytest.mark.skipif(
    not REAL.is_dir(),
    reason=f"{REAL} missing: apt-get install dataset-fashion-mnist (.ci/run does as root)",
)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashionmnist", "mnist", "kmnist"])
def test_a_folder_of_idx_files_reads_exactly_what_was_written(
    tmp_path: Path, name: str, gz: bool
) -> None:
    written = write_idx(tmp_path, 8, gz=gz)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        ds = build_dataset(f"{name}:{tmp_path}", split)
        assert len(ds) == len(written[prefix])  # type: ignore[arg-type]
        for i in range(len(written[prefix])):
            image, label = ds[i]
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), written[prefix][i])
            assert label == written[prefix + "_labels"][i]
    assert len(ds.classes) == 10  # type: ignore[attr-defined]
    assert not list(tmp_path.glob("*-ubyte")) or not gz  # nothing decompressed beside the files


def test_torchvision_layout_is_found_below_the_root(tmp_path: Path) -> None:
    written = write_idx(tmp_path / "FashionMNIST" / "raw", 6, gz=False)
    ds = build_dataset(f"fashionmnist:{tmp_path}", "train")
    np.testing.assert_array_equal(np.asarray(ds[5][0]), written["train"][5])


def test_images_become_three_channels_at_the_native_size_without_a_crop(tmp_path: Path) -> None:
    written = write_idx(tmp_path, 4, gz=True)
    spec = f"fashionmnist:{tmp_path}"
    assert native_size(spec) == 28
    assert default_resize(spec, 28) == 28
    ds = build_dataset(spec, "val", eval_transform(28, default_resize(spec, 28), normalize=False))
    image, _ = ds[1]
    assert image.shape == (3, 28, 28)
    expected = torch.from_numpy(written["t10k"][1]).float() / 255
    for channel in image:
        torch.testing.assert_close(channel, expected, rtol=0, atol=1e-6)


def test_missing_files_name_what_is_missing(tmp_path: Path) -> None:
    write_idx(tmp_path, 4, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    build_dataset(f"fashionmnist:{tmp_path}", "train")  # the train split is complete
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
        build_dataset(f"fashionmnist:{tmp_path}", "val")


def test_corrupt_and_mismatched_files_are_refused(tmp_path: Path) -> None:
    write_idx(tmp_path, 4, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="gzip"):
        build_dataset(f"mnist:{tmp_path}", "train")
    damaged = bytearray(gzip.compress(bytes(range(256)) * 40))
    damaged[30:60] = b"x" * 30  # a gzip header, then a broken deflate stream
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="gzip"):
        build_dataset(f"mnist:{tmp_path}", "train")
    with pytest.raises(InputError, match="no folder after"):
        build_dataset("mnist:", "train")
    other = tmp_path / "other"
    write_idx(other, 4, gz=False)
    (other / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 3) + bytes(3))
    with pytest.raises(InputError, match="4 images but"):
        build_dataset(f"mnist:{other}", "train")


def test_a_truncated_gzip_file_is_called_damaged_with_the_way_to_restore_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx(tmp_path, 4, gz=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])  # a download cut short
    with pytest.raises(InputError) as caught:
        build_dataset(f"fashionmnist:{tmp_path}", "val")
    assert str(caught.value).endswith(
        "Hint: the file is damaged (cut short or overwritten): download it again"
    )
    monkeypatch.setitem(idxdata.SYSTEM_COPIES, "fashionmnist", (tmp_path, "dataset-fashion-mnist"))
    with pytest.raises(InputError) as installed:
        build_dataset("fashionmnist", "val")
    assert str(installed.value).endswith(
        "download it again, or reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
    )


def test_bare_names_without_a_system_copy_teach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InputError, match="no system package installs mnist"):
        build_dataset("mnist")
    monkeypatch.setitem(
        idxdata.SYSTEM_COPIES, "fashionmnist", (tmp_path / "absent", "dataset-fashion-mnist")
    )
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashionmnist")
    result = CliRunner().invoke(
        ckascope_main, ["compare", "-m", "resnet18", "--weights", "none", "--data", "fashionmnist"]
    )
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert "Traceback" not in result.output


@real_data
def test_debian_fashion_mnist_is_the_real_set() -> None:
    train, test = build_dataset("fashionmnist", "train"), build_dataset("fashionmnist", "val")
    assert (len(train), len(test)) == (60000, 10000)  # type: ignore[arg-type]
    labels = test.targets  # type: ignore[attr-defined]
    assert torch.bincount(labels).tolist() == [1000] * 10  # balanced, as published
    assert test.classes[0] == "T-shirt/top"  # type: ignore[attr-defined]
    image = np.asarray(train[0][0])
    assert image.shape == (28, 28)
    assert image.dtype == np.uint8
    assert 0 < image.mean() < 255


@real_data
def test_compare_on_real_fashion_mnist_records_the_native_size(tmp_path: Path) -> None:
    out = tmp_path / "cka"
    args = ["compare", "-m", "resnet18", "--weights", "none", "--data", "fashionmnist"]
    args += ["--scales", "7", "28", "--num-images", "64", "--batch-size", "32"]
    result = CliRunner().invoke(
        ckascope_main, [*args, "--layers", "stages", "--out", str(out), "--no-figures"]
    )
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "result.json").read_text())["settings"]
    assert (settings["native_size"], settings["image_size"], settings["resize_size"]) == (
        28,
        28,
        28,
    )
    assert settings["images_used"] == 64


@real_data
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_msun_trains_and_evaluates_on_real_fashion_mnist(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--model", "resnet18", "--data", "fashionmnist", "--image-size", "28"]
    args += ["--scales", "8", "28", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch"]
    args += ["2", "--num-train", "64", "--num-val", "16", "--out", str(run)]
    result = CliRunner().invoke(msun_main, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval"
    args = ["eval", str(run / "last.pt"), "--num-val", "16", "--paths", "routed", "--out", str(out)]
    result = CliRunner().invoke(msun_main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    assert summary["sizes"] == list(range(4, 29, 2))
    assert all(0 <= t <= 100 for t in summary["top1"])
