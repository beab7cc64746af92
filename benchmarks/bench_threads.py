"""How OpenMP's waiting policy shapes a training step on a small machine, quiet and shared.

    python benchmarks/bench_threads.py --rounds 3       # writes results/threads.json

torch's CPU kernels run on an OpenMP team (libgomp in the PyPI wheels). Between parallel
regions its threads spin for a while before they sleep; on a machine with as many cores as
threads, when another process takes a core, a spinning thread holds the core its teammate
needs and every barrier waits for the scheduler: a step can take several times as long. The
policy is read once, when the library loads, from the environment, so each setting runs in a
fresh process:

- ``default``: libgomp's own spinning;
- ``GOMP_SPINCOUNT=1000``: spin briefly, then sleep (what ``msun`` and ``ckascope`` set unless
  the environment already sets a policy);
- ``OMP_WAIT_POLICY=PASSIVE``: sleep at once;
- ``1 thread``: no team at all.

Each process times a bare ResNet-18 training step (the Fashion-MNIST study's: batch 64 of
28-px images, forward, backward, SGD step), first with the machine to itself, then with a
second process keeping one core busy (a pure-Python loop, like a test run or another tool).
Rounds rotate the order of the settings; medians of ms per step are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import describe_machine, machine_info, markdown_table, write_json

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
POLICY_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")

STEP = """
import json, sys, time, torch, torchvision
model = torchvision.models.resnet18(num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
x, y = torch.randn(64, 3, 28, 28), torch.randint(0, 10, (64,))
def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
for _ in range(5):
    step()
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(json.dumps((time.perf_counter() - start) / int(sys.argv[1]) * 1000))
"""


def timed(setting: str, steps: int) -> float:
    """ms per step in a fresh process run with ``setting``'s environment."""
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(steps)],
        env={**env, **SETTINGS[setting]},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(done.stdout))


def busy() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def rounds(count: int, steps: int, shared: bool) -> dict[str, list[float]]:
    names = list(SETTINGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    hog = busy() if shared else None
    try:
        time.sleep(1.0 if shared else 0.0)
        for r in range(count):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(timed(name, steps))
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "threads.json"
    )
    args = parser.parse_args()
    machine = machine_info(os.cpu_count() or 1)
    quiet = rounds(args.rounds, args.steps, shared=False)
    shared = rounds(args.rounds, args.steps, shared=True)
    base = statistics.median(quiet["default"])
    rows: list[dict[str, Any]] = [
        {
            "setting": name,
            "quiet_ms": statistics.median(quiet[name]),
            "quiet_vs_default": statistics.median(quiet[name]) / base,
            "one_core_busy_ms": statistics.median(shared[name]),
            "busy_vs_quiet_default": statistics.median(shared[name]) / base,
        }
        for name in SETTINGS
    ]
    print(f"{describe_machine(machine)}\n\n{markdown_table(rows)}")
    write_json(
        args.out,
        {"args": vars(args), "machine": machine, "quiet": quiet, "shared": shared, "rows": rows},
    )


if __name__ == "__main__":
    main()
