"""Parameter and FLOP accounting of an MSUN against its vanilla backbone.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on meta-device copies of the
models (shapes only: no compute, no memory), one image (batch size 1) under ``torch.no_grad()``.
That counter counts convolutions and matrix products, as 2 FLOPs per multiply-accumulate
(so MACs = FLOPs / 2); element-wise ops, pooling, BatchNorm and the bilinear interpolations
(input resize and unified resize) are not counted, for MSUN and vanilla alike.

Two protocols over the test sizes (by default the paper's 13, scaled to the image size: 32, 48,
..., 224 for the published 224, 4, 6, ..., 28 for 28), each routed by the model's routing table:

- ``upsample``: the input is resized to the routed path's nominal size (how accuracy is
  measured, the protocol of ``msun eval`` and of ``ckascope compare`` on an MSUN);
- ``native``: the routed path is fed the input at its own size (how the paper's "fewer FLOPs"
  claim is computed).

Both are compared with a vanilla model that runs every input at the image size (the largest
scale unless given).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ckascope.platform import PROTOCOLS, InputError, Protocol
from msun.backbones import accepts, meta_model
from msun.config import paper_sizes, sizes_text
from msun.model import MSUN, build_msun, eval_mode


@dataclass(frozen=True)
class Parameters:
    """Parameter counts per part of an MSUN and of its vanilla backbone."""

    subnets: tuple[int, ...]
    trunk: int
    head: int
    total: int
    vanilla: int


@dataclass(frozen=True)
class SizeRow:
    """FLOPs of the routed model at one test size (one image)."""

    size: int
    path: int
    upsample: int
    native: int


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs over the test sizes under both protocols, vanilla at the image size, parameters."""

    config: dict[str, Any]
    rows: tuple[SizeRow, ...]
    path_flops: tuple[int, ...]
    vanilla: int
    parameters: Parameters
    image_size: int

    def mean(self, protocol: Protocol) -> float:
        """Mean FLOPs per image over the test sizes under ``protocol``."""
        return float(sum(getattr(row, protocol) for row in self.rows)) / len(self.rows)

    def saving(self, protocol: Protocol) -> float:
        """Percent fewer FLOPs than vanilla at the image size under ``protocol`` (negative: more)."""
        return 100.0 * (1.0 - self.mean(protocol) / self.vanilla)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per-size rows, means, savings and parameter counts."""
        return {
            **self.config,
            "sizes": [asdict(row) for row in self.rows],
            "flops_per_path_at_nominal_size": list(self.path_flops),
            "image_size": self.image_size,
            "vanilla_flops": self.vanilla,
            "mean_flops": {p: self.mean(p) for p in PROTOCOLS},
            "fewer_flops_percent": {p: self.saving(p) for p in PROTOCOLS},
            "parameters": asdict(self.parameters),
            "counted": "FLOPs = 2 x MACs of convolutions and matrix products, batch size 1",
        }


def _count(run: Callable[[torch.Tensor], torch.Tensor], size: int) -> int:
    """FLOPs of ``run`` on one meta image (1, 3, size, size)."""
    x = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(x)
    return int(counter.get_total_flops())


def meta_twin(model: MSUN) -> MSUN:
    """``model`` itself if it lives on the meta device, else a structural copy there."""
    if all(p.is_meta for p in model.parameters()):
        return model
    config = model.config()
    with torch.device("meta"):
        return build_msun(config.pop("arch"), **config)


def path_flops(model: MSUN, k: int, size: int) -> int:
    """FLOPs of path k on one (1, 3, size, size) image fed at that size (no input resize)."""
    with eval_mode(meta_twin(model)) as twin:
        assert isinstance(twin, MSUN)
        return _count(lambda x: twin.forward_path(x, k, protocol="native"), size)


def path_macs(model: MSUN, k: int, size: int) -> int:
    """Multiply-accumulates of path k at ``size``: half its FLOPs."""
    return path_flops(model, k, size) // 2


@functools.lru_cache(maxsize=64)
def vanilla_flops(arch: str, size: int = 224, num_classes: int = 1000) -> int:
    """FLOPs of the vanilla torchvision model on one (1, 3, size, size) image."""
    model = meta_model(arch, num_classes).eval()
    return _count(model, size)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: MSUN) -> Parameters:
    """Parameters of each subnet, the trunk, the head, the whole MSUN and the vanilla model."""
    return Parameters(
        subnets=tuple(_numel(s) for s in model.subnets),
        trunk=_numel(model.trunk),
        head=_numel(model.head),
        total=_numel(model),
        vanilla=_numel(meta_model(model.arch, model.num_classes)),
    )


def flops_report(
    model: MSUN, sizes: Sequence[int] | None = None, image_size: int | None = None
) -> FlopsReport:
    """FLOPs of the routed model at each test size under both protocols, and vanilla's.

    Counts depend on the structure only (``model.config()``), so each structure's report is
    counted once per process: evaluating many checkpoints of one architecture costs one count.

    Args:
        model: The MSUN (any device: it is counted on a meta-device twin).
        sizes: Test sizes [the paper's 13 scaled to ``image_size``].
        image_size: The size vanilla runs every input at [the largest scale].
    """
    image_size = image_size or max(model.scales)
    sizes = tuple(paper_sizes(image_size) if sizes is None else sizes)
    return _report(json.dumps(model.config(), sort_keys=True), sizes, image_size)


@functools.lru_cache(maxsize=64)
def _report(config_json: str, sizes: tuple[int, ...], image_size: int) -> FlopsReport:
    config = json.loads(config_json)
    with torch.device("meta"):
        twin = build_msun(config.pop("arch"), **config)
    counts: dict[tuple[int, int], int] = {}

    def count(k: int, size: int) -> int:
        if (k, size) not in counts:
            counts[k, size] = path_flops(twin, k, size)
        return counts[k, size]

    at_nominal = tuple(count(k, s) for k, s in enumerate(twin.scales))
    try:
        rows = [SizeRow(s, k, at_nominal[k], count(k, s)) for s in sizes for k in [twin.route(s)]]
    except RuntimeError as e:  # a pooling left with less than a pixel (a shape error)?
        refusal = native_refusal(twin, sizes)
        if refusal is None:
            raise
        raise refusal from e
    return FlopsReport(
        config={**twin.config(), "unified_size": twin.unified_size},
        rows=tuple(rows),
        path_flops=at_nominal,
        vanilla=vanilla_flops(twin.arch, image_size, twin.num_classes),
        parameters=count_parameters(twin),
        image_size=image_size,
    )


def native_refusal(model: MSUN, sizes: Sequence[int]) -> InputError | None:
    """The error for test sizes that their routed path shrinks to nothing when fed as they are.

    Under the native protocol a size below a path's nominal size runs through that path's
    subnet at its own size: a VGG subnet keeps max-pools that a few pixels do not survive.
    None when every size runs.
    """
    with eval_mode(meta_twin(model)) as twin:
        assert isinstance(twin, MSUN)
        bad = [s for s in sizes if not accepts(_native_path(twin, twin.route(s)), s)]
    if not bad:
        return None
    good = [s for s in sizes if s not in bad]
    hint = f"--eval-sizes {sizes_text(good)}" if good else "larger --eval-sizes"
    return InputError(
        f"test size(s) {', '.join(map(str, bad))} shrink to nothing on the path they are routed "
        f"to when fed as they are (the native protocol) in {twin.describe()}, scales "
        f"{list(twin.scales)}. Hint: give {hint}, without them"
    )


def _native_path(model: MSUN, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model.forward_path(x, k, protocol="native")


_PRIVATE = ", a BatchNorm set per path"


def _private(report: FlopsReport) -> bool:
    """Whether the MSUN's trunk has private BatchNorm (``--bn private``)."""
    return report.config.get("bn") == "private"


def _g(flops: float) -> str:
    return f"{flops / 1e9:.3f}"


def flops_table(report: FlopsReport) -> Table:
    """Per test size: routed path, GFLOPs under both protocols and vanilla's; then means."""
    scales = report.config["scales"]
    table = Table(
        title=f"{report.config['arch']} MSUN (trunk from {report.config['split_at']}"
        f"{_PRIVATE if _private(report) else ''}): GFLOPs per image",
        caption="upsample: input resized to the path's nominal size; native: fed at its size. "
        "Interpolations are not counted.",
    )
    for name in ("size", "path", "upsample", "native", f"vanilla @{report.image_size}"):
        table.add_column(name, justify="right")
    for row in report.rows:
        path = f"S{row.path + 1} ({scales[row.path]})"
        table.add_row(str(row.size), path, _g(row.upsample), _g(row.native), _g(report.vanilla))
    means = [_g(report.mean(p)) for p in PROTOCOLS]
    table.add_section()
    table.add_row("mean", "", *means, _g(report.vanilla))
    savings = [f"{report.saving(p):.2f} %" for p in PROTOCOLS]
    table.add_row("fewer FLOPs", "", *savings, "")
    return table


def parameters_table(report: FlopsReport) -> Table:
    """Parameter counts (millions) per part, of the MSUN and of the vanilla model."""
    params = report.parameters
    table = Table(title="parameters (M)")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for k, (count, scale) in enumerate(zip(params.subnets, report.config["scales"], strict=True)):
        table.add_row(f"subnet S{k + 1} ({scale})", f"{count / 1e6:.3f}")
    trunk = "trunk" + (_PRIVATE if _private(report) else "")
    for name, count in ((trunk, params.trunk), ("head", params.head)):
        table.add_row(name, f"{count / 1e6:.3f}")
    table.add_section()
    table.add_row("MSUN total", f"{params.total / 1e6:.3f}")
    table.add_row("vanilla", f"{params.vanilla / 1e6:.3f}")
    return table
