"""Validates the CUDA paths on one GPU in a few minutes; run it whenever a GPU is lent.

    PYTHONPATH=. python benchmarks/gpu_check.py                 # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu    # dry run of the script itself

Each check runs in its own subprocess (TF32 settings, process groups and CUDA state cannot leak
from one to the next) and reports pass / FAIL / skipped with its numbers; the JSON with the
hardware named goes to benchmarks/results/gpu_check.json. Checks:

1. the ``cuda``-marked tests (``pytest -m cuda``);
2. CKA on the GPU against a float64 CPU reference (the same model in float64), with TF32 forced
   on globally, once through the fp32_precision API and once through the legacy allow_tf32
   flags (each in its own process: mixing them raises on torch >= 2.9);
3. bfloat16 and float16 models measured on the GPU, close to the float32 model;
4. host-device syncs of a CKA sweep, counted with ``torch.cuda.set_sync_debug_mode``: the same
   for 1 and 4 batches;
5. tiny ``msun train`` runs with ``--amp fp16`` (GradScaler) and with ``--compile``;
6. resume across devices: an epoch on the GPU, the next on the CPU, and the other way round;
7. NCCL with world size 1: ``all_reduce_sum`` and the rank-0 broadcast of the RBF bandwidth;
8. ``msun eval`` on the GPU equals ``msun eval`` on the CPU (same checkpoint, same images).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet18", "--image-size", "32", "--scales", "16", "32", "--batch-size", "8"]
TINY += ["--num-train", "32", "--num-val", "16", "--eval-sizes", "16,32", "--lr", "0.05"]


# ----------------------------------------------------------------------------- the checks
# Each returns a dict of numbers and "ok"; it runs in a child process (see ``_child``).


def check_tests(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    done = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], timeout=240)
    return {"ok": done.returncode == 0, "tail": done.stdout.strip().splitlines()[-1:]}


def check_cka_tf32(device: str, api: str) -> dict[str, Any]:
    import torch

    from ckascope import models
    from ckascope.platform import compare_scales

    if device == "cuda" and api == "new":
        setattr(torch.backends, "fp32_precision", "tf32")  # noqa: B010 (a user's global TF32)
    elif device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kwargs: dict[str, Any] = {
        "num_images": 256,
        "batch_size": 64,
        "image_size": 64,
        "layers": "blocks",
    }
    model = models.build_model("resnet18", "none", num_classes=10)
    reference = compare_scales(model.double(), None, (16, 64), **kwargs)  # float64 on the CPU
    model = models.build_model("resnet18", "none", num_classes=10)
    result = compare_scales(model, None, (16, 64), device=device, **kwargs)
    error = float(abs(result.matrix - reference.matrix).max())
    return {"ok": error < 1e-5, "max_abs_error": error, "tf32_setting": result.settings["tf32"]}


def check_half_models(device: str) -> dict[str, Any]:
    import torch

    from ckascope import models
    from ckascope.platform import compare_scales

    kwargs: dict[str, Any] = {
        "num_images": 128,
        "batch_size": 64,
        "image_size": 64,
        "device": device,
    }
    full = compare_scales(models.build_model("resnet18", "none"), None, (16, 64), **kwargs)
    out: dict[str, Any] = {"ok": True}
    for dtype in (torch.bfloat16, torch.float16):
        model = models.build_model("resnet18", "none").to(dtype)
        error = float(
            abs(compare_scales(model, None, (16, 64), **kwargs).matrix - full.matrix).max()
        )
        out[str(dtype)] = error
        out["ok"] &= error < 0.05
    return out


def check_syncs(device: str) -> dict[str, Any]:
    import warnings

    import torch

    from ckascope import models
    from ckascope.platform import compare_scales

    if device != "cuda":
        return {"skipped": "needs CUDA (tests/test_syncs.py counts them on the CPU)"}
    model = models.build_model("resnet18", "none", num_classes=10).cuda()
    counts = []
    for images in (64, 256):  # 1 and 4 batches
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            compare_scales(model, None, (16, 64), num_images=images, batch_size=64, image_size=64)
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return {"ok": counts[0] == counts[1], "syncs_1_vs_4_batches": counts}


def check_train(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    out: dict[str, Any] = {"ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("fp16", ["--amp", "fp16"]), ("compile", ["--compile"])):
            cmd = _msun("train", *TINY, "--epochs", "1", "--device", "cuda", *extra)
            done = _run([*cmd, "--out", f"{tmp}/{name}"], timeout=300)
            out[name] = done.returncode == 0
            out["ok"] &= done.returncode == 0
    return out


def check_resume(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    out: dict[str, Any] = {"ok": True}
    with tempfile.TemporaryDirectory() as tmp:
        for first, second in (("cuda", "cpu"), ("cpu", "cuda")):
            run = Path(tmp) / f"{first}-{second}"
            base = [*TINY, "--amp", "none", "--epochs", "2", "--out", str(run)]
            killed = _killed_after_one_epoch(_msun("train", *base, "--device", first), run)
            one_epoch = len((run / "metrics.jsonl").read_text().splitlines()) == 1
            two = _run(_msun("train", *base, "--device", second, "--resume"), timeout=300)
            rows = (run / "metrics.jsonl").read_text().splitlines() if two.returncode == 0 else []
            ok = killed and one_epoch and len(rows) == 2  # the second epoch ran on the other
            out[f"{first}->{second}"] = ok or two.stderr.strip().splitlines()[-1:]
            out["ok"] &= ok
    return out


def _killed_after_one_epoch(cmd: list[str], run: Path) -> bool:
    """Starts a 2-epoch run and kills it once its first epoch is logged; whether it was killed
    (a run that finished both epochs first would make the resume test nothing)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() and proc.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    finished = proc.poll() is not None
    proc.kill()
    proc.wait()
    return not finished


