from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ckascope.shapes import (
    CLASSES,
    TEXTURES,
    SyntheticShapes,
    _grid,
    _shape_mask,
    _texture,
    sample_params,
)


def _anisotropy(g: torch.Tensor) -> float:
    """Coherence of the gradient structure tensor: 1 for one orientation, 0 for isotropic."""
    gx, gy = g[1:-1, 2:] - g[1:-1, :-2], g[2:, 1:-1] - g[:-2, 1:-1]
    a, b, c = (gx * gx).sum(), (gx * gy).sum(), (gy * gy).sum()
    return float(torch.sqrt((a - c) ** 2 + 4 * b * b) / (a + c))


def _best_threshold_accuracy(pos: np.ndarray, neg: np.ndarray) -> float:
    cuts = np.concatenate([pos, neg])
    return max(((pos > t).mean() + (neg <= t).mean()) / 2 for t in cuts)


def test_deterministic_disjoint_splits_and_all_classes() -> None:
    val = SyntheticShapes("val", 60, seed=3)
    again = SyntheticShapes("val", 60, seed=3)
    train = SyntheticShapes("train", 60, seed=3)
    image, label = val[5]
    assert image.dtype == torch.uint8
    assert image.shape == (3, 224, 224)
    assert torch.equal(image, again[5][0])
    assert label == again[5][1]
    assert not torch.equal(image, train[5][0])
    assert not torch.equal(image, SyntheticShapes("val", 60, seed=4)[5][0])
    assert {val[i][1] for i in range(60)} == set(range(len(CLASSES)))
    assert len(CLASSES) >= 10


def test_texture_kind_is_visible_at_224_and_destroyed_at_32() -> None:
    x, y = _grid(224)
    scores: dict[str, dict[int, list[float]]] = {t: {224: [], 32: []} for t in TEXTURES}
    for i in range(40):
        params = sample_params(0, "val", i)
        for texture in TEXTURES:
            t = _texture(texture, x, y, params).float()
            small = F.interpolate(t[None, None], size=32, mode="bilinear", align_corners=False)[
                0, 0
            ]
            scores[texture][224].append(_anisotropy(t))
            scores[texture][32].append(_anisotropy(small))
    dashes, speckles = scores["dashes"], scores["speckles"]
    assert _best_threshold_accuracy(np.array(dashes[224]), np.array(speckles[224])) > 0.98
    assert _best_threshold_accuracy(np.array(dashes[32]), np.array(speckles[32])) < 0.7


def test_outer_shape_survives_32px() -> None:
    x, y = _grid(224)
    for i in range(20):
        p = sample_params(0, "val", i)
        ca, sa = math.cos(p.angle), math.sin(p.angle)
        dx, dy = x - p.center[0] * 224, y - p.center[1] * 224
        u, v = (ca * dx + sa * dy) / (p.radius * 224), (-sa * dx + ca * dy) / (p.radius * 224)
        mask = _shape_mask(CLASSES[p.label].split("-")[0], u, v).float()[None, None]
        small = F.interpolate(mask, size=32, mode="bilinear", align_corners=False)
        back = F.interpolate(small, size=224, mode="bilinear", align_corners=False) > 0.5
        iou = (back & (mask > 0.5)).sum() / (back | (mask > 0.5)).sum()
        assert iou > 0.85, (CLASSES[p.label], float(iou))
