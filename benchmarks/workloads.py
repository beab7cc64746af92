"""The workloads every tool runs: models, pre-rendered images, input views, batches, and the call
of ckascope's public API for each.

Images are rendered once by the parent process (``render_pool``: the built-in synthetic set with
the eval transform, so no tool is timed generating data) and saved to a temporary file the
spawned children load. A ``PooledImages`` dataset of any length cycles through the pool, so the
data's memory is the pool's whatever the number of images (needed to see that ckascope's memory
is flat in the number of images, and to run 5000 images without rendering 5000).

Every tool sees the same batches: ckascope's compare draws a seeded permutation of the images
(``ckascope.data.subset_indices``) and cuts it into batches; ``batch_plan`` reproduces it and the
peers, the bare forward passes and the reference get it as the DataLoader's ``batch_sampler``.
Minibatch CKA depends on which images share a batch, so this is what makes errors comparable.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ckascope.compare import compare_models
from ckascope.layers import resolve_layers
from ckascope.platform import (
    build_dataset,
    build_model,
    compare_scales,
    eval_transform,
    plan_batches,
    subset_indices,
)
from ckascope.views import ScaleView

View = Callable[[Tensor], Tensor]


# --- images -----------------------------------------------------------------------------------


def render_pool(count: int, image_size: int, seed: int = 0) -> Tensor:
    """``count`` synthetic images (count, 3, image_size, image_size), ImageNet-normalised.

    Same pipeline as ``ckascope compare`` without --data: resize the short side to
    image_size * 256/224, centre-crop image_size.
    """
    resize = round(image_size * 256 / 224)
    dataset = build_dataset(
        None, "val", eval_transform(image_size, resize), num_images=count, seed=seed
    )
    return torch.stack([dataset[i][0] for i in range(count)])


class PooledImages(Dataset[tuple[Tensor, int]]):
    """``length`` items cycling through a fixed pool of inputs; label 0."""

    def __init__(self, pool: Tensor, length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.pool[index % len(self.pool)], 0


def batch_plan(total: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """ckascope's batches: a seeded permutation in chunks, chunks of fewer than 4 dropped."""
    return plan_batches(subset_indices(total, None, seed), batch_size, min_size=4)


# --- views and models -------------------------------------------------------------------------


def identity(x: Tensor) -> Tensor:
    return x


class ViewModel(nn.Module):
    """``net(view(x))``: how a peer that feeds one batch to two models sees two scales."""

    def __init__(self, view: View, net: nn.Module) -> None:
        super().__init__()
        self.view = view
        self.net = net

    def forward(self, x: Tensor) -> Any:
        return self.net(self.view(x))


