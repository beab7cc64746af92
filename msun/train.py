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
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ckascope.platform import (
    CKAScopeError,
    DistInfo,
    InputError,
    Reporter,
    WeightsUnavailableError,
    build_model,
    dataset_len,
    ensure_weights,
    init_distributed,
    is_multipath,
    is_self_describing,
    make_console,
    make_progress,
    model_from_checkpoint,
    read_checkpoint,
    warn,
    warn_skipped,
    write_text,
)
from msun import config as C
from msun.backbones import classifier
from msun.checkpoint import BUILDER, SCALE_BN_BUILDER, input_size
from msun.data import (
    PlanSampler,
    default_num_val,
    epoch_plan,
    make_loader,
    micro_batch,
    steps_per_epoch,
    val_batches,
    validation_subset,
)
from msun.data import datasets as make_datasets
from msun.evaluate import EvalResult, evaluate
from msun.model import MSUN, build_msun, weights_name
from msun.objective import Objective
from msun.privatebn import ScaleBNNet, build_scale_bn_net
from msun.runstate import (
    RunLock,
    Trainables,
    TrainState,
    any_rank,
    check_resume,
    check_reuse,
    gather_rng,
    interrupt_flag,
    is_finished,
    restore_state,
    save_state,
    saved_run,
    write_metrics,
)
from msun.splits import resolve_split


class TrainingStopError(CKAScopeError):
    """Training cannot go on (NaN loss, out of memory); the message says what was kept."""


class NonFiniteLossError(TrainingStopError):
    """The loss became NaN/Inf: every process stops at the same step, so rank 0 says it.

    One process's loss is enough, but the check is all-reduced (``_step_check``): each process
    stops with the same step and, rank 0 deciding, the same words on what was kept.
    """

    whole_job = True


class NonFiniteWeightsError(TrainingStopError):
    """The weights or the optimizer state became NaN/Inf: every process stops at the same save.

    DDP keeps every process's weights alike; the check is all-reduced all the same (``_finite``)
    so that no process goes on to the save's collective while another stops. Rank 0 says it.
    """

    whole_job = True


class TrainingInterruptedError(TrainingStopError):
    """Ctrl-C or SIGTERM: a checkpoint was saved at the current step."""

    exit_code = 130


