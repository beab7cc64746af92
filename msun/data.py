"""Training data for msun: augmentation, and a batch plan that makes every run reproducible.

The order of the images is a function of (seed, epoch) and the augmentation of each image a
function of (seed, epoch, index), whatever the number of processes, workers or restarts. A global
batch is cut into world_size x accum_steps micro-batches; process r takes micro-batches
r*accum .. r*accum + accum - 1. A run resumed from any checkpoint therefore repeats exactly the
steps it lost, and W processes see the same micro-batches as one process with
``--accum-steps W``. Sets held in memory at one size (the MNIST family, CIFAR) are augmented a
batch at a time with the same draws (``msun.augment``); the others image by image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from ckascope.platform import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    DistInfo,
    InputError,
    build_dataset,
    collate_skip,
    dataset_len,
    default_resize,
    eval_transform,
    plan_batches,
    to_rgb,
)
from msun.augment import BatchAugmented, in_memory_images
from msun.config import TrainConfig, parse_sizes

#: Size of the synthetic training / validation sets when --num-train / --num-val are not given.
SYNTHETIC_TRAIN, SYNTHETIC_VAL = 20000, 2000
#: Without --num-val, validation may cost at most this share of the training it follows, on at
#: least MIN_VALIDATION images (fewer make a top-1 that moves by whole points per image).
VALIDATION_SHARE, MIN_VALIDATION = 0.1, 256

Plan = list[list[tuple[int, int]]]


def train_transform(size: int, crop_scale_min: float) -> v2.Compose:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation (the recipe)."""
    crop = v2.RandomResizedCrop(
        size,
        scale=(crop_scale_min, 1.0),
        interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True,
    )
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.ToImage(),
            crop,
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SeededItems(Dataset[Any]):
    """Item ``(index, seed)`` draws its random augmentation from ``seed``, in any process."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return dataset_len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**62)


def steps_per_epoch(num_images: int, cfg: TrainConfig) -> int:
    """Optimiser steps per epoch: full global batches only, capped by --steps-per-epoch."""
    steps = num_images // cfg.batch_size
    if steps == 0:
        raise InputError(
            f"{num_images} training images make no batch of {cfg.batch_size}. Hint: lower --batch-size"
        )
    return min(steps, cfg.steps_per_epoch or steps)


def micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """Images per process per forward pass; BatchNorm needs at least 2."""
    micro, rest = divmod(cfg.batch_size, world_size * cfg.accum_steps)
    if rest or micro < 2:
        raise InputError(
            f"--batch-size {cfg.batch_size} must split into {world_size} process(es) x "
            f"{cfg.accum_steps} accumulation step(s) of at least 2 images each (BatchNorm needs 2). "
            "Hint: use a multiple of their product, at least twice it"
        )
    return micro


def epoch_plan(num_images: int, epoch: int, cfg: TrainConfig, info: DistInfo) -> Plan:
    """This process's micro-batches of one epoch, as lists of (index, augmentation seed)."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=generator).tolist()
    micro = micro_batch(cfg, info.world_size)
    plan = []
    for step in range(steps_per_epoch(num_images, cfg)):
        batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        for m in range(cfg.accum_steps):
            start = (info.rank * cfg.accum_steps + m) * micro
            plan.append([(i, item_seed(cfg.seed, epoch, i)) for i in batch[start : start + micro]])
    return plan


class PlanSampler:
    """A batch sampler whose batches are set before each pass over the data.

    It lets one DataLoader, with persistent workers, serve every epoch of a run.
    """

    def __init__(self) -> None:
        self.plan: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.plan))

    def __len__(self) -> int:
        return len(self.plan)


def make_loader(dataset: Dataset[Any], cfg: TrainConfig, device: torch.device) -> DataLoader[Any]:
    """A DataLoader whose batches come from a ``PlanSampler``.

    It gets its own generator, so creating it does not draw from the global RNG (whose state a
    checkpoint restores for dropout).
    """
    return DataLoader(
        dataset,
        batch_sampler=PlanSampler(),
        collate_fn=collate_batch,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator(),
    )