def build_mlp(depth: int, width: int, seed: int, init: str = "kaiming") -> nn.Sequential:
    """Flatten, then ``depth`` x (Linear(width, width), ReLU); hook points ``relu{i}``.

    init "kaiming" (He normal, zero bias) keeps the signal's scale through all layers;
    "default" is torch's Linear init, under which the input's signal fades with depth until the
    representations are almost constant (the bias dominates), the regime where float32 Grams
    lose their digits.
    """
    modules: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(depth):
            linear = nn.Linear(width, width)
            if init == "kaiming":
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
                nn.init.zeros_(linear.bias)
            modules[f"fc{i}"] = linear
            modules[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(modules).eval()


def mlp_inputs(count: int, width: int, seed: int) -> Tensor:
    """Gaussian inputs shaped (count, width, 1, 1): "1-px images", which ckascope's native
    views at scale 1 pass through unchanged, so ``compare_models`` runs the MLP as it is."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, width, 1, 1, generator=g)


# --- workloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetSpec:
    """One model at two scales (``compare_scales``); picklable, built in each child."""

    arch: str
    scales: tuple[int, int]
    image_size: int
    num_images: int
    batch_size: int
    device: str
    pool_file: str
    seed: int = 0

    def describe(self) -> str:
        return (
            f"{self.arch} blocks, scales {self.scales[0]} vs {self.scales[1]} (upsample to "
            f"{self.image_size}), {self.num_images} images, batch {self.batch_size}, {self.device}"
        )


@dataclass(frozen=True)
class MLPSpec:
    """Two MLPs of different seeds on the same inputs (``compare_models``)."""

    depth: int
    width: int
    num_images: int
    batch_size: int
    device: str
    init: str = "kaiming"
    seed: int = 0

    def describe(self) -> str:
        return (
            f"two {self.depth}-layer MLPs (width {self.width}, {self.init} init, seeds "
            f"{self.seed} and {self.seed + 1}), {self.num_images} inputs, batch "
            f"{self.batch_size}, {self.device}"
        )


Spec = ResNetSpec | MLPSpec


@dataclass
class Workload:
    """Everything a tool needs, identical for all tools."""

    model_a: nn.Module
    model_b: nn.Module  # the same object as model_a for a cross-scale comparison
    view_a: View
    view_b: View
    layers_a: list[str]
    layers_b: list[str]
    dataset: Dataset[Any]
    plan: list[list[int]]
    device: torch.device
    ckascope: Callable[..., Any]  # the public API call (data, **options) -> CKAResult

    def loader(self, plan: list[list[int]] | None = None) -> DataLoader[Any]:
        """The batches of ``plan`` (default: all), pinned on CUDA like ckascope's loader."""
        return DataLoader(
            self.dataset,
            batch_sampler=self.plan if plan is None else plan,
            pin_memory=self.device.type == "cuda",
        )

    def first_batch(self) -> Workload:
        """The same workload on the first batch only, for warm-ups."""
        first = self.plan[0]
        return replace(self, dataset=Subset(self.dataset, first), plan=[list(range(len(first)))])


def peer_models(work: Workload) -> tuple[nn.Module, nn.Module, list[str], list[str]]:
    """Side modules and layer names for peers that hook "two models" and feed both one batch.

    Each side is a deep copy (same weights) of its network wrapped with its resize. A cross-scale
    comparison needs two module objects anyway: hooks on one shared network would fire in both
    forward passes and each side would record the last one. Copies also keep the originals free
    of hooks a peer never removes (torch-cka). Made outside the timer; they count in the
    baseline memory.
    """
    side_a = ViewModel(work.view_a, copy.deepcopy(work.model_a))
    side_b = ViewModel(work.view_b, copy.deepcopy(work.model_b))
    return (
        side_a,
        side_b,
        [f"net.{n}" for n in work.layers_a],
        [f"net.{n}" for n in work.layers_b],
    )


def build_workload(spec: Spec) -> Workload:
    if isinstance(spec, ResNetSpec):
        return _resnet_workload(spec)
    return _mlp_workload(spec)


def _resnet_workload(spec: ResNetSpec) -> Workload:
    device = torch.device(spec.device)
    model = build_model(spec.arch, "none", seed=spec.seed).to(device)
    pool = torch.load(spec.pool_file, weights_only=True)
    dataset = PooledImages(pool, spec.num_images)
    small, large = spec.scales

    def run_ckascope(data: Dataset[Any], **options: Any) -> Any:
        return compare_scales(
            model,
            data,
            spec.scales,
            layers="blocks",
            image_size=spec.image_size,
            batch_size=spec.batch_size,
            seed=spec.seed,
            device=device,
            **options,
        )

    layers = resolve_layers(model, "blocks")
    return Workload(
        model,
        model,
        ScaleView(small, "upsample", spec.image_size),
        ScaleView(large, "upsample", spec.image_size),
        layers,
        layers,
        dataset,
        batch_plan(spec.num_images, spec.batch_size, spec.seed),
        device,
        run_ckascope,
    )


def _mlp_workload(spec: MLPSpec) -> Workload:
    device = torch.device(spec.device)
    model_a = build_mlp(spec.depth, spec.width, spec.seed, spec.init).to(device)
    model_b = build_mlp(spec.depth, spec.width, spec.seed + 1, spec.init).to(device)
    dataset = PooledImages(mlp_inputs(spec.num_images, spec.width, spec.seed), spec.num_images)
    layers = [f"relu{i}" for i in range(spec.depth)]

    def run_ckascope(data: Dataset[Any], **options: Any) -> Any:
        return compare_models(
            model_a,
            model_b,
            data,
            scale=1,
            protocol="native",
            layers=layers,
            batch_size=spec.batch_size,
            seed=spec.seed,
            device=device,
            **options,
        )

    return Workload(
        model_a,
        model_b,
        identity,
        identity,
        layers,
        layers,
        dataset,
        batch_plan(spec.num_images, spec.batch_size, spec.seed),
        device,
        run_ckascope,
    )


def ckascope_matrix(work: Workload, data: Dataset[Any] | None = None, **options: Any) -> np.ndarray:
    """Runs ckascope's public API and returns its (La, Lb) matrix, checking the layer order.

    ``options`` are sweep options (e.g. ``memory_format``, ``precision``); none: the defaults.
    """
    result = work.ckascope(work.dataset if data is None else data, **options)
    if list(result.layers_a) != work.layers_a or list(result.layers_b) != work.layers_b:
        raise RuntimeError(
            f"ckascope recorded layers {result.layers_a} x {result.layers_b}, expected "
            f"{work.layers_a} x {work.layers_b}"
        )
    return np.asarray(result.matrix, dtype=np.float64)


# --- capturing features with our own hooks ------------------------------------------------------


class Capture:
    """Forward hooks that apply ``reduce`` to each named module's output, in layer order."""

    def __init__(
        self, model: nn.Module, names: list[str], reduce: Callable[[Tensor], Tensor]
    ) -> None:
        self.model, self.names, self.reduce = model, names, reduce
        self.records: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> Capture:
        for name in self.names:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.records[name] = self.reduce(out.detach())

        return hook

    def run(self, x: Tensor) -> list[Tensor]:
        """One forward pass; the reduced outputs in ``names`` order."""
        self.records = {}
        self.model(x)
        return [self.records[n] for n in self.names]


def pool_file(directory: Path, name: str, pool: Tensor) -> str:
    """Saves the rendered images for the children; returns the path."""
    path = directory / f"{name}.pt"
    torch.save(pool, path)
    return str(path)