# ----------------------------------------------------------------------------- the network


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swaps the classifier for a freshly initialised one with ``num_classes`` outputs."""
    name, old = classifier(model)
    parent, _, child = name.rpartition(".")
    setattr(
        model.get_submodule(parent) if parent else model,
        child,
        nn.Linear(old.in_features, num_classes),
    )


#: What ``--weights`` can do instead when its download fails: msun train's options, not
#: ckascope's (``--checkpoint``).
OFFLINE_WEIGHTS_HINT = (
    "--weights none trains from random weights; or copy the file to that path, or fine-tune a "
    "local copy of it as a vanilla network with --init-from FILE"
)


@contextlib.contextmanager
def _offline_hint() -> Iterator[None]:
    """Gives a ``WeightsUnavailableError`` msun train's hint instead of ckascope's."""
    try:
        yield
    except WeightsUnavailableError as e:
        raise WeightsUnavailableError(e.problem, OFFLINE_WEIGHTS_HINT) from e


def check_weights(cfg: C.TrainConfig) -> None:
    """Refuses pretrained weights ``build_network`` could not load, before anything is written.

    The network is built once its split is chosen, and ``--split-at auto`` writes its analysis
    as it chooses: offline, the run would otherwise stop with ``split-analysis/`` written. A
    saved run is not checked here (``_configure``): a finished one needs no network, and an
    unfinished one's comes from its checkpoint (``_start_network``).

    Raises:
        WeightsUnavailableError: Pretrained weights that cannot be had, with msun train's hint.
    """
    with _offline_hint():
        ensure_weights(cfg.model, weights_name(cfg.weights))


def build_network(cfg: C.TrainConfig) -> nn.Module:
    """The network of a resolved config: random init (seeded) or pretrained vanilla weights.

    Raises:
        WeightsUnavailableError: Pretrained weights that cannot be had, with msun train's hint.
    """
    with _offline_hint():
        return _network(cfg)


def _network(cfg: C.TrainConfig) -> nn.Module:
    """``build_network`` itself."""
    assert cfg.num_classes is not None, "resolve the config first"
    torch.manual_seed(cfg.seed)
    weights = None if cfg.weights == "none" else cfg.weights
    classes = 1000 if weights else cfg.num_classes  # pretrained weights come with 1000 classes
    model: nn.Module
    if cfg.method == "msun":
        model = build_msun(
            cfg.model,
            split_at=cfg.split_at,
            scales=cfg.scales,
            num_classes=classes,
            weights=weights,
            bn=cfg.bn,
        )
    elif cfg.bn == "private":  # MST with a BatchNorm set per scale
        model = build_scale_bn_net(
            cfg.model,
            scales=cfg.scales,
            num_classes=classes,
            image_size=cfg.image_size,
            weights=weights,
            seed=cfg.seed,
        )
    else:
        model = build_model(
            cfg.model, weights or "none", num_classes=None if weights else classes, seed=cfg.seed
        )
    if classes != cfg.num_classes:
        replace_classifier(model, cfg.num_classes)
    return model.train()


def check_init_flags(
    cfg: C.TrainConfig, held: tuple[str, str, str], explicit: Collection[str]
) -> None:
    """Refuses a --model, --method or --bn set to another network than ``--init-from`` holds.

    Fine-tuning trains the checkpoint's network as it is; a flag asking for another would be
    silently ignored. Options left at their defaults are not the user's request, and a
    fine-tuning run's own config.yaml records the checkpoint's (``--resume``, ``--config``).

    Args:
        cfg: The options.
        held: The checkpoint's architecture, method and BatchNorm mode (``init_arch``).
        explicit: The options the user set.

    Raises:
        InputError: Naming the flag, the value asked for and the checkpoint's network.
    """
    arch, method, bn = held
    network = f"a {arch} {method} network" + (" with private BatchNorm" if bn == "private" else "")
    for flag, value in zip(("model", "method", "bn"), held, strict=True):
        asked = getattr(cfg, flag)
        if flag in explicit and asked != value:
            raise InputError(
                f"--init-from {cfg.init_from} fine-tunes its own network as it is, {network}; "
                f"--{flag} {asked} asks for another. Hint: drop --{flag}"
            )


def init_arch(init: Mapping[str, Any] | None, cfg: C.TrainConfig) -> tuple[str, str, str]:
    """Architecture, method and BatchNorm mode of a fine-tuning run: the ``--init-from``'s.

    The config then records what the network is.
    """
    if init is None:
        return cfg.model, cfg.method, cfg.bn
    if not is_self_describing(init):
        return cfg.model, "vanilla", "shared"
    config, builder = init["config"], init.get("builder")
    if builder == SCALE_BN_BUILDER:
        return str(config["arch"]), "mst", "private"
    if builder == BUILDER:
        return str(config["arch"]), "msun", str(config.get("bn", "shared"))
    return str(config["arch"]), "vanilla", "shared"


def load_init(init: Mapping[str, Any], cfg: C.TrainConfig) -> tuple[nn.Module, int]:
    """``--init-from``: the trained model with a new classifier, and the side it was fed.

    That side (``msun.checkpoint.input_size``: a fine-tuned plain network's recorded one, else
    its run's image size) is what a plain network goes on being fed.

    An MSUN trains only the path the dataset's images are routed to (the others would get no
    gradient); ``--linear-probe`` trains only the new classifier.
    """
    assert cfg.num_classes is not None, "resolve the config first"
    model = model_from_checkpoint(
        init, str(cfg.init_from), arch=None if is_self_describing(init) else cfg.model
    )
    torch.manual_seed(cfg.seed)
    replace_classifier(model, cfg.num_classes)
    # A private BatchNorm's other sets get zero gradients here, but weight decay still shrinks
    # their affine parameters a little (the sets are rows of one tensor): fine-tuning is for
    # the routed size; scores at other sizes after it are not the original network's.
    if isinstance(model, MSUN):
        routed = model.route(cfg.image_size)
        for k, subnet in enumerate(model.subnets):
            subnet.requires_grad_(k == routed)
    if cfg.linear_probe:
        model.requires_grad_(False)
        classifier(model)[1].requires_grad_(True)
    return model.train(), input_size(init)


def make_optimizer(model: nn.Module, cfg: C.TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on all trainable parameters (as published)."""
    assert cfg.lr is not None, "resolve the config first"
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, start: float, floor: float) -> float:
    """Linear warm-up from ``start`` to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return start + (1 - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: C.TrainConfig, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule for ``steps`` optimiser steps per epoch (warm-up within the run)."""
    assert cfg.epochs is not None, "resolve the config first"
    assert cfg.warmup_epochs is not None, "resolve the config first"
    total = steps * cfg.epochs
    warmup = min(round(steps * cfg.warmup_epochs), total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_factor, cfg.min_lr_factor)
    )


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``: bf16 on CUDA, none on CPU; others as they are.

    The resolved value is what the config and checkpoints keep, so a CPU run resumed on a GPU
    is refused (``--amp`` differs) instead of silently switching to bf16.
    """
    return amp if amp != "auto" else ("bf16" if device.type == "cuda" else "none")


def amp_dtype(cfg: C.TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the run (``auto``: bf16 on CUDA, full precision on CPU)."""
    choice = resolve_amp(cfg.amp, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


# ----------------------------------------------------------------------------- one epoch


@dataclass
class Loop:
    """Everything an epoch needs."""

    cfg: C.TrainConfig
    info: DistInfo
    objective: nn.Module  # the Objective, wrapped in DDP / torch.compile when used
    trainables: Trainables
    train_loader: DataLoader[Any]  # one loader for the run: persistent workers, batches swapped
    val_loader: DataLoader[Any]
    amp: torch.dtype | None
    out: Path
    #: The side a fine-tuned plain network is validated at and its checkpoints record
    #: (``_input_size``); None: its image size, as every other network's.
    input_size: int | None
    writer: Any = None  # TensorBoard SummaryWriter (rank 0, --tensorboard)

    @property
    def model(self) -> nn.Module:
        """The bare network."""
        return self.trainables.model

    @property
    def validation_size(self) -> int:
        """The side a plain network sees each test image resized to in validation."""
        return self.input_size or self.cfg.image_size

    def iterate(self, loader: DataLoader[Any], batches: list[Any]) -> Iterator[Any]:
        """Iterates ``loader`` over ``batches``."""
        sampler = loader.batch_sampler
        assert isinstance(sampler, PlanSampler)
        sampler.plan = batches
        return iter(loader)


def _save(loop: Loop, state: TrainState, name: str = "last.pt") -> None:
    """Every process gives its generator states (collective); rank 0 writes the checkpoint.

    Raises:
        NonFiniteWeightsError: The weights or the optimizer's state hold NaN/Inf on any process
            (a loss can stay finite while a step overflows them); nothing is written over the
            last good file.
    """
    if not _finite(loop.trainables, loop.info):
        kept = loop.out / "last.pt"
        where = f"the last checkpoint ({kept}) is kept" if kept.exists() else "nothing was saved"
        raise NonFiniteWeightsError(
            f"the weights or the optimizer state became NaN/Inf by step {state.global_step}; "
            f"{where}. Hint: lower --lr, or keep --grad-clip on"
        )
    rng = gather_rng(loop.info)
    if loop.info.is_main:
        save_state(loop.out / name, loop.trainables, loop.cfg, state, rng, loop.input_size)


def _finite(t: Trainables, info: DistInfo) -> bool:
    """Whether every parameter and optimizer state tensor is finite on every process.

    One read of the device, after one all-reduce under torchrun: a collective call, which every
    process makes at each save (``_save``), so that they all agree.
    """
    tensors = [*t.model.parameters(), *_state_tensors(t.optimizer.state_dict()["state"])]
    checks = [(~torch.isfinite(x)).any() for x in tensors if x.is_floating_point()]
    none = torch.zeros((), dtype=torch.bool, device=info.device)  # stack needs one tensor
    flag = torch.stack([none, *checks]).any().double()  # summed, as _step_check's flags
    if info.world_size > 1:
        torch.distributed.all_reduce(flag)
    return not bool(flag > 0)


def _state_tensors(state: Mapping[Any, Any]) -> list[torch.Tensor]:
    return [v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)]


