"""Why the revised-SI MSUN's same-layer CKA dips in the deep trunk (Figure 2): a few images.

    python figures/outliers.py                     # after make_figures.py has trained the runs

Records every ``blocks`` layer of the 16-px and the 64-px path of runs/figures/msun_si0.1_largest
on the same validation images (each image resized to the path's nominal size, as in routing),
then per layer: the exact linear CKA (debiased, all images at once), the same without the
images whose centred feature norm is in the top ``--drop`` fraction on either path, the RBF CKA
(median bandwidth: far-out images get small kernel values, so they weigh less), and how far the
largest norm is from the median on each path. Writes figures/data/outliers.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ckascope.functional import cka
from ckascope.platform import (
    MultiPathModel,
    PathView,
    build_dataset,
    eval_transform,
    is_multipath,
    load_checkpoint,
    write_json,
)
from ckascope.recorder import ActivationRecorder

HERE = Path(__file__).resolve().parent


def features(model: nn.Module, k: int, images: Tensor) -> dict[str, Tensor]:
    """Flattened ``blocks`` outputs of path ``k``: name -> (n, p) float64."""
    paths = cast(MultiPathModel, model)
    with ActivationRecorder(PathView(model, k), "blocks", reduce="flatten") as rec, torch.no_grad():
        parts = []
        for batch in images.split(64):
            paths.forward_path(batch, k, protocol="upsample")
            parts.append(rec.pop())
    return {name: torch.cat([p[name] for p in parts]).double() for name in parts[0]}


def norm_ratio(x: Tensor) -> Tensor:
    """Per-image centred feature norm over its median: (n, p) -> (n,)."""
    norms = (x - x.mean(0)).norm(dim=1)
    ratio: Tensor = norms / norms.median()
    return ratio


def layer_row(a: Tensor, b: Tensor, drop: float) -> dict[str, Any]:
    """The diagnostics of one layer: a, b (n, p) are the small- and large-scale features."""
    ra, rb = norm_ratio(a), norm_ratio(b)
    keep = (ra < ra.quantile(1 - drop)) & (rb < rb.quantile(1 - drop))
    return {
        "linear": cka(a, b, debiased=True),
        "linear_without_outliers": cka(a[keep], b[keep], debiased=True),
        "images_dropped": int((~keep).sum()),
        "rbf": cka(a, b, kernel="rbf", debiased=True),
        "max_norm_over_median_small": float(ra.max()),
        "max_norm_over_median_large": float(rb.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("runs/figures/msun_si0.1_largest/last.pt")
    )
    parser.add_argument("--image-size", type=int, default=64, help="the run's training size")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--drop", type=float, default=0.02, help="top fraction of norms dropped")
    parser.add_argument("--out", type=Path, default=HERE / "data" / "outliers.json")
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).eval()
    if not is_multipath(model):
        raise SystemExit(f"{args.checkpoint} is not an MSUN checkpoint")
    size = args.image_size
    data = build_dataset(
        "shapes", "val", eval_transform(size), num_images=args.num_images, synthetic_size=size
    )
    images = torch.stack([data[i][0] for i in range(args.num_images)])  # (n, 3, size, size)
    small, large = (
        features(model, 0, images),
        features(model, cast(MultiPathModel, model).num_paths - 1, images),
    )
    rows = {name: layer_row(small[name], large[name], args.drop) for name in small}
    for name, r in rows.items():
        print(
            name,
            " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
        )
    write_json(
        args.out,
        {
            "checkpoint": str(args.checkpoint),
            "num_images": args.num_images,
            "drop": args.drop,
            "layers": rows,
        },
    )


if __name__ == "__main__":
    main()
