"""msun.augment: the batched augmentation against torchvision's per-image pipeline.

The per-image pipeline (``msun.data.train_transform`` under ``torch.manual_seed(item seed)``) is
the reference: the batched path must draw the same crops and flips and give the same pixels up
to the fixed-point rounding of torch's uint8 kernel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from ckascope.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from ckascope.shapes import SyntheticShapes
from msun.augment import RATIO, BatchAugmented, apply_crops, draw_crop, in_memory_images
from msun.config import TrainConfig
from msun.data import SeededItems, datasets, item_seed, make_loader, train_transform
from tests.idxfiles import write_idx

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def _torchvision_draws(seed: int, height: int, width: int, scale: tuple[float, float]) -> tuple:
    """What v2.RandomResizedCrop then RandomHorizontalFlip draw after torch.manual_seed(seed)."""
    crop = v2.RandomResizedCrop(28, scale=scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        p = crop.make_params([torch.zeros(1, height, width)])
        flip = bool(torch.rand(1) < 0.5)
    return p["top"], p["left"], p["height"], p["width"], flip


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [
        (28, 28, (0.35, 1.0)),
        (32, 32, (0.08, 1.0)),
        (20, 40, (0.35, 1.0)),
        (28, 28, (1.5, 2.0)),  # every draw too large: the central fallback
        (10, 40, (1.5, 2.0)),  # fallback on an image wider than the ratio range
        (40, 10, (1.5, 2.0)),  # and taller
    ],
)
def test_crops_and_flips_are_torchvisions_draws(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    for seed in [0, 1, 7, 12345, 2**40 + 3, *range(100, 160)]:
        c = draw_crop(seed, height, width, scale, RATIO)
        assert (c.top, c.left, c.height, c.width, c.flip) == _torchvision_draws(
            seed, height, width, scale
        )


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised images back in uint8 levels, their absolute difference."""
    return ((a - b) * STD * 255).abs().round()


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_equals_the_per_image_pipeline_to_one_rounding(channels: int) -> None:
    gen = torch.Generator().manual_seed(channels)
    images = torch.randint(0, 256, (40, channels, 28, 28), dtype=torch.uint8, generator=gen)
    images[:10] = (images[:10] > 127).to(torch.uint8) * 255  # hard edges: bicubic overshoot
    keys = [(i, item_seed(3, 1, i)) for i in range(len(images))]
    per_image = train_transform(24, 0.08)
    with torch.random.fork_rng(devices=[]):
        expected = []
        for i, seed in keys:
            torch.manual_seed(seed)
            expected.append(per_image(images[i]))
    batch = BatchAugmented(images, torch.zeros(40, dtype=torch.long), 24, 0.08).__getitems__(keys)
    diff = _levels(batch.images, torch.stack(expected))
    assert batch.images.shape == (40, 3, 24, 24)
    assert diff.max() <= 2  # fixed-point weights in torch's uint8 kernel
    assert (diff > 0.5).float().mean() < 0.01


def test_an_image_is_augmented_alike_alone_and_in_any_batch() -> None:
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    data = BatchAugmented(images, torch.arange(16), 28, 0.35)
    keys = [(i, 1000 + i) for i in range(16)]
    whole = data.__getitems__(keys).images
    alone = torch.stack([data[k][0] for k in keys])
    reversed_ = data.__getitems__(keys[::-1]).images.flip(0)
    assert torch.equal(whole, alone)
    assert torch.equal(whole, reversed_)
    assert data[(3, 7)][1] == 3


def test_an_uncropped_unflipped_image_is_only_normalised() -> None:
    images = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    crop = draw_crop(0, 28, 28, (1.5, 2.0), RATIO)  # the central fallback: the whole image
    assert (crop.height, crop.width) == (28, 28)
    out = apply_crops(images, [crop], 28)
    plain = images.float().expand(-1, 3, -1, -1) / 255
    if crop.flip:
        plain = plain.flip(-1)
    torch.testing.assert_close(out, (plain - MEAN) / STD)


def test_in_memory_sets_are_found_and_others_are_not(tmp_path: Path) -> None:
    written = write_idx(tmp_path / "fm", 32, gz=False)
    train = build_dataset(f"fashionmnist:{tmp_path / 'fm'}", "train")
    images, labels = in_memory_images(train)  # type: ignore[misc]
    assert images.shape == (32, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert np.array_equal(images[:, 0].numpy(), written["train"])
    assert np.array_equal(labels.numpy(), written["train_labels"])
    sub = in_memory_images(Subset(train, [5, 2, 9]))
    assert sub is not None
    assert torch.equal(sub[0], images[[5, 2, 9]])

    class CifarLike(torch.utils.data.Dataset):  # CIFAR's layout: (N, H, W, 3) array, list labels
        def __init__(self) -> None:
            self.data = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
            self.targets = [1, 0]

    like = CifarLike()
    cifar = in_memory_images(like)
    assert cifar is not None
    assert torch.equal(cifar[0], torch.from_numpy(like.data).permute(0, 3, 1, 2))
    assert torch.equal(cifar[1], torch.tensor([1, 0]))
    assert in_memory_images(SyntheticShapes("train", 8, size=16)) is None


def test_training_on_the_mnist_family_takes_the_batched_path(tmp_path: Path) -> None:
    write_idx(tmp_path / "fm", 64, gz=True)
    cfg = TrainConfig(
        data=f"fashionmnist:{tmp_path / 'fm'}", image_size=20, batch_size=8, num_train=48
    )
    train, _, classes = datasets(cfg)
    assert isinstance(train, BatchAugmented)
    assert len(train) == 48
    assert classes == 10
    keys = [[(i, item_seed(0, 0, i)) for i in range(8)]]
    loaders = [make_loader(train, TrainConfig(workers=w), torch.device("cpu")) for w in (0, 1)]
    batches = []
    for loader in loaders:
        loader.batch_sampler.plan = keys  # type: ignore[union-attr]
        batches.append(next(iter(loader)))
    assert batches[0].images.shape == (8, 3, 20, 20)
    assert torch.equal(batches[0].images, batches[1].images)
    assert torch.equal(batches[0].labels, batches[1].labels)


def test_sets_not_in_memory_keep_the_per_image_pipeline() -> None:
    train, _, _ = datasets(TrainConfig(data="shapes", image_size=16, num_train=8, num_val=4))
    assert isinstance(train, SeededItems)
    loader = DataLoader(train, batch_size=2)
    assert loader.dataset is train
