"""Multi-scale evaluation: top-1/top-5 per test size, per path and for the routed model.

Protocol (docs/msun.md): resize 256 -> centre crop 224 (the val loader) -> resize (bilinear, no
antialias) to s for every test size s. Vanilla and MST models see the image resized back up to
their training image size (224): the ``upsample`` protocol. An MSUN runs every path on it, each
either resized to the path's nominal size (``upsample``, as for the paper's accuracy tables) or
fed as it is (``native``); the routed model's accuracy is that of the path its fixed routing table picks for
s. Routing is never chosen on the evaluation set: the per-path table lets a reader see the
oracle, the routed column is the honest number.

Counts are float64 torchmetrics states with sum reduction, so DDP ranks combine exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from torchvision.datasets import ImageFolder

from ckascope.platform import (
    InputError,
    Layout,
    MemoryFormat,
    MultiPathModel,
    OutputKind,
    Precision,
    Protocol,
    Reporter,
    build_dataset,
    check_protocol,
    checkpoint_label,
    choose_layout,
    collate_skip,
    dataset_len,
    default_resize,
    eval_transform,
    in_layout,
    is_multipath,
    is_self_describing,
    json_matrix,
    make_progress,
    model_from_checkpoint,
    plan_batches,
    read_checkpoint,
    resize,
    subset_indices,
    to_layout,
    warn,
    warn_skipped,
)
from msun.backbones import accepts, classifier, smallest_side
from msun.checkpoint import input_size
from msun.config import sizes_count
from msun.data import SYNTHETIC_TRAIN, check_count, recalibration_seed
from msun.flops import flops_report, meta_twin, vanilla_flops
from msun.model import MSUN, eval_mode
from msun.privatebn import ScaleBNNet
from msun.recalibrate import kept_statistics, norm_layers, recalibrate


class TopKCounts(Metric):
    """Correct top-1 / top-5 counts per (test size, path); images scored and skipped per size.

    The images skipped are the unreadable ones, left out of the accuracies.

    Args:
        num_sizes: Number of test sizes S.
        num_paths: Number of paths P (1 for a plain network).
    """

    full_state_update = False
    correct1: Tensor
    correct5: Tensor
    total: Tensor
    skipped: Tensor

    def __init__(self, num_sizes: int, num_paths: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("correct1", "correct5"):
            self.add_state(
                name, torch.zeros(num_sizes, num_paths, dtype=torch.float64), dist_reduce_fx="sum"
            )
        for name in ("total", "skipped"):
            self.add_state(name, torch.zeros(num_sizes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, size_index: int, path: int, logits: Tensor, labels: Tensor) -> None:
        """Adds one batch of logits (n, C) for one test size and path."""
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (n, k)
        hits = top == labels[:, None]
        self.correct1[size_index, path] += hits[:, 0].sum()
        self.correct5[size_index, path] += hits.any(dim=1).sum()

    def add_images(self, size_index: int, count: int, skipped: int = 0) -> None:
        """Counts the images of one batch at one test size, and those it had to skip."""
        self.total[size_index] += count
        self.skipped[size_index] += skipped

    def compute(self) -> Tensor:
        """Top-1 and top-5 accuracy in percent, the images scored and those skipped: (4, S, P).

        One tensor of at least four elements, which torchmetrics never squeezes (it squeezes
        one-element results, which would break a single size and path). The accuracies are
        over the images scored (unreadable ones left out); the counts per size are repeated
        over the paths so that all four share one shape.
        """
        denom = self.total.clamp_min(1)[:, None]
        images, skipped = (c[:, None].expand_as(self.correct1) for c in (self.total, self.skipped))
        return torch.stack(
            [100 * self.correct1 / denom, 100 * self.correct5 / denom, images, skipped]
        )


@dataclass
class EvalResult:
    """Accuracy of one model over the test sizes.

    Attributes:
        sizes: Test sizes.
        top1: (S, P) percent per size and path (P = 1 for vanilla/MST).
        top5: (S, P).
        routed: (S,) path index used per size (zeros for a plain network).
        protocol: The protocol the model was run under: "upsample" or "native" (MSUN),
            always "upsample" for other networks, whatever was asked.
        info: Anything else worth keeping with the numbers (model, method, FLOPs, params).
        images: Test images scored at each size (every process's, unreadable ones left out).
        skipped: Test images left out as unreadable (every process's; each named in a warning).
    """

    sizes: list[int]
    top1: np.ndarray
    top5: np.ndarray
    routed: list[int]
    protocol: str
    info: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    skipped: int = 0

    @property
    def routed_top1(self) -> np.ndarray:
        """(S,) top-1 of the routed model."""
        top: np.ndarray = self.top1[np.arange(len(self.sizes)), self.routed]
        return top

    @property
    def routed_top5(self) -> np.ndarray:
        """(S,) top-5 of the routed model."""
        top: np.ndarray = self.top5[np.arange(len(self.sizes)), self.routed]
        return top

    @property
    def mean_top1(self) -> float:
        """Routed top-1 averaged over the test sizes (the paper's headline number)."""
        return float(self.routed_top1.mean())

    def frame(self) -> pd.DataFrame:
        """One row per size: routed top-1/top-5, the path, and top-1 of every path."""
        data: dict[str, Any] = {
            "size": self.sizes,
            "path": self.routed,
            "top1": self.routed_top1,
            "top5": self.routed_top5,
        }
        if self.top1.shape[1] > 1:
            for k in range(self.top1.shape[1]):
                data[f"top1_path{k}"] = self.top1[:, k]
        frame: pd.DataFrame = pd.DataFrame(data)
        return frame


def _batches(
    loader: Iterable[Any], device: torch.device, *, report: bool
) -> Iterable[tuple[Tensor, Tensor, int]]:
    """(images, labels, unreadable images skipped) of each batch, the images on ``device``.

    A ``Batch``'s skipped images are named in a warning where ``report`` (once per image: a
    loader passed over again for each test size and path reports on its first pass only);
    a batch whose every image was skipped comes with no images.
    """
    for batch in loader:
        images, labels = (batch.images, batch.labels) if hasattr(batch, "images") else batch
        skipped = getattr(batch, "skipped", [])
        if report:
            warn_skipped(skipped)
        if len(images) or skipped:
            moved = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            yield *moved, len(skipped)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    sizes: Sequence[int],
    *,
    protocol: Protocol = "upsample",
    image_size: int = 224,
    paths: Literal["all", "routed"] = "all",
    amp_dtype: torch.dtype | None = None,
    memory_format: MemoryFormat = "contiguous",
    recalibration: Iterable[Any] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """Top-1/top-5 of ``model`` at every test size (the model's mode is restored afterwards).

    Args:
        model: An MSUN or another multi-path model (a private-BatchNorm MST network: its
            paths are its BatchNorm sets), or a plain classifier (vanilla / MST).
        loader: Yields (images (n, 3, 224, 224), labels (n,)) or ``ckascope.data.Batch``.
        sizes: Test sizes.
        protocol: MSUN path input: "upsample" to the path's nominal size, or "native";
            other networks always see the image at ``image_size`` (their training input).
        image_size: The image size plain networks were trained at (test images are resized
            back to it).
        paths: Run every path ("all", for the per-path table) or only the routed one.
        amp_dtype: Autocast dtype, or None for full precision.
        memory_format: The forward passes' layout (``ckascope.execution``; "auto" picks
            channels_last for a CNN on a CPU); the model's own tensors are back afterwards.
            Training's validation keeps contiguous, the layout its runs were made with.
        recalibration: Training images (batches like ``loader``'s, labels unused): before each
            test size and path is scored, every BatchNorm's statistics are re-estimated on them
            at that size (``msun.recalibrate``); the original statistics are back afterwards.
            Every process must get the same images. None scores the model as it is.
        on_batch: Called after each batch of each pass over ``loader`` (progress).
    """
    check_protocol(protocol)
    # Vanilla and MST (a private-BN MST network too) always see their training size: the input
    # they were trained on (docs/msun.md). The protocol returned is the one that ran.
    if not isinstance(model, MSUN):
        protocol = "upsample"
    device = next(model.parameters()).device
    multi = is_multipath(model)
    num_paths = cast(MultiPathModel, model).num_paths if multi else 1
    counts = TopKCounts(len(sizes), num_paths).to(device)
    routed = [cast(MultiPathModel, model).route(s) for s in sizes] if multi else [0] * len(sizes)
    todo = [list(range(num_paths)) if paths == "all" else [routed[i]] for i in range(len(sizes))]
    precision: Precision = "float32" if amp_dtype is None else "bf16"  # all the rule asks
    layout = choose_layout(memory_format, [model], device, precision)
    score = partial(
        _score, model, loader, counts, device, layout, protocol, image_size, amp_dtype, on_batch
    )
    with _eval_mode(model), in_layout([model], layout):
        if recalibration is None:
            score([(i, size, todo[i]) for i, size in enumerate(sizes)])
        else:
            for i, size in enumerate(sizes):
                for k in todo[i]:
                    with kept_statistics(model):
                        forward = partial(
                            _logits, model, k=k, protocol=protocol, image_size=image_size
                        )
                        with _autocast(device, amp_dtype):  # as the scoring passes
                            _recalibrate(
                                model,
                                recalibration,
                                size,
                                device,
                                layout,
                                forward,
                                report=i == 0 and k == todo[0][0],
                            )
                        score([(i, size, [k])], count_images=k == todo[i][0])
    top1, top5, seen, skipped = counts.compute().cpu().numpy()  # (S, P) each
    if paths == "routed":  # paths that did not run have no accuracy, not 0 %
        ran = np.zeros_like(top1, dtype=bool)
        ran[np.arange(len(sizes)), routed] = True
        top1, top5 = np.where(ran, top1, np.nan), np.where(ran, top5, np.nan)
    info = {"memory_format": layout}
    scored, unreadable = (int(c.max(initial=0)) for c in (seen, skipped))
    return EvalResult(list(sizes), top1, top5, routed, protocol, info, scored, unreadable)


Job = tuple[int, int, list[int]]  # (size index, test size, paths to score)


def _score(
    model: nn.Module,
    loader: Iterable[Any],
    counts: TopKCounts,
    device: torch.device,
    layout: Layout,
    protocol: Protocol,
    image_size: int,
    amp_dtype: torch.dtype | None,
    on_batch: Callable[[], None] | None,
    jobs: list[Job],
    *,
    count_images: bool = True,
) -> None:
    """One pass over ``loader``, scoring every (size, paths) job on each batch.

    Unreadable images are counted with the images, and named by the pass that counts the
    first size's (the only pass, without recalibration).
    """
    report = count_images and jobs[0][0] == 0
    for images, labels, skipped in _batches(loader, device, report=report):
        for i, size, ks in jobs:
            if count_images:
                counts.add_images(i, len(labels), skipped)
            if not len(labels):  # every image of the batch was unreadable
                continue
            for part, x in _resized_parts(images, size, image_size):
                x = to_layout(x, layout)
                for k in ks:
                    with _autocast(device, amp_dtype):
                        logits = _logits(model, x, k, protocol, image_size)
                    counts.update(i, k, logits.float(), labels[part])
        if on_batch is not None:
            on_batch()


def _recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    size: int,
    device: torch.device,
    layout: Layout,
    forward: Callable[[Tensor], Tensor],
    *,
    report: bool,
) -> None:
    """BatchNorm statistics of ``model`` re-estimated on ``batches`` at the test size ``size``.

    ``report``: name the unreadable training images (on the first of the passes only).

    Raises:
        InputError: ``batches`` held no images (the statistics would be left reset).
    """
    # Whole batches (not _resized_parts' memory-bounded pieces): each batch is one estimate
    # of the statistics, and a piece of a batch would be a smaller, noisier one.
    inputs = (
        to_layout(resize(images, size), layout)
        for images, _, _ in _batches(batches, device, report=report)
        if len(images)
    )
    if recalibrate(model, inputs, forward) == 0:
        raise InputError(
            "no images to recalibrate BatchNorm on. Hint: give --recalibrate-bn a positive count "
            "of a training set that holds images"
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, its own mode back afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _resized_parts(images: Tensor, size: int, image_size: int) -> Iterator[tuple[slice, Tensor]]:
    """The batch (n, C, H, W) at ``size``, in parts of no more pixels than the batch itself.

    A test size above the images' own (the sizes reach ``MAX_SCALE``) would otherwise grow
    memory with its square; the parts keep it at what the batch needed at its own size.
    """
    base = max(images.shape[-1], image_size)
    step = max(1, len(images) * base**2 // size**2)
    for start in range(0, len(images), step):
        part = slice(start, start + step)
        yield part, resize(images[part], size)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``amp_dtype`` on ``device``; off for None."""
    return torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


def _logits(model: nn.Module, x: Tensor, k: int, protocol: Protocol, image_size: int) -> Tensor:
    """Path k's logits of a multi-path model; a plain network's on x resized to its size."""
    if is_multipath(model):
        return cast(MultiPathModel, model).forward_path(x, k, protocol=protocol)
    logits: Tensor = model(resize(x, image_size))
    return logits


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Evaluated:
    """One checkpoint's evaluation with what the paper's Figure 4 shows next to it.

    With what it takes to score it again: the file, the data, the test images' size and count.
    """

    name: str
    result: EvalResult
    method: str
    parameters: int
    flops: list[int]  # per test size, one image, under the evaluation's protocol
    bn: str = "shared"  # "private": a BatchNorm set per scale (mst) or per path in the trunk
    recalibrate_bn: int = 0  # training images BatchNorm was re-estimated on per size; 0: none
    recalibrate_batch: int = 0  # in batches of this many images (image-weighted)
    checkpoint_path: str = ""  # the file, absolute
    data: str = ""  # the --data spec the test images came from
    image_size: int = 0  # the test images' centre crop, before each test size
    distill: bool | None = None  # its training config's, where it has the key
    # the run seed whose validation draw chose the test images (msun eval: the first
    # checkpoint's); None where the caller drew them some other way
    test_draw_seed: int | None = None

    @property
    def variant(self) -> str:
        """The method with what sets it apart, for tables and legends: "mst, private BN"."""
        parts = [self.method]
        if self.bn == "private":
            parts.append("private BN")
        if self.recalibrate_bn:
            parts.append(f"BN recalibrated on {self.recalibrate_bn}")
        return ", ".join(parts)

    @property
    def mean_flops(self) -> float:
        """Mean FLOPs per image over the test sizes."""
        return float(np.mean(self.flops))

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers of this checkpoint."""
        r = self.result
        distill = {} if self.distill is None else {"distill": self.distill}
        draw = {} if self.test_draw_seed is None else {"test_draw_seed": self.test_draw_seed}
        return {
            "checkpoint": self.name,
            "checkpoint_path": self.checkpoint_path,
            "data": self.data,
            "image_size": self.image_size,
            "images": r.images,
            "skipped_images": r.skipped,
            **draw,
            "method": self.method,
            **distill,
            "bn": self.bn,
            "recalibrate_bn": self.recalibrate_bn,
            "recalibrate_batch": self.recalibrate_batch,
            "variant": self.variant,
            "protocol": r.protocol,
            "sizes": r.sizes,
            "top1": r.routed_top1.tolist(),
            "top5": r.routed_top5.tolist(),
            "path": r.routed,
            "mean_top1": r.mean_top1,
            "mean_top5": float(r.routed_top5.mean()),
            "top1_per_path": json_matrix(r.top1),
            "flops": self.flops,
            "mean_flops": self.mean_flops,
            "parameters": self.parameters,
            **r.info,
        }


#: The keys of every ``Evaluated.summary`` that Figure 4 is drawn from (``msun.plot``), there
#: since msun eval's first output: what marks an eval.json as msun's.
SUMMARY_KEYS = frozenset(
    ("checkpoint", "method", "protocol", "sizes", "top1", "mean_top1", "mean_flops", "parameters")
)


def is_eval_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``msun eval`` output, which ``--overwrite`` may replace.

    That is a folder whose eval.json is a non-empty list of checkpoint summaries, each with the
    ``SUMMARY_KEYS``; a training run's folder or a folder of other files is none.
    """
    try:
        summaries = json.loads((path / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON (or not UTF-8)
        return False
    return (
        isinstance(summaries, list)
        and bool(summaries)
        and all(isinstance(s, dict) and s.keys() >= SUMMARY_KEYS for s in summaries)
    )


#: What ``msun eval --out`` may replace.
EVAL_OUTPUT = OutputKind(
    "an earlier msun eval output",
    is_eval_dir,
    frozenset(["eval.json", "eval.csv", "figure4.png", "figure4.pdf"]),
)


def flops_per_size(
    model: nn.Module, sizes: Sequence[int], protocol: str, arch: str, image_size: int
) -> list[int]:
    """FLOPs of one image at each test size.

    For an MSUN the routed path, at its nominal size (``resize``) or the test size (``native``);
    for a plain network, the network at ``image_size`` (the side it is fed); a private-BatchNorm
    MST network resizes every input to its own ``image_size``, which a fine-tuning run's image
    size need not be. BatchNorm is not counted (convolutions and matrix products only), so
    private sets change parameters, not FLOPs.
    """
    if isinstance(model, MSUN):
        report = flops_report(model, tuple(sizes))
        return [row.upsample if protocol == "upsample" else row.native for row in report.rows]
    side = model.image_size if isinstance(model, ScaleBNNet) else image_size
    classes = classifier(model)[1].out_features
    return [vanilla_flops(arch, side, classes)] * len(sizes)


def frame(evaluated: Sequence[Evaluated]) -> pd.DataFrame:
    """Tidy table over checkpoints: one row per (checkpoint, size, path) with a routed flag.

    Each row carries what scoring it again takes: the checkpoint's file, the data, the test
    images' size, count (and the unreadable ones skipped, ``skipped_images``) and draw
    (``test_draw_seed``, empty where not recorded), and the
    BatchNorm settings (``distill`` empty where the
    checkpoint's training config does not have it).
    """
    rows = []
    for ev in evaluated:
        r = ev.result
        for i, size in enumerate(r.sizes):
            for k in range(r.top1.shape[1]):
                if not np.isnan(r.top1[i, k]):
                    rows.append(
                        {
                            "checkpoint": ev.name,
                            "checkpoint_path": ev.checkpoint_path,
                            "data": ev.data,
                            "image_size": ev.image_size,
                            "images": r.images,
                            "skipped_images": r.skipped,
                            "test_draw_seed": ev.test_draw_seed,
                            "method": ev.method,
                            "bn": ev.bn,
                            "distill": ev.distill,
                            "recalibrate_bn": ev.recalibrate_bn,
                            "recalibrate_batch": ev.recalibrate_batch,
                            "variant": ev.variant,
                            "protocol": r.protocol,
                            "size": size,
                            "path": k,
                            "routed": k == r.routed[i],
                            "top1": r.top1[i, k],
                            "top5": r.top5[i, k],
                            "flops": ev.flops[i] if k == r.routed[i] else None,
                        }
                    )
    table: pd.DataFrame = pd.DataFrame(rows)
    return table


def shared_protocol(protocols: Iterable[str]) -> str | None:
    """The protocol every column ran under, or None when they differ (say so per column).

    ``--protocol native`` reaches MSUN paths only: vanilla and MST columns run under
    ``upsample`` beside native MSUN columns, and a title naming one protocol would misname
    the others.
    """
    found = set(protocols)
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Recalibration:
    """Training images BatchNorm is re-estimated on before each test size (``evaluate``).

    Attributes:
        batches: A re-iterable of batches (a DataLoader or a list), the same on every process.
        images: How many images they hold (recorded with the results).
        batch_size: The images per batch, at most ``images`` (the last may hold up to one
            more; recorded).
    """

    batches: Iterable[Any]
    images: int
    batch_size: int


#: The ``--data`` spec of the synthetic set (msun train's default).
SYNTHETIC = "shapes"


def recalibration_set(
    data: str,
    image_size: int,
    count: int,
    batch_size: int,
    seed: int,
    *,
    synthetic_train: int = SYNTHETIC_TRAIN,
) -> Recalibration:
    """``count`` training images of ``data`` under the test images' transform, in batches.

    Drawn with ``msun.data.recalibration_seed(seed)`` (a run of ``seed``: apart from its
    validation draw). Not shared out between processes: each must estimate the same statistics.
    The synthetic set is drawn on the fly, so it has no size of its own: its training split
    counts ``synthetic_train`` images (a run's ``--num-train``, msun train's
    ``SYNTHETIC_TRAIN`` without it), of which ``count`` are drawn as from any other set.

    Raises:
        InputError: ``data`` has no training split or cannot be read, or holds fewer than
            ``count`` training images (named: a larger count is refused, never clamped).
    """
    train = build_dataset(
        data,
        "train",
        eval_transform(image_size, default_resize(data, image_size)),
        num_images=synthetic_train,  # the synthetic set's size; the other sets have their own
        seed=seed,
        synthetic_size=image_size,
        require_split=True,
        missing_split_hint="--recalibrate-bn needs the training images: give --data a folder "
        "with train/ beside val/ (one sub-folder per class), or drop --recalibrate-bn",
    )
    total = dataset_len(train)
    check_count("--recalibrate-bn", count, total, "training", _holder(data))
    keep = subset_indices(total, count if count < total else None, recalibration_seed(seed))
    if len(keep) < 2:
        raise InputError(
            f"{data} holds {len(keep)} training image(s); BatchNorm recalibration needs at "
            "least 2. Hint: give --recalibrate-bn 2 or more, on a set with training images"
        )
    batches = plan_batches(keep, batch_size, 0, 1, deal="images")
    if len(batches) > 1 and len(batches[-1]) < 2:  # a lone image has no variance
        batches[-2:] = [batches[-2] + batches[-1]]
    loader = DataLoader(train, batch_sampler=batches, collate_fn=collate_skip)
    return Recalibration(loader, len(keep), min(batch_size, len(keep)))


def _holder(data: str) -> str:
    """Whose training images a count is measured against: ``data``, or the synthetic set's size.

    The synthetic set is drawn on the fly: its size is the run's, which the message says.
    """
    if data == SYNTHETIC:
        return f"the synthetic set drawn for this run (its --num-train, else {SYNTHETIC_TRAIN})"
    return data


@dataclass(frozen=True)
class Loaded:
    """A checkpoint ready to evaluate."""

    name: str
    model: nn.Module
    method: str
    arch: str
    image_size: int
    eval_sizes: str | None
    data: str  # what it was trained on
    seed: int = 0  # its run's seed: --num-val draws the images its validation scored
    bn: str = "shared"
    path: str = ""  # the file, absolute
    distill: bool | None = None  # its training config's, None where it has no such key
    num_train: int | None = None  # its training config's --num-train
    #: The side a plain network was fed in training, which scoring feeds it too
    #: (``msun.checkpoint.input_size``: a fine-tuned one's recorded size, else its image size).
    input_size: int = field(kw_only=True)

    @property
    def synthetic_train(self) -> int:
        """The synthetic training split as the run drew it: --num-train images, else the default.

        Meaningful for runs on the synthetic set (``data`` "shapes"); the others' default.
        """
        return (self.num_train if self.data == SYNTHETIC else None) or SYNTHETIC_TRAIN


def load_for_eval(path: Path, name: str | None = None) -> Loaded:
    """Any self-describing checkpoint (msun train writes them), with its training settings.

    Named ``name``, else by ``checkpoint_label`` (``unique_labels`` names several apart).

    Raises:
        InputError: The file is unreadable, or does not name its model (a plain state dict).
    """
    ckpt = read_checkpoint(path)
    if not is_self_describing(ckpt):
        raise InputError(
            f"{path} does not name its model (a plain state dict?): msun eval scores "
            "checkpoints that do, such as msun train's last.pt and best.pt. Hint: give such a "
            f"checkpoint; analyse a plain state dict with ckascope compare --checkpoint {path} "
            "--model NAME"
        )
    model = model_from_checkpoint(ckpt, path)
    train = ckpt.get("train_config") or {}
    method = str(train.get("method") or ("msun" if isinstance(model, MSUN) else "vanilla"))
    arch = str(ckpt["config"].get("arch", "?"))
    name = name or checkpoint_label(path)
    size, sizes, data = (
        int(train.get("image_size", 224)),
        train.get("eval_sizes"),
        str(train.get("data", SYNTHETIC)),
    )
    bn = (
        "private"
        if isinstance(model, ScaleBNNet) or getattr(model, "bn", "") == "private"
        else "shared"
    )
    distill = bool(train["distill"]) if "distill" in train else None
    num_train = int(train["num_train"]) if train.get("num_train") else None
    return Loaded(
        name,
        model,
        method,
        arch,
        image_size=size,
        eval_sizes=sizes,
        data=data,
        seed=int(train.get("seed", 0)),
        bn=bn,
        path=str(path.absolute()),
        distill=distill,
        num_train=num_train,
        input_size=input_size(ckpt),
    )


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """A label per checkpoint for tables, files and legends, no two alike.

    ``checkpoint_label`` where it is unique; files that share one take as many trailing parts
    of their path as tell them apart, without the suffix ("rs/best", "rs/last"); the same file
    given again gets "#2", "#3" after its label.
    """
    files = [Path(p).absolute() for p in paths]
    distinct = list(dict.fromkeys(files))
    names = dict(zip(distinct, _labels_apart(distinct), strict=True))
    seen: dict[Path, int] = {}
    labels = []
    for f in files:
        seen[f] = seen.get(f, 0) + 1
        labels.append(names[f] + (f"#{seen[f]}" if seen[f] > 1 else ""))
    return labels


def note_repeated(paths: Sequence[Path], labels: Sequence[str]) -> None:
    """Notes each checkpoint file given more than once: it is scored again under each label."""
    given: dict[Path, list[str]] = {}
    for path, label in zip(paths, labels, strict=True):
        given.setdefault(Path(path).resolve(), []).append(label)  # a/../m.pt is m.pt
    for path, named in given.items():
        if len(named) > 1:
            warn(
                f"{path} is given {len(named)} times: it is evaluated each time, as "
                f"{', '.join(named)}. Hint: give each checkpoint once"
            )


def _labels_apart(files: Sequence[Path]) -> list[str]:
    """Labels of distinct files: ``checkpoint_label``, lengthened where two share one."""
    labels = [checkpoint_label(f) for f in files]
    parts = [f.with_suffix("").as_posix().split("/") for f in files]
    for depth in range(2, max(len(x) for x in parts) + 1):
        shared = _repeated(labels)
        if not shared:
            return labels
        labels = [
            "/".join(x[-depth:]) if i in shared else label
            for i, (label, x) in enumerate(zip(labels, parts, strict=True))
        ]
    shared = _repeated(labels)  # "m.pt" and "m.pth": only the suffix tells them apart
    return [
        f.as_posix() if i in shared else label
        for i, (label, f) in enumerate(zip(labels, files, strict=True))
    ]


def _repeated(labels: Sequence[str]) -> set[int]:
    """The indices of labels that occur more than once."""
    return {i for i, label in enumerate(labels) if labels.count(label) > 1}


def check_recalibratable(loaded: Sequence[Loaded]) -> None:
    """Refuses ``--recalibrate-bn`` for a network with no BatchNorm statistics to re-estimate.

    Its scores would come out unchanged but labelled "BN recalibrated".

    Raises:
        InputError: Naming the first such checkpoint and its model.
    """
    for item in loaded:
        if not norm_layers(item.model):
            raise InputError(
                f"{item.name} ({item.arch}) has no BatchNorm running statistics, so "
                "--recalibrate-bn has "
                "nothing to re-estimate. Hint: drop --recalibrate-bn, or evaluate "
                f"{item.name} in a separate msun eval without it"
            )


def check_same_setting(loaded: Sequence[Loaded], data: str | None, image_size: int | None) -> None:
    """Refuses to set side by side checkpoints trained on other data or at other image sizes.

    They would all be evaluated on the first one's test images and sizes, a comparison nobody
    asked for; naming ``--data`` (and ``--image-size``) says which images to use for all.

    Raises:
        InputError: Checkpoints that differ in data (unless ``data``) or image size (unless
            ``image_size``), naming both.
    """
    for key, given, what in (("data", data, "data"), ("image_size", image_size, "image sizes")):
        values = sorted({getattr(c, key) for c in loaded})
        if given is None and len(values) > 1:
            flag = "--" + key.replace("_", "-")
            raise InputError(
                f"the checkpoints were trained with different {what} "
                f"({', '.join(map(str, values))}), so one test set would not fit them all. "
                f"Hint: evaluate them separately, or pass {flag} to evaluate every one on the "
                "same test images"
            )


def note_synthetic(loaded: Sequence[Loaded], data: str | None) -> None:
    """Notes each checkpoint trained on other images than the synthetic ones ``--data`` asks for.

    Its scores are then those of another set than its own, which the run's validation never
    saw (``ckascope compare --checkpoint`` notes the same of its default data).
    """
    if data != SYNTHETIC:
        return
    for item in loaded:
        if item.data != SYNTHETIC:
            warn(
                f"{item.path} was trained on {item.data}; these are the synthetic images. "
                f"Hint: leave --data out (or --data {item.data}) to score it on its own"
            )


def check_runnable(
    loaded: Sequence[Loaded],
    sizes: Sequence[int],
    protocol: Protocol,
    paths: Literal["all", "routed"],
) -> None:
    """Refuses test sizes a path of a checkpoint would shrink to nothing, before any is scored.

    Every (size, path) the evaluation will run is tried on the meta device (shapes only,
    ``msun.backbones.accepts``): an MSUN's path takes a test size as it is (native) or at the
    path's nominal size (upsample). Other networks see their training image size, as trained.

    Raises:
        InputError: Naming the checkpoint, the sizes and paths, and what would run instead.
    """
    for item in loaded:
        if isinstance(item.model, MSUN):
            with eval_mode(meta_twin(item.model)) as twin:
                _check_msun_sizes(item.name, cast(MSUN, twin), sizes, protocol, paths)


def _check_msun_sizes(
    name: str, twin: MSUN, sizes: Sequence[int], protocol: Protocol, paths: str
) -> None:
    """``check_runnable`` for one MSUN on the meta device (``twin``, in eval mode)."""
    bad = {
        k: failing
        for k, wanted in _jobs(twin, sizes, paths).items()
        if (failing := _too_small(twin, k, wanted, protocol))
    }
    if bad and protocol == "upsample":  # at their own scales: no test size helps
        raise InputError(
            f"{name} ({twin.describe()}, scales {_listed(twin.scales)}): path(s) "
            f"{_listed(sorted(bad))} shrink their own nominal size to nothing in its "
            "down-sampling, so the network cannot be scored. Hint: train it with larger scales "
            "or an earlier split point (msun train refuses such a network)"
        )
    if bad:
        raise InputError(_size_refusal(name, twin, sizes, bad, paths))


def _jobs(twin: MSUN, sizes: Sequence[int], paths: str) -> dict[int, list[int]]:
    """Path -> the test sizes it is scored at: every size ("all"), or those routed to it."""
    jobs: dict[int, list[int]] = {}
    for s in sizes:
        for k in range(twin.num_paths) if paths == "all" else [twin.route(s)]:
            jobs.setdefault(k, []).append(s)
    return jobs


def _too_small(twin: MSUN, k: int, sizes: list[int], protocol: Protocol) -> list[int]:
    """The test sizes of ``sizes`` path k shrinks to nothing under ``protocol``.

    A feature map never grows when its input shrinks: one pass at the smallest input says
    whether all run; only then does a bisection find where the path stops.
    """
    run = _path(twin, k)
    sides = {s: s if protocol == "native" else twin.scales[k] for s in sizes}
    if accepts(run, min(sides.values())):
        return []
    least = smallest_side(run)
    return [s for s, side in sides.items() if side < least]


def _path(twin: MSUN, k: int) -> Callable[[Tensor], Tensor]:
    """Path k fed the side its caller computed (``--protocol upsample``'s, or a test size)."""
    return partial(twin.forward_path, k=k, protocol="native")


def _size_refusal(
    name: str,
    twin: MSUN,
    sizes: Sequence[int],
    bad: dict[int, list[int]],
    paths: str,
) -> str:
    """The refusal of ``bad`` (path -> test sizes it cannot take as they are), with its fixes."""
    routed = [s for s in sizes if s in bad.get(twin.route(s), [])]
    return (
        f"{name} ({twin.describe()}, scales {_listed(twin.scales)}) cannot take test size(s) "
        f"{_where(twin, sizes, bad, routed)}: fed as they are (--protocol native), they shrink "
        f"to nothing in its down-sampling. Hint: give "
        + ", or ".join(_size_fixes(twin, sizes, bad, routed, paths))
    )


def _size_fixes(
    twin: MSUN, sizes: Sequence[int], bad: dict[int, list[int]], routed: list[int], paths: str
) -> list[str]:
    """What runs instead of ``bad``: the routed paths, the sizes all take, the nominal sizes."""
    good = [s for s in sizes if not any(s in failing for failing in bad.values())]
    fixes = [] if routed or paths == "routed" else ["--paths routed"]
    fixes.append(f"--eval-sizes {','.join(map(str, good))}" if good else "larger --eval-sizes")
    if all(accepts(_path(twin, k), twin.scales[k]) for k in range(twin.num_paths)):
        fixes.append("--protocol upsample (each path at its nominal size)")
    return fixes


def _where(twin: MSUN, sizes: Sequence[int], bad: dict[int, list[int]], routed: list[int]) -> str:
    """``bad`` in words: "2 on the path each is routed to; 3, 4 on path 1 (nominal 32)"."""
    where = [f"{_listed(routed)} on the path each is routed to"] if routed else []
    where += [
        f"{_listed(others)} on path {k} (nominal {twin.scales[k]})"
        for k, failing in sorted(bad.items())
        if (others := [s for s in failing if twin.route(s) != k])
    ]
    return "; ".join(where)


def _listed(sizes: Sequence[int]) -> str:
    """``2, 3, 4``."""
    return ", ".join(map(str, sizes))


def eval_dataset(
    data: str, image_size: int, num_images: int, seed: int, *, recorded: bool = False
) -> Dataset[Any]:
    """The validation split of ``data`` that msun eval scores: an image folder's val/.

    An image folder with train/ but no val/ is refused in training's words (its training
    images would be scored instead); one with neither is a folder of classes, scored itself
    (``scored_in_place`` says so).

    Args:
        data: The ``--data`` spec.
        image_size: The test images' centre crop.
        num_images: The synthetic set's size (the others have their own).
        seed: The synthetic set's seed (the pool the run's validation drew).
        recorded: ``data`` is the checkpoint's own (no --data given).

    Raises:
        InputError: As ``build_dataset``, in msun eval's words (leaving --data out scores the
            run's own data; the checkpoint's recorded data that cannot be read is named so),
            and for the folder without val/ above.
    """
    try:
        return build_dataset(
            data,
            "val",
            eval_transform(image_size, default_resize(data, image_size)),
            num_images=num_images,
            seed=seed,
            synthetic_size=image_size,
            # read for an image folder only (build_dataset decides what the spec names)
            require_split=(Path(data).expanduser() / "train").is_dir(),
            missing_split_hint="msun eval scores the images in val/ (one sub-folder per class): "
            "give --data a folder with val/, or a folder of class sub-folders",
        )
    except InputError as e:
        raise InputError(_eval_data_hint(str(e), recorded)) from e


def _eval_data_hint(message: str, recorded: bool) -> str:
    """``build_dataset``'s refusal in msun eval's words.

    Leaving --data out means the run's own data (ckascope's default is the synthetic set, so
    its hint does not say it); when that is what cannot be read, the hint says where else the
    images can come from.
    """
    if not recorded:
        return f"{message}; or omit --data for the data the run was trained on"
    problem = message.split(" Hint:")[0]
    return (
        f"{problem} (the data the checkpoint records). Hint: give --data where those images "
        "are now, or --data shapes for the synthetic set"
    )


def scored_in_place(dataset: Dataset[Any], data: str) -> Path | None:
    """The folder ``--data`` named when its own class sub-folders are scored (it has no val/).

    None for a folder with val/ and for every set that is no image folder.
    """
    folder = Path(data).expanduser()
    if isinstance(dataset, ImageFolder) and Path(dataset.root) == folder:
        return folder
    return None


def check_classes(loaded: Sequence[Loaded], dataset: Any, data: str) -> None:
    """Refuses to score a model on data with another number of classes.

    Raises:
        InputError: Naming the checkpoint, its classes, and the data's.
    """
    classes = getattr(dataset, "classes", None)
    for item in loaded:
        outputs = classifier(item.model)[1].out_features
        if classes is not None and outputs != len(classes):
            raise InputError(
                f"{item.name} predicts {outputs} classes, but {data} holds {len(classes)}. "
                "Hint: evaluate on the data it was trained on (--data)"
            )


def evaluate_checkpoints(
    loaded: Sequence[Loaded],
    loader: Iterable[Any],
    sizes: Sequence[int],
    *,
    protocol: Protocol,
    paths: Literal["all", "routed"],
    device: torch.device,
    memory_format: MemoryFormat = "contiguous",
    recalibration: Recalibration | None = None,
    progress: bool = False,
    data: str,
    image_size: int,
    test_draw_seed: int | None = None,
    sizes_checked: bool = False,
) -> list[Evaluated]:
    """Evaluates every model on the same batches and counts its FLOPs and parameters.

    ``memory_format`` is the forward passes' layout and ``recalibration`` the training images
    BatchNorm is re-estimated on (see ``evaluate``); ``progress`` shows a bar per checkpoint
    (lines every few seconds without a terminal). ``data`` and ``image_size`` (the test
    images' spec and centre crop) are recorded with each result, and ``test_draw_seed`` (the
    run seed whose validation draw ``loader`` holds) where given. ``sizes_checked``: the caller
    ran ``check_runnable`` on these checkpoints and sizes (msun eval does, before it reads any
    image), which is not done again.

    Raises:
        InputError: A test size a path would shrink to nothing (``check_runnable``), before
            any checkpoint is scored.
    """
    out = []
    if not sizes_checked:
        check_runnable(loaded, sizes, protocol, paths)  # not after minutes of scoring
    run = partial(
        _evaluate_one,
        protocol=protocol,
        paths=paths,
        memory_format=memory_format,
        recalibration=recalibration,
        data=data,
        image_size=image_size,
        test_draw_seed=test_draw_seed,
    )
    with make_progress(progress) as bar:
        for item in loaded:
            out.append(run(item, loader, sizes, device=device, bar=bar))
    return out


def _evaluate_one(
    item: Loaded,
    loader: Iterable[Any],
    sizes: Sequence[int],
    *,
    protocol: Protocol,
    paths: Literal["all", "routed"],
    memory_format: MemoryFormat,
    recalibration: Recalibration | None,
    device: torch.device,
    bar: Reporter,
    data: str,
    image_size: int,
    test_draw_seed: int | None,
) -> Evaluated:
    model = item.model.to(device)
    task = bar.add_task(
        f"eval {item.name} ({sizes_count(sizes)})",
        total=_passes(model, sizes, paths, recalibration, loader),
    )
    result = evaluate(
        model,
        loader,
        sizes,
        protocol=protocol,
        image_size=item.input_size,
        paths=paths,
        memory_format=memory_format,
        recalibration=None if recalibration is None else recalibration.batches,
        on_batch=lambda: bar.advance(task),
    )
    bar.remove_task(task)
    flops = flops_per_size(model.cpu(), sizes, result.protocol, item.arch, item.input_size)
    params = sum(p.numel() for p in model.parameters())
    images, batch = (
        (0, 0) if recalibration is None else (recalibration.images, recalibration.batch_size)
    )
    return Evaluated(
        item.name,
        result,
        item.method,
        params,
        flops,
        item.bn,
        images,
        batch,
        checkpoint_path=item.path,
        data=data,
        image_size=image_size,
        distill=item.distill,
        test_draw_seed=test_draw_seed,
    )


def _passes(
    model: nn.Module,
    sizes: Sequence[int],
    paths: str,
    recalibration: Recalibration | None,
    loader: Iterable[Any],
) -> int | None:
    """Batches ``evaluate`` will report: one pass, or one per size and path when recalibrating."""
    if not isinstance(loader, Sized):
        return None
    if recalibration is None:
        return len(loader)
    per_size = (
        cast(MultiPathModel, model).num_paths if is_multipath(model) and paths == "all" else 1
    )
    return len(loader) * len(sizes) * per_size