class TermSums:
    """Running sums of the logged loss terms, kept on the device until the epoch ends.

    A torchmetrics ``MeanMetric`` per term and micro-batch would cost host-device syncs (its
    NaN check) on every call; the epoch's means need one all-reduce and one copy at its end.
    A resumed epoch starts from the sums its checkpoint saved (``restored``): the first process
    carries them, the others start at zero with the same terms, so the means cover every step
    of the epoch (bit for bit on one process; under torchrun up to the order of additions).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # micro-batches this process added
        self.earlier = 0  # micro-batches of all processes in the sums restored

    @classmethod
    def restored(cls, saved: Mapping[str, Any], info: DistInfo) -> TermSums:
        """The sums ``saved`` (``TrainState.epoch_sums``; empty: none) on this process."""
        meters = cls()
        for key, value in saved.get("terms", {}).items():
            carried = float(value) if info.is_main else 0.0
            meters.sums[key] = torch.tensor(carried, dtype=torch.float64, device=info.device)
        meters.earlier = int(saved.get("count", 0))
        return meters

    def add(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Adds one micro-batch's detached scalar terms."""
        for key, value in terms.items():
            value = value.detach().double()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def totals(self, info: DistInfo) -> tuple[torch.Tensor, int]:
        """Every term's sum over all processes (terms,), and the micro-batches they hold.

        A collective call under torchrun (every process holds the same terms).
        """
        stacked = torch.stack(list(self.sums.values()))  # (terms,)
        if info.world_size > 1:
            torch.distributed.all_reduce(stacked)
        return stacked, self.count * info.world_size + self.earlier

    def summary(self, info: DistInfo) -> tuple[dict[str, float], dict[str, Any]]:
        """The means of every term over all processes' micro-batches, and the sums as saved.

        The sums are what a checkpoint keeps (``restored`` takes them back); the epoch's one
        sync (a collective call under torchrun).
        """
        if not self.sums:
            return {}, {}
        stacked, count = self.totals(info)
        means = dict(zip(self.sums, (stacked / count).tolist(), strict=True))
        return means, {"terms": dict(zip(self.sums, stacked.tolist(), strict=True)), "count": count}


