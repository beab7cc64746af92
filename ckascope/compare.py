"""Cross-scale and cross-model CKA: the sweep behind ``ckascope compare``.

For every batch of base images (224 px, or the native size of a small-image set, by default)
each side makes its input on the device (resizing to its scale), runs one forward pass under
``torch.inference_mode()`` with hooks that turn every chosen layer's output into its centred Gram
matrix (packed: its diagonal and upper blocks, ``ckascope.packing``), and the two stacks of
Grams go to ``MinibatchCKA``. ``repeats`` sweeps over random permutations (or random subsets) of
the images give the mean and std of the paper's study.

Under ``torchrun`` each process takes every world_size-th batch of the same permutation, so the
batches, and therefore the float64 sums the processes combine, are those of a single process.
Batches of fewer than 4 images (a short remainder) are dropped: the unbiased HSIC needs 4.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypedDict, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from typing_extensions import Unpack

from ckascope.calibration import (
    MIN_BATCHES,
    SweepSummary,
    bootstrap_gap,
    calibrate,
    check_calibration_size,
)
from ckascope.config import FALLBACK_IMAGE_SIZE, default_scales
from ckascope.data import (
    Batch,
    SafeImageFolder,
    Skipped,
    build_dataset,
    collate_skip,
    dataset_len,
    default_resize,
    eval_transform,
    is_synthetic,
    native_size,
    plan_batches,
    resize_for,
    subset_indices,
    unusable,
    warn_skipped,
)
from ckascope.distributed import all_reduce_sum
from ckascope.errors import InputError, warn
from ckascope.execution import (
    Layout,
    autocast_for,
    check_execution,
    choose_layout,
    in_layout,
    to_layout,
)
from ckascope.kernels import check_kernel, ieee_fp32
from ckascope.layers import LayerSpec, resolve_layers
from ckascope.metric import MinibatchCKA
from ckascope.multipath import MultiPathModel, PathView, is_multipath
from ckascope.options import (
    CI_RANGE,
    MAX_REPLICATES,
    SWEEP_USES,
    SweepFields,
    check_ranges,
    literal_choices,
    refuse_ignored,
)
from ckascope.progress import make_progress
from ckascope.recorder import ActivationRecorder, GramStack
from ckascope.result import CKAResult
from ckascope.shapes import SyntheticShapes
from ckascope.views import ScaleView, ViewOptions, check_scale
from ckascope.vocab import (
    Bandwidth,
    GramDtype,
    Kernel,
    MemoryFormat,
    Precision,
    Protocol,
    Weighting,
)


@dataclass(frozen=True)
class Execution:
    """How a comparison's forward passes run (``ckascope.execution``).

    Attributes:
        layout: contiguous or channels_last (inputs and 4-D weights).
        precision: float32, or bf16 / fp16 autocast.
    """

    layout: Layout = "contiguous"
    precision: Precision = "float32"


@dataclass
class Side:
    """One side of a comparison: a model, its hooked layers and how it sees the images."""

    model: nn.Module
    recorder: ActivationRecorder
    view: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor], Any]
    stack: GramStack

    def grams(self, images: Tensor, run: Execution | None = None) -> tuple[list[str], Tensor]:
        """Layer names and their packed float64 Grams (L, size), for one batch of base images.

        Args:
            images: Base images (n, C, H, W).
            run: The layout and precision of the forward pass [contiguous float32].

        The Grams are a view of a buffer the next batch overwrites.
        """
        run = run or Execution()
        x = fit_channels(self.view(images), self.model).to(_dtype_of(self.model))  # bf16/fp16 too
        x = to_layout(x, run.layout)
        self.stack.start(len(images))
        with self.recorder.recording(), autocast_for(x.device, run.precision):
            try:
                self.forward(x)
            except (AssertionError, RuntimeError) as e:
                if isinstance(e, torch.OutOfMemoryError) or not _size_refusal(e):
                    raise
                raise InputError(
                    f"the model cannot run on {tuple(x.shape[-2:])}-px inputs "
                    f"({' '.join(str(e).split())}). Hint: {self._size_hint(e, x.shape[-1])}"
                ) from e
            recorded = self.recorder.pop()
        if not recorded:
            raise InputError(
                "none of the chosen layers ran in the forward pass. Hint: check --layers"
            )
        return list(recorded), self.stack.stack()

    def _size_hint(self, error: Exception, side: int) -> str:
        """What makes a model that refused ``side``-px inputs run: the options that set its input.

        Under ``upsample`` the model sees the image size, so that is what to change; a side
        fed at its scale (``native``) sees the scale unless ``upsample`` feeds it the image size.
        """
        fixed = _fixed_size(error)
        native = side != getattr(self.view, "image_size", side)
        if fixed is not None and native:
            return (
                f"this model takes {fixed}-px inputs only: pass --image-size {fixed} with "
                "--protocol upsample, which feeds every scale at that size"
            )
        if fixed is not None:
            return (
                f"this model takes {fixed}-px inputs only: pass --image-size {fixed} (--protocol "
                "upsample, the default, then feeds every scale at that size)"
            )
        if native:
            return (
                "use a larger scale, or --protocol upsample, which feeds every scale at the image "
                "size (a fixed-size model such as a ViT needs it, with --image-size its input size)"
            )
        return "use a larger --image-size (a fixed-size model such as a ViT: its input size)"


def _fixed_size(error: Exception) -> int | None:
    """The one input size a model takes, where its refusal names it (a torchvision ViT's).

    Read from the error, not from an ``image_size`` attribute, which other models carry too
    (a network trained at that size, not one that takes nothing else).
    """
    found = re.search(r"expected (\d+) but got \d+", str(error), re.IGNORECASE)
    return int(found.group(1)) if found else None


#: What torch and torchvision say when an input is too small or not the size a model is built for.
SIZE_REFUSALS = (
    "wrong image",  # ViT: "Wrong image height! Expected 224 but got 32!"
    "input image size",
    "output size is too small",  # pooling
    "kernel size can't be greater than actual input size",  # convolution
    "calculated padded input size",
)


def _size_refusal(error: Exception) -> bool:
    """Whether a forward pass failed because of the input's size (by the library's message)."""
    text = str(error).lower()
    return any(known in text for known in SIZE_REFUSALS)


def make_side(
    model: nn.Module,
    layers: LayerSpec,
    view: Callable[[Tensor], Tensor],
    gram_dtype: GramDtype = "auto",
    output_key: str | None = None,
) -> Side:
    """A side that hooks ``layers`` of ``model`` and runs its plain forward."""
    names = resolve_layers(model, layers)
    stack = GramStack(gram_dtype, len(names))
    recorder = ActivationRecorder(model, names, reduce=stack, output_key=output_key)
    return Side(model, recorder, view, model, stack)


def path_side(
    model: nn.Module,
    layers: LayerSpec,
    view: ScaleView,
    gram_dtype: GramDtype = "auto",
    output_key: str | None = None,
) -> Side:
    """A side of a multi-path model: the scale's routed path, its layers by canonical name.

    Layers are resolved on the largest path (the vanilla structure), so presets name the same
    layer roles in every path. Under ``upsample`` the path gets the image resized to its
    nominal size (as for the paper's accuracy tables), under ``native`` the image as it is.
    """
    paths = cast(MultiPathModel, model)
    k = paths.route(view.size)
    names = resolve_layers(PathView(model, paths.num_paths - 1), layers)
    path = PathView(model, k)
    present = {n for n, _ in path.named_modules()}
    hooked = [n for n in names if n in present]
    stack = GramStack(gram_dtype, len(hooked))
    recorder = ActivationRecorder(path, hooked, reduce=stack, output_key=output_key)
    native = replace(view, protocol="native")
    protocol = view.protocol
    forward = lambda x: paths.forward_path(x, k, protocol=protocol)  # noqa: E731
    return Side(model, recorder, native, forward, stack)


@dataclass(frozen=True)
class SideSpec:
    """One side of a comparison before it runs: a model, the scale it sees, its layers.

    Attributes:
        model: Any module; a multi-path model routes the scale through its path.
        scale: The scale in pixels [the image size].
        layers: Layer names, patterns, a predicate or a preset.
        output_key: The key to record from layers that return dicts.
    """

    model: nn.Module
    scale: int | None = None
    layers: LayerSpec = "blocks"
    output_key: str | None = None


def side_for(spec: SideSpec, view: ScaleView, gram_dtype: GramDtype) -> Side:
    """``path_side`` for multi-path models, ``make_side`` for the others."""
    make = path_side if is_multipath(spec.model) else make_side
    return make(spec.model, spec.layers, view, gram_dtype, spec.output_key)


def _paths(models: Sequence[nn.Module], sizes: Sequence[int]) -> dict[str, Any]:
    """The routed path of each side, for the settings of multi-path comparisons."""
    routed = [
        cast(MultiPathModel, m).route(s) if is_multipath(m) else None
        for m, s in zip(models, sizes, strict=True)
    ]
    return {"paths": routed} if any(r is not None for r in routed) else {}


@dataclass(frozen=True)
class SweepOptions(SweepFields):
    """Options of the sweep over the images, shared by both kinds of comparison.

    The options a user sets are declared in ``ckascope.options.SweepFields`` (``ckascope
    compare`` takes them too); these add how this process takes part.

    Attributes:
        progress: Show a progress bar (a line every few seconds without a terminal).
        rank: This process's rank under torchrun.
        world_size: The number of processes.
    """

    progress: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        self.check()  # at construction: the error names the field, before any work

    def check(self) -> None:
        """Raises InputError for values no sweep can use, or that this sweep would ignore.

        Ignored: an option serving another one that is off (``sigma_frac`` with the linear
        kernel, ``ci`` without ``bootstrap``), when its value is not the default.
        """
        check_kernel(self.kernel, self.sigma_frac)
        check_calibration(self.bootstrap, self.ci, self.permutations)
        check_execution(self.memory_format, self.precision)
        for name, allowed in SWEEP_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"SweepOptions.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.batch_size < 4:
            raise InputError(
                f"--batch-size must be at least 4 (the unbiased HSIC needs 4), got {self.batch_size}"
            )
        check_ranges(self, SweepFields)  # the command line's other ranges (repeats, num_images)
        refuse_ignored(self, SWEEP_USES)


#: The sweep options that name one of a few choices (their ``Literal`` types say which).
SWEEP_CHOICES = literal_choices(SweepOptions)


class SweepKwargs(TypedDict, total=False):
    """``SweepOptions`` as keyword arguments, so a type checker sees what ``**sweep`` takes.

    Written out because a type checker cannot read a TypedDict built at import; a test checks
    that it holds every field of ``SweepOptions`` with its type.
    """

    kernel: Kernel
    sigma_frac: float
    bandwidth: Bandwidth
    weighting: Weighting
    batch_size: int
    repeats: int
    num_images: int | None
    seed: int
    num_workers: int
    progress: bool
    rank: int
    world_size: int
    tf32: bool
    gram_dtype: GramDtype
    bootstrap: int
    ci: float
    permutations: int
    memory_format: MemoryFormat
    precision: Precision


def check_calibration(bootstrap: int, ci: float, permutations: int) -> None:
    """Raises InputError for bootstrap, interval or permutation settings no sweep can use."""
    if bootstrap < 0 or permutations < 0:
        raise InputError(
            f"--bootstrap and --permutations must be >= 0 (0: none), got {bootstrap} and {permutations}"
        )
    _check_count("--bootstrap", bootstrap)
    _check_count("--permutations", permutations)
    low, high = CI_RANGE
    if not low <= ci <= high:  # NaN fails too
        raise InputError(
            f"--ci must be a coverage in {low}..{high}, got {ci}. Hint: e.g. --ci 0.95 for a "
            "95 % interval"
        )


#: Per count option: what ``MAX_REPLICATES`` of it already give, and a usual value.
_ENOUGH = {
    "--bootstrap": ("the ends of a 95 % interval to about 1 % of its width", 1000),
    "--permutations": (f"p-values down to 1/{MAX_REPLICATES + 1}", 100),
}


def _check_count(flag: str, count: int) -> None:
    """Refuses more replicates than ``MAX_REPLICATES``, before any work.

    Each is a matrix held in memory: 10**8 permutations of resnet18's 9 x 9 blocks were 65 GB.
    """
    if count > MAX_REPLICATES:
        enough, usual = _ENOUGH[flag]
        raise InputError(
            f"{flag} {count} is more than {MAX_REPLICATES}, the most a sweep takes: each one is "
            f"a matrix held in memory, and {MAX_REPLICATES} already give {enough}. Hint: "
            f"{flag} {MAX_REPLICATES} or fewer (e.g. {usual})"
        )


def check_plan(plan: list[list[int]], n: int, opts: SweepOptions, dataset: Dataset[Any]) -> None:
    """Refuses a sweep with fewer batches than processes; notes the images no batch takes.

    Args:
        plan: Every process's batches of one sweep (``plan_batches`` with ``min_size=4``).
        n: The images the sweep was asked to use.
        opts: The sweep options (batch size, processes).
        dataset: Where the images come from (for the hint: can more be had?).

    Raises:
        InputError: Fewer batches than processes, with the fix that fits the case.
    """
    if len(plan) < opts.world_size:
        raise InputError(too_few_batches(len(plan), n, opts, dataset))
    dropped = n - sum(len(batch) for batch in plan)
    if dropped:
        warn(left_out(dropped, n, opts))


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``; ``batch`` and ``process`` take ``-es``."""
    plural = noun + ("es" if noun.endswith(("ch", "ss")) else "s")
    return f"{n} {noun if n == 1 else plural}"


def too_few_batches(batches: int, n: int, opts: SweepOptions, dataset: Dataset[Any]) -> str:
    """Why ``n`` images make too few batches of at least 4 for the processes, and the fix."""
    world = opts.world_size
    made = "no batch" if not batches else f"only {_count(batches, 'batch')}"
    text = f"{_count(n, 'image')} {'makes' if n == 1 else 'make'} {made} of at least 4 images"
    if world > 1:
        text += f", and each of the {world} processes needs one"
    else:
        text += ", the fewest the unbiased HSIC takes"
    return f"{text}. Hint: {_more_batches(n, opts, dataset)}"


def _more_batches(n: int, opts: SweepOptions, dataset: Dataset[Any]) -> str:
    """The fix for too few batches: smaller batches, more images asked for, or more data."""
    world, need = opts.world_size, 4 * opts.world_size  # a batch of 4 for every process
    fewer = ", or fewer processes" if world > 1 else ""
    if n >= need:
        return f"a --batch-size of {n // world} or less gives each process a batch{fewer}"
    total = dataset_len(dataset)
    if isinstance(dataset, SyntheticShapes) or need <= total:  # more can be asked for
        return f"--num-images {need} or more{fewer}"
    unread = sum(isinstance(dataset[i], Skipped) for i in range(total))  # under 4 per process
    bad = f", {unread} of them unreadable" if unread else ""
    where = "the folder" if isinstance(dataset, SafeImageFolder) else "the data"
    return (
        f"{where} holds {_count(total, 'image')}{bad}: give it at least {need} readable ones{fewer}"
    )


def left_out(dropped: int, n: int, opts: SweepOptions) -> str:
    """The note on images left out of every sweep: a last batch under 4 is not used."""
    each = " of each sweep" if opts.repeats > 1 else ""
    fits = whole_batch_size(n, opts.batch_size, opts.world_size)
    fix = f"--batch-size {fits} uses all {n}" if fits else "a --num-images that batches evenly"
    return (
        f"{dropped} of the {n} images{each} are left out: batches of {opts.batch_size} leave a "
        f"last one of {dropped}, and the unbiased HSIC needs at least 4. Hint: {fix}"
    )


def whole_batch_size(n: int, batch_size: int, world: int = 1) -> int | None:
    """The batch size nearest ``batch_size`` whose batches of ``n`` images use them all.

    A batch size b does when the last batch is whole or holds at least 4 (n mod b is 0 or
    >= 4), and each of ``world`` processes still gets a batch (b <= n / world); None if none does.
    """
    fits = [b for b in range(4, n // world + 1) if n % b == 0 or n % b >= 4]
    return min(fits, key=lambda b: (abs(b - batch_size), -b), default=None)


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 for none)."""
    params = (p for p in model.parameters() if p.is_floating_point())
    return next((p.dtype for p in params), torch.float32)


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


Source = Dataset[Any] | Iterable[Any]  # a dataset, or a loader whose batches are used as they come


def _is_loader(source: Source) -> bool:
    """A loader (any iterable of batches, an IterableDataset too), not a map-style dataset.

    Under torchrun every process sweeps the whole loader it is given: shard it yourself
    (e.g. ``DistributedSampler``) or pass the dataset, which ckascope shares out.
    """
    return isinstance(source, IterableDataset) or not isinstance(source, Dataset)


def as_batch(item: Any) -> Batch:
    """A loader's batch as a ``Batch``: a Batch, images (n, C, H, W), or (images, labels, ...).

    Raises:
        InputError: Anything else, saying what a batch may be.
    """
    if isinstance(item, Batch):
        return item
    images = item[0] if isinstance(item, (tuple, list)) and item else item
    if not isinstance(images, Tensor):
        raise InputError(
            unusable("a loader's batch", item, "images (n, C, H, W) or (images, labels)")
        )
    labels = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None
    return Batch(images, labels if isinstance(labels, Tensor) else torch.empty(0), [])


def check_images(images: Tensor) -> None:
    """Refuses batches no model here can take, whichever path (dataset or loader) they came by.

    Raises:
        InputError: Not (n, C, H, W), or not floating point (uint8 images carry no
            normalisation: the model would see 0..255).
    """
    if images.ndim != 4:
        raise InputError(f"a batch must hold images (n, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(
            f"the images are {images.dtype}, not float. Hint: end the transform with "
            "ToDtype(torch.float32, scale=True) and the model's normalisation"
        )


def fit_channels(images: Tensor, model: nn.Module) -> Tensor:
    """Grayscale images (n, 1, H, W) as RGB when the model's first convolution takes 3.

    ckascope's own data pipeline converts grayscale the same way; other images are left as
    they are (a model built for one channel gets one).
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if images.shape[1] == 1 and first is not None and first.in_channels == 3:
        return images.expand(-1, 3, -1, -1)
    return images


class _Sweep:
    """Runs the repeats of one comparison and collects the per-repeat matrices."""

    def __init__(self, side_a: Side, side_b: Side, source: Source, opts: SweepOptions) -> None:
        self.side_a, self.side_b, self.source, self.opts = side_a, side_b, source, opts
        self.device = _device_of(side_a.model)
        models = (side_a.model, side_b.model)
        layout = choose_layout(opts.memory_format, models, self.device, opts.precision)
        self.execution = Execution(layout, opts.precision)
        self.layers_a: list[str] = []
        self.layers_b: list[str] = []
        self.images_used = 0
        self.skipped = 0
        self.planned: int | None = None  # every process's batches of all sweeps, when known

    def _sweeps(self) -> list[tuple[Callable[[], Iterator[Batch]], int | None]]:
        """Per sweep: a maker of its batches and their number (None: a loader without len)."""
        source, o = self.source, self.opts
        if _is_loader(source):  # one sweep over its batches as they come
            loader = cast(Iterable[Any], source)
            size = len(loader) if isinstance(loader, Sized) else None
            self.planned = size if o.world_size == 1 else None  # each process has its own
            return [(lambda: map(as_batch, loader), size)]
        first = self._plan(0)
        check_plan(first, o.num_images or dataset_len(self.dataset), o, self.dataset)
        self.planned = len(first) * o.repeats  # every sweep draws as many images
        mine = len(first[o.rank :: o.world_size])
        # Each sweep's subset is drawn when it starts: drawing them all first (a permutation of
        # the whole pool each, 47 ms for 1.6 M images) kept a run of many sweeps silent, its
        # progress not yet shown, for as long as the planning took.
        return [(partial(self._sweep_batches, r, first), mine) for r in range(o.repeats)]

    @property
    def dataset(self) -> Dataset[Any]:
        """The source as the map-style dataset it is when it is not a loader."""
        return cast(Dataset[Any], self.source)

    def _plan(self, repeat: int) -> list[list[int]]:
        """Every process's batches of sweep ``repeat`` (each process draws the same ones)."""
        o = self.opts
        indices = subset_indices(dataset_len(self.dataset), o.num_images, o.seed + repeat)
        return plan_batches(indices, o.batch_size, min_size=4)

    def _sweep_batches(self, repeat: int, first: list[list[int]]) -> Iterator[Batch]:
        """This process's batches of sweep ``repeat`` (the first sweep's plan already drawn)."""
        return self._loader(self._mine(first if repeat == 0 else self._plan(repeat)))

    def _mine(self, plan: list[list[int]]) -> list[list[int]]:
        """This process's share of a sweep's batches: plan_batches' dealing, planned once."""
        return plan[self.opts.rank :: self.opts.world_size]

    def run(self) -> list[SweepSummary]:
        self._check_calibration()  # before the plan's notes: a refused run prints one line
        sweeps = self._sweeps()
        self._note_gap()
        total = None if any(n is None for _, n in sweeps) else sum(n or 0 for _, n in sweeps)
        show = self.opts.progress and self.opts.rank == 0
        # Exact by default: TF32 convolutions (cuDNN's default) move CKA by ~1e-3 on a GPU.
        exact = nullcontext() if self.opts.tf32 else ieee_fp32("conv")
        models = (self.side_a.model, self.side_b.model)
        with (
            make_progress(show) as bar,
            in_layout(models, self.execution.layout),  # the user's tensors back on exit
            torch.inference_mode(),
            exact,
            self._hooked(),
        ):
            task = bar.add_task("CKA", total=total)
            advance = lambda: bar.advance(task)  # noqa: E731
            return [self._repeat(r, make(), advance) for r, (make, _) in enumerate(sweeps)]

    def _check_calibration(self) -> None:
        """Refuses a calibration too large to hold, before the first batch."""
        o = self.opts
        layers = [len(side.recorder.layer_names) for side in (self.side_a, self.side_b)]
        check_calibration_size(o.bootstrap, o.permutations, o.repeats, *layers)

    def _note_gap(self) -> None:
        """Says before the sweep, not after it, when its planned batches allow no interval."""
        o = self.opts
        gap = bootstrap_gap(self.planned) if o.bootstrap and self.planned is not None else None
        if gap is not None:
            warn(gap)

    @contextmanager
    def _hooked(self) -> Iterator[None]:
        """Both sides' hooks for the whole run, each recording only its own forward passes.

        Adding hooks and saving the model's flags per batch cost about 1 ms per side and batch
        on a 50-layer MLP.
        """
        with ExitStack() as stack:
            for side in (self.side_a, self.side_b):
                stack.enter_context(side.recorder)
                side.recorder.paused = True
            yield

    def _loader(self, plan: list[list[int]]) -> Iterator[Batch]:
        return iter(
            DataLoader(
                cast(Dataset[Any], self.source),
                batch_sampler=plan,
                collate_fn=partial(collate_skip, labelled=False),
                num_workers=self.opts.num_workers,
                pin_memory=self.device.type == "cuda",
            )
        )

    def _repeat(
        self, repeat: int, batches: Iterator[Batch], advance: Callable[[], None]
    ) -> SweepSummary:
        metric: MinibatchCKA | None = None
        # This process's k-th batch is the sweep's batch rank + k * world_size (the dealing of
        # _mine): kept terms are ordered and shuffles seeded as in one process.
        for k, batch in enumerate(batches):
            warn_skipped(batch.skipped)
            self.skipped += len(batch.skipped)
            if len(batch.images):
                check_images(batch.images)
            if len(batch.images) >= 4:
                images = batch.images.to(self.device, non_blocking=True)
                index = self.opts.rank + k * self.opts.world_size
                metric = self._update(metric, images, repeat, index)
            advance()
        if metric is None:
            raise InputError(self._no_batch())
        return metric.summary()

    def _no_batch(self) -> str:
        """Why a sweep had no batch of at least 4 images to measure, and the fix."""
        if self.skipped:
            return (
                f"no batch held 4 readable images: {_count(self.skipped, 'image')} could not be "
                "read (each named in a note). Hint: replace or remove the unreadable files, or "
                "add readable images"
            )
        if _is_loader(self.source):
            return "no batch of the loader held 4 images. Hint: batch it by 4 or more"
        return "no batch of at least 4 readable images. Hint: check --data"

    def _update(
        self, metric: MinibatchCKA | None, images: Tensor, repeat: int, index: int
    ) -> MinibatchCKA:
        run = self.execution
        names_a, grams_a = self.side_a.grams(images, run)
        names_b, grams_b = self.side_b.grams(images.to(_device_of(self.side_b.model)), run)
        if metric is None:
            metric = self._new_metric(names_a, names_b, repeat)
        elif (names_a, names_b) != (self.layers_a, self.layers_b):
            raise InputError(
                "the recorded layers changed between batches (data-dependent control flow?)"
            )
        metric.update_packed(grams_a, grams_b, self.side_a.stack.layout, batch=index)
        self.images_used += len(images)
        return metric

    def _new_metric(self, names_a: list[str], names_b: list[str], repeat: int) -> MinibatchCKA:
        self.layers_a, self.layers_b = names_a, names_b
        o = self.opts
        return MinibatchCKA(
            len(names_a),
            len(names_b),
            kernel=o.kernel,
            sigma_frac=o.sigma_frac,
            bandwidth=o.bandwidth,
            weighting=o.weighting,
            layer_names_a=names_a,
            layer_names_b=names_b,
            keep_batches=o.bootstrap > 0,
            permutations=o.permutations,
            seed=o.seed + repeat,  # each sweep its own shuffles
        ).to(self.device)


def run_comparison(
    side_a: Side, side_b: Side, source: Source, opts: SweepOptions, settings: dict[str, Any]
) -> CKAResult:
    """Sweeps the images ``opts.repeats`` times and returns the result (on every rank).

    Args:
        side_a: The rows of the matrix.
        side_b: The columns.
        source: Base images: a dataset of (image (3, H, W) float, label) pairs, or a loader
            (any iterable) whose batches are used as they come, in one sweep.
        opts: Sweep options.
        settings: Settings to record with the result (sweep options are added).
    """
    opts.check()
    loader = _is_loader(source)
    if loader:
        check_loader_options(opts)
    start = time.perf_counter()
    sweep = _Sweep(side_a, side_b, source, opts)
    sweeps = sweep.run()  # each side's recorder restores its modules' own train/eval flags
    told = sweep.planned is not None and sweep.planned < MIN_BATCHES  # before the sweep
    if opts.bootstrap and not told:
        _note_bootstrap_gap(sweeps)
    device = sweep.device
    options = applied(opts)  # the layout used, and what was asked (auto: the rule chose)
    options.update(memory_format=sweep.execution.layout, memory_format_requested=opts.memory_format)
    if loader:  # the loader decided these
        options.update(batch_size=None, num_workers=None, batches="the caller's loader")
    settings = {
        **settings,
        **options,
        "images_used": int(all_reduce_sum(sweep.images_used, device)),
        "images_skipped": int(all_reduce_sum(sweep.skipped, device)),
        "device": str(device),
    }
    overlap = 1.0 if loader else sweep_overlap(cast(Dataset[Any], source), opts)
    calibration, how = calibrate(sweeps, opts.bootstrap, opts.ci, opts.seed, overlap)
    return CKAResult(
        torch.stack([s.matrix for s in sweeps]).cpu().numpy(),
        sweep.layers_a,
        sweep.layers_b,
        {**settings, **how},
        elapsed=time.perf_counter() - start,
        calibration=calibration,
    )


def _note_bootstrap_gap(sweeps: Sequence[SweepSummary]) -> None:
    """Says when the batches kept are too few for an interval, though more were planned.

    Batches of unreadable images are dropped as they come, and a loader's count may be unknown.
    """
    kept = sum(len(s.batches) for s in sweeps if s.batches is not None)
    gap = bootstrap_gap(kept)
    if gap is not None:
        warn(gap)


def sweep_overlap(dataset: Dataset[Any], opts: SweepOptions) -> float:
    """The share of images two sweeps have in common: each takes num_images of the set."""
    count = dataset_len(dataset)
    return min(1.0, (opts.num_images or count) / count)


def applied(opts: SweepOptions) -> dict[str, Any]:
    """The sweep options a result records: None for those this sweep did not use."""
    options = {k: v for k, v in vars(opts).items() if k not in ("progress", "rank")}
    if opts.kernel == "linear":
        options.update(sigma_frac=None, bandwidth=None)
    if not opts.bootstrap:
        options["ci"] = None
    return options


def check_loader_options(opts: SweepOptions) -> None:
    """Refuses the sweep options a loader decides itself.

    Raises:
        InputError: ``num_images`` or ``repeats`` set for a loader.
    """
    if opts.num_images is not None or opts.repeats != 1:
        raise InputError(
            "with a DataLoader (or any iterable of batches) ckascope uses its batches as they "
            "come, in one sweep: num_images and repeats do not apply (nor batch_size and "
            "num_workers). Hint: subset and batch in the loader, or pass its dataset instead"
        )


#: Images of a sweep over the synthetic set when ``num_images`` is not given (the paper's 1280).
SYNTHETIC_SWEEP = 1280


def synthetic_pool(opts: SweepOptions) -> tuple[int, SweepOptions]:
    """The synthetic set's size, and the options with its sweep size filled in.

    The set holds ``num_images x repeats`` images, so that the sweeps draw different random
    subsets (as the paper's 1280 of 50 000) and their std measures something.
    """
    sweep = opts.num_images or SYNTHETIC_SWEEP
    return sweep * opts.repeats, replace(opts, num_images=sweep)


def as_source(
    data: Source | str | None, view: ViewOptions, opts: SweepOptions
) -> tuple[Source, SweepOptions]:
    """A dataset or loader as is, or the set a ``--data`` spec names with the eval transform.

    Args:
        data: See ``compare_sides``.
        view: View options with the image size resolved (``resolve_view``).
        opts: Sweep options (the synthetic set fills in its sweep size).

    Raises:
        InputError: ``resize_size`` with a dataset or loader, whose own transform sizes its
            images (the option would be ignored).
    """
    if not (data is None or isinstance(data, str)):
        if view.resize_size is not None:
            raise InputError(
                "resize_size sets the short side before the centre crop of a --data spec or the "
                "synthetic set; a dataset or loader brings its images as its transform made them. "
                "Hint: resize in that transform, or drop resize_size"
            )
        return data, opts
    size = cast(int, view.image_size)
    count = opts.num_images or SYNTHETIC_SWEEP
    if is_synthetic(data):
        count, opts = synthetic_pool(opts)
    transform = eval_transform(size, default_resize(data, size, view.resize_size))
    dataset = build_dataset(
        data, "val", transform, num_images=count, seed=opts.seed, synthetic_size=size
    )
    return dataset, opts


def image_size_for(data: Source | str | None, image_size: int | None) -> int:
    """``image_size``, else the native side of the images a spec names (28 for Fashion-MNIST), else 224."""
    if image_size is not None:
        return image_size
    return (native_size(data) if isinstance(data, str) else None) or FALLBACK_IMAGE_SIZE


def resolve_view(view: ViewOptions | None, data: Source | str | None) -> ViewOptions:
    """The view options with the image size filled in from ``data`` (``image_size_for``)."""
    view = view or ViewOptions()
    return replace(view, image_size=image_size_for(data, view.image_size))


def compare_sides(
    a: SideSpec,
    b: SideSpec,
    data: Source | str | None = None,
    *,
    view: ViewOptions | None = None,
    sweep: SweepOptions | None = None,
    device: str | torch.device | None = None,
    settings: dict[str, Any] | None = None,
) -> CKAResult:
    """CKA between the layers of two sides seeing the same images: the one entry point.

    Both sides holding the same model is a cross-scale comparison (``compare_scales``; the
    result has a same-layer diagonal), two models a cross-model one (``compare_models``).

    Args:
        a: The rows of the matrix.
        b: The columns.
        data: A dataset of (image, label), a ``--data`` spec, None for the synthetic set, or a
            DataLoader (any iterable of image batches or (images, labels)) used as it comes.
        view: How the base images are prepared and resized to each side's scale.
        sweep: Kernel, batching, repeats, precision and process options of the sweep.
        device: Move the models there first; None keeps them where they are.
        settings: Extra settings to record (e.g. the model's name and weights).

    Returns:
        The result; its matrix is (La, Lb) = (layers of a, layers of b).

    Raises:
        TypeError: An argument of another type (a model where a SideSpec goes, a dict for the
            options), naming the type it takes.
    """
    _check_types(
        a=(a, SideSpec), b=(b, SideSpec), view=(view, ViewOptions), sweep=(sweep, SweepOptions)
    )
    view = resolve_view(view, data)
    view.check()
    size = cast(int, view.image_size)
    scales = [check_scale(size if s.scale is None else s.scale) for s in (a, b)]
    for model in (a.model, b.model):
        if device is not None:
            model.to(device)
    source, opts = as_source(data, view, sweep or SweepOptions())
    note_upsampled(scales, size)  # after the data's refusals: a refused run prints one line
    side_a, side_b = (
        side_for(s, view.at(x), opts.gram_dtype) for s, x in zip((a, b), scales, strict=True)
    )
    info = _settings(a, b, scales, data, view)
    return run_comparison(side_a, side_b, source, opts, {**info, **(settings or {})})


def note_upsampled(scales: Sequence[int], image_size: int) -> None:
    """Notes scales above the image size: their images are the base images enlarged.

    Such a side sees no detail the image-size images lack, which a reader of its CKA should
    know; it is a choice one can make on purpose, so it is said, not refused.
    """
    above = sorted({s for s in scales if s > image_size})
    if not above:
        return
    what, its = (
        (f"scale {above[0]} is", "its")
        if len(above) == 1
        else (f"scales {above[0]} and {above[1]} are", "their")
    )
    warn(
        f"{what} larger than the image size {image_size}: {its} images are the "
        f"{image_size}-px images upsampled, with no finer detail. Hint: --image-size "
        f"{above[-1]} or more compares images that have it, if the data does"
    )


def _check_types(**arguments: tuple[Any, type]) -> None:
    """Raises TypeError for an argument (None aside) not of its type."""
    for name, (value, kind) in arguments.items():
        if value is not None and not isinstance(value, kind):
            raise TypeError(
                f"compare_sides: {name} must be a {kind.__name__}, got {type(value).__name__}"
                + (f". Hint: {name}={kind.__name__}(model, ...)" if kind is SideSpec else "")
                + (f". Hint: {name}={kind.__name__}(**options)" if isinstance(value, dict) else "")
            )


class ViewKwargs(TypedDict, total=False):
    """``ViewOptions`` as keyword arguments (checked against its fields, as ``SweepKwargs``)."""

    protocol: Protocol
    image_size: int | None
    resize_size: int | None
    resize_mode: str
    antialias: bool


class CompareKwargs(ViewKwargs, SweepKwargs, total=False):
    """The view and sweep options as keyword arguments of ``compare_scales``/``compare_models``."""


#: Options renamed since earlier releases: their new names, for the error a caller gets.
RENAMED = {"base_size": "image_size"}


def split_options(options: CompareKwargs) -> tuple[ViewOptions, SweepOptions]:
    """Keyword options sorted into the view and the sweep options they name.

    Raises:
        InputError: An option neither takes, naming it (and its new name if it was renamed).
    """
    known = ViewKwargs.__annotations__.keys() | SweepKwargs.__annotations__.keys()
    for key in options.keys() - known:
        hint = f"it is now {RENAMED[key]}" if key in RENAMED else "see help(compare_scales)"
        raise InputError(f"compare_scales/compare_models take no option {key!r}. Hint: {hint}")
    view_keys = ViewKwargs.__annotations__.keys()
    view: dict[str, Any] = {k: v for k, v in options.items() if k in view_keys}
    sweep: dict[str, Any] = {k: v for k, v in options.items() if k not in view_keys}
    return ViewOptions(**view), SweepOptions(**sweep)


def compare_scales(
    model: nn.Module,
    data: Source | str | None = None,
    scales: Sequence[int] | None = None,
    *,
    layers: LayerSpec = "blocks",
    output_key: str | None = None,
    device: str | torch.device | None = None,
    settings: dict[str, Any] | None = None,
    **options: Unpack[CompareKwargs],
) -> CKAResult:
    """CKA between the layers of one model seeing the same images at two scales.

    Args:
        model: Any module; multi-path models route each scale through its path.
        data: See ``compare_sides``.
        scales: (s_a, s_b): rows see the images at s_a, columns at s_b [(image_size/7,
            image_size): the paper's (32, 224) for 224-px base images].
        layers: Layer names, patterns, a predicate or a preset.
        output_key: The key to record from layers that return dicts.
        device: Move the model there first; None keeps it where it is.
        settings: Extra settings to record (e.g. the model's name and weights).
        **options: ``ViewOptions`` fields (protocol, image_size, resize_size, resize_mode,
            antialias) and ``SweepOptions`` fields (kernel, sigma_frac, bandwidth, weighting,
            batch_size, repeats, num_images, seed, num_workers, tf32, gram_dtype, bootstrap,
            ci, permutations, memory_format, precision, progress, rank, world_size).

    Returns:
        The result; its matrix is (La, Lb) = (layers at s_a, layers at s_b).
    """
    view, sweep = split_options(options)
    view = resolve_view(view, data)
    scales = default_scales(cast(int, view.image_size)) if scales is None else scales
    if len(scales) != 2:
        raise InputError(f"give exactly two scales, got {list(scales)}")
    a, b = (SideSpec(model, s, layers, output_key) for s in scales)
    return compare_sides(a, b, data, view=view, sweep=sweep, device=device, settings=settings)


def compare_models(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Source | str | None = None,
    *,
    scale: int | None = None,
    layers: LayerSpec = "blocks",
    layers_b: LayerSpec | None = None,
    output_key: str | None = None,
    device: str | torch.device | None = None,
    settings: dict[str, Any] | None = None,
    **options: Unpack[CompareKwargs],
) -> CKAResult:
    """CKA between the layers of two models seeing the same images at one scale.

    Args:
        model_a: Rows of the matrix.
        model_b: Columns of the matrix.
        data: See ``compare_sides``.
        scale: Input scale for both models [the image size].
        layers: Layers of model_a (and of model_b unless ``layers_b`` is given).
        layers_b: Layers of model_b.
        output_key: The key to record from layers that return dicts.
        device: Move both models there first; None keeps them where they are.
        settings: Extra settings to record.
        **options: View and sweep options (see ``compare_scales``).
    """
    view, sweep = split_options(options)
    a = SideSpec(model_a, scale, layers, output_key)
    b = SideSpec(model_b, scale, layers if layers_b is None else layers_b, output_key)
    return compare_sides(a, b, data, view=view, sweep=sweep, device=device, settings=settings)


def _settings(
    a: SideSpec, b: SideSpec, scales: list[int], data: Source | str | None, view: ViewOptions
) -> dict[str, Any]:
    """What the result records about the sides and how the images were prepared."""
    models = a.model is not b.model
    spec = data if isinstance(data, str) else None
    size = cast(int, view.image_size)
    return {
        "mode": "models" if models else "scales",
        "scales": scales,
        "protocol": view.protocol,
        "native_size": native_size(spec),
        "image_size": size,
        "resize_size": resize_for(size, default_resize(spec, size, view.resize_size)),
        "resize_mode": view.resize_mode,
        "antialias": view.antialias,
        "layers": _describe(a.layers),
        **({"layers_b": _describe(b.layers)} if models or b.layers != a.layers else {}),
        **_paths([a.model, b.model], scales),
    }


def _describe(layers: LayerSpec | None) -> Any:
    if layers is None or isinstance(layers, str):
        return layers
    if callable(layers):
        return getattr(layers, "__name__", "predicate")
    return list(layers)
