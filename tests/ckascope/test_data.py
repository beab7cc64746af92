from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ckascope.data import (
    Skipped,
    build_dataset,
    collate_skip,
    eval_transform,
    list_datasets,
    subset_indices,
    to_rgb,
)
from ckascope.errors import InputError
from ckascope.shapes import SyntheticShapes


def _image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_synthetic_is_the_default_and_transformed() -> None:
    ds = build_dataset(None, "val", eval_transform(32, 36), num_images=12, seed=1)
    assert isinstance(ds, SyntheticShapes)
    assert len(ds) == 12
    image, label = ds[0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert 0 <= label < 10
    assert abs(float(image.mean())) < 3  # ImageNet-normalised


def test_eval_transform_matches_resize_centre_crop_normalise() -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    out = eval_transform(224, 256)(img)
    assert out.shape == (3, 224, 224)
    plain = eval_transform(224, 256, normalize=False)(img)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(out, (plain - mean) / std)


def test_image_folder_with_corrupt_files_skips_and_counts(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "text.jpg").write_text("not an image")
    ds = build_dataset(str(root), "val", eval_transform(32, 32))
    assert len(ds) == 9
    items = [ds[i] for i in range(len(ds))]
    skipped = [it for it in items if isinstance(it, Skipped)]
    assert sorted(Path(s.path).name for s in skipped) == ["empty.jpg", "text.jpg", "truncated.png"]
    batch = collate_skip(items)
    assert batch.images.shape == (6, 3, 32, 32)
    assert batch.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(batch.skipped) == 3


def test_image_folder_uses_split_subfolder(tmp_path: Path) -> None:
    _image_folder(tmp_path / "data" / "train", per_class=2)
    _image_folder(tmp_path / "data" / "val", per_class=1)
    assert len(build_dataset(str(tmp_path / "data"), "val")) == 2
    assert len(build_dataset(str(tmp_path / "data"), "train")) == 4


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "RGBA", "I;16", "I", "F"])
def test_to_rgb_handles_modes(mode: str) -> None:
    base = Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 9, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F"):
        arr = np.linspace(0, 65535 if mode != "F" else 1000, 72).reshape(8, 9)
        img = Image.fromarray(
            arr.astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
        )
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == (9, 8)
    if mode in ("I;16", "I", "F"):
        arr_out = np.asarray(out)[..., 0]
        assert arr_out.min() == 0
        assert arr_out.max() == 255


def test_to_rgb_repeats_single_channel_tensors() -> None:
    assert to_rgb(torch.zeros(1, 5, 5)).shape == (3, 5, 5)


def _write_mnist(root: Path, n: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )


def test_torchvision_dataset_on_disk(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    ds = build_dataset(f"mnist:{tmp_path}", "val", eval_transform(32, 32))
    image, label = ds[0]
    assert len(ds) == 10
    assert image.shape == (3, 32, 32)
    assert 0 <= label < 10
    assert "cifar10" in list_datasets()
    assert "shapes" in list_datasets()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("cifar1O:/tmp", r"did you mean 'cifar10'"),
        ("/no/such/dir", "does not exist"),
        ("mnist:/no/such/dir", "does not exist"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        build_dataset(spec)


def test_a_missing_folder_is_named_as_given_with_every_form_data_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as dotted:
        build_dataset("./fashionmnist")
    message = str(dotted.value)
    assert message.startswith("data directory ./fashionmnist does not exist. Hint: did you mean")
    assert "--data fashionmnist?" in message  # the installed copy: ./ names a folder
    for form in ("NAME:PATH", "fashionmnist alone (Debian's dataset-fashion-mnist)", "shapes"):
        assert form in message
    with pytest.raises(InputError, match=r"did you mean --data fashionmnist\?"):
        build_dataset("FashionMNIST")
    with pytest.raises(InputError, match=r"did you mean --data cifar10:PATH\?"):
        build_dataset("CIFAR-10")  # no copy without a path: the form that works
    with pytest.raises(InputError) as other:
        build_dataset("photos")
    assert "did you mean" not in str(other.value)


def test_empty_and_missing_dataset_dirs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        build_dataset(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no usable cifar10"):
        build_dataset(f"cifar10:{tmp_path / 'empty'}")


def test_subset_indices() -> None:
    a = subset_indices(100, 10, seed=0)
    assert len(a) == 10
    assert len(set(a)) == 10
    assert a == subset_indices(100, 10, seed=0)
    assert a != subset_indices(100, 10, seed=1)
    assert sorted(subset_indices(20, None, seed=0)) == list(range(20))
    with pytest.raises(InputError, match=r"1\.\.100"):
        subset_indices(100, 101, seed=0)
    with pytest.raises(InputError, match="empty"):
        subset_indices(0, None, seed=0)


def test_dark_16_bit_images_are_scaled_by_their_depth_not_their_maximum() -> None:
    dark = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))  # 200 / 65535: nearly black
    assert np.asarray(to_rgb(dark)).max() == 1


def test_the_loaders_pin_memory_step_pins_our_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned: list[torch.Tensor] = []

    def fake_pin(self: torch.Tensor, *args: object) -> torch.Tensor:  # no GPU here to pin for
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = collate_skip(
        [(torch.zeros(3, 4, 4), 1), Skipped("x.jpg", "bad"), (torch.ones(3, 4, 4), 0)]
    )
    out = pin_memory(batch)  # what DataLoader(pin_memory=True) does to each batch
    assert isinstance(out, type(batch))
    assert [t.shape for t in pinned] == [(2, 3, 4, 4), (2,)]
    assert out.skipped == batch.skipped


@pytest.mark.cuda
def test_batches_are_really_pinned_on_a_gpu_machine() -> None:
    batch = collate_skip([(torch.zeros(3, 4, 4), 1)])
    assert batch.pin_memory().images.is_pinned()


def test_plan_batches_deals_whole_batches_to_the_processes() -> None:
    from ckascope.data import plan_batches

    order = list(range(20, 0, -1))
    single = plan_batches(order, 6, min_size=4)
    assert single == [order[0:6], order[6:12], order[12:18]]  # the 2-image rest is dropped
    shares = [plan_batches(order, 6, rank, 2, min_size=4) for rank in range(2)]
    assert shares == [[single[0], single[2]], [single[1]]]
    assert plan_batches(range(5), 2) == [[0, 1], [2, 3], [4]]
    images = [plan_batches(range(7), 2, rank, 2, deal="images") for rank in range(2)]
    assert images == [[[0, 2], [4, 6]], [[1, 3], [5]]]
