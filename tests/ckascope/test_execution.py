"""Memory format and precision of a comparison's forward passes (ckascope.execution).

What is proven: the Gram of a channels_last feature map is the float64 reference's and is
built from a view (no copy of the layer); the layout rule; a comparison leaves the user's model
with the very tensors, flags and hooks it had, after success and after an exception; every
layout gives the same matrix (1e-6); reduced precision is recorded and stays near float32.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ckascope import models
from ckascope.compare import SweepOptions, compare_models, compare_scales
from ckascope.errors import InputError
from ckascope.execution import choose_layout, in_layout, to_layout
from ckascope.kernels import centered_gram, flat_features
from tests import reference as ref

BASE = 32


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return models.build_model("resnet18", "none", num_classes=10, seed=0).eval()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * BASE * BASE, 16), nn.ReLU(), nn.Linear(16, 4))


def _snapshot(model: nn.Module) -> list[tuple[str, int, tuple[int, ...], torch.Tensor, bool]]:
    """Every tensor's identity as the user sees it: storage, strides, values, grad flag."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(n, t.data_ptr(), t.stride(), t.detach().clone(), t.requires_grad) for n, t in tensors]


def _assert_untouched(model: nn.Module, before: list, training: bool) -> None:
    after = _snapshot(model)
    assert [a[:3] for a in after] == [b[:3] for b in before]  # same storage and strides
    for (name, *_, value, grad), (_, *__, old, old_grad) in zip(after, before, strict=True):
        assert torch.equal(value, old), name
        assert grad == old_grad, name
    assert model.training == training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_channels_last_features_flatten_as_a_view_with_the_reference_gram() -> None:
    x = torch.randn(12, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    flat = flat_features(x)
    assert flat.shape == (12, 5 * 7 * 6)
    assert flat.data_ptr() == x.data_ptr()  # a view: no copy of the layer
    expected = ref.linear_kernel(x.double().numpy())  # centred Gram in logical order
    np.testing.assert_allclose(centered_gram(x, torch.float64).numpy(), expected, atol=1e-10)


def test_odd_strides_fall_back_to_a_copy_with_the_same_gram() -> None:
    x = torch.randn(9, 4, 6, 5).transpose(2, 3)[:, :, ::2]  # no flat view exists
    expected = ref.linear_kernel(x.double().numpy())
    np.testing.assert_allclose(centered_gram(x, torch.float64).numpy(), expected, atol=1e-10)
    contiguous = torch.randn(6, 3, 4, 4)
    assert flat_features(contiguous).data_ptr() == contiguous.data_ptr()


@pytest.mark.parametrize(
    ("requested", "conv", "device", "precision", "expected"),
    [
        ("auto", True, "cpu", "float32", "channels_last"),  # measured 1.05-1.87x at 224 px
        ("auto", False, "cpu", "float32", "contiguous"),  # no convolution to speed up
        ("auto", True, "cuda", "float32", "contiguous"),  # IEEE float32: no rule, unmeasured
        ("auto", True, "cuda", "bf16", "channels_last"),  # Tensor Cores want NHWC
        ("contiguous", True, "cpu", "float32", "contiguous"),
        ("channels_last", False, "cpu", "float32", "channels_last"),
    ],
)
def test_the_layout_rule(
    requested: str, conv: bool, device: str, precision: str, expected: str
) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3)) if conv else _mlp()
    got = choose_layout(requested, [net], torch.device(device), precision)  # type: ignore[arg-type]
    assert got == expected


def test_in_layout_gives_the_model_back_its_own_tensors_also_after_an_error(
    model: nn.Module,
) -> None:
    before = _snapshot(model)
    conv = model.conv1.weight
    with in_layout([model, model], "channels_last"):  # shared tensors converted once
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert model.conv1.weight is conv  # the Parameter object itself stays
    _assert_untouched(model, before, training=False)
    with pytest.raises(RuntimeError, match="boom"), in_layout([model], "channels_last"):
        raise RuntimeError("boom")
    _assert_untouched(model, before, training=False)
    assert to_layout(torch.randn(2, 3), "channels_last").shape == (2, 3)  # not 4-D: as it is


@pytest.mark.parametrize("memory_format", ["auto", "contiguous", "channels_last"])
def test_every_layout_gives_the_same_matrix_and_leaves_the_model_as_it_was(
    model: nn.Module, memory_format: str
) -> None:
    model.train()  # a user's model in training mode, some weights frozen
    model.fc.weight.requires_grad_(False)
    try:
        before = _snapshot(model)
        kw = {"image_size": BASE, "batch_size": 16, "num_images": 32, "layers": "blocks"}
        plain = compare_scales(model, None, (8, BASE), memory_format="contiguous", **kw)
        result = compare_scales(model, None, (8, BASE), memory_format=memory_format, **kw)
        _assert_untouched(model, before, training=True)
    finally:
        model.eval()
        model.fc.weight.requires_grad_(True)
    np.testing.assert_allclose(result.matrix, plain.matrix, atol=1e-6)
    used = "contiguous" if memory_format == "contiguous" else "channels_last"
    assert result.settings["memory_format"] == used
    assert result.settings["memory_format_requested"] == memory_format


class FailsLater(nn.Module):
    """The model, failing in its third forward pass (the second batch's first side)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("the user's model failed")
        return self.net(x)


def test_a_failed_comparison_leaves_the_model_as_it_was(model: nn.Module) -> None:
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="the user's model failed"):
        compare_scales(
            FailsLater(model), None, (8, BASE), image_size=BASE, batch_size=8, num_images=16,
            layers=["net.layer1", "net.layer2"], memory_format="channels_last",
        )  # fmt: skip
    _assert_untouched(model, before, training=False)


def test_two_models_and_an_mlp_side(model: nn.Module) -> None:
    other = models.build_model("resnet18", "none", num_classes=10, seed=1).eval()
    kw = {"image_size": BASE, "batch_size": 16, "num_images": 32, "layers": "stages"}
    fast = compare_models(model, other, None, memory_format="channels_last", **kw)
    plain = compare_models(model, other, None, memory_format="contiguous", **kw)
    np.testing.assert_allclose(fast.matrix, plain.matrix, atol=1e-6)
    mlp = compare_scales(_mlp(), None, (8, BASE), layers="leaves", image_size=BASE, num_images=16)
    assert mlp.settings["memory_format"] == "contiguous"  # auto: nothing to gain


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_is_recorded_and_near_float32(model: nn.Module, precision: str) -> None:
    kw = {"image_size": BASE, "batch_size": 16, "num_images": 32, "layers": "blocks"}
    full = compare_scales(model, None, (8, BASE), **kw)
    low = compare_scales(model, None, (8, BASE), precision=precision, **kw)
    assert low.settings["precision"] == precision
    assert full.settings["precision"] == "float32"
    difference = np.abs(low.matrix - full.matrix).max()
    assert 0 < difference < 0.02  # the features' rounding moves CKA, by little


@pytest.mark.parametrize(
    ("option", "match"),
    [({"memory_format": "nhwc"}, "--memory-format"), ({"precision": "half"}, "--precision")],
)
def test_unknown_layouts_and_precisions_are_refused(option: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        SweepOptions(**option)


def test_the_memory_format_help_quotes_the_speed_up_the_docs_measured() -> None:
    from ckascope.options import SweepFields

    meta = next(f.metadata for f in fields(SweepFields) if f.name == "memory_format")
    quoted = re.search(r"\d\.\d+-\d\.\d+x", meta["help"])
    assert quoted is not None
    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/performance.md"):
        assert quoted.group() in (root / doc).read_text(), doc
