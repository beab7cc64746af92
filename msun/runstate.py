"""The run folder of ``msun train``: checkpoints, resume, lock, interrupts and metric logs.

A training checkpoint is a self-describing model checkpoint (ckascope and ``msun eval`` load it
as a model) plus what a resumed run needs: optimiser, schedule, grad scaler, progress, RNG
states and the resolved config. Everything is written atomically; a crash mid-write leaves the
previous file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import fnmatch
import io
import json
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckascope.platform import DistInfo, InputError, read_checkpoint, torch_save, write_text
from msun.checkpoint import model_payload, training_inputs
from msun.config import (
    RESUMABLE_CHANGES,
    WEIGHT_NEUTRAL,
    TrainConfig,
    default_warmup,
    differences,
    is_run_config,
)


@dataclass
class TrainState:
    """Where training stands: the next epoch and step to run, and the best score so far.

    ``epoch_sums`` holds what the epoch in progress has logged so far (``TermSums.saved`` in
    ``msun.train``: its loss terms' sums, and the seconds and images of its steps), so that a
    resumed epoch's metrics cover all of its steps; empty between epochs.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_sums: dict[str, Any] = field(default_factory=dict)


#: TrainState's fields that a checkpoint keeps apart from ``progress``.
_NOT_PROGRESS = ("history", "epoch_sums")


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states: CPU, and its own GPU's (dropout masks depend on them).

    One GPU's state, not every visible GPU's: a run resumed with fewer GPUs must still load it.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every process's ``rng_state``, in rank order (a collective call under torchrun)."""
    mine = rng_state(info.device)
    if info.world_size == 1:
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng(saved: Mapping[str, Any], info: DistInfo) -> None:
    """Sets this process's generators from a checkpoint's ``rng`` entry.

    Rank r takes the state rank r saved (rank r mod the saved count after a change of world
    size). Checkpoints written before per-rank states kept rank 0's CPU state and a list of
    every visible GPU's; their entry for this GPU is used when it exists.
    """
    ranks = saved.get("ranks") or [saved]
    mine = ranks[info.rank % len(ranks)]
    torch.set_rng_state(mine["torch"])
    cuda = mine.get("cuda")
    if isinstance(cuda, (list, tuple)):  # the older format: one state per visible GPU
        index = info.device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and info.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, info.device)


