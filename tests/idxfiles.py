"""Tiny MNIST-family idx files written by the tests (the format Debian's Fashion-MNIST uses)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(folder: Path, n: int, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The four idx files of a tiny set (train n, test n // 2 images); returns what they hold."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        blobs = {
            f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, count, 28, 28)
            + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, count) + labels.tobytes(),
        }
        for name, blob in blobs.items():
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(blob) if gz else blob)
        written[prefix] = images
        written[prefix + "_labels"] = labels
    return written
