"""``msun train``: MSUN and its baselines (vanilla, MST) with the published recipe.

Reads like torchvision's reference trainer: the network, the optimiser and its schedule,
``train_one_epoch``, ``validate``, ``main``. Data order and augmentation are reproducible
(``msun.data``), checkpoints self-describing and atomic (``msun.runstate``).

Under ``torchrun`` the run is DDP (NCCL on GPU, gloo on CPU): each process takes its micro-batches
of every global batch, gradients are averaged, metrics reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from ckascope.data import dataset_len, warn_skipped
from ckascope.distributed import DistInfo, init_distributed
from ckascope.errors import CKAScopeError, InputError
from ckascope.fileio import atomic_path, write_text
from ckascope.models import build_model, is_self_describing, model_from_checkpoint, read_checkpoint
from msun import autosplit
from msun import config as C
from msun.data import datasets as make_datasets
from msun.data import epoch_plan, make_loader, micro_batch, steps_per_epoch, val_batches
from msun.evaluate import EvalResult, evaluate
from msun.losses import default_si_threshold
from msun.model import MSUN, build_msun
from msun.objective import Objective
from msun.runstate import (
    RunLock,
    Trainables,
    TrainState,
    any_rank,
    check_resume,
    interrupt_flag,
    restore_state,
    save_state,
    write_metrics,
)


class TrainingStopError(CKAScopeError):
    """Training ended early on a NaN loss; the message names the checkpoint kept."""


class TrainingInterruptedError(TrainingStopError):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the current step."""

    exit_code = 130


# ----------------------------------------------------------------------------- the network


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swaps the last linear layer for a freshly initialised one with ``num_classes`` outputs."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    old = model.get_submodule(name)
    parent, _, child = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes)  # type: ignore[arg-type]
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build_network(cfg: C.TrainConfig) -> nn.Module:
    """The network of a resolved config: random init (seeded) or pretrained vanilla weights."""
    torch.manual_seed(cfg.seed)
    weights = None if cfg.weights == "none" else cfg.weights
    classes = cfg.num_classes or 1000
    if cfg.method == "msun":
        model: nn.Module = build_msun(cfg.model, split_at=cfg.split_at, scales=cfg.scales,
                                      num_classes=1000 if weights else classes, weights=weights)  # fmt: skip
    else:
        model = build_model(
            cfg.model, weights or "none", num_classes=None if weights else classes, seed=cfg.seed
        )
    if weights and classes != 1000:
        replace_classifier(model, classes)
    return model.train()


def load_init(cfg: C.TrainConfig) -> tuple[nn.Module, int]:
    """``--init-from``: a trained model with a new classifier, and the size it was trained at."""
    path = Path(str(cfg.init_from))
    ckpt = read_checkpoint(path)
    described = is_self_describing(ckpt)
    model = model_from_checkpoint(ckpt, path, arch=None if described else cfg.model)
    torch.manual_seed(cfg.seed)
    replace_classifier(model, int(cfg.num_classes or 2))
    if cfg.linear_probe:
        model.requires_grad_(False)
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].requires_grad_(True)
    saved = (ckpt.get("train_config") if described else None) or {}
    return model.train(), int(saved.get("image_size", 224))


def make_optimizer(model: nn.Module, cfg: C.TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on all trainable parameters (as published)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=float(cfg.lr or 0.1), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def lr_factor(step: int, total: int, warmup: int, start: float, floor: float) -> float:
    """Linear warm-up from ``start`` to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: C.TrainConfig, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule for ``steps`` optimiser steps per epoch."""
    total, warmup = steps * int(cfg.epochs or 1), round(steps * cfg.warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_factor, cfg.min_lr_factor)
    )