@dataclass
class Trainables:
    """The live objects a checkpoint saves and restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def save_state(
    path: Path,
    t: Trainables,
    cfg: TrainConfig,
    state: TrainState,
    rng: list[dict[str, Any]],
    input_size: int | None = None,
) -> None:
    """Writes a training checkpoint atomically; ``rng`` holds every process's generators.

    ``input_size`` is a fine-tuned plain network's fed side (``training_inputs``).
    """
    progress = {k: v for k, v in asdict(state).items() if k not in _NOT_PROGRESS}
    torch_save(
        {
            **model_payload(t.model, cfg.model),
            "inputs": training_inputs(t.model, cfg, input_size),  # ckascope compare's defaults
            "train_config": cfg.to_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "progress": progress,
            "history": state.history,
            "epoch_sums": state.epoch_sums,
            "rng": {"ranks": rng},
        },
        path,
    )


#: What a run writes into its folder before its first checkpoint (config.yaml) and beside it
#: (best.pt is written before last.pt, the logs after it): a new run replaces them only where
#: config.yaml is a run's.
RUN_FILES = frozenset({"config.yaml", "best.pt", "metrics.jsonl", "metrics.csv"})
#: Names a new run accepts in its folder and never replaces: the lock, the split analysis
#: (``msun.splits`` replaces only an earlier one), TensorBoard's folder (appended to), and
#: what a killed atomic write or staging leaves (``.last.pt.XXXX.tmp``, ``.NAME.XXXX.old``).
RUN_KEEPS = (".lock", "split-analysis", "tensorboard", ".*.tmp", ".split-analysis.*.old")


def check_new_run(folder: Path) -> None:
    """Refuses a folder without last.pt that holds files a new run would replace.

    A run started again before its first checkpoint finds its own config.yaml (and, for
    ``--split-at auto``, its split-analysis/), and is accepted; anything else is a user's.

    Raises:
        InputError: Naming the first few such files.
    """
    if not folder.is_dir():
        return
    own = RUN_FILES if is_run_config(folder / "config.yaml") else frozenset()
    others = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in own and not any(fnmatch.fnmatchcase(p.name, k) for k in RUN_KEEPS)
    )
    if others:
        named = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise InputError(
            f"--out {folder} holds files that are not an msun train run's ({named}); a new run "
            "starts in an empty folder or one of its own. Hint: choose another --out, or move "
            "them away"
        )


def saved_run(folder: Path, resume: bool) -> Mapping[str, Any] | None:
    """The training checkpoint to continue from (read once), or None for a new run.

    Raises:
        InputError: ``--resume`` without a run, a folder that holds a run but no ``--resume``,
            a folder of other files (``check_new_run``), or a file that is not a training
            checkpoint.
    """
    last = folder / "last.pt"
    if not resume:
        if last.exists():
            raise InputError(
                f"{folder} already holds a training run. Hint: add --resume to continue it, or choose another --out"
            )
        check_new_run(folder)
        return None
    if not last.is_file():
        raise InputError(f"--resume but {last} does not exist. Hint: start without --resume")
    ckpt = read_checkpoint(last)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("train_config"), Mapping):
        raise InputError(f"{last} is not a training checkpoint of msun train")
    return ckpt


def restore_state(ckpt: Mapping[str, Any], t: Trainables, info: DistInfo) -> TrainState:
    """Loads a training checkpoint into the live objects; returns where to continue."""
    t.model.load_state_dict(ckpt["state_dict"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], info)
    return TrainState(
        **ckpt["progress"],
        history=list(ckpt.get("history", [])),
        # older checkpoints have none: a resumed epoch's row covers the steps run after it
        epoch_sums=dict(ckpt.get("epoch_sums") or {}),
    )


def is_finished(ckpt: Mapping[str, Any]) -> bool:
    """Whether a training checkpoint's run has trained all of its epochs."""
    return bool(ckpt["progress"]["epoch"] >= ckpt["train_config"]["epochs"])


def run_differences(
    ckpt: Mapping[str, Any], cfg: TrainConfig, allowed: frozenset[str] = RESUMABLE_CHANGES
) -> list[str]:
    """``key: saved -> current`` for every setting the run saved differently, but ``allowed``.

    Args:
        ckpt: A training checkpoint.
        cfg: The resolved config that would continue it.
        allowed: The settings that may differ.
    """
    saved = dict(ckpt["train_config"])
    if saved.get("amp") == "auto":  # saved before amp was stored resolved: it meant this device's
        saved["amp"] = cfg.amp
    return differences(saved, cfg.to_dict(), allowed)


