"""MNIST-family datasets (MNIST, Fashion-MNIST, KMNIST) from their original idx files.

torchvision reads these sets only from its own download layout, ``ROOT/<Class>/raw/`` with the
files decompressed. The files also come as the four original ``*-idx?-ubyte.gz`` files in one
folder, which is how Debian's ``dataset-fashion-mnist`` package installs them
(``/usr/share/datasets/fashion-mnist``). This module finds a split's two files in either layout,
gzipped or not, and reads them with torchvision's own idx readers (``read_image_file``,
``read_label_file``): gzipped files are decompressed with torchvision's ``extract_archive`` into a
temporary folder that is removed once the tensors are in memory (47 MB for Fashion-MNIST's
training images), so nothing is left on disk and nothing is downloaded.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from ckascope.errors import InputError

#: ``--data`` name -> torchvision class of the same images.
IDX_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}
#: Side of every image of these sets, in pixels.
IDX_SIZE = 28
#: Where a system package installs a set, and the package's name (the data behind a bare name).
SYSTEM_COPIES = {
    "fashionmnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist"),
}


def split_files(split: str) -> dict[str, str]:
    """The idx file names of a split: ``{"images": "train-images-idx3-ubyte", "labels": ...}``."""
    prefix = "train" if split == "train" else "t10k"
    return {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}


def find_files(name: str, root: Path, split: str) -> dict[str, Path] | None:
    """A split's two files under ``root`` (plain or .gz), in ROOT itself or ROOT/<Class>/raw.

    Returns:
        {"images": path, "labels": path}, or None when no folder holds both.
    """
    for folder in (root, root / IDX_DATASETS[name] / "raw"):
        found = {kind: _plain_or_gz(folder / file) for kind, file in split_files(split).items()}
        if all(found.values()):
            return {kind: path for kind, path in found.items() if path is not None}
    return None


def _plain_or_gz(path: Path) -> Path | None:
    gz = path.with_name(path.name + ".gz")
    return path if path.is_file() else gz if gz.is_file() else None


def read_tensors(files: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 from a split's files.

    Raises:
        InputError: A file that is not a valid idx file of the expected kind.
    """
    with tempfile.TemporaryDirectory(prefix="ckascope-idx-") as tmp:
        plain = {kind: _decompressed(path, Path(tmp)) for kind, path in files.items()}
        try:
            images, labels = (
                read_image_file(str(plain["images"])),
                read_label_file(str(plain["labels"])),
            )
        except (
            AssertionError,
            TypeError,
            ValueError,
            RuntimeError,
            OSError,
            KeyError,
            IndexError,
        ) as e:
            raise InputError(
                f"{files['images'].parent} does not hold valid idx files ({type(e).__name__}: {e}). "
                "Hint: use the original *-idx3-ubyte / *-idx1-ubyte files"
            ) from e
    if len(images) != len(labels):
        raise InputError(
            f"{files['images']} holds {len(images)} images but {files['labels']} "
            f"{len(labels)} labels. Hint: use the two files of one split"
        )
    return images, labels


def _decompressed(path: Path, tmp: Path) -> Path:
    if path.suffix != ".gz":
        return path
    try:
        return Path(extract_archive(str(path), str(tmp)))
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(
            f"{path} is not a readable gzip file ({e}). Hint: the file is damaged (cut short "
            f"or overwritten): download it again{_reinstall(path)}"
        ) from e


def _reinstall(path: Path) -> str:
    """How to restore ``path`` when a system package installed it (``SYSTEM_COPIES``)."""
    for folder, package in SYSTEM_COPIES.values():
        if path.parent == folder:
            return f", or reinstall it (apt-get install --reinstall {package})"
    return ""


class _IdxFiles:
    """Mixin over a torchvision MNIST-family class: data from given files, not ROOT/<Class>/raw."""

    def __init__(self, files: dict[str, Path], train: bool, transform: Any = None) -> None:
        self._files = files
        super().__init__(str(files["images"].parent), train=train, transform=transform)  # type: ignore[call-arg]

    def _check_exists(self) -> bool:
        return True  # find_files has found both files

    def _check_legacy_exist(self) -> bool:
        return False  # never torchvision's old processed/*.pt cache beside the files

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return read_tensors(self._files)


class MNISTFiles(_IdxFiles, torchvision.datasets.MNIST):
    """MNIST from idx files (classes, ``__getitem__`` and PIL images as torchvision's)."""


class FashionMNISTFiles(_IdxFiles, torchvision.datasets.FashionMNIST):
    """Fashion-MNIST from idx files."""


class KMNISTFiles(_IdxFiles, torchvision.datasets.KMNIST):
    """KMNIST from idx files."""


_CLASSES: dict[str, Callable[..., Dataset[Any]]] = {
    "mnist": MNISTFiles,
    "fashionmnist": FashionMNISTFiles,
    "kmnist": KMNISTFiles,
}


def idx_dataset(name: str, root: str | None, split: str, transform: Any = None) -> Dataset[Any]:
    """An MNIST-family split as a torchvision dataset of (PIL image 28x28 "L", label) pairs.

    Args:
        name: "mnist", "fashionmnist" or "kmnist".
        root: A folder holding the files (or torchvision's layout below it); None for the copy
            a system package installs.
        split: "train" or "val" (the test files).
        transform: Applied to each PIL image.

    Raises:
        InputError: No such folder, files missing there, or no system copy installed.
    """
    if root is not None and not root.strip():
        raise InputError(f"no folder after '{name}:'. Hint: {name}:DIR, or {name} alone")
    folder = _system_copy(name) if root is None else Path(root).expanduser()
    if folder.is_file():
        raise InputError(
            f"{name}:{root} names a file; give the folder that holds the four idx files"
        )
    if not folder.is_dir():
        raise InputError(
            f"dataset directory {folder} does not exist. Hint: check the path after '{name}:'"
        )
    files = find_files(name, folder, split)
    if files is None:
        wanted = " and ".join(f"{f}[.gz]" for f in split_files(split).values())
        raise InputError(
            f"no usable {name} {split} data under {folder}: {wanted} are in neither {folder} nor "
            f"{folder / IDX_DATASETS[name] / 'raw'}. Hint: copy the original idx files there; "
            "nothing is downloaded"
        )
    return _CLASSES[name](files, split == "train", transform)


def _system_copy(name: str) -> Path:
    if name not in SYSTEM_COPIES:
        raise InputError(
            f"no system package installs {name}. Hint: give the folder of its idx files as {name}:DIR"
        )
    folder, package = SYSTEM_COPIES[name]
    if not folder.is_dir():
        raise InputError(
            f"{name} is not installed ({folder} is missing). Hint: apt-get install "
            f"{package} (after apt-get update), or give {name}:DIR"
        )
    return folder