class EpochLog:
    """What an epoch logs of its steps: its loss terms, and the seconds and images they took.

    A resumed epoch goes on from what its checkpoint saved (``TrainState.epoch_sums``), so its
    row is the uninterrupted epoch's, its time that of both parts.
    """

    def __init__(self, state: TrainState, info: DistInfo, batch_size: int) -> None:
        saved = state.epoch_sums
        self.terms = TermSums.restored(saved, info)
        self.info, self.batch_size = info, batch_size
        self.seconds, self.images = float(saved.get("seconds", 0.0)), int(saved.get("images", 0))
        self.start, self.first_step = time.perf_counter(), state.step_in_epoch

    def keep(self, state: TrainState) -> dict[str, float]:
        """Puts the epoch's log so far into ``state.epoch_sums``; returns its terms' means.

        A collective call under torchrun; a checkpoint saved next keeps the log.
        """
        means, terms = self.terms.summary(self.info)
        images = self.images + (state.step_in_epoch - self.first_step) * self.batch_size
        seconds = self.seconds + time.perf_counter() - self.start
        state.epoch_sums = {**terms, "seconds": seconds, "images": images}
        return means


def _step_check(losses: list[torch.Tensor], stop: bool, info: DistInfo) -> tuple[bool, bool, float]:
    """(a loss is NaN/Inf on any rank, a stop was asked on any rank, the last loss).

    The step's one synchronisation (plus one all-reduce under torchrun): every check that
    needs the host reads the same small tensor.
    """
    stacked = torch.stack(losses).double()  # (accum,)
    flags = torch.stack([(~torch.isfinite(stacked)).any().double(), stacked.new_tensor(stop)])
    if info.world_size > 1:
        torch.distributed.all_reduce(flags)
    values = torch.cat([flags, stacked]).tolist()
    return values[0] > 0, values[1] > 0, values[-1]