def collate_batch(items: Any) -> Batch:
    """A ``BatchAugmented`` set's batch as it comes; (image, label) items collated."""
    return items if isinstance(items, Batch) else collate_skip(items)


def val_batches(num_images: int, batch_size: int, info: DistInfo) -> list[list[int]]:
    """This process's share of the validation images, in batches."""
    return plan_batches(range(num_images), batch_size, info.rank, info.world_size, deal="images")


def datasets(cfg: TrainConfig, *, saved: bool = False) -> tuple[Dataset[Any], Dataset[Any], int]:
    """The training set (seeded augmentation), the validation set and the number of classes.

    Args:
        cfg: The run's options.
        saved: ``cfg`` is a saved run's own (resumed or reused): its ``num_train`` and
            ``num_val`` are taken as the run took them, never refused. Older versions clamped
            one above its set to the whole set, which ``subset`` still gives: the run's own
            images.

    Raises:
        InputError: Missing/empty data, train and val with different classes, or
            ``--num-train`` / ``--num-val`` of a new run above the images of their split.
    """
    size = cfg.image_size
    train = build_dataset(
        cfg.data,
        "train",
        train_transform(size, cfg.crop_scale_min),
        num_images=cfg.num_train or SYNTHETIC_TRAIN,
        seed=cfg.seed,
        synthetic_size=size,
        require_split=True,
    )
    val = build_dataset(
        cfg.data,
        "val",
        eval_transform(size, default_resize(cfg.data, size)),
        num_images=cfg.num_val or SYNTHETIC_VAL,
        seed=cfg.seed,
        synthetic_size=size,
        require_split=True,
    )
    classes, val_classes = _classes(train), _classes(val)
    if classes != val_classes:
        raise InputError(
            f"train and val hold different classes ({len(classes or [])} vs {len(val_classes or [])}). "
            "Hint: give both folders the same class sub-folders"
        )
    if classes is None and cfg.num_classes is None:
        raise InputError(
            f"{type(train).__name__} does not name its classes. Hint: pass --num-classes N"
        )
    if classes is not None and cfg.num_classes not in (None, len(classes)):
        raise InputError(
            f"--num-classes {cfg.num_classes} but the data holds {len(classes)} classes. Hint: drop --num-classes"
        )
    if not saved:
        check_count("--num-train", cfg.num_train, dataset_len(train), "training", cfg.data)
        check_num_val(cfg.num_val, dataset_len(val), cfg.data)
    count = int((cfg.num_classes if classes is None else len(classes)) or 0)
    train, val = (
        subset(train, cfg.num_train, cfg.seed),
        validation_subset(val, cfg.num_val, cfg.seed),
    )
    for split, dataset in (("training", train), ("validation", val)):
        check_labels(dataset, count, split, cfg.data)
    return _augmented(train, cfg, classes), val, count


def check_labels(dataset: Dataset[Any], count: int, split: str, data: str) -> None:
    """Refuses labels outside 0..count-1, before any step, for sets that hold their labels.

    Raises:
        InputError: Naming the first such image (its index in the set) and its label.
    """
    labels = held_labels(dataset)
    if labels is None or count < 1:
        return
    bad = torch.nonzero((labels < 0) | (labels >= count)).flatten()
    if len(bad):
        i = int(bad[0])
        raise InputError(
            f"{split} image {i} of {data} has label {int(labels[i])}, outside 0..{count - 1} "
            f"({count} classes; {len(bad)} such image(s)). Hint: check the set's label file, or "
            "pass --num-classes above its largest label"
        )