def check_resume(ckpt: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Refuses to resume from a checkpoint whose trajectory-changing settings differ.

    Raises:
        InputError: Naming every differing key with its saved and current value.
    """
    diff = run_differences(ckpt, cfg)
    if diff:
        saved = ckpt["train_config"]
        raise InputError(
            f"--resume with a config that differs from {cfg.out}/last.pt: {'; '.join(diff)}. "
            "Hint: leave those options out (--resume takes the run's own from its config.yaml) "
            f"or repeat the original values{_old_defaults(saved, cfg)}, or train into a new --out"
            f"{_other_length(saved, cfg)}"
        )


def _other_length(saved: Mapping[str, Any], cfg: TrainConfig) -> str:
    """How to train for another number of epochs, where ``--epochs`` differs: a new run.

    The learning rate's warm-up and cosine decay span the run's own epochs, so a run cannot
    be lengthened (``--init-from`` would fine-tune a new classifier, not continue it).
    """
    if saved.get("epochs") == cfg.epochs or cfg.epochs is None:
        return ""
    return (
        f" (the learning rate decays over a run's own --epochs: for {cfg.epochs} epochs train "
        f"a new run with its options, msun train --config {cfg.out}/config.yaml --epochs "
        f"{cfg.epochs}{_warmup_for(saved, cfg.epochs)} --out NEW)"
    )


def _warmup_for(saved: Mapping[str, Any], epochs: int) -> str:
    """``--warmup-epochs`` for a new run of ``epochs``, where the saved one was the default.

    config.yaml records the warm-up resolved for the run's own length (``default_warmup``);
    a user's own warm-up carries over as it is.
    """
    if saved.get("warmup_epochs") != default_warmup(int(saved.get("epochs") or 0)):
        return ""
    return f" --warmup-epochs {default_warmup(epochs):.6g}"


def check_reuse(ckpt: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Refuses to reuse or continue a run made with other settings.

    A finished run is reused whatever its validation options (nothing is validated again); one
    to continue needs them as ``--resume`` does.

    Raises:
        InputError: Naming every differing key with its saved and wanted value; the run is
            left as it is.
    """
    diff = run_differences(ckpt, cfg, WEIGHT_NEUTRAL if is_finished(ckpt) else RESUMABLE_CHANGES)
    if diff:
        raise InputError(
            f"{cfg.out} holds a run with other settings ({'; '.join(diff)}). "
            "Hint: move that folder away, or train into another one"
        )


#: Defaults of runs made before the authors' recipe became the default: clipping for every
#: method, tau 0.001 for the ResNets but ResNet-50, a 5-epoch warm-up whatever the run's length.
OLDER_DEFAULTS = {"grad_clip": 1.0, "warmup_epochs": 5.0, "si_threshold": 0.001}


def _old_defaults(saved: Mapping[str, Any], cfg: TrainConfig) -> str:
    """Flags that give back the older defaults a run was made with, where they differ now.

    Only a saved value equal to an older default is named: any other (0.1667, a warm-up derived
    from a run's length) was never a default, and the differences already name it.
    """
    keys = [k for k in OLDER_DEFAULTS if k != "si_threshold" or cfg.method == "msun"]
    flags = [
        f"--{key.replace('_', '-')} {saved[key]:g}"
        for key in keys
        if saved.get(key) == OLDER_DEFAULTS[key] and saved[key] != getattr(cfg, key)
    ]
    return f" (older defaults: {' '.join(flags)})" if flags else ""


class RunLock:
    """An exclusive lock on the run folder.

    ``flock`` locks belong to the open file, so the kernel drops the lock when the process dies,
    however it dies: a stale ``.lock`` file left by a crash never blocks the next run. A clean
    exit removes the file (while still holding the lock; a process that locked the removed file
    in between sees it is gone and tries again), so a finished run folder holds no ``.lock``. A
    folder the lock created is removed again when the run fails before writing anything into it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out {folder} is a file. Hint: choose a folder")
        self._created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"cannot create the run folder {folder} ({e.strerror}). Hint: choose a writable --out"
            ) from e
        while self._fd is None:
            self._fd = self._lock()
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()}".encode())
        return self

    def _lock(self) -> int | None:
        """The locked file's descriptor; None when the file was removed under us (try again)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            owner = self.path.read_text().strip() or "another process"
            raise InputError(
                f"{self.path.parent} is in use by a running msun train ({owner}). "
                "Hint: wait for it to finish or choose another --out"
            ) from e
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: nobody else can hold it
            os.close(self._fd)
            self._fd = None
        folder = self.path.parent
        if exc_type is not None and self._created and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def interrupt_flag() -> Iterator[Callable[[], bool]]:
    """Inside the block, SIGINT (Ctrl-C) and SIGTERM only set a flag the loop checks."""
    hit = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        hit[0] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: hit[0]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is set on any (the flag itself without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and metrics.csv, one row per epoch, rewritten atomically."""
    write_text(folder / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(folder / "metrics.csv", buf.getvalue())