def _micro_step(loop: Loop, batch: Any, sync: bool, meters: TermSums) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its (detached) loss."""
    warn_skipped(batch.skipped)
    # Checked on the host (the batch is still on the CPU). Under torchrun the failing process
    # ends the job: torchrun stops the other workers, which would otherwise wait for its
    # gradients.
    if len(batch.images) == 0:
        raise TrainingStopError(
            f"every image of a micro-batch was unreadable ({len(batch.skipped)} file(s), named "
            "in the warnings above). Hint: remove or repair them, or raise --batch-size"
        )
    device = loop.info.device
    images = batch.images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch.labels.to(device, non_blocking=True)
    # DDP: reduce gradients on the last micro-batch of the step only.
    no_sync = getattr(loop.objective, "no_sync", None)
    autocast = torch.autocast(
        device.type, dtype=loop.amp or torch.float32, enabled=loop.amp is not None
    )
    with no_sync() if no_sync and not sync else contextlib.nullcontext(), autocast:
        loss, terms = loop.objective(images, labels)
        loop.trainables.scaler.scale(loss / loop.cfg.accum_steps).backward()
    meters.add({"loss": loss, **terms})
    detached: torch.Tensor = loss.detach()
    return detached


def _optimizer_step(loop: Loop) -> None:
    t = loop.trainables
    if loop.cfg.grad_clip:  # 0 = off (the recipe for vanilla and MST)
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for p in t.model.parameters() if p.requires_grad], loop.cfg.grad_clip
        )
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()


def _nan_stop(loop: Loop, state: TrainState) -> NonFiniteLossError:
    last = loop.out / "last.pt"
    kept = (
        f"the last checkpoint ({last}) is kept" if last.exists() else "no checkpoint was saved yet"
    )
    return NonFiniteLossError(
        f"loss became NaN/Inf at step {state.global_step + 1} (epoch {state.epoch + 1}); {kept}. "
        "Hint: lower --lr, or use --amp bf16/none"
    )


def _interrupted(loop: Loop, state: TrainState, during: str = "") -> TrainingInterruptedError:
    """Saves ``last.pt`` where the run stands; the error says so (``during``: where it stopped)."""
    _save(loop, state)
    return TrainingInterruptedError(
        f"interrupted at step {state.global_step}{during}; continue with --resume (from {loop.out / 'last.pt'})"
    )


def train_one_epoch(
    loop: Loop,
    state: TrainState,
    stop: Callable[[], bool],
    bar: Reporter,
    on_pace: Callable[[float], None] | None = None,
) -> dict[str, float]:
    """Runs the rest of epoch ``state.epoch`` from ``state.step_in_epoch``.

    ``on_pace`` is called once, with the seconds per step, after ``PACE_STEPS`` steps. Every
    checkpoint keeps the epoch's log so far (``EpochLog``), and so does ``state`` at the end.

    Returns:
        Mean loss terms over the epoch's steps (those before a resume too, when its checkpoint
        kept them), learning rate and images/s.
    """
    cfg, accum = loop.cfg, loop.cfg.accum_steps
    plan = epoch_plan(dataset_len(loop.train_loader.dataset), state.epoch, cfg, loop.info)
    steps = len(plan) // accum
    batches = loop.iterate(loop.train_loader, plan[state.step_in_epoch * accum :])
    task = bar.add_task(
        f"epoch {state.epoch + 1}/{cfg.epochs}", total=steps, completed=state.step_in_epoch
    )
    log = EpochLog(state, loop.info, cfg.batch_size)
    _set_train_mode(loop)
    while state.step_in_epoch < steps:
        losses = [_micro_step(loop, next(batches), m == accum - 1, log.terms) for m in range(accum)]
        nonfinite, stopping, last = _step_check(losses, stop(), loop.info)
        if nonfinite:
            raise _nan_stop(loop, state)
        _optimizer_step(loop)
        state.step_in_epoch, state.global_step = state.step_in_epoch + 1, state.global_step + 1
        bar.update(
            task, advance=1, description=f"epoch {state.epoch + 1}/{cfg.epochs} loss {last:.3f}"
        )
        saving = bool(cfg.save_every and state.global_step % cfg.save_every == 0)
        if saving or stopping:
            log.keep(state)
        if saving:
            _save(loop, state)
        if stopping:
            raise _interrupted(loop, state)
        if on_pace is not None and state.step_in_epoch - log.first_step == PACE_STEPS:
            on_pace((time.perf_counter() - log.start) / PACE_STEPS)
    bar.remove_task(task)
    means = log.keep(state)  # a Ctrl-C in the validation that follows saves it
    seconds, images = state.epoch_sums["seconds"], state.epoch_sums["images"]
    lr = float(loop.trainables.scheduler.get_last_lr()[0])
    return {
        **means,
        "lr": lr,
        "images_per_s": images / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


def _set_train_mode(loop: Loop) -> None:
    """Training mode; a linear probe keeps its frozen backbone (BatchNorm statistics) in eval."""
    loop.model.train(not loop.cfg.linear_probe)
    if loop.cfg.linear_probe:
        classifier(loop.model)[1].train()


#: The metrics column of the validation images skipped as unreadable (named in notes).
SKIPPED = "val_skipped_images"


class ValidationStoppedError(Exception):
    """Ctrl-C or SIGTERM during a validation pass, seen by every process at the same batch."""


def validate(loop: Loop, bar: Reporter, stop: Callable[[], bool] | None = None) -> EvalResult:
    """Top-1/top-5 over the evaluation sizes on this process's share of the validation set.

    A plain network sees each test image resized to ``loop.validation_size``.

    Raises:
        ValidationStoppedError: ``stop`` returned True after a batch (on any process).
    """
    assert loop.cfg.eval_sizes is not None, "resolve the config first"
    batch = max(2, loop.cfg.batch_size // loop.info.world_size)
    count = dataset_len(loop.val_loader.dataset)
    plan = val_batches(count, batch, loop.info)
    sizes = C.parse_sizes(loop.cfg.eval_sizes)
    task = bar.add_task(f"validation ({C.sizes_count(sizes)})", total=len(plan))
    # The processes agree on a stop after each batch (one all-reduce under torchrun); shares
    # differ by up to one image, so only after the batches every process has.
    last_rank = dataclasses.replace(loop.info, rank=loop.info.world_size - 1)
    shared, done = len(val_batches(count, batch, last_rank)), [0]

    def on_batch() -> None:
        bar.advance(task)
        done[0] += 1
        if stop is not None and done[0] <= shared and any_rank(stop(), loop.info.device):
            raise ValidationStoppedError

    result = evaluate(
        loop.model,
        loop.iterate(loop.val_loader, plan),
        sizes,
        image_size=loop.validation_size,
        paths="all",
        amp_dtype=loop.amp,
        on_batch=on_batch,
    )
    bar.remove_task(task)
    return result


def _epoch_row(
    state: TrainState, stats: dict[str, float], result: EvalResult | None
) -> dict[str, Any]:
    """One line of metrics.csv: the epoch's training terms and, when validated, its accuracy.

    The validation images skipped as unreadable (every process's) come last, after the
    columns that were there before them, as ``msun eval``'s ``skipped_images``.
    """
    row: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.global_step, **stats}
    if result is None:
        return row
    row["val_top1_mean"] = result.mean_top1
    row.update(
        {f"val_top1_{s}": float(v) for s, v in zip(result.sizes, result.routed_top1, strict=True)}
    )
    if result.top1.shape[1] > 1:
        row.update(
            {
                f"val_top1_path{k}_mean": float(result.top1[:, k].mean())
                for k in range(result.top1.shape[1])
            }
        )
    row[SKIPPED] = result.skipped
    return row


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a metrics row: every number but its ``epoch`` and ``step``.

    Those two are the x axis; the count of skipped images (an int) is a curve like the rest.
    """
    return {
        key: float(value)
        for key, value in row.items()
        if key not in ("epoch", "step")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def _end_of_epoch(
    loop: Loop,
    state: TrainState,
    stats: dict[str, float],
    console: Console,
    bar: Reporter,
    stop: Callable[[], bool],
) -> None:
    """Validates, logs and saves ``last.pt`` (and ``best.pt``, written first, when it improved).

    Raises:
        TrainingInterruptedError: ``stop`` during the validation: ``last.pt`` is saved as after
            the epoch's last step (its log kept), and ``--resume`` runs this validation again.
    """
    last_epoch = state.epoch + 1 == loop.cfg.epochs
    due = (state.epoch + 1) % loop.cfg.eval_every == 0 or last_epoch
    try:
        result = validate(loop, bar, stop) if due else None
    except ValidationStoppedError:
        where = f", in epoch {state.epoch + 1}'s validation (a resume runs it again)"
        raise _interrupted(loop, state, where) from None
    row = _epoch_row(state, stats, result)
    state.history.append(row)
    state.epoch, state.step_in_epoch, state.epoch_sums = state.epoch + 1, 0, {}
    if result is not None and result.mean_top1 > state.best:
        state.best = result.mean_top1
        _save(loop, state, "best.pt")  # before last.pt: a crash between the two redoes this epoch
    _save(loop, state)
    if loop.info.is_main:
        write_metrics(loop.out, state.history)
        if loop.writer is not None:
            for key, value in scalars(row).items():
                loop.writer.add_scalar(key, value, state.epoch)
            loop.writer.flush()  # a run stopped later keeps its finished epochs' curves
        shown = (
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()
            if (not k.startswith("val_top1_") or k == "val_top1_mean") and (k != SKIPPED or v)
        )
        console.print(" | ".join(shown))


# ----------------------------------------------------------------------------- main


def _configure(
    cfg: C.TrainConfig, info: DistInfo, saved: Mapping[str, Any] | None, explicit: Collection[str]
) -> tuple[C.TrainConfig, Dataset[Any], Dataset[Any], Mapping[str, Any] | None]:
    """The resolved config, the datasets and the ``--init-from`` checkpoint.

    Everything is checked before anything is written; the split point comes last (the
    ``--split-at auto`` analysis writes), decided here once: ``_build`` builds what it says.
    ``explicit`` names the options the user set (see ``main``).
    """
    cfg, init = _with_init(cfg, explicit)
    train_set, val_set, classes = make_datasets(cfg, saved=saved is not None)
    cfg = C.resolve(cfg, num_classes=classes)
    cfg = dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, info.device))
    micro_batch(cfg, info.world_size)
    cfg, val_set = _validation_share(cfg, train_set, val_set, saved)
    # a resumed run's weights are its checkpoint's, as a fine-tuned run's are its --init-from's
    if saved is None and init is None:
        check_weights(cfg)  # a download, after the cheap checks; before split-analysis/
    split_at, scales = resolve_split(cfg, init, saved, info)
    return dataclasses.replace(cfg, split_at=split_at, scales=scales), train_set, val_set, init


