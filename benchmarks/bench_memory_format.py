"""Forward-pass time per memory format (and bf16 autocast) over the torchvision families.

The measurement behind ``--memory-format auto``'s rule (ckascope.execution): each model in
eval mode under ``torch.inference_mode()``, random weights, one batch of random images, the
layouts interleaved (contiguous, channels_last, channels_last + bf16 autocast, ...) in every
round so a busy spell hits them alike; the median over rounds is reported with the largest
difference from contiguous float32 (of the logits; with ``--train``, of the updated first weight).

    python benchmarks/bench_memory_format.py                       # CPU, the default families
    python benchmarks/bench_memory_format.py --sizes 224 32 --batch 64 --rounds 5
    python benchmarks/bench_memory_format.py --train --models resnet18 --sizes 224 --batch 32

``--train`` times a training step instead (forward, cross-entropy, backward, SGD step with
momentum, the model in train mode), contiguous vs channels_last: whether ``msun train`` should
use channels_last too. It also reports each layout's float32 gradients against the same step in
float64 (``grad_rel_err``: relative L2 error over all parameters' gradients).

Writes benchmarks/results/memory_format.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from common import (
    RESULTS_DIR,
    describe_machine,
    machine_info,
    markdown_table,
    set_threads,
    write_json,
)
from torchvision import models

FAMILIES = (
    "resnet18",
    "resnet50",
    "densenet121",
    "vgg11_bn",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
)
MODES = ("contiguous", "channels_last", "channels_last+bf16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(FAMILIES))
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 32])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    p.add_argument("--train", action="store_true", help="time training steps, not inference")
    p.add_argument("--out", type=Path, help="[results/memory_format(_train).json]")
    return p.parse_args(argv)


def forward_once(model: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
    """Seconds of one forward pass in ``mode`` and its float32 logits."""
    last = mode.startswith("channels_last")
    fmt = torch.channels_last if last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    cast = torch.autocast(x.device.type, torch.bfloat16) if mode.endswith("bf16") else nullcontext()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode(), cast:
        sync()
        start = time.perf_counter()
        out = model(x)
        sync()
    return time.perf_counter() - start, out.float()


def train_once(model: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
    """Seconds of one SGD step in ``mode`` from the same weights, and the updated first weight."""
    fmt = torch.channels_last if mode == "channels_last" else torch.contiguous_format
    model.load_state_dict(STATE)  # every step starts from the same weights
    model.to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = x.contiguous(memory_format=fmt)
    labels = torch.arange(len(x), device=x.device) % 10
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return seconds, next(model.parameters()).detach().clone()


STATE: dict[str, torch.Tensor] = {}


def grad_rel_err(model: torch.nn.Module, x: torch.Tensor, mode: str) -> float:
    """Relative L2 error of one step's float32 gradients in ``mode`` against float64's."""

    def grads(dtype: torch.dtype, fmt: torch.memory_format) -> torch.Tensor:
        model.load_state_dict(STATE)
        model.to(dtype).to(memory_format=fmt).train()
        model.zero_grad(set_to_none=True)
        labels = torch.arange(len(x), device=x.device) % 10
        inputs = x.to(dtype).contiguous(memory_format=fmt)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])  # type: ignore[union-attr]

    reference = grads(torch.float64, torch.contiguous_format)
    fmt = torch.channels_last if mode == "channels_last" else torch.contiguous_format
    got = grads(torch.float32, fmt)
    model.float()
    return float((got - reference).norm() / reference.norm())


def measure(name: str, size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=1000 if not args.train else 10).to(args.device)
    STATE.clear()
    STATE.update({k: v.clone() for k, v in model.state_dict().items()})
    model.eval()
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    modes = MODES[:2] if args.train else MODES
    once = train_once if args.train else forward_once
    times: dict[str, list[float]] = {m: [] for m in modes}
    logits: dict[str, torch.Tensor] = {}
    for m in modes:  # warm-up: oneDNN builds its kernels for each layout once
        once(model, x, m)
    for _ in range(args.rounds):
        for m in modes:
            seconds, logits[m] = once(model, x, m)
            times[m].append(seconds)
    base = statistics.median(times["contiguous"])
    errors = {m: grad_rel_err(model, x, m) for m in modes} if args.train else {}
    return [
        {
            "model": name,
            "size": size,
            "mode": m,
            "median_s": statistics.median(times[m]),
            "speedup": base / statistics.median(times[m]),
            "max_abs_diff": float((logits[m] - logits["contiguous"]).abs().max()),
            **({"grad_rel_err": errors[m]} if args.train else {}),
        }
        for m in modes
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    name = "memory_format_train.json" if args.train else "memory_format.json"
    args.out = args.out or RESULTS_DIR / name
    rows = []
    for size in args.sizes:
        for name in args.models:
            rows += measure(name, size, args)
            print(rows[-2], flush=True)
    keys = ["model", "size", "mode", "median_s", "speedup", "max_abs_diff"]
    columns = [(k, k) for k in keys + (["grad_rel_err"] if args.train else [])]
    print(describe_machine(machine_info(threads)))
    print(markdown_table(rows, columns))
    write_json(args.out, {"machine": machine_info(threads), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
