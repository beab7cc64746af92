"""Shared benchmark helpers: isolation, timing, peak memory, machine info, output files, and an
independent float64 CKA reference.

Isolation: every measured configuration runs in a fresh interpreter (``run_isolated``, a spawned
process), so no tool profits from another's warm caches, allocator pools or oneDNN kernels, and
each process's peak memory is its own.

Peak memory (CPU): the kernel's high-water mark of resident memory, VmHWM in /proc/self/status.
Writing "5" to /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0), so the peak is
that of the timed region alone, not of the setup or warm-up before it. The baseline (VmRSS just
before the region: interpreter, torch, the models, the pre-rendered images) is reported next to
it. Where clear_refs is not writable the fallback is ``ru_maxrss``, the process-lifetime peak,
and the method is recorded with every row. CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``.

The reference shares no code with ckascope (only the output files are written with
ckascope.fileio's atomic writes): per batch and layer, float64 Grams of the column-centred
features (on the workload's device), then the tests' NumPy reference (tests/reference.py, the
one float64 reference of the project): the Song et al. (2012) formula for HSIC1 and the ratio
of means of minibatch CKA (Nguyen, Raghu, Kornblith 2021), or HSIC0 with the explicit centring
matrix for the biased full-batch estimator; formulas as in docs/cka.md.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ckascope.platform import write_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's tests package: its float64 reference
from tests import reference as ref  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
PEER_PACKAGES = ("ckascope", "pytorch-cka", "torch-cka", "ckatorch")

T = TypeVar("T")


# --- threads, machine, versions ------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (affinity), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads explicitly (None: every available core) and returns it."""
    count = threads or available_cores()
    torch.set_num_threads(count)
    return count


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: hardware, thread count and library versions."""
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": threads,
        "mem_total_gib": _mem_total_gib(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "memory_method": MemoryProbe.method(),
        "load_average_1m": load_average(),
        **{package: _version(package) for package in PEER_PACKAGES},
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One markdown line about the machine."""
    gpu = f", GPU {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else ", no GPU"
    libs = ", ".join(f"{p} {info[p]}" for p in PEER_PACKAGES)
    text = (
        f"{info['cpu']}, {info['available_cores']} cores available, {info['torch_threads']} torch "
        f"threads, {info['mem_total_gib']} GiB{gpu}; torch {info['torch']}, torchvision "
        f"{info['torchvision']}, {libs}; peak memory: {info['memory_method']}; "
        f"load average {info['load_average_1m']}"
    )
    load = info["load_average_1m"]
    if load is not None and load > 0.5 * info["available_cores"]:
        text += " (WARNING: the machine is busy; timings will not be representative)"
    return text


# --- isolation ---------------------------------------------------------------------------------


def run_isolated(fn: Callable[..., T], *args: Any) -> T:
    """Runs ``fn(*args)`` in a fresh spawned interpreter and returns its (picklable) result.

    ``fn`` must be importable by name (defined at module level). An exception in the child is
    raised here; a child killed by the kernel (out of memory) raises ``BrokenProcessPool``.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def run_isolated_row(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``run_isolated`` for a job returning a row: failures become ``{"error": ...}`` rows.

    A peer that raises (NaN assertion, out of memory) is a result to report, not a crash.
    """
    try:
        return run_isolated(fn, *args)
    except BrokenProcessPool:
        return {"error": "process died (killed by the kernel, probably out of memory)"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}".strip()[:300]}


# --- memory -------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class MemoryProbe:
    """Peak memory of one region of code: host RSS and, on CUDA, allocated device memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = False
        self.baseline_kib = 0
        self.cuda_baseline = 0

    @staticmethod
    def method() -> str:
        if _reset_hwm():
            return "VmHWM reset via /proc/self/clear_refs (peak of the timed region)"
        return "ru_maxrss (process-lifetime peak; clear_refs not writable)"

    def start(self) -> None:
        gc.collect()
        self.exact = _reset_hwm()
        self.baseline_kib = _status_kib("VmRSS") or 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)

    def stop(self) -> dict[str, float | None]:
        if self.exact:
            peak_kib = _status_kib("VmHWM") or 0
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out: dict[str, float | None] = {
            "peak_rss_mib": peak_kib / 1024,
            "baseline_rss_mib": self.baseline_kib / 1024,
            "extra_rss_mib": (peak_kib - self.baseline_kib) / 1024,
            "cuda_peak_mib": None,
            "cuda_extra_mib": None,
        }
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_mib"] = peak / MIB
            out["cuda_extra_mib"] = (peak - self.cuda_baseline) / MIB
        return out


# --- timing -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Wall times of the repeats and the peak memory of the worst one."""

    seconds: list[float]
    memory: dict[str, float | None]
    load_before: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_row(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "median_s": self.median,
            "load_before": self.load_before,
            **self.memory,
        }