def check_nccl(device: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from ckascope.distributed import all_reduce_sum
    from ckascope.metric import _from_rank_zero

    if device != "cuda":
        return {"skipped": "needs CUDA"}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        total = all_reduce_sum(2.5, torch.device("cuda", 0))
        sent = _from_rank_zero(torch.tensor([1.5, 2.0], dtype=torch.float64, device="cuda"))
        return {"ok": total == 2.5 and sent.tolist() == [1.5, 2.0], "sum": total}
    finally:
        dist.destroy_process_group()


def check_eval(device: str) -> dict[str, Any]:
    import torch

    from msun import build_msun, save_checkpoint

    if device != "cuda":
        return {"skipped": "needs CUDA"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(build_msun("resnet18", scales=(16, 32), num_classes=10), f"{tmp}/m.pt")
        summaries = []
        for where in ("cuda", "cpu"):
            args = ["eval", f"{tmp}/m.pt", "--image-size", "32", "--num-val", "64"]
            done = _run(_msun(*args, "--device", where, "--out", f"{tmp}/{where}"), timeout=300)
            if done.returncode != 0:
                return {"ok": False, where: done.stderr.strip().splitlines()[-1:]}
            summaries.append(json.loads(Path(f"{tmp}/{where}/eval.json").read_text())[0])
    gap = max(abs(a - b) for a, b in zip(summaries[0]["top1"], summaries[1]["top1"], strict=True))
    return {"ok": gap <= 100 / 64 + 1e-9, "max_top1_gap_points": gap}  # at most one image


CHECKS: dict[str, tuple[Callable[..., dict[str, Any]], tuple[str, ...]]] = {
    "cuda tests": (check_tests, ()),
    "CKA vs float64, TF32 on (fp32_precision API)": (check_cka_tf32, ("new",)),
    "CKA vs float64, TF32 on (allow_tf32 flags)": (check_cka_tf32, ("legacy",)),
    "bf16/fp16 models": (check_half_models, ()),
    "syncs per CKA batch": (check_syncs, ()),
    "fp16 GradScaler and --compile trains": (check_train, ()),
    "resume GPU<->CPU": (check_resume, ()),
    "NCCL world size 1": (check_nccl, ()),
    "msun eval GPU vs CPU": (check_eval, ()),
}


# ----------------------------------------------------------------------------- plumbing


def _msun(*args: str) -> list[str]:
    return [sys.executable, "-m", "msun", *args]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _child(name: str, device: str) -> None:
    """Runs one check in this (fresh) process and prints its JSON on the last line."""
    check, extra = CHECKS[name]
    print(json.dumps(check(device, *extra)))


def run_check(name: str, device: str) -> dict[str, Any]:
    """One check in a fresh interpreter, with its time; a crash is a failure, not an abort."""
    start = time.perf_counter()
    try:
        done = _run([sys.executable, __file__, "--child", name, "--device", device], timeout=400)
        lines = done.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if done.returncode == 0 and lines else {"ok": False}
        if done.returncode != 0:
            row["error"] = done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        row = {"ok": False, "error": "timed out after 400 s"}
    return {"check": name, **row, "seconds": round(time.perf_counter() - start, 1)}


def hardware(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(0), cuda=str(torch.version.cuda))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.device)
        return
    rows = []
    for name in CHECKS:
        rows.append(run_check(name, args.device))
        status = "skipped" if "skipped" in rows[-1] else "pass" if rows[-1]["ok"] else "FAIL"
        print(
            f"{status:7} {name}: {json.dumps({k: v for k, v in rows[-1].items() if k not in ('check', 'ok')})}",
            flush=True,
        )
    payload = {"hardware": hardware(args.device), "checks": rows}
    if args.device == "cuda":  # a CPU dry run checks the script, not the GPU: nothing is kept
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    failed = [r["check"] for r in rows if r.get("ok") is False]
    skipped = sum("skipped" in r for r in rows)
    print(f"{len(rows) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