def _with_init(
    cfg: C.TrainConfig, explicit: Collection[str]
) -> tuple[C.TrainConfig, Mapping[str, Any] | None]:
    """``cfg`` with the network ``--init-from`` holds, and that checkpoint (None without one).

    The network is its architecture, method and BatchNorm mode.

    Raises:
        InputError: An unreadable checkpoint, or a --model / --method it contradicts.
    """
    init = read_checkpoint(cfg.init_from) if cfg.init_from else None
    arch, method, bn = init_arch(init, cfg)
    if init is not None:
        check_init_flags(cfg, (arch, method, bn), explicit)
    return dataclasses.replace(cfg, model=arch, method=method, bn=bn), init


def _validation_share(
    cfg: C.TrainConfig,
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    saved: Mapping[str, Any] | None,
) -> tuple[C.TrainConfig, Dataset[Any]]:
    """``cfg`` with its ``num_val`` decided, and the validation images it draws.

    Without ``--num-val``, a share of the run's cost (``default_num_val``), not the whole
    validation set; a run saved with ``num_val: null`` keeps validating every image.
    """
    if cfg.num_val is not None or _validates_whole_set(saved):
        return cfg, val_set
    steps = steps_per_epoch(dataset_len(train_set), cfg)
    cfg = dataclasses.replace(cfg, num_val=default_num_val(cfg, steps, dataset_len(val_set)))
    return cfg, validation_subset(val_set, cfg.num_val, cfg.seed)


def _validates_whole_set(saved: Mapping[str, Any] | None) -> bool:
    """Whether ``saved`` is a run from before ``default_num_val``, which validated every image.

    Its config recorded ``num_val: null``: then the whole validation set (2000 synthetic
    images), which it goes on scoring when resumed. Read as a default's share, it would differ
    from the run's own, and ``--resume`` would refuse it with no way to give "null".
    """
    return saved is not None and saved["train_config"].get("num_val") is None


def _build(
    cfg: C.TrainConfig,
    info: DistInfo,
    train_set: Dataset[Any],
    val_set: Dataset[Any],
    init: Mapping[str, Any] | None,
    saved: Mapping[str, Any] | None = None,
) -> Loop:
    """The network, its objective, optimiser, schedule and data loaders for a resolved config.

    ``saved`` is the checkpoint a resumed run continues from (None: a new run).
    """
    model, model_image_size = _start_network(cfg, init, saved)
    model.to(info.device)
    if info.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    objective: nn.Module = Objective(
        model, cfg, routed=init is not None, image_size=model_image_size
    )
    if info.world_size > 1:
        objective = DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if cfg.compile:
        objective = torch.compile(objective)  # type: ignore[assignment]
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(dataset_len(train_set), cfg))
    amp = amp_dtype(cfg, info.device)
    trainables = Trainables(
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(info.device.type, enabled=amp == torch.float16),
    )
    loaders = make_loader(train_set, cfg, info.device), make_loader(val_set, cfg, info.device)
    return Loop(
        cfg,
        info,
        objective,
        trainables,
        *loaders,
        amp,
        Path(cfg.out),
        _input_size(model, init, saved),
        _tensorboard(cfg, info),
    )


