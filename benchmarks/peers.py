"""How each tool is run on a ``Workload``, and the float64 reference on the same features.

Each ``prepare_*`` does the untimed set-up (copies of the models, loaders) and returns the
callable that is timed plus a note for the table. The peers are called the way their READMEs
show; deviations are favours to the peer and are written in the notes:

- pytorch-cka 1.1.3 (``import cka``): ``compute_cka(model1, model2, loader, layers=...,
  model2_layers=...)``. Its own forward hooks keep each layer's flattened output; per batch it
  stacks float32 Grams of the raw (uncentred) features and adds the unbiased HSIC1 of all pairs
  (einsum) to float32 sums; CKA = ratio of the sums, clamped to [0, 1] (a zero denominator
  becomes 1e-6). It feeds the same batch to both models, so a cross-scale comparison needs two
  module objects (``peer_models``).
- torch-cka 0.21 (``import torch_cka``): ``CKA(model1, model2, model1_layers=...,
  model2_layers=...).compare(loader, loader)``. Hooks are registered in the constructor and
  never removed; per batch and per layer pair it recomputes both float32 Grams and three HSIC1
  values with n x n x n products and ``.item()`` calls; CKA = ratio of the per-batch means;
  it asserts there is no NaN. It runs its forward passes with autograd on (its README shows no
  ``no_grad``); by default we wrap it in ``torch.no_grad()`` (``--no-torch-cka-no-grad`` runs it
  as documented), which only makes it faster and leaner.
- ckatorch 1.0.3, functional API (its ``CKA`` class keeps only the last batch's value per pair
  and treats a conv output (n, C, H, W) as C examples, so it is not usable here):
  ``cka_batch(x, y)`` takes the features of all k batches stacked (k, n, p), casts them to
  float64, builds the Grams and returns sum HSIC1(K, L) / sqrt(sum HSIC1(K, K) sum HSIC1(L, L)).
  We capture the features with our own hooks and call it for every layer pair ("stacked").
  When the features of all images do not fit in memory (GPU, 5000 images), the same sums are
  accumulated batch by batch with ``ckatorch.hsic1`` ("streamed"). ``cka_base(x, y)`` (biased,
  full-batch, float64) is the row "ckatorch-base".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    MinibatchReference,
    biased_cka_reference,
    gram64,
    measure,
    set_threads,
)
from torch import Tensor
from workloads import Capture, Spec, Workload, build_workload, ckascope_matrix, peer_models

Run = Callable[[], np.ndarray | None]


@dataclass(frozen=True)
class PeerOptions:
    torch_cka_no_grad: bool = True
    ckatorch_mode: str = "auto"  # "auto", "stacked" or "streamed"


@dataclass(frozen=True)
class ToolInfo:
    call: str
    estimator: str
    precision: str
    capture: str


TOOLS: dict[str, ToolInfo] = {
    "bare": ToolInfo(
        "the two forward passes per batch under torch.inference_mode()", "-", "-", "no hooks"
    ),
    "ckascope": ToolInfo(
        "ckascope.compare.compare_scales / compare_models on a dataset of tensors",
        "minibatch HSIC1, ratio of sums",
        "Grams of centred features in float32 (float64 up to 128 features), HSIC in float64",
        "own hooks; Gram made inside the hook",
    ),
    "ckascope-contiguous": ToolInfo(
        "ckascope with memory_format='contiguous' (the model's own layout, float32)",
        "minibatch HSIC1, ratio of sums",
        "as ckascope",
        "as ckascope",
    ),
    "ckascope-bf16": ToolInfo(
        "ckascope with precision='bf16' (forward passes autocast; Grams float32/float64)",
        "minibatch HSIC1, ratio of sums",
        "bf16 features, Grams and sums as ckascope",
        "as ckascope",
    ),
    "pytorch-cka": ToolInfo(
        "cka.compute_cka(model1, model2, loader, layers=..., model2_layers=...)",
        "minibatch HSIC1, ratio of sums",
        "float32 Grams of raw features, float32 sums, clamped to [0, 1]",
        "own hooks (removed on exit); keeps every layer's output of the batch",
    ),
    "torch-cka": ToolInfo(
        "torch_cka.CKA(model1, model2, ...).compare(loader, loader)",
        "minibatch HSIC1, ratio of means",
        "float32 Grams of raw features, per pair n^3 products",
        "own hooks, never removed; keeps every layer's output of the batch",
    ),
    "ckatorch": ToolInfo(
        "ckatorch.cka_batch(x, y) per layer pair (or ckatorch.hsic1 streamed)",
        "minibatch HSIC1, ratio of sums",
        "float64 casts of raw features",
        "given features (our hooks); stacked mode keeps all images' features",
    ),
    "ckatorch-base": ToolInfo(
        "ckatorch.cka_base(x, y) per layer pair on all images",
        "full-batch biased HSIC0",
        "float64",
        "given features (our hooks); keeps all images' features",
    ),
}


# --- capture helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def side_capture(
    work: Workload, reduce: Callable[[Tensor], Tensor]
) -> Iterator[Callable[[Tensor], tuple[list[Tensor], list[Tensor]]]]:
    """Hooks both sides; yields ``run(x) -> (features a, features b)`` for one batch.

    For a cross-scale workload both sides are one network: one set of hooks, two passes.
    """
    cap_a = Capture(work.model_a, work.layers_a, reduce)
    same = work.model_b is work.model_a and work.layers_b == work.layers_a
    cap_b = cap_a if same else Capture(work.model_b, work.layers_b, reduce)
    with cap_a, contextlib.nullcontext() if same else cap_b:
        yield lambda x: (cap_a.run(work.view_a(x)), cap_b.run(work.view_b(x)))


def flat(t: Tensor) -> Tensor:
    return t.flatten(1)


# --- tools --------------------------------------------------------------------------------------


def prepare_bare(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    loader = work.loader()

    def run() -> None:
        with torch.inference_mode():
            for x, _ in loader:
                x = x.to(work.device, non_blocking=True)
                work.model_a(work.view_a(x))
                work.model_b(work.view_b(x))

    return run, "same loader and resizes as the tools"


def prepare_ckascope(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    return (lambda: ckascope_matrix(work)), "public API, default options"


def prepare_ckascope_contiguous(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    run = lambda: ckascope_matrix(work, memory_format="contiguous")  # noqa: E731
    return run, "public API, memory_format='contiguous'"


def prepare_ckascope_bf16(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    return (lambda: ckascope_matrix(work, precision="bf16")), "public API, precision='bf16'"


def prepare_pytorch_cka(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    from cka import compute_cka

    side_a, side_b, names_a, names_b = peer_models(work)
    loader = work.loader()

    def run() -> np.ndarray:
        [matrix] = compute_cka(
            side_a,
            side_b,
            loader,
            layers=names_a,
            model2_layers=names_b,
            device=work.device,
            progress=False,
        )
        out: np.ndarray = matrix.double().cpu().numpy()
        return out

    return run, "model copy per side"


def prepare_torch_cka(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    from torch_cka import CKA

    side_a, side_b, names_a, names_b = peer_models(work)
    loader = work.loader()

    def run() -> np.ndarray:
        grad = torch.no_grad() if opts.torch_cka_no_grad else contextlib.nullcontext()
        with grad, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "identical names", "no second dataloader"
            tool = CKA(
                side_a,
                side_b,
                model1_name="a",
                model2_name="b",
                model1_layers=names_a,
                model2_layers=names_b,
                device=str(work.device),
            )
            tool.compare(loader, loader)
        result = tool.export()
        if result["model1_layers"] != names_a or result["model2_layers"] != names_b:
            raise RuntimeError(f"torch-cka hooked {result['model1_layers']}")
        out: np.ndarray = result["CKA"].double().cpu().numpy()
        return out

    note = "model copy per side; under no_grad" if opts.torch_cka_no_grad else "as documented"
    return run, note


def prepare_ckatorch(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    mode = opts.ckatorch_mode
    if mode == "auto":
        mode = "stacked" if _stack_fits(work) else "streamed"
    if mode == "stacked":
        return (lambda: _ckatorch_stacked(work)), "stacked: cka_batch on all features"
    return (lambda: _ckatorch_streamed(work)), "streamed: hsic1 sums per batch"


def prepare_ckatorch_base(work: Workload, opts: PeerOptions) -> tuple[Run, str]:
    return (lambda: _ckatorch_base(work)), "all features of all images in memory"


PREPARE: dict[str, Callable[[Workload, PeerOptions], tuple[Run, str]]] = {
    "bare": prepare_bare,
    "ckascope": prepare_ckascope,
    "ckascope-contiguous": prepare_ckascope_contiguous,
    "ckascope-bf16": prepare_ckascope_bf16,
    "pytorch-cka": prepare_pytorch_cka,
    "torch-cka": prepare_torch_cka,
    "ckatorch": prepare_ckatorch,
    "ckatorch-base": prepare_ckatorch_base,
}

# --- ckatorch ------------------------------------------------------------------------------------


def _feature_sizes(work: Workload) -> list[int]:
    x = work.dataset[0][0][None].repeat(4, *([1] * work.dataset[0][0].ndim))
    with torch.inference_mode(), side_capture(work, flat) as run:
        fa, fb = run(x.to(work.device))
    return [f.shape[1] for f in fa + fb]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _stack_fits(work: Workload) -> bool:
    """Whether all images' float32 features plus two float64 copies fit in half the memory."""
    sizes = _feature_sizes(work)
    images = sum(len(b) for b in work.plan)
    need = images * (4 * sum(sizes) + 2 * 8 * max(sizes))
    return need < _available_bytes(work.device) // 2