def held_labels(dataset: Dataset[Any]) -> torch.Tensor | None:
    """The labels (N,) a set keeps in memory (``targets``, SVHN's ``labels``), else None."""
    if isinstance(dataset, Subset):
        inner = held_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices))]
    labels = getattr(dataset, "targets", None)
    labels = getattr(dataset, "labels", None) if labels is None else labels
    if labels is None:
        return None
    try:
        return torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
    except (TypeError, ValueError):
        return None


def _augmented(train: Dataset[Any], cfg: TrainConfig, classes: list[str] | None) -> Dataset[Any]:
    """The training set with its augmentation: a batch at a time for images held in memory.

    Both paths draw each image's crop and flip from its own seed, the same way
    (``msun.augment``); sets read from files or drawn on the fly go image by image.
    """
    held = in_memory_images(train)
    if held is None:
        return SeededItems(train)
    return BatchAugmented(*held, cfg.image_size, cfg.crop_scale_min, classes)


def default_num_val(cfg: TrainConfig, steps: int, available: int) -> int:
    """Validation images of a run without --num-val (``VALIDATION_SHARE`` of its training).

    Costs counted in forward passes of one image at the training size: a training step costs
    about 3 per image and trained path (forward and backward), a validation 1 per image, test
    size and evaluated path (an upper bound: smaller sizes cost less).

    Args:
        cfg: The resolved config.
        steps: Optimiser steps per epoch.
        available: Images in the validation set.
    """
    assert cfg.epochs is not None, "resolve the config first"
    assert cfg.eval_sizes is not None, "resolve the config first"
    trained = len(cfg.scales) if cfg.method in ("msun", "mst") else 1
    evaluated = len(cfg.scales) if cfg.method == "msun" else 1
    epochs = min(cfg.eval_every, cfg.epochs)  # training between two validations
    training = 3 * steps * cfg.batch_size * trained * epochs
    per_image = len(parse_sizes(cfg.eval_sizes)) * evaluated
    share = int(VALIDATION_SHARE * training / per_image)
    return min(available, max(MIN_VALIDATION, share))


def _classes(dataset: Dataset[Any]) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    return None if classes is None else [str(c) for c in classes]


def validation_seed(seed: int) -> int:
    """The seed of the validation images a run of ``seed`` scores (its training draws use seed).

    ``msun eval --num-val N`` draws with it too, so it scores the images the run validated on.
    """
    return seed + 1


def recalibration_seed(seed: int) -> int:
    """The seed of the training images ``msun eval --recalibrate-bn`` draws for a run of ``seed``.

    Apart from its validation draw's, so the two sets are drawn independently.
    """
    return seed + 2


def check_count(option: str, count: int | None, available: int, split: str, data: str) -> None:
    """Refuses ``option count`` above the images ``data``'s ``split`` holds (never clamped).

    Clamped, a run or an evaluation would use fewer images than it says it asked for.

    Args:
        option: The flag, named in the message (``--num-train``, ``--num-val``).
        count: Its value (None: not given, nothing to check).
        available: The images in ``data``'s split.
        split: Which split, in words ("training", "validation").
        data: The ``--data`` spec, named in the message.

    Raises:
        InputError: ``count`` above ``available``, naming both.
    """
    if count is not None and count > available:
        raise InputError(
            f"{option} {count} asks for more {split} images than {data} holds: "
            f"{available}. Hint: give {option} {available} or fewer"
        )


def check_num_val(count: int | None, available: int, data: str) -> None:
    """Refuses ``--num-val count`` above the validation images ``data`` holds (``check_count``)."""
    check_count("--num-val", count, available, "validation", data)


def validation_subset(dataset: Dataset[Any], count: int | None, seed: int) -> Dataset[Any]:
    """The ``count`` validation images a run of ``seed`` scores (``validation_seed``)."""
    return subset(dataset, count, validation_seed(seed))


def subset(dataset: Dataset[Any], count: int | None, seed: int) -> Dataset[Any]:
    """A seeded random subset of ``count`` items (the whole set for None or more)."""
    size = dataset_len(dataset)
    if count is None or count >= size:
        return dataset
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return Subset(dataset, keep)