def _start_network(
    cfg: C.TrainConfig, init: Mapping[str, Any] | None, saved: Mapping[str, Any] | None
) -> tuple[nn.Module, int]:
    """The network a run starts from, and the side it is fed (``load_init``'s).

    A resumed run's checkpoint replaces every weight, so pretrained ones are not loaded (nor
    fetched: an unfinished ``--weights default`` run resumes offline). The structure is the
    same: a supported architecture's torchvision builder changes nothing but the weights when
    given them, and the classifier is the run's width either way.
    """
    if init is not None:
        return load_init(init, cfg)
    if saved is not None:
        cfg = dataclasses.replace(cfg, weights="none")
    return build_network(cfg), cfg.image_size


def _input_size(
    model: nn.Module, init: Mapping[str, Any] | None, saved: Mapping[str, Any] | None
) -> int | None:
    """The side a fine-tuned plain network is validated at and its checkpoints record.

    A new run's is its ``--init-from``'s (``load_init``: the side it trains at); a resumed
    run's its own checkpoint's, and one saved before checkpoints recorded it validated at its
    image size (``input_size``'s fallback), which it goes on doing: its epochs are scored one
    way. None for any other network (an MSUN's paths take their own sizes).
    """
    if init is None or is_multipath(model):
        return None
    return input_size(saved if saved is not None else init)


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
    micro, lr = micro_batch(cfg, info.world_size), loop.trainables.optimizer.defaults["lr"]
    console.print(
        network_words(cfg, _fed(loop))
        + f" | global batch {cfg.batch_size} = {info.world_size} process(es) x {cfg.accum_steps} accumulation x {micro}"
        + f" | lr {lr:.4g} ({lr * 256 / cfg.batch_size:.4g} per 256 images) | {cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'} on {info.device}"
    )
    _note_upsampled(cfg)
    if (cfg.warmup_epochs or 0) >= (cfg.epochs or 0):
        console.print(
            f"warning: the {cfg.warmup_epochs:g}-epoch warm-up spans the whole {cfg.epochs}-epoch run; lower --warmup-epochs"
        )


def _note_upsampled(cfg: C.TrainConfig) -> None:
    """Notes training scales above ``--image-size``: its crops upsampled, no detail added."""
    above = C.upsampled_scales(cfg)
    if above:
        warn(
            f"--scales {' '.join(map(str, above))} above --image-size {cfg.image_size}: each "
            f"{cfg.image_size}-px crop is upsampled to {'it' if len(above) == 1 else 'them'}, "
            "which adds no detail (msun's default --scales end at the image size: "
            f"{' '.join(map(str, C.nominal_scales(cfg.image_size)))})"
        )


def network_words(cfg: C.TrainConfig, fed: int | None = None) -> str:
    """What a run trains, in a few words: method, architecture, split, BatchNorm, distillation.

    ``fed`` is the side a fine-tuned network is fed (``_fed``; None: its image size): each
    crop is resized to it, which the words say where it is not the crop's.
    """
    words = f"{cfg.method} {cfg.model}"
    if cfg.method == "msun":  # a fine-tuned MSUN's split and scales are its checkpoint's
        words += f" split at {cfg.split_at}, scales {list(cfg.scales)}"
    elif cfg.method == "mst" and cfg.init_from is None:  # fine-tuning runs at one size
        words += f" at scales {list(cfg.scales)}"
    if cfg.bn == "private":
        words += ", a BatchNorm set per " + (
            "path in the trunk" if cfg.method == "msun" else "scale"
        )
    if cfg.distill:
        words += ", ensemble distillation"
    if cfg.init_from is not None:
        what = "linear probe" if cfg.linear_probe else "fine-tuning"
        words += f", {what} of {cfg.init_from} at {_fed_side(cfg.image_size, fed)}"
    return words


def _fed(loop: Loop) -> int | None:
    """The side a fine-tuned network is fed; None for a run that is no fine-tuning.

    A plain network's is ``Loop.input_size``, a private-BN MST network's its own image size (it
    resizes every input to it), an MSUN's its routed path's scale (its forward resizes to it).
    """
    model = loop.trainables.model
    if loop.cfg.init_from is None:
        return None
    if isinstance(model, ScaleBNNet):
        return model.image_size
    if isinstance(model, MSUN):
        return model.scales[model.route(loop.cfg.image_size)]
    return loop.input_size


def _fed_side(image_size: int, fed: int | None) -> str:
    """The side in words: "28 px", or "224 px (28-px images resized)" where they differ."""
    if fed is None or fed == image_size:
        return f"{image_size} px"
    return f"{fed} px ({image_size}-px images resized)"


