"""The built-in synthetic image set: procedurally drawn objects whose class needs fine detail.

Ten classes = five outer shapes (disk, square, triangle, cross, star) x two fine random textures
with a grain of 2-3 px at 224 px: "dashes" (random cells 2-3 px wide and 6-9 px long, all of one
orientation) and "speckles" (random square 2-3 px cells, isotropic). Both textures are random,
not periodic, so downscaling to 32 px (7-px sampling, with or without antialiasing) leaves
nearly uncorrelated samples of the same 50/50 colour mix and no trace of the texture's kind,
while the outer shape survives: at 32 px at most the shape half of the label is recoverable, at
224 px all of it (tests/ckascope/test_shapes.py measures both). That makes input scale matter the
way it does for ImageNet objects, with no files to download: every image is drawn on the fly
(about 3 ms at 224 px), deterministically from (seed, split, index), with random position, size,
rotation, colours, background gradient and noise.

The canvas defaults to 224 px. A smaller canvas (``size``) scales the geometry but keeps the
texture's pixel size, so a fast CPU experiment at 96 px keeps the same structure: texture gone
at about 1/7 of the canvas, shapes still there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "cross", "star")
TEXTURES = ("dashes", "speckles")
CLASSES = tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)
SPLITS = {"train": 0, "val": 1}
RENDER_SIZE = 224


@dataclass(frozen=True)
class ShapeParams:
    """Everything random about one image: geometry in canvas fractions, texture in pixels."""

    label: int
    center: tuple[float, float]  # fractions of the canvas side
    radius: float  # fraction of the canvas side
    angle: float
    texture_angle: float
    grain: float
    dash: float
    colors: np.ndarray  # (4, 3): background start, two texture colours, background end
    noise_seed: int


def sample_params(seed: int, split: str, index: int) -> ShapeParams:
    """Draws the parameters of image ``index`` of ``split`` from a seeded generator."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    label = int(rng.integers(len(CLASSES)))
    radius = float(rng.uniform(0.22, 0.38))
    margin = 0.8 * radius
    center = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    colors = _contrasting_colors(rng)
    return ShapeParams(
        label=label,
        center=center,
        radius=radius,
        angle=float(rng.uniform(0, 2 * math.pi)),
        texture_angle=float(rng.uniform(0, math.pi)),
        grain=float(rng.uniform(2.0, 3.0)),
        dash=float(rng.uniform(6.0, 9.0)),
        colors=colors,
        noise_seed=int(rng.integers(2**31)),
    )


def _contrasting_colors(rng: np.random.Generator) -> np.ndarray:
    """Four RGB colours in [0, 1]: background start/end, and two texture colours far apart."""
    while True:
        c = rng.uniform(0, 1, size=(4, 3))
        if (
            np.abs(c[1] - c[2]).sum() > 0.9
            and np.abs(c[1:3].mean(0) - c[[0, 3]].mean(0)).sum() > 0.3
        ):
            return c


def _shape_mask(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test in shape-local coordinates (unit radius)."""
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.8
    if shape == "triangle":  # equilateral, inradius 0.5, three half-planes
        normals = [
            (math.cos(a), math.sin(a))
            for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        ]
        return torch.stack([u * nx + v * ny for nx, ny in normals]).amax(0) <= 0.5
    if shape == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.9)) | ((v.abs() <= 0.3) & (u.abs() <= 0.9))
    radius = torch.sqrt(u * u + v * v)  # star: five points
    return radius <= 0.6 + 0.35 * torch.cos(5 * torch.atan2(v, u))


def _texture(texture: str, x: Tensor, y: Tensor, params: ShapeParams) -> Tensor:
    """Random binary texture on cells of a frame rotated by ``texture_angle``.

    Cells are ``grain`` px across; along the texture's orientation they are ``dash`` px long for
    dashes and ``grain`` px for speckles. Each cell draws one random bit.
    """
    ct, st = math.cos(params.texture_angle), math.sin(params.texture_angle)
    length = params.dash if texture == "dashes" else params.grain
    cells = 2 * math.ceil(float(x.max()) * 1.5 / params.grain)  # covers the rotated canvas
    iu = torch.floor((ct * x + st * y) / params.grain).long() + cells // 2
    iv = torch.floor((-st * x + ct * y) / length).long() + cells // 2
    generator = torch.Generator().manual_seed(params.noise_seed + 1)
    return (torch.rand(cells, cells, generator=generator) < 0.5)[iu, iv]


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates x, y, each (size, size)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    x, y = torch.meshgrid(coords, coords, indexing="xy")
    return x, y


def render(params: ShapeParams, size: int = RENDER_SIZE) -> Tensor:
    """Draws one image.

    Args:
        params: From ``sample_params``.
        size: Canvas side in pixels; the geometry scales with it, the texture keeps its pixels.

    Returns:
        (3, size, size) uint8 image.
    """
    x, y = _grid(size)
    dx, dy = x - params.center[0] * size, y - params.center[1] * size
    ca, sa = math.cos(params.angle), math.sin(params.angle)
    radius = params.radius * size
    u, v = (ca * dx + sa * dy) / radius, (-sa * dx + ca * dy) / radius
    shape, texture = CLASSES[params.label].split("-")
    inside = _shape_mask(shape, u, v)
    pattern = _texture(texture, x, y, params)
    colors = torch.as_tensor(params.colors, dtype=torch.float32)  # (4, 3)
    t = (x + y) / (2 * size)  # background gradient along the diagonal
    background = colors[0, :, None, None] * (1 - t) + colors[3, :, None, None] * t
    foreground = torch.where(pattern, colors[1, :, None, None], colors[2, :, None, None])
    image = torch.where(inside, foreground, background)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(params.noise_seed))
    return ((image + 0.03 * noise).clamp(0, 1) * 255).round().to(torch.uint8)


class SyntheticShapes(Dataset[tuple[Any, int]]):
    """The synthetic set: ``num_images`` images of ``split`` drawn on the fly.

    Args:
        split: "train" or "val" (disjoint random streams).
        num_images: Length of the dataset.
        seed: Seed of the whole set; the same (seed, split, index) always gives the same image.
        size: Canvas side in pixels (see the module docstring).
        transform: Applied to the (3, size, size) uint8 tensor.
    """

    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        split: str = "val",
        num_images: int = 1280,
        *,
        seed: int = 0,
        size: int = RENDER_SIZE,
        transform: Any = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split, self.num_images, self.seed, self.transform = split, num_images, seed, transform
        self.size = size

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        params = sample_params(self.seed, self.split, index)
        image: Any = render(params, self.size)
        return (self.transform(image) if self.transform else image), params.label
