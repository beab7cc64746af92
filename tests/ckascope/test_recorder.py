from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from ckascope import ActivationRecorder
from ckascope.errors import InputError
from ckascope.kernels import centered_gram
from ckascope.recorder import select_output


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


class Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.block(x)))


class TupleDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (self.lin(x), {"a": x * 2, "b": x * 3})


class Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TupleDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.inner(x)


class Backwards(nn.Module):
    """Registers ``second`` before ``first`` but runs ``first`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(3, 3)
        self.first = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_hooks_removed_after_success_and_after_exception() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with ActivationRecorder(model, ["0", "2"]) as rec:
        assert not _no_hooks(model)
        model(torch.randn(5, 3))
        assert list(rec.pop()) == ["0", "2"]
    assert _no_hooks(model)
    with pytest.raises(RuntimeError), ActivationRecorder(model, ["0", "2"]):
        model(torch.randn(5, 7))  # wrong width: the forward raises inside the block
    assert _no_hooks(model)


def test_module_reuse_gives_numbered_names() -> None:
    model = Reuse()
    x = torch.randn(6, 4)
    with ActivationRecorder(model, ["block", "head"]) as rec:
        model(x)
        out = rec.pop()
    assert list(out) == ["block#0", "block#1", "head"]
    torch.testing.assert_close(out["block#0"], model.block(x))
    torch.testing.assert_close(out["block#1"], model.block(model.block(x)))


def test_in_place_relu_cannot_corrupt_recorded_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1))
    x = torch.randn(4, 3, 9, 9)
    expected = model[0](x)
    for reduce in ("none", "flatten"):
        with ActivationRecorder(model, ["0"], reduce=reduce) as rec:
            model(x)
            got = rec.pop()["0"]
        assert (got < 0).any()
        torch.testing.assert_close(got, expected if reduce == "none" else expected.flatten(1))


def test_tuple_and_dict_outputs() -> None:
    model = Wrap()
    x = torch.randn(5, 3)
    with ActivationRecorder(model, ["inner"]) as rec:
        model(x)
        torch.testing.assert_close(rec.pop()["inner"], model.inner.lin(x))
    with pytest.raises(InputError, match="holds no tensor"):
        select_output((1, "a"), None, "odd")
    rec2 = ActivationRecorder(model, ["inner"], output_key="b")
    with rec2:
        model.inner.forward = lambda x: {"a": x * 2, "b": x * 3}  # type: ignore[method-assign]
        model(x)
        torch.testing.assert_close(rec2.pop()["inner"], x * 3)
    with pytest.raises(InputError, match="keys"), ActivationRecorder(model, ["inner"]):
        model(x)


def test_execution_order_not_registration_order() -> None:
    model = Backwards()
    with ActivationRecorder(model, ["second", "first"]) as rec:
        model(torch.randn(4, 3))
        assert list(rec.pop()) == ["first", "second"]


def test_mode_and_requires_grad_restored_and_no_graph() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    model[0].bias.requires_grad_(False)
    before_training = [m.training for m in model.modules()]
    before_grad = [p.requires_grad for p in model.parameters()]
    with ActivationRecorder(model, ["1"]) as rec:
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        out = model(torch.randn(6, 3, requires_grad=False))
        recorded = rec.pop()["1"]
    assert out.grad_fn is None
    assert recorded.grad_fn is None
    assert not recorded.requires_grad
    assert [m.training for m in model.modules()] == before_training
    assert [p.requires_grad for p in model.parameters()] == before_grad
    with ActivationRecorder(model, ["1"], mode="keep"):
        assert [m.training for m in model.modules()] == before_training


def test_reducers_gap_flatten_gram() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    x = torch.randn(6, 3, 8, 8)
    y = model[0](x)
    for reduce, expected in [
        ("gap", y.mean(dim=(2, 3))),
        ("flatten", y.flatten(1)),
        ("gram", centered_gram(y, torch.float32)),
    ]:
        with ActivationRecorder(model, ["0"], reduce=reduce) as rec:
            model(x)
            torch.testing.assert_close(rec.pop()["0"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="unknown reduce"):
        ActivationRecorder(model, ["0"], reduce="max")  # type: ignore[arg-type]


def test_equals_torchvision_feature_extraction_on_resnet18_stages() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    stages = ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        expected = create_feature_extractor(model, return_nodes=stages)(x)
    with ActivationRecorder(model, "stages") as rec, torch.inference_mode():
        model(x)
        got = rec.pop()
    assert list(got) == ["maxpool", *stages]
    for name in stages:
        torch.testing.assert_close(got[name], expected[name])


def test_layer_selection_errors_are_helpful() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(InputError, match=r"did you mean .*'layer1\.0'"):
        ActivationRecorder(model, ["layer1.O"])
    with pytest.raises(InputError, match=r"matches no module.*layer1"):
        ActivationRecorder(model, ["block*"])
    with pytest.raises(InputError, match="predicate"):
        ActivationRecorder(model, lambda name, module: False)
    rec = ActivationRecorder(
        model, lambda name, m: isinstance(m, nn.Conv2d) and name.startswith("layer4")
    )
    assert rec.layer_names[0] == "layer4.0.conv1"
    assert len(rec.layer_names) == 5


def test_reentry_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    rec = ActivationRecorder(model, ["0"])
    with rec, pytest.raises(RuntimeError, match="already active"), rec:
        pass
    assert _no_hooks(model)


def test_records_of_a_failed_forward_do_not_leak_into_the_next_block() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))  # the second layer always fails
    rec = ActivationRecorder(model, ["0"])
    with pytest.raises(RuntimeError), rec:
        model(torch.randn(2, 3))
    with rec:
        model[0](torch.randn(2, 3))
        assert len(rec.pop()["0"]) == 2
        assert rec.pop() == {}


def test_gram_reduce_keeps_each_layer_apart_on_square_layers() -> None:
    # Square layers: the centred features and the Gram have one shape.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
    x = torch.randn(8, 8)
    outputs = [model[0](x)]
    outputs += [model[1](outputs[0]), model[2](model[1](outputs[0]))]
    outputs.append(model[3](outputs[2]))
    names = ["0", "1", "2", "3"]
    with ActivationRecorder(model, names, reduce="gram", gram_dtype="float32") as rec:
        for _ in range(2):
            model(x)
            got = rec.pop()
            for name, y in zip(names, outputs, strict=True):
                want = centered_gram(y.detach(), torch.float64).float()
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5)


def test_recording_lets_recorders_on_one_model_take_turns() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    first = ActivationRecorder(model, ["0"], reduce="flatten")
    second = ActivationRecorder(model, ["0", "1"], reduce="flatten")
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    with first, second:
        first.paused = second.paused = True
        with first.recording():
            model(x)
        with second.recording():
            model(y)
        model(x)  # both paused: nobody records
        assert list(first.pop()) == ["0"]
        assert first.pop() == {}
        recorded = second.pop()
        assert list(recorded) == ["0", "1"]
        assert recorded["0"].shape == (5, 3)
    assert _no_hooks(model)


def test_a_comparison_leaves_no_hook_after_success_or_failure() -> None:
    from ckascope.compare import compare_scales

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.zeros(8))
    compare_scales(model, images, (8, 16), layers=["0", "1"], batch_size=8, progress=False)
    assert _no_hooks(model)
    with pytest.raises(InputError, match="cannot run on"):  # a 3x3 conv on 2-px images
        compare_scales(
            model,
            images,
            (2, 16),
            layers=["0", "1"],
            protocol="native",
            batch_size=8,
            progress=False,
        )
    assert _no_hooks(model)


def test_recording_restores_the_pause_and_needs_an_active_recorder() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    rec = ActivationRecorder(model, ["0"], reduce="gram")
    with pytest.raises(RuntimeError, match="active recorder"), rec.recording():
        pass
    with torch.inference_mode(), rec:
        with rec.recording():
            model(torch.randn(5, 3))
        assert not rec.paused  # restored to what it was
        rec.paused = True
    assert not rec.paused  # leaving the block resets it
    with torch.no_grad(), rec:  # a recorder used in inference mode works outside it
        model(torch.randn(5, 3))
        assert list(rec.pop()) == ["0"]
