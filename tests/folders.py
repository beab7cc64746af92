"""Folders a user may point ``--out`` at by mistake, and their exact contents to compare.

``tests/ckascope/test_output_folders.py`` and ``tests/msun/test_eval_output.py`` check that
no output replaces them.
"""

from __future__ import annotations

from pathlib import Path


def training_run(folder: Path) -> Path:
    """A folder as ``msun train --out`` leaves it."""
    folder.mkdir()
    for name in ("last.pt", "best.pt"):
        (folder / name).write_bytes(b"\x80\x04weights")
    (folder / "config.yaml").write_text("model: resnet18\nmethod: vanilla\n")
    (folder / "metrics.csv").write_text("epoch,top1\n1,50.0\n")
    return folder


def own_files(folder: Path) -> Path:
    """A folder of a user's files, one of them in a subfolder."""
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "data" / "raw.bin").write_bytes(bytes(range(256)))
    return folder


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }
