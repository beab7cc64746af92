"""Image sources: ImageFolder directories, torchvision datasets on disk, the synthetic set.

Specs, as given to ``--data``:

- ``shapes`` — the synthetic set (``ckascope.shapes``), drawn on the fly; nothing on disk.
- ``NAME:PATH`` — a torchvision dataset already downloaded under PATH, e.g. ``cifar10:~/data``,
  ``stl10:/data/stl``; nothing is downloaded (``list_datasets()`` names them). For ``mnist``,
  ``fashionmnist`` and ``kmnist`` PATH may also be any folder holding the original idx files,
  gzipped or not (``ckascope.idxdata``).
- ``fashionmnist`` (no path) — the copy Debian's ``dataset-fashion-mnist`` package installs
  (``./fashionmnist`` names a folder of that name instead).
- ``PATH`` — an ImageFolder directory (one sub-folder per class). For training, ``PATH/train``
  and ``PATH/val``.

Unreadable images (truncated, zero-byte, not an image, or beyond PIL's decompression-bomb limit)
are skipped with a warning naming the file, and counted: one bad JPEG in a folder of 50 000
should not end an hour-long run, and the count is reported with every result so nothing is lost
silently. Grayscale, palette, CMYK and alpha images are converted to RGB (alpha is dropped);
16-bit images are scaled to 8 bits rather than clipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2
from typing_extensions import TypeIs

from ckascope.errors import InputError, hint_close, warn
from ckascope.idxdata import IDX_DATASETS, IDX_SIZE, SYSTEM_COPIES, idx_dataset
from ckascope.shapes import SyntheticShapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Errors PIL raises for files that are not (complete, sane) images.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _split_train(name: str) -> Callable[..., Dataset[Any]]:
    cls = getattr(torchvision.datasets, name)
    return lambda root, split, transform: cls(root, train=split == "train", transform=transform)


def _split_named(name: str, train: str, val: str) -> Callable[..., Dataset[Any]]:
    cls = getattr(torchvision.datasets, name)
    return lambda root, split, transform: cls(
        root, split=train if split == "train" else val, transform=transform
    )


#: torchvision datasets that can be read from disk: name -> factory(root, split, transform).
TORCHVISION_DATASETS: dict[str, Callable[..., Dataset[Any]]] = {
    "cifar10": _split_train("CIFAR10"),
    "cifar100": _split_train("CIFAR100"),
    "stl10": _split_named("STL10", "train", "test"),
    "svhn": _split_named("SVHN", "train", "test"),
    "food101": _split_named("Food101", "train", "test"),
    "flowers102": _split_named("Flowers102", "train", "val"),
    "pets": _split_named("OxfordIIITPet", "trainval", "test"),
    "imagenet": _split_named("ImageNet", "train", "val"),
}


#: Sets of small whole images and their side in pixels. Their eval transform resizes the whole
#: image to the crop size: ImageNet's resize-then-centre-crop would cut the object's edges off.
NATIVE_SIZES = {
    **dict.fromkeys(IDX_DATASETS, IDX_SIZE),
    "cifar10": 32,
    "cifar100": 32,
    "svhn": 32,
    "stl10": 96,
}


def list_datasets() -> list[str]:
    """Names accepted before the colon in ``NAME:PATH`` specs (plus ``shapes``)."""
    return ["shapes", *sorted([*TORCHVISION_DATASETS, *IDX_DATASETS])]


def is_synthetic(spec: str | None) -> TypeIs[Literal["shapes"] | None]:
    """Whether a ``--data`` spec names the built-in synthetic set (``shapes``, or no spec)."""
    return spec in (None, "shapes")


def dataset_name(spec: str | None) -> str | None:
    """The dataset a ``--data`` spec names ("fashionmnist:DIR" -> "fashionmnist"), else None."""
    if is_synthetic(spec):
        return None
    if spec in IDX_DATASETS:
        return spec
    name, sep, _ = spec.partition(":")
    return name if sep and len(name) > 1 and not os.path.isabs(spec) else None


def native_size(spec: str | None) -> int | None:
    """Side in pixels of every image of the set a spec names (28 for Fashion-MNIST), else None."""
    return NATIVE_SIZES.get(dataset_name(spec) or "")


def default_resize(spec: str | None, crop: int, resize: int | None = None) -> int | None:
    """``resize``, else the crop itself for sets of whole small images, else None (ImageNet's)."""
    return crop if resize is None and native_size(spec) else resize


def to_rgb(image: Any) -> Any:
    """Any PIL image to 8-bit RGB; tensors with one channel are repeated to three."""
    if isinstance(image, Tensor):
        return image.expand(3, *image.shape[-2:]) if image.shape[-3] == 1 else image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(
            np.clip(arr / _white(arr, image.mode) * 255, 0, 255).round().astype(np.uint8), "L"
        )
    return image.convert("RGB")


def _white(arr: np.ndarray, mode: str) -> float:
    """The value that means white.

    The bit depth's maximum (16-bit: 65535, even for a dark image), 1 for float images in [0, 1],
    and for 32-bit integers the smallest depth that holds the data.
    """
    top = float(arr.max())
    if mode == "F":
        return 1.0 if top <= 1 else top
    if mode.startswith("I;16"):
        return 65535.0
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else top


def resize_for(crop: int, resize: int | None = None) -> int:
    """The short side before a centre crop of ``crop``: ``resize``, or ImageNet's 256/224 ratio.

    Raises:
        InputError: ``resize`` smaller than ``crop`` (the crop would pad with black).
    """
    side = round(crop * 256 / 224) if resize is None else resize
    if side < crop:
        raise InputError(
            f"--resize-size {side} is smaller than the crop {crop}. Hint: use at least {crop}"
        )
    return side


def eval_transform(
    crop: int = 224, resize: int | None = None, normalize: bool = True
) -> v2.Compose:
    """Resize the short side, centre-crop ``crop``, scale to [0, 1], normalise.

    Args:
        crop: Output side in pixels.
        resize: Short side before the crop; None keeps ImageNet's ratio (256 for 224).
        normalize: Apply ImageNet mean/std.

    Returns:
        A transform from a PIL image or uint8 tensor to a (3, crop, crop) float tensor.
    """
    steps: list[Any] = [
        v2.Lambda(to_rgb),
        v2.ToImage(),
        v2.Resize(resize_for(crop, resize), antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(steps)


@dataclass(frozen=True)
class Skipped:
    """Stands in for an image that could not be read."""

    path: str
    reason: str


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that returns ``Skipped`` for unreadable files instead of raising.

    Its images are found as torchvision finds them (the same order), but each real file once:
    torchvision's walk follows links without remembering where it has been, so a link back
    into the tree counted every image below it again (up to 40 times round a link loop).
    """

    @staticmethod
    def make_dataset(
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """(path, class index) of every image, in torchvision's order, each real file once.

        A file reached from two class folders belongs to the one that really holds it.
        """
        valid = is_valid_file or (lambda f: f.lower().endswith(tuple(extensions or ())))
        found: list[tuple[str, int, str]] = []  # (path, class index, real path)
        owner: dict[str, int] = {}
        for name in sorted(class_to_idx):
            home = os.path.realpath(os.path.join(directory, name)) + os.sep
            for root, files in sorted(_walk_once(os.path.join(directory, name))):
                for path in (os.path.join(root, f) for f in sorted(files)):
                    real = os.path.realpath(path)
                    if valid(path) and (real not in owner or real.startswith(home)):
                        owner[real] = class_to_idx[name]
                        found.append((path, class_to_idx[name], real))
        samples = _first_of_each(found, owner)
        missing = sorted(n for n, i in class_to_idx.items() if i not in {j for _, j in samples})
        if missing and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(missing)}")
        return samples

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                image = to_rgb(img)
        except IMAGE_ERRORS as e:
            return Skipped(path, f"{type(e).__name__}: {e}")
        return (self.transform(image) if self.transform else image), target


def _first_of_each(
    found: list[tuple[str, int, str]], owner: dict[str, int]
) -> list[tuple[str, int]]:
    """Each real file's first path under the class that owns it, in the order found."""
    taken: set[str] = set()
    samples = []
    for path, index, real in found:
        if owner[real] == index and real not in taken:
            taken.add(real)
            samples.append((path, index))
    return samples


def _walk_once(top: str) -> list[tuple[str, list[str]]]:
    """(folder, file names) below ``top``, links followed, every real folder visited once."""
    seen: set[str] = set()
    out = []
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # been here by another path: a loop, or a link back into the tree
            continue
        seen.add(real)
        out.append((root, files))
    return out


@dataclass
class Batch:
    """A collated batch and the images that had to be skipped from it."""

    images: Tensor  # (n, 3, H, W)
    labels: Tensor  # (n,)
    skipped: list[Skipped]

    def pin_memory(self) -> Batch:
        """Page-locked copies; DataLoader(pin_memory=True) calls this on custom batch types.

        Without it the loader returns the batch as it is, and ``non_blocking`` copies to the GPU
        come from pageable memory (synchronous).
        """
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


def collate_skip(items: Sequence[Any], *, labelled: bool = True) -> Batch:
    """Collates (image, label[, ...]) items, setting ``Skipped`` items aside.

    Anything after the label is ignored, as ``ckascope.compare.as_batch`` ignores it in a
    loader's batches; an item of another shape is refused with the same words. Unless
    ``labelled`` (a CKA sweep needs no labels), bare images are items too.
    """
    good = [_image_and_label(i, labelled) for i in items if not isinstance(i, Skipped)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = default_collate(good)
    return Batch(images, labels, skipped)


def _image_and_label(item: Any, labelled: bool) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if not labelled and isinstance(item, Tensor):
        return item, 0
    wanted = "(image, label)" if labelled else "an image or (image, label)"
    raise InputError(unusable("a dataset's item", item, wanted))


def unusable(what: str, item: Any, wanted: str) -> str:
    """The one message for data of a shape ckascope cannot use, whichever path it came by."""
    kind = type(item).__name__ + (
        f" with keys {sorted(map(str, item))[:5]}" if isinstance(item, dict) else ""
    )
    return (
        f"{what} must be {wanted}, got a {kind}. Hint: wrap the dataset or loader so that it "
        "returns (images, labels) as tensors"
    )


def warn_skipped(skipped: Sequence[Skipped]) -> None:
    """One warning per unreadable image, naming it (this process's: under torchrun, each rank's)."""
    for item in skipped:
        warn(f"skipped unreadable image {item.path} ({item.reason})", local=True)


def build_dataset(
    spec: str | None,
    split: str = "val",
    transform: Any = None,
    *,
    num_images: int = 1280,
    seed: int = 0,
    synthetic_size: int = 224,
    require_split: bool = False,
    missing_split_hint: str | None = None,
) -> Dataset[Any]:
    """The dataset named by a ``--data`` spec.

    Args:
        spec: "shapes" or None (synthetic), "NAME:PATH" (torchvision on disk, or a folder of
            MNIST-family idx files), "fashionmnist" (the system package's copy), or a directory.
        split: "train" or "val".
        transform: Applied to each image (PIL image or uint8 tensor).
        num_images: Size of the synthetic set (ignored by the others).
        seed: Seed of the synthetic set.
        synthetic_size: Canvas side of the synthetic images.
        require_split: An ImageFolder root must hold ``split/`` (training must never validate
            on its own images); otherwise the root itself is used when ``split/`` is absent.
        missing_split_hint: The hint of the refusal when ``require_split`` finds no
            ``split/`` (what needs it) [training's: PATH/train and PATH/val].

    Returns:
        A map-style dataset of (image, label) pairs (``Skipped`` for unreadable folder images).
    """
    if is_synthetic(spec):
        return SyntheticShapes(
            split, num_images, seed=seed, size=synthetic_size, transform=transform
        )
    if spec in IDX_DATASETS:  # a bare name: the system package's copy (./mnist is a folder)
        return idx_dataset(spec, None, split, transform)
    name, sep, root = spec.partition(":")
    if sep and len(name) > 1 and not os.path.isabs(spec):  # "C:\\..." and "/a:b" are paths
        if name in IDX_DATASETS:
            return idx_dataset(name, root, split, transform)
        if name not in TORCHVISION_DATASETS:
            raise InputError(hint_close(name, list_datasets(), what="dataset"))
        return _torchvision_dataset(name, root, split, transform)
    return _image_folder(spec, split, transform, require_split, missing_split_hint)


def _torchvision_dataset(name: str, root: str, split: str, transform: Any) -> Dataset[Any]:
    path = Path(root).expanduser()
    if path.is_file():
        raise InputError(f"{name}:{root} names a file; give the folder that holds the dataset")
    if not path.is_dir():
        raise InputError(
            f"dataset directory {path} does not exist. Hint: check the path after '{name}:'"
        )
    try:
        return TORCHVISION_DATASETS[name](str(path), split, transform)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise InputError(
            f"no usable {name} {split} data under {path} ({e}). Hint: download it with torchvision "
            "on a machine with internet and copy the folder here; nothing is downloaded"
        ) from e


def _image_folder(
    spec: str, split: str, transform: Any, require_split: bool, missing_split_hint: str | None
) -> Dataset[Any]:
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(
            f"--data {spec} is a file; it takes a folder of images (one sub-folder per class), "
            "NAME:PATH for a dataset on disk, or shapes"
        )
    if not path.is_dir():
        raise InputError(f"data directory {spec} does not exist. Hint: {_data_hint(spec)}")
    if require_split and not (path / split).is_dir():
        hint = missing_split_hint or (
            "training needs PATH/train and PATH/val, one sub-folder per class in each"
        )
        raise InputError(f"{path} has no {split}/ folder. Hint: {hint}")
    root = path / split if (path / split).is_dir() else path
    try:
        return SafeImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise InputError(
            f"no images found in {root} ({e}). Hint: an ImageFolder needs one sub-folder per "
            "class holding .jpg/.png files"
        ) from e


def _data_hint(spec: str) -> str:
    """What ``--data`` takes, led by the spec ``spec`` may have meant (``FashionMNIST``)."""
    names = sorted([*IDX_DATASETS, *TORCHVISION_DATASETS])
    bare = ", ".join(f"{n} alone (Debian's {package})" for n, (_, package) in SYSTEM_COPIES.items())
    listed = (
        f"give an ImageFolder directory, NAME:PATH with NAME in {', '.join(names)}, {bare}, "
        "or shapes for the synthetic set"
    )
    meant = _meant(spec, names)
    return f"did you mean --data {meant}? Otherwise {listed}" if meant else listed


def _meant(spec: str, names: list[str]) -> str | None:
    """The ``--data`` spec a missing folder's name may have meant, in any case or spelling."""
    name = Path(spec).name.lower().replace("-", "").replace("_", "")
    if name == "shapes" or name in SYSTEM_COPIES:
        return name
    return f"{name}:PATH" if name in names else None


def dataset_len(dataset: Dataset[Any]) -> int:
    """len() of a map-style dataset (``Dataset`` itself does not promise ``__len__``)."""
    return len(dataset)  # type: ignore[arg-type]


def subset_indices(total: int, num_images: int | None, seed: int) -> list[int]:
    """A random subset (or permutation when ``num_images`` is None) of range(total)."""
    if total == 0:
        raise InputError("the dataset is empty. Hint: check --data")
    if num_images is not None and not 1 <= num_images <= total:
        raise InputError(f"--num-images must be in 1..{total} for this data, got {num_images}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[: num_images or total].tolist()


def plan_batches(
    indices: Sequence[int],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    min_size: int = 1,
    deal: Literal["batches", "images"] = "batches",
) -> list[list[int]]:
    """This process's batches of ``indices``, the processes taking turns.

    ``deal="batches"`` cuts the batches first and deals them out whole, so every batch is what a
    single process would form (minibatch CKA needs that to give the same sums under torchrun).
    ``deal="images"`` deals the images, then cuts (shares differ by at most one image: counts
    such as accuracies do not care which images share a batch).

    Args:
        indices: Dataset indices in the order to use them.
        batch_size: Images per batch; the last batch may be shorter.
        rank: This process's rank.
        world_size: Number of processes.
        min_size: Batches with fewer images are dropped (4 for the unbiased HSIC).
        deal: What the processes take turns at.
    """
    mine = list(indices[rank::world_size] if deal == "images" else indices)
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    batches = [b for b in batches if len(b) >= min_size]
    return batches if deal == "images" else batches[rank::world_size]
