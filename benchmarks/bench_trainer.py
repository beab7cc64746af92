"""msun's trainer against a bare training loop: time per step, same process, taking turns.

    python benchmarks/bench_trainer.py                      # the Fashion-MNIST study's settings
    python benchmarks/bench_trainer.py --methods vanilla --steps 20 --rounds 3 --data fashionmnist:DIR

For each method the trainer's own ``Loop`` is built as ``msun train`` builds it (config, data,
network, objective, optimiser, schedule, loaders; ``msun.train._configure`` / ``_build``). Each
round then times, in an order that alternates from round to round:

- **trainer**: ``train_one_epoch`` over ``--steps`` optimiser steps of that round's epoch plan:
  loading and augmenting the batches, the step, the NaN and interrupt check, clipping, the
  schedule, the logged terms, the progress line;
- **bare**: the same steps on the same batches, already in memory: the objective's forward,
  backward, the gradient clip where the method has one, ``optimizer.step``, ``zero_grad``: what
  any loop training this objective must do.

Both update the same network and optimiser (weights drift, the cost does not). The first round
warms up and is dropped; the medians over the others and their ratio are reported. Then the
rest of a run, once each: the loader alone per batch, validation (``--num-val`` images at every
evaluation size, as at the end of a run) and the study's evaluation (``--num-eval`` images), so
the per-run breakdown shows where a run's time goes.

Writes benchmarks/results/trainer.json (every time, the medians, the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import describe_machine, machine_info, markdown_table, set_threads, write_json

from ckascope.platform import dataset_len, init_distributed, make_progress
from msun.config import TrainConfig
from msun.data import epoch_plan
from msun.runstate import TrainState
from msun.train import Loop, _build, _configure, train_one_epoch, validate

# The Fashion-MNIST study's recipe (figures/fashion_study.py): what a step computes there.
STUDY: dict[str, Any] = {
    "model": "resnet18",
    "scales": (4, 16, 28),
    "image_size": 28,
    "batch_size": 64,
    "crop_scale_min": 0.35,
}
SPLIT = {"vanilla": None, "mst": None, "msun": "layer2"}


def build_loop(method: str, data: str, steps: int, num_val: int) -> Loop:
    """The trainer's Loop for ``method`` on the study's settings, ``steps`` steps per epoch."""
    cfg = TrainConfig(
        **STUDY,
        method=method,
        split_at=SPLIT[method],
        data=data,
        steps_per_epoch=steps,
        num_val=num_val,
        epochs=1000,  # the schedule's length does not change a step's cost
        out="/nonexistent",  # nothing is saved: train_one_epoch writes no file
    )
    info = init_distributed("cpu")
    cfg, train, val, init = _configure(cfg, info, None, ())
    return _build(cfg, info, train, val, init)


def trainer_steps(loop: Loop, epoch: int) -> Callable[[], None]:
    """One call = ``train_one_epoch`` over the epoch's capped plan, as a run does it."""

    def run() -> None:
        with make_progress(True) as bar:
            train_one_epoch(loop, TrainState(epoch=epoch), lambda: False, bar)

    return run


def bare_steps(loop: Loop, epoch: int) -> Callable[[], None]:
    """One call = the same steps on the same batches, loaded beforehand (not timed)."""
    plan = epoch_plan(dataset_len(loop.train_loader.dataset), epoch, loop.cfg, loop.info)
    batches = list(loop.iterate(loop.train_loader, plan))
    t = loop.trainables
    params = [p for p in loop.model.parameters() if p.requires_grad]

    def run() -> None:
        for batch in batches:
            loss, _ = loop.objective(batch.images, batch.labels)
            loss.backward()
            if loop.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, loop.cfg.grad_clip)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)

    return run


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(loop: Loop, rounds: int, steps: int) -> dict[str, Any]:
    """Trainer and bare loop taking turns; seconds per step of each, round by round."""
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    for r in range(rounds + 1):  # round 0 warms up (oneDNN primitives, allocator)
        jobs = {"trainer": trainer_steps(loop, r), "bare": bare_steps(loop, r)}
        order = list(jobs) if r % 2 == 0 else list(jobs)[::-1]
        for name in order:
            seconds = timed(jobs[name]) / steps
            if r:
                times[name].append(seconds)
    trainer, bare = (statistics.median(times[k]) for k in ("trainer", "bare"))
    ratios = [a / b for a, b in zip(times["trainer"], times["bare"], strict=True)]
    return {
        "trainer_ms": 1000 * trainer,
        "bare_ms": 1000 * bare,
        "ratio": trainer / bare,
        "ratio_per_round": ratios,
        "times_s": times,
    }


def phases(loop: Loop, steps: int, num_eval: int) -> dict[str, float]:
    """The other parts of a run, once each: loader per batch, validation, evaluation."""
    plan = epoch_plan(dataset_len(loop.train_loader.dataset), 999, loop.cfg, loop.info)
    loader_s = timed(lambda: list(loop.iterate(loop.train_loader, plan))) / steps
    with make_progress(False) as bar:
        val_s = timed(lambda: validate(loop, bar))
    images = dataset_len(loop.val_loader.dataset)
    return {
        "loader_ms_per_batch": 1000 * loader_s,
        "validation_s": val_s,
        "validation_images": images,
        "evaluation_s_estimate": val_s * num_eval / images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="fashionmnist")
    parser.add_argument("--methods", nargs="+", default=["vanilla", "mst", "msun"])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after a warm-up)")
    parser.add_argument("--num-val", type=int, default=500, help="validation images")
    parser.add_argument("--num-eval", type=int, default=5000, help="the study's test images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "trainer.json"
    )
    args = parser.parse_args()
    machine = machine_info(set_threads(args.threads))
    rows = []
    for method in args.methods:
        loop = build_loop(method, args.data, args.steps, args.num_val)
        row = {"method": method, **interleaved(loop, args.rounds, args.steps)}
        rows.append({**row, **phases(loop, args.steps, args.num_eval)})
    print(f"{describe_machine(machine)}\n")
    columns = [
        ("method", "method"),
        ("trainer_ms", "trainer ms/step"),
        ("bare_ms", "bare ms/step"),
        ("ratio", "trainer / bare"),
        ("loader_ms_per_batch", "loader ms/batch"),
        ("validation_s", f"validation s ({args.num_val} images)"),
        ("evaluation_s_estimate", f"evaluation s ({args.num_eval} images)"),
    ]
    print(markdown_table(rows, columns))
    write_json(args.out, {"args": vars(args), "machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