def _ckatorch_stacked(work: Workload) -> np.ndarray:
    from ckatorch import cka_batch

    sizes = {len(b) for b in work.plan}
    if len(sizes) != 1:
        raise ValueError(f"cka_batch needs equal batch sizes, got {sorted(sizes)}")
    k = len(work.plan)
    store_a: list[Tensor] = []
    store_b: list[Tensor] = []
    with torch.inference_mode(), side_capture(work, flat) as run:
        for b, (x, _) in enumerate(work.loader()):
            fa, fb = run(x.to(work.device, non_blocking=True))
            for store, feats in ((store_a, fa), (store_b, fb)):
                if not store:
                    store.extend(
                        torch.empty(k, *f.shape, dtype=f.dtype, device=f.device) for f in feats
                    )
                for s, f in zip(store, feats, strict=True):
                    s[b].copy_(f)
        out = np.empty((len(store_a), len(store_b)))
        for i, xa in enumerate(store_a):
            for j, xb in enumerate(store_b):
                out[i, j] = cka_batch(xa, xb).item()
    return out


def _ckatorch_streamed(work: Workload) -> np.ndarray:
    from ckatorch import hsic1

    la, lb, f64 = len(work.layers_a), len(work.layers_b), torch.float64
    cross = torch.zeros(la, lb, dtype=f64, device=work.device)
    self_a = torch.zeros(la, dtype=f64, device=work.device)
    self_b = torch.zeros(lb, dtype=f64, device=work.device)
    with torch.inference_mode(), side_capture(work, flat) as run:
        for x, _ in work.loader():
            fa, fb = run(x.to(work.device, non_blocking=True))
            ga = [_bmm_gram(f) for f in fa]
            gb = [_bmm_gram(f) for f in fb]
            cross += torch.stack([torch.cat([hsic1(a, b) for b in gb]) for a in ga])
            self_a += torch.cat([hsic1(a, a) for a in ga])
            self_b += torch.cat([hsic1(b, b) for b in gb])
    out: np.ndarray = (cross / torch.sqrt(torch.outer(self_a, self_b))).cpu().numpy()
    return out