def amp_dtype(cfg: C.TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for "auto", full precision on CPU."""
    choice = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


# ----------------------------------------------------------------------------- one epoch


@dataclass
class Loop:
    """Everything an epoch needs."""

    cfg: C.TrainConfig
    info: DistInfo
    objective: nn.Module  # the Objective, wrapped in DDP / torch.compile when used
    trainables: Trainables
    train_set: Dataset[Any]
    val_set: Dataset[Any]
    amp: torch.dtype | None
    out: Path
    writer: Any = None  # TensorBoard SummaryWriter (rank 0, --tensorboard)

    @property
    def model(self) -> nn.Module:
        """The bare network."""
        return self.trainables.model


def _save(loop: Loop, state: TrainState, name: str = "last.pt") -> None:
    if loop.info.is_main:
        save_state(loop.out / name, loop.trainables, loop.cfg, state)


def _micro_step(loop: Loop, batch: Any, sync: bool, meters: dict[str, MeanMetric]) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its (detached) loss."""
    warn_skipped(batch.skipped)
    device = loop.info.device
    images = batch.images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch.labels.to(device, non_blocking=True)
    no_sync = getattr(loop.objective, "no_sync", None)
    with (no_sync() if no_sync and not sync else contextlib.nullcontext()), \
            torch.autocast(device.type, dtype=loop.amp or torch.float32, enabled=loop.amp is not None):  # fmt: skip
        loss, terms = loop.objective(images, labels)
        loop.trainables.scaler.scale(loss / loop.cfg.accum_steps).backward()
    for key, value in {"loss": loss.detach(), **terms}.items():
        meters.setdefault(key, MeanMetric().to(device)).update(value.float())
    detached: torch.Tensor = loss.detach()
    return detached


def _optimizer_step(loop: Loop) -> None:
    t = loop.trainables
    t.scaler.unscale_(t.optimizer)
    torch.nn.utils.clip_grad_norm_(
        [p for p in t.model.parameters() if p.requires_grad], loop.cfg.grad_clip
    )
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()


def train_one_epoch(loop: Loop, state: TrainState, stop: Any, bar: Progress) -> dict[str, float]:
    """Runs the rest of epoch ``state.epoch`` from ``state.step_in_epoch``.

    Returns:
        Mean loss terms over the epoch's steps run here, learning rate and images/s.
    """
    cfg, accum = loop.cfg, loop.cfg.accum_steps
    plan = epoch_plan(dataset_len(loop.train_set), state.epoch, cfg, loop.info)
    batches = iter(
        make_loader(loop.train_set, plan[state.step_in_epoch * accum :], cfg, loop.info.device)
    )
    task = bar.add_task(
        f"epoch {state.epoch + 1}/{cfg.epochs}",
        total=len(plan) // accum,
        completed=state.step_in_epoch,
    )
    meters: dict[str, MeanMetric] = {}
    _set_train_mode(loop)
    start, images = time.perf_counter(), 0
    while state.step_in_epoch < len(plan) // accum:
        losses = [_micro_step(loop, next(batches), m == accum - 1, meters) for m in range(accum)]
        if any_rank(not bool(torch.isfinite(torch.stack(losses)).all()), loop.info.device):
            raise TrainingStopError(
                f"loss became NaN/Inf at step {state.global_step + 1} (epoch {state.epoch + 1}); weights "
                f"before it are kept in {loop.out / 'last.pt'} (last save). Hint: lower --lr or use --amp none"
            )
        _optimizer_step(loop)
        state.step_in_epoch, state.global_step = state.step_in_epoch + 1, state.global_step + 1
        images += cfg.batch_size
        bar.update(
            task,
            advance=1,
            description=f"epoch {state.epoch + 1}/{cfg.epochs} loss {float(losses[-1]):.3f}",
        )
        if cfg.save_every and state.global_step % cfg.save_every == 0:
            _save(loop, state)
        if any_rank(stop(), loop.info.device):
            _save(loop, state)
            raise TrainingInterruptedError(
                f"interrupted at step {state.global_step}; resume with --resume from {loop.out / 'last.pt'}"
            )
    bar.remove_task(task)
    seconds = time.perf_counter() - start
    stats = {k: float(m.compute()) for k, m in meters.items()}
    return {
        **stats,
        "lr": float(loop.trainables.scheduler.get_last_lr()[0]),
        "images_per_s": images / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


def _set_train_mode(loop: Loop) -> None:
    """Training mode; a linear probe keeps its frozen backbone (BatchNorm statistics) in eval."""
    loop.model.train(not loop.cfg.linear_probe)
    if loop.cfg.linear_probe:
        [m for m in loop.model.modules() if isinstance(m, nn.Linear)][-1].train()


def validate(loop: Loop) -> EvalResult:
    """Top-1/top-5 over the evaluation sizes on this process's share of the validation set."""
    batch = max(2, loop.cfg.batch_size // loop.info.world_size)
    batches = val_batches(dataset_len(loop.val_set), batch, loop.info)
    return evaluate(
        loop.model, make_loader(loop.val_set, batches, loop.cfg, loop.info.device), C.parse_sizes(loop.cfg.eval_sizes),
        train_size=loop.cfg.image_size, paths="all", amp_dtype=loop.amp,
    )  # fmt: skip


# ----------------------------------------------------------------------------- main


def _prepare(cfg: C.TrainConfig, info: DistInfo, resume: bool) -> tuple[C.TrainConfig, Loop]:
    train_set, val_set, classes = make_datasets(cfg)
    cfg = C.resolve(cfg, num_classes=classes, default_threshold=default_si_threshold(cfg.model))
    if cfg.split_at == "auto":
        split = autosplit.choose(cfg, Path(cfg.out), write=info.is_main, resume=resume)
        cfg = dataclasses.replace(cfg, split_at=split)
    micro_batch(cfg, info.world_size)
    routed = cfg.init_from is not None
    model, train_size = load_init(cfg) if routed else (build_network(cfg), cfg.image_size)
    if isinstance(model, MSUN):
        cfg = dataclasses.replace(cfg, split_at=model.split_at, scales=model.scales)
    model.to(info.device)
    if info.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    objective: nn.Module = Objective(model, cfg, routed=routed, train_size=train_size)
    if info.world_size > 1:
        objective = DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if cfg.compile:
        objective = torch.compile(objective)  # type: ignore[assignment]
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(dataset_len(train_set), cfg))
    amp = amp_dtype(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp == torch.float16)
    trainables = Trainables(model, optimizer, scheduler, scaler)
    loop = Loop(
        cfg,
        info,
        objective,
        trainables,
        train_set,
        val_set,
        amp,
        Path(cfg.out),
        _tensorboard(cfg, info),
    )
    return cfg, loop


def _tensorboard(cfg: C.TrainConfig, info: DistInfo) -> Any:
    """A SummaryWriter in <out>/tensorboard for --tensorboard on rank 0, else None."""
    if not (cfg.tensorboard and info.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise InputError(
            "--tensorboard needs the tensorboard package. Hint: pip install tensorboard"
        ) from e
    return SummaryWriter(str(Path(cfg.out) / "tensorboard"))


def _announce(loop: Loop, console: Console) -> None:
    cfg, info = loop.cfg, loop.info
    micro, lr = micro_batch(cfg, info.world_size), float(cfg.lr or 0)
    console.print(
        f"{cfg.method} {cfg.model}" + (f" split at {cfg.split_at}, scales {list(cfg.scales)}" if cfg.method == "msun" else "")
        + f" | global batch {cfg.batch_size} = {info.world_size} process(es) x {cfg.accum_steps} accumulation x {micro}"
        + f" | lr {lr:.4g} ({lr * 256 / cfg.batch_size:.4g} per 256 images) | {cfg.epochs} epochs on {info.device}"
    )  # fmt: skip


def _end_of_epoch(loop: Loop, state: TrainState, stats: dict[str, float], console: Console) -> None:
    result = (
        validate(loop)
        if (state.epoch + 1) % loop.cfg.eval_every == 0 or state.epoch + 1 == loop.cfg.epochs
        else None
    )
    row: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.global_step, **stats}
    if result is not None:
        row["val_top1_mean"] = result.mean_top1
        row.update(
            {
                f"val_top1_{s}": float(v)
                for s, v in zip(result.sizes, result.routed_top1, strict=True)
            }
        )
        if result.top1.shape[1] > 1:
            row.update(
                {
                    f"val_top1_path{k}_mean": float(result.top1[:, k].mean())
                    for k in range(result.top1.shape[1])
                }
            )
    state.history.append(row)
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    improved = result is not None and result.mean_top1 > state.best
    if improved:
        state.best = result.mean_top1  # type: ignore[union-attr]
    _save(loop, state)
    if loop.info.is_main:
        if improved:
            with atomic_path(loop.out / "best.pt") as tmp:
                shutil.copyfile(loop.out / "last.pt", tmp)
        write_metrics(loop.out, state.history)
        for key, value in row.items():
            if loop.writer is not None and isinstance(value, float):
                loop.writer.add_scalar(key, value, state.epoch)
        console.print(
            " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items()
                if not k.startswith("val_top1_") or k == "val_top1_mean"
            )
        )


def main(cfg: C.TrainConfig, *, resume: bool = False) -> Path:
    """Trains as ``cfg`` says; returns the run folder (last.pt, best.pt, metrics, config)."""
    C.check(cfg)
    info = init_distributed(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    out = Path(cfg.out)
    console = Console(quiet=not info.is_main)
    with RunLock(out) if info.is_main else contextlib.nullcontext():
        cfg, loop = _prepare(cfg, info, resume)
        state = _start(loop, resume)
        if info.is_main:
            write_text(out / "config.yaml", C.dump_yaml(cfg))
        _announce(loop, console)
        show = info.is_main and sys.stderr.isatty()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with interrupt_flag() as stop, Progress(*columns, disable=not show, transient=True) as bar:
            while state.epoch < int(cfg.epochs or 0):
                stats = train_one_epoch(loop, state, stop, bar)
                _end_of_epoch(loop, state, stats, console)
    return out


def _start(loop: Loop, resume: bool) -> TrainState:
    last = loop.out / "last.pt"
    if resume:
        check_resume(last, loop.cfg)
        return restore_state(last, loop.trainables)
    if last.exists():
        raise InputError(
            f"{loop.out} already holds a training run. Hint: add --resume to continue it, or choose another --out"
        )
    return TrainState()