#: Steps timed before a run's length is estimated; runs estimated longer than LONG_RUN seconds
#: say so at their start.
PACE_STEPS, LONG_RUN = 3, 3600.0


def _pace_report(loop: Loop, state: TrainState, console: Console) -> Callable[[float], None]:
    """Says how long the run will take when that is more than ``LONG_RUN``."""
    cfg = loop.cfg
    steps = steps_per_epoch(dataset_len(loop.train_loader.dataset), cfg)
    left = steps * (cfg.epochs or 0) - state.global_step

    def report(seconds: float) -> None:
        total = seconds * left
        if total > LONG_RUN and loop.info.is_main:
            console.print(
                f"note: at {seconds:.3g} s per step this run needs about {total / 3600:.1f} h "
                f"more on {loop.info.device} ({left} steps left, validation not counted)"
            )

    return report


def _run_epochs(loop: Loop, state: TrainState, console: Console) -> None:
    pace: Callable[[float], None] | None = _pace_report(loop, state, console)
    with interrupt_flag() as stop, make_progress(loop.info.is_main) as bar:
        while state.epoch < (loop.cfg.epochs or 0):
            stats = train_one_epoch(loop, state, stop, bar, pace)
            pace = None  # said once, from this process's first steps
            _end_of_epoch(loop, state, stats, console, bar, stop)
            if any_rank(stop(), loop.info.device):  # Ctrl-C while saving or logging the epoch
                raise TrainingInterruptedError(
                    f"interrupted after epoch {state.epoch}; continue with --resume"
                )


def main(cfg: C.TrainConfig, *, resume: bool = False, explicit: Collection[str] = ()) -> Path:
    """Trains as ``cfg`` says; returns the run folder (last.pt, best.pt, metrics, config).

    Args:
        cfg: The options.
        resume: Continue the run in ``cfg.out`` from its last.pt.
        explicit: The options the user set (command line or config file), as opposed to
            defaults: a --model or --method that ``--init-from``'s network contradicts is
            refused only when set.
    """
    C.check(cfg, resume=resume)
    if cfg.deterministic:
        # cuBLAS needs its workspace fixed before its first handle; ops with no deterministic
        # kernel (e.g. some CUDA interpolation backward passes) warn by name and stay as they are.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    info = init_distributed(cfg.device)
    out, console = Path(cfg.out), make_console(quiet=not info.is_main)
    with RunLock(out) if info.is_main else contextlib.nullcontext():
        saved = saved_run(out, resume)
        cfg, train_set, val_set, init = _configure(cfg, info, saved, explicit)
        if saved is not None:
            check_resume(saved, cfg)
            if is_finished(saved):
                console.print(
                    f"{out} is finished ({cfg.epochs} of {cfg.epochs} epochs); nothing to "
                    f"resume. Hint: msun eval {out / 'best.pt'}"
                )
                return out
        loop = _build(cfg, info, train_set, val_set, init, saved)
        try:
            _start(loop, saved, console)
        except torch.cuda.OutOfMemoryError as e:
            micro = micro_batch(cfg, info.world_size)
            raise TrainingStopError(
                f"out of GPU memory with {micro} images per process and step. Hint: lower --batch-size or raise --accum-steps"
            ) from e
        finally:
            if loop.writer is not None:
                loop.writer.close()
    return out


def _start(loop: Loop, saved: Mapping[str, Any] | None, console: Console) -> None:
    """Restores a resumed run's state, writes the run's config, then trains it."""
    state = restore_state(saved, loop.trainables, loop.info) if saved is not None else TrainState()
    if loop.info.is_main:
        write_text(loop.out / "config.yaml", C.dump_yaml(loop.cfg))
        if state.history:  # a run killed between its checkpoint and its logs
            write_metrics(loop.out, state.history)
    _announce(loop, console)
    _run_epochs(loop, state, console)


def train_or_reuse(cfg: C.TrainConfig) -> Path:
    """Trains a run, continues it when interrupted, or reuses it when finished; returns last.pt.

    For scripts built on many runs: running one again trains only what is missing. The wanted
    config is resolved as ``--resume`` would resolve it (``--split-at auto`` keeps the run's own
    choice) and compared as ``--resume`` compares it.

    Raises:
        InputError: ``cfg.out`` holds a run with other trajectory-changing settings (named in
            the message); it is never overwritten.
    """
    out = Path(cfg.out)
    if not (out / "last.pt").is_file():
        return main(cfg) / "last.pt"
    saved = saved_run(out, resume=True)
    assert saved is not None  # with resume, a run or an InputError
    wanted = _resolved(cfg, saved)
    check_reuse(saved, wanted)
    assert wanted.epochs is not None, "resolve fills epochs"
    if saved["progress"]["epoch"] < wanted.epochs:
        main(cfg, resume=True)
    return out / "last.pt"


def _resolved(cfg: C.TrainConfig, saved: Mapping[str, Any]) -> C.TrainConfig:
    """``cfg`` resolved as ``main`` resolves it to continue ``saved``; nothing is written."""
    C.check(cfg, resume=True)
    return _configure(cfg, init_distributed(cfg.device), saved, ())[0]