def load_average() -> float | None:
    """The 1-minute load average: above ~0.5 x cores, other processes are skewing the times."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def measure(
    prepare: Callable[[], Callable[[], T]],
    device: torch.device,
    repeats: int,
    warmup: Callable[[], object] | None = None,
) -> tuple[Measurement, T]:
    """Times ``prepare()()`` ``repeats`` times; ``prepare`` (copies, set-up) is not timed.

    Args:
        prepare: Returns the callable to time; called before every repeat, outside the clock.
        device: Synchronised before and after the clock on CUDA.
        repeats: Timed runs; the median is reported.
        warmup: Run once first (e.g. one batch), so one-off costs (oneDNN/cuDNN kernel
            selection, allocator growth, lazy imports) are not in the timed runs.

    Returns:
        The measurement (memory: the largest peak over the repeats) and the last run's result.
    """
    if warmup is not None:
        warmup()
        synchronize(device)
    load = load_average()
    seconds: list[float] = []
    worst: dict[str, float | None] = {}
    result: T | None = None
    for _ in range(repeats):
        run = prepare()
        probe = MemoryProbe(device)
        probe.start()
        start = time.perf_counter()
        result = run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        memory = probe.stop()
        if not worst or (memory["extra_rss_mib"] or 0) > (worst["extra_rss_mib"] or 0):
            worst = memory
        del run
    return Measurement(seconds, worst, load), result  # type: ignore[return-value]


def median_time(
    fn: Callable[[], object], repeats: int, device: torch.device | None = None
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (``measure``)."""
    return measure(lambda: fn, device or torch.device("cpu"), repeats, warmup=fn)[0].median


# --- independent float64 reference ------------------------------------------------------------


def gram64(features: Tensor) -> Tensor:
    """Linear Gram (n, n) in float64 of the column-centred, flattened features (n, ...).

    Centring changes neither HSIC estimator (HSIC1 ignores a constant row shift, HSIC0 centres
    anyway) and keeps the float64 product exact for features whose spread is small next to
    their mean.
    """
    x = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def _numpy(grams: Tensor) -> np.ndarray:
    return grams.detach().to("cpu", torch.float64).numpy()


class MinibatchReference:
    """Minibatch CKA with the published weighting: every batch counts once.

    CKA_ij = sum_b HSIC1(K_ib, L_jb) / sqrt(sum_b HSIC1(K_ib, K_ib) · sum_b HSIC1(L_jb, L_jb)).
    """

    def __init__(self) -> None:
        self.cross: np.ndarray | None = None
        self.self_a: np.ndarray | None = None
        self.self_b: np.ndarray | None = None
        self.batches = 0

    def update(self, grams_a: Tensor, grams_b: Tensor) -> None:
        """Adds one batch: (La, n, n) and (Lb, n, n) float64 Grams of the same n examples."""
        ka, kb = _numpy(grams_a), _numpy(grams_b)
        cross = ref.hsic1_pairs(ka, kb)
        self_a = ref.hsic1_pairs(ka, ka).diagonal().copy()
        self_b = ref.hsic1_pairs(kb, kb).diagonal().copy()
        if self.cross is None or self.self_a is None or self.self_b is None:
            self.cross, self.self_a, self.self_b = cross, self_a, self_b
        else:
            self.cross += cross
            self.self_a += self_a
            self.self_b += self_b
        self.batches += 1

    def compute(self) -> np.ndarray:
        if self.cross is None or self.self_a is None or self.self_b is None:
            raise ValueError("no batch was added")
        return ref.cka_ratio(self.cross, self.self_a, self.self_b)


def biased_cka_reference(grams_a: Tensor, grams_b: Tensor) -> np.ndarray:
    """Full-batch biased CKA (HSIC0) from float64 Grams over all N examples."""
    ka, kb = _numpy(grams_a), _numpy(grams_b)
    cross = ref.hsic0_pairs(ka, kb)
    return ref.cka_ratio(
        cross, ref.hsic0_pairs(ka, ka).diagonal(), ref.hsic0_pairs(kb, kb).diagonal()
    )


def matrix_error(matrix: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Max |matrix - reference| over cells both finite, and the cells only one side has finite."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != reference.shape:
        return {"max_abs_err": None, "nan_cells": None, "shape_mismatch": list(matrix.shape)}
    both = np.isfinite(matrix) & np.isfinite(reference)
    diff = np.abs(matrix - reference)[both]
    return {
        "max_abs_err": float(diff.max()) if diff.size else None,
        "nan_cells": int((np.isfinite(matrix) != np.isfinite(reference)).sum()),
    }


# --- output -------------------------------------------------------------------------------------


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] | None = None
) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs (default: every key)."""
    if columns is None:
        columns = [(key, key) for key in rows[0]]
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, float) and value != value:
        return None  # JSON has no NaN
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as JSON (NaN as null), atomically (ckascope's own file writing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(_jsonable(payload), indent=1) + "\n")
