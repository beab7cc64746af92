"""Why every batch's features are centred by their own mean before their float32 Gram.

Both HSIC estimators are invariant to a shift of the features, so a Gram of x_i - c for any
c gives the same HSIC terms in exact arithmetic, and subtracting a c known in advance (say the
mean an earlier batch had) saves the pass that computes this batch's mean: 11 % of resnet18's
Gram time at 224 px on the 2-core VM (tried at ce7ba31, reverted in 43be5f7). In float32 it
costs digits on some layers (up to 77x on resnet18's maxpool), far more than the distance of c
from the mean suggests, while others come out slightly better. This script measures the
relative error of HSIC1(K, K) against float64, per layer, for float32 Grams of one batch's
features centred by their own mean, shifted by the previous batch's mean, and not centred:

    python benchmarks/bench_centring_error.py --out benchmarks/results/centring-error.json

resnet18 (random weights, seed 0), ``blocks`` layers at 224 px, two batches of 128 synthetic
images (the bench_compare workload's images); each float32 Gram is summed over 4 MiB column
chunks as ckascope's hooks sum it (whole products here, not packed ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import machine_info, markdown_table, set_threads, write_json
from workloads import render_pool

from ckascope.kernels import centre_width
from ckascope.layers import resolve_layers
from ckascope.platform import build_model
from tests import reference as ref  # on the path through common


def batch_features(count: int, batch: int) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """Each ``blocks`` layer's flattened output (batch, p), float32, for two batches."""
    model = build_model("resnet18", "none", seed=0).eval()
    names = resolve_layers(model, "blocks")
    images, out = render_pool(count, 224), []
    feats: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: feats.__setitem__(n, o.detach().flatten(1).clone())
        )
        for n in names
    ]
    try:
        with torch.inference_mode():
            for start in range(0, count, batch):
                model(images[start : start + batch])
                out.append(dict(feats))
    finally:
        for h in hooks:
            h.remove()
    return names, out


def hsic_error(x: torch.Tensor, shift: torch.Tensor | None, exact: float) -> float:
    """|HSIC1(K, K) - exact| / exact for the float32 Gram of x - shift (None: x itself).

    The Gram is summed over column chunks the way ckascope's hooks take it on a CPU
    (``kernels.centre_width``: 4 MiB of features at a time), as whole products.
    """
    n, p = x.shape
    width = centre_width(n, p, torch.float32, x.device)
    gram = torch.zeros(n, n)
    for start in range(0, p, width):
        chunk = x[:, start : start + width]
        if shift is not None:
            chunk = chunk - shift[start : start + width]
        gram.addmm_(chunk, chunk.T)
    k = gram.double().numpy()
    return abs(ref.hsic1(k, k) - exact) / exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "centring-error.json"
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    names, (first, second) = batch_features(256, 128)
    rows = []
    for name in names:
        x = second[name]
        centred64 = x.double() - x.double().mean(0)
        exact_gram = (centred64 @ centred64.T).numpy()
        exact = ref.hsic1(exact_gram, exact_gram)
        earlier = first[name].mean(0)
        rows.append(
            {
                "layer": name,
                "features": x.shape[1],
                "own mean": hsic_error(x, x.mean(0), exact),
                "previous batch's mean": hsic_error(x, earlier, exact),
                "not centred": hsic_error(x, None, exact),
            }
        )
    print(markdown_table(rows))
    write_json(args.out, {"machine": machine_info(threads), "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
