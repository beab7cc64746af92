"""``CKAResult``: a CKA matrix with its layer names, every setting and the library versions.

Saved as a directory:

- ``result.json`` — format marker, layers, settings, versions, elapsed time, mean and std
  matrices (readable without NumPy);
- ``matrices.npz`` — ``matrices`` (R, La, Lb) per repeat, ``mean``, ``std``, float64, and for
  a calibrated comparison (``ckascope.calibration``) ``ci_low``, ``ci_high`` (bootstrap
  interval), ``null_mean``, ``null_std``, ``z_score``, ``p_value`` (permutation null), each
  (La, Lb), and ``bootstrap_diagonal`` (replicates, L);
- ``cka.csv`` — the tidy table (``to_frame()``): one row per (repeat, layer_a, layer_b), with
  the calibration's per-cell columns when there are any.

A directory is written in a staging folder beside it and moved into place at the end, so an
interruption leaves either the previous result or the new one, never a mix.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ckascope.calibration import CELL_KEYS
from ckascope.errors import InputError
from ckascope.fileio import atomic_write, json_matrix, staging_dir, write_json

RESULT_FORMAT = "ckascope-result"
#: The calibration arrays a result may hold (older results hold none).
CALIBRATION_ARRAYS = (*CELL_KEYS, "bootstrap_diagonal")
RESULT_VERSION = 1
FILES = ("result.json", "matrices.npz", "cka.csv")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a result."""
    import torch
    import torchvision

    from ckascope import __version__

    return {
        "ckascope": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@dataclass
class CKAResult:
    """Layer-by-layer CKA between side a (rows) and side b (columns).

    Attributes:
        matrices: (R, La, Lb) float64, one matrix per repeat (sweep over a random permutation).
        layers_a: La row names.
        layers_b: Lb column names.
        settings: Every option that produced the result (model, data, scales, kernel, ...).
        versions: Library versions.
        elapsed: Seconds the computation took.
        calibration: Bootstrap interval and permutation null arrays (``CELL_KEYS``, each
            (La, Lb); ``bootstrap_diagonal`` (replicates, L)); empty for a plain comparison.
    """

    matrices: np.ndarray
    layers_a: list[str]
    layers_b: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    elapsed: float = 0.0
    calibration: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matrices = np.asarray(self.matrices, dtype=np.float64)
        if self.matrices.ndim == 2:
            self.matrices = self.matrices[None]
        expected = (len(self.layers_a), len(self.layers_b))
        if self.matrices.ndim != 3 or self.matrices.shape[1:] != expected:
            raise InputError(
                f"matrices of shape {self.matrices.shape} do not fit {expected} layers"
            )
        self.calibration = {k: np.asarray(v, dtype=np.float64) for k, v in self.calibration.items()}
        for key, value in self.calibration.items():
            fits = value.shape == expected if key in CELL_KEYS else value.ndim == 2
            if key not in CALIBRATION_ARRAYS or not fits:
                raise InputError(f"calibration array {key!r} of shape {value.shape} does not fit")

    def cell(self, key: str) -> np.ndarray | None:
        """A calibration array (La, Lb) by name (``CELL_KEYS``), None when not computed."""
        return self.calibration.get(key)

    @property
    def matrix(self) -> np.ndarray:
        """(La, Lb) mean over repeats."""
        return self.matrices.mean(axis=0)  # type: ignore[no-any-return]

    @property
    def std(self) -> np.ndarray:
        """(La, Lb) sample standard deviation over repeats (zeros for a single repeat)."""
        if len(self.matrices) < 2:
            return np.zeros_like(self.matrix)
        return self.matrices.std(axis=0, ddof=1)  # type: ignore[no-any-return]

    @property
    def arch(self) -> str | None:
        """The architecture of side a (e.g. "resnet18"), apart from its display label.

        ``settings["model"]`` is the label (a run's folder for a checkpoint); results written
        before "arch" was recorded used the label for both.
        """
        arch = self.settings.get("arch", self.settings.get("model"))
        return None if arch is None else str(arch)

    @property
    def repeats(self) -> int:
        """Number of sweeps R."""
        return len(self.matrices)

    @property
    def has_diagonal(self) -> bool:
        """Whether row i and column i are the same layer of the same model."""
        return self.layers_a == self.layers_b and self.settings.get("mode") != "models"

    def diagonal(self) -> pd.DataFrame:
        """Same-layer CKA: one row per layer with ``mean`` and ``std`` over repeats.

        Raises:
            InputError: The two sides have different layers (e.g. two different models).
        """
        if not self.has_diagonal:
            raise InputError(
                "this result compares two models (or different layers), so it has no same-layer "
                "diagonal. Hint: compare one model at two scales (ckascope compare --scales A B); "
                "this result's layer pairs are in its cka.csv (CKAResult.matrix in Python)"
            )
        idx = np.arange(len(self.layers_a))
        frame: pd.DataFrame = pd.DataFrame(
            {
                "layer": self.layers_a,
                "depth": idx,
                "mean": self.matrix[idx, idx],
                "std": self.std[idx, idx],
            }
        )
        return frame

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: repeat, index_a, layer_a, index_b, layer_b, cka."""
        r, la, lb = np.meshgrid(
            np.arange(self.repeats),
            np.arange(len(self.layers_a)),
            np.arange(len(self.layers_b)),
            indexing="ij",
        )
        frame: pd.DataFrame = pd.DataFrame(
            {
                "repeat": r.ravel(),
                "index_a": la.ravel(),
                "layer_a": np.asarray(self.layers_a, dtype=object)[la.ravel()],
                "index_b": lb.ravel(),
                "layer_b": np.asarray(self.layers_b, dtype=object)[lb.ravel()],
                "cka": self.matrices.ravel(),
                **{
                    key: np.broadcast_to(value, self.matrices.shape).ravel()
                    for key, value in self.calibration.items()
                    if key in CELL_KEYS
                },
            }
        )
        return frame

    def _json(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "repeats": self.repeats,
            "settings": self.settings,
            "versions": self.versions,
            "elapsed": self.elapsed,
            "matrix": json_matrix(self.matrix),
            "std": json_matrix(self.std),
            **{k: json_matrix(v) for k, v in self.calibration.items() if k in CELL_KEYS},
        }

    def save(
        self,
        directory: str | Path,
        *,
        overwrite: bool = False,
        extra: Callable[[Path], None] | None = None,
        kind: OutputKind | None = None,
    ) -> Path:
        """Writes the result (and whatever ``extra`` writes into the folder) atomically.

        Args:
            directory: Output folder: missing, empty, or holding an earlier result.
            overwrite: Replace an earlier result in the folder. A folder holding anything
                else is refused all the same: ``save`` never deletes other files.
            extra: Called with the staging folder to add files (e.g. figures).
            kind: What an earlier output in the folder consists of [``RESULT_OUTPUT``: a
                result and its figures]; a caller whose ``extra`` adds other files names them.

        Returns:
            The output folder.
        """
        dest = Path(directory)
        with staged_folder(dest, overwrite, kind or RESULT_OUTPUT) as staging:
            self._write_files(staging)
            if extra is not None:
                extra(staging)
        return dest

    def _arrays(self) -> dict[str, Any]:
        """What matrices.npz holds."""
        return {"matrices": self.matrices, "mean": self.matrix, "std": self.std, **self.calibration}

    def _write_files(self, folder: Path) -> None:
        atomic_write(
            folder / "matrices.npz",
            lambda f: np.savez(f, **self._arrays()),
        )
        atomic_write(folder / "cka.csv", lambda f: self.to_frame().to_csv(f, index=False))
        write_json(folder / "result.json", self._json())

    @classmethod
    def load(cls, directory: str | Path) -> CKAResult:
        """Reads a result written by ``save``."""
        folder = Path(directory)
        meta = _read_meta(folder)
        try:
            with np.load(folder / "matrices.npz") as npz:
                matrices = npz["matrices"]
                calibration = {k: npz[k] for k in npz.files if k in CALIBRATION_ARRAYS}
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{folder}/matrices.npz is missing or unreadable ({e})") from e
        return cls(
            matrices,
            meta["layers_a"],
            meta["layers_b"],
            _current_names(meta["settings"]),
            meta.get("versions") or {},
            float(meta.get("elapsed") or 0.0),
            calibration,
        )


def _current_names(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings of a result written before ``base_size`` was renamed ``image_size``."""
    if "base_size" in settings and "image_size" not in settings:
        return {("image_size" if k == "base_size" else k): v for k, v in settings.items()}
    return settings


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "result.json"
    if not path.is_file():
        hint = (
            f"run ckascope compare --out {folder}"
            if not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
            else "give the folder ckascope compare --out wrote"  # this one holds other files
        )
        raise InputError(f"{folder} holds no ckascope result (no result.json). Hint: {hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        raise InputError(f"{path} is not a ckascope result")
    for key, kind in (("layers_a", list), ("layers_b", list), ("settings", dict)):
        if not isinstance(meta.get(key), kind):
            raise InputError(
                f"{path} has no valid {key!r} (a {kind.__name__}): an incomplete or edited "
                "result. Hint: run the comparison again"
            )
    return meta


class OutputKind(NamedTuple):
    """What an output folder may hold for ``overwrite`` to replace it.

    Attributes:
        name: The earlier output, as an error names it (e.g. "an earlier ckascope result").
        holds: Whether a folder holds such an output (and so may be replaced).
        files: The names (``fnmatch`` patterns) such an output's folder consists of: a file
            of any other name in it is someone else's, and keeps the folder from being replaced.
    """

    name: str
    holds: Callable[[Path], bool]
    files: frozenset[str]


def is_result_dir(path: Path) -> bool:
    """Whether ``path`` holds a result written by ckascope."""
    try:
        _read_meta(path)
    except InputError:
        return False
    return True


#: The stem of ``ckascope.plot.redraw``'s hidden staging folders in a result folder
#: (``.figures.XXXX.tmp``): a killed redraw leaves one, which is the result's own debris.
FIGURE_STAGING = "figures"

#: What a result folder consists of: ``CKAResult.save``'s files, the figures
#: ``ckascope.plot.save_figures`` draws (the heatmap; the curve where there is a diagonal) and
#: what a killed ``redraw`` leaves.
RESULT_FILES = frozenset(
    [*FILES, f".{FIGURE_STAGING}.*.tmp"]
    + [f"{stem}.{ext}" for stem in ("heatmap", "curve") for ext in ("png", "pdf")]
)


def _own(name: str, kind: OutputKind) -> bool:
    """Whether a file named ``name`` in a folder of ``kind`` belongs to that output."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in kind.files)


#: What ``--out`` of ``ckascope compare`` (and ``CKAResult.save``) may replace.
RESULT_OUTPUT = OutputKind("an earlier ckascope result", is_result_dir, RESULT_FILES)


@contextmanager
def staged_folder(
    dest: Path, overwrite: bool = False, kind: OutputKind = RESULT_OUTPUT
) -> Iterator[Path]:
    """A staging folder that replaces ``dest`` as a whole when the block succeeds.

    An interruption or error leaves ``dest`` as it was (an earlier output or nothing), never a
    mix; ``dest`` must be missing or empty, or hold an earlier output of ``kind`` and
    ``overwrite`` be given (``check_output_dir``).

    Args:
        dest: The output folder.
        overwrite: Let an earlier output of ``kind`` be replaced.
        kind: What ``dest`` may hold to be replaced [an earlier ckascope result].
    """
    check_output_dir(dest, overwrite, kind)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest, kind)
    staging = staging_dir(dest, ".tmp")
    try:
        yield staging
        _swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_dir(dest: Path, overwrite: bool, kind: OutputKind = RESULT_OUTPUT) -> None:
    """Refuses an output folder that cannot (or may not) be replaced by the new output.

    A missing or empty folder is free; one holding an earlier output of ``kind`` is replaced
    only with ``overwrite``; one holding anything else is never replaced, so ``overwrite``
    cannot delete a user's files.

    Args:
        dest: The output folder.
        overwrite: Let an earlier output of ``kind`` be replaced.
        kind: What ``dest`` may hold to be replaced [an earlier ckascope result].

    Raises:
        InputError: ``dest`` is the working folder or above it, a file, below something not a
            writable folder, or a non-empty folder it may not replace.
    """
    _refuse_working_folder(dest)
    if dest.is_symlink():  # replacing it would swap the link, not the folder it points to
        raise InputError(
            f"output {dest} is a symbolic link. Hint: give the folder it points to "
            f"({os.path.realpath(dest)}), or another --out"
        )
    check_writable_folder(dest)
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    others = sorted(p.name for p in dest.iterdir() if not _own(p.name, kind))
    if others or not kind.holds(dest):
        never = ", which --overwrite never replaces" if overwrite else ""
        raise InputError(
            f"output folder {dest} holds files that are not {kind.name}"
            f"{_named(others) if others else ''}{never}. Hint: choose another --out, "
            "or empty or remove the folder yourself"
        )
    if not overwrite:
        raise InputError(
            f"output folder {dest} holds {kind.name}. Hint: choose another --out, or pass "
            "--overwrite (overwrite=True from Python) to replace it"
        )


def _named(files: list[str]) -> str:
    """The first few of ``files`` in brackets, for a message: " (a, b, c, ...)"."""
    return f" ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"


def check_writable_folder(dest: Path) -> None:
    """Refuses an output folder that is a file, or that cannot be created or written.

    Raises:
        InputError: ``dest`` is a file, or its nearest existing ancestor is not a writable folder.
    """
    if dest.exists() and not dest.is_dir():
        raise InputError(f"output {dest} exists and is a file. Hint: choose another --out")
    ancestor = dest
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not _can_create_in(ancestor):
        raise InputError(
            f"cannot create or write {dest} ({ancestor} is not a writable folder). Hint: choose another --out"
        )


def _can_create_in(folder: Path) -> bool:
    """Whether a folder can be made in ``folder``: tried (and removed), not inferred.

    Permission bits do not say it all: root passes ``os.access`` everywhere, and /proc
    refuses a new entry whatever its bits say. Asked before the work, not found after it.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        probe = tempfile.mkdtemp(prefix=".probe.", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _refuse_working_folder(dest: Path) -> None:
    """Refuses the working folder and those above it: replacing one would pull the floor away.

    Renaming the folder a process runs in fails (or, for an ancestor, would move this very
    output into the trash), so it is refused before any work rather than after it.
    """
    here = Path.cwd().resolve()
    target = dest.resolve()
    if target == here or target in here.parents:
        raise InputError(
            f"output folder {dest} is the current folder or one above it, which the output "
            f"cannot replace. Hint: name a new folder inside it, e.g. --out {dest / 'out'}"
        )


def next_free(dest: Path) -> Path:
    """``dest`` when it is free (missing or empty), else the first free ``dest-2``, ``dest-3``, ..."""
    candidate, n = dest, 1
    while candidate.exists() and not (candidate.is_dir() and not any(candidate.iterdir())):
        n += 1
        candidate = dest.with_name(f"{dest.name}-{n}")
    return candidate


def _remove_leftovers(dest: Path, kind: OutputKind) -> None:
    """Cleans up after a run killed (SIGKILL) while saving to ``dest``.

    Unfinished staging folders go. A previous output of ``kind`` moved aside (``.old``) just
    before the kill comes back when ``dest`` is missing, so one of the two always survives.
    """
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(dest.parent.glob(f".{dest.name}.*.old")):
        if not dest.exists() and kind.holds(old):
            old.rename(dest)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _swap_in(staging: Path, dest: Path) -> None:
    """Moves the finished staging folder to ``dest``, replacing what was there."""
    if not dest.exists():
        staging.rename(dest)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    trash.rmdir()
    dest.rename(trash)
    staging.rename(dest)
    shutil.rmtree(trash, ignore_errors=True)