def _bmm_gram(f: Tensor) -> Tensor:
    """The Gram exactly as ``cka_batch`` builds it: float64 cast, ``bmm``, batch dim 1."""
    x = f.to(torch.float64)[None]
    return torch.bmm(x, x.transpose(1, 2))


def _ckatorch_base(work: Workload) -> np.ndarray:
    from ckatorch import cka_base

    parts_a: list[list[Tensor]] = [[] for _ in work.layers_a]
    parts_b: list[list[Tensor]] = [[] for _ in work.layers_b]
    with torch.inference_mode(), side_capture(work, flat) as run:
        for x, _ in work.loader():
            fa, fb = run(x.to(work.device, non_blocking=True))
            for parts, feats in ((parts_a, fa), (parts_b, fb)):
                for p, f in zip(parts, feats, strict=True):
                    p.append(f.clone())
        xs_a = [torch.cat(p) for p in parts_a]
        xs_b = [torch.cat(p) for p in parts_b]
        del parts_a, parts_b
        return np.array([[cka_base(xa, xb).item() for xb in xs_b] for xa in xs_a])


# --- jobs run in fresh processes ------------------------------------------------------------


def tool_job(
    tool: str, spec: Spec, threads: int | None, repeats: int, opts: PeerOptions
) -> dict[str, Any]:
    """Warm-up on the first batch, then ``repeats`` timed runs of ``tool`` on the workload."""
    used = set_threads(threads)
    work = build_workload(spec)
    notes: list[str] = []

    def prepare() -> Run:
        run, note = PREPARE[tool](work, opts)
        notes[:] = [note]
        return run

    def warmup() -> None:
        PREPARE[tool](work.first_batch(), opts)[0]()

    measurement, matrix = measure(prepare, work.device, repeats, warmup)
    row: dict[str, Any] = {"tool": tool, "threads": used, **measurement.as_row()}
    row["notes"] = "; ".join(notes)
    if matrix is not None:
        row["matrix"] = np.asarray(matrix, dtype=np.float64)
    return row


def reference_job(spec: Spec, threads: int | None, biased: bool) -> dict[str, Any]:
    """The float64 references on the features the tools see (same model, images, batches).

    Minibatch HSIC1 always; the biased full-batch HSIC0 when ``biased`` (keeps all features).
    """
    set_threads(threads)
    work = build_workload(spec)
    minibatch = MinibatchReference()
    keep_a: list[list[Tensor]] = [[] for _ in work.layers_a]
    keep_b: list[list[Tensor]] = [[] for _ in work.layers_b]
    with torch.inference_mode(), side_capture(work, lambda t: t.flatten(1).clone()) as run:
        for x, _ in work.loader():
            fa, fb = run(x.to(work.device))
            minibatch.update(
                torch.stack([gram64(f) for f in fa]), torch.stack([gram64(f) for f in fb])
            )
            if biased:
                for keep, feats in ((keep_a, fa), (keep_b, fb)):
                    for k, f in zip(keep, feats, strict=True):
                        k.append(f)
    out: dict[str, Any] = {"minibatch_hsic1": minibatch.compute(), "batches": minibatch.batches}
    if biased:
        grams_a = torch.stack([gram64(torch.cat(k)) for k in keep_a])
        grams_b = torch.stack([gram64(torch.cat(k)) for k in keep_b])
        out["biased_hsic0"] = biased_cka_reference(grams_a, grams_b)
    out["layers_a"], out["layers_b"] = work.layers_a, work.layers_b
    return out
