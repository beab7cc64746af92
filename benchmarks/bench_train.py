"""msun training costs: the framework's own overhead, and the data loader against the step.

    python benchmarks/bench_train.py --model resnet18 --image-size 112 --batch-size 32

1. Overhead: one MSUN training step (forward of every path, cross-entropies, scale-invariance
   loss, backward) against the sum of the same paths' forward + backward run one at a time
   (``forward_path`` on the crop resized to the path's size, cross-entropy, backward). The
   difference is what MSUN adds on top of its paths: the resizes to the unified size, the loss
   terms, bookkeeping. Target: <= 10 %.
2. Input pipeline: images/s of the training DataLoader (synthetic set, RandomResizedCrop + flip,
   seeded per item) with 0, 1 and 2 workers, against the images/s of the training step.

Prints markdown tables and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import markdown_table, median_time, write_json

from ckascope.platform import DistInfo, resize
from ckascope.shapes import SyntheticShapes
from msun import build_msun
from msun.config import TrainConfig
from msun.data import PlanSampler, SeededItems, epoch_plan, make_loader, train_transform
from msun.objective import Objective


def overhead(cfg: TrainConfig, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_msun(cfg.model, scales=cfg.scales, num_classes=10).train()
    objective = Objective(model, cfg)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    labels = torch.randint(0, 10, (cfg.batch_size,))

    def msun_step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = objective(images, labels)
        loss.backward()

    def path_step(k: int) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            x = resize(images, cfg.scales[k])
            F.cross_entropy(model.forward_path(x, k, protocol="native"), labels).backward()

        return run

    step = median_time(msun_step, repeats)
    paths = [median_time(path_step(k), repeats) for k in range(len(cfg.scales))]
    return {
        "msun_step_s": step,
        "sum_of_paths_s": sum(paths),
        **{f"path{k}_s": t for k, t in enumerate(paths)},
        "overhead_percent": 100 * (step / sum(paths) - 1),
    }


def loader_rate(cfg: TrainConfig, workers: int, batches: int) -> float:
    data = SeededItems(
        SyntheticShapes(
            "train",
            4096,
            size=cfg.image_size,
            transform=train_transform(cfg.image_size, cfg.crop_scale_min),
        )
    )
    run = TrainConfig(**{**cfg.to_dict(), "scales": tuple(cfg.scales), "workers": workers})
    loader = make_loader(data, run, torch.device("cpu"))
    sampler = loader.batch_sampler
    assert isinstance(sampler, PlanSampler)
    sampler.plan = epoch_plan(4096, 0, run, DistInfo(0, 1, torch.device("cpu")))[: batches + 1]
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--scales", type=int, nargs="+", default=[16, 64, 112])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "train.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        model=args.model,
        scales=tuple(args.scales),
        image_size=args.image_size,
        batch_size=args.batch_size,
        si_threshold=0.0,
        crop_scale_min=0.35,
    )
    cost = overhead(cfg, args.repeats)
    step_rate = cfg.batch_size / cost["msun_step_s"]
    loaders = [
        {"workers": w, "images_per_s": loader_rate(cfg, w, args.loader_batches)} for w in (0, 1, 2)
    ]
    print(
        f"## {args.model}, {args.image_size} px, scales {args.scales}, batch {args.batch_size}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}\n"
    )
    print(
        markdown_table([cost])
        + f"\n\ntraining step: {step_rate:.1f} images/s (forward + backward)\n\n"
        + markdown_table(loaders)
    )
    write_json(
        args.out,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "overhead": cost,
            "step_images_per_s": step_rate,
            "loader": loaders,
        },
    )


if __name__ == "__main__":
    main()
