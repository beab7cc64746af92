from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckascope import kernels, models
from ckascope.compare import ScaleView, compare_models, compare_scales
from ckascope.data import build_dataset, eval_transform, subset_indices
from ckascope.errors import CKAScopeWarning, InputError
from ckascope.result import CKAResult
from tests import reference as ref

BASE = 48
LAYERS = ["maxpool", "layer1", "layer2", "layer4"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return models.build_model("resnet18", "none", num_classes=10, seed=0)


@pytest.fixture(scope="module")
def data() -> torch.utils.data.Dataset:
    # Drawn once: the sweeps below index the same 40 images many times.
    shapes = build_dataset(None, "val", eval_transform(BASE, 56), num_images=40, seed=0)
    images, labels = zip(*(shapes[i] for i in range(len(shapes))), strict=True)
    return torch.utils.data.TensorDataset(torch.stack(images), torch.tensor(labels))


def _independent(
    model: nn.Module, data, scales: tuple[int, int], num_images: int, batch: int, seed: int
) -> np.ndarray:
    """Own hooks, float64 NumPy reference: no ckascope code except the index draw."""
    feats: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: feats.__setitem__(n, o.detach().clone())
        )
        for n in LAYERS
    ]
    idx = subset_indices(len(data), num_images, seed)
    batches_a, batches_b = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(idx), batch):
                chunk = idx[start : start + batch]
                if len(chunk) < 4:
                    continue
                images = torch.stack([data[i][0] for i in chunk])
                for s, out in zip(scales, (batches_a, batches_b), strict=False):
                    x = (
                        F.interpolate(images, size=s, mode="bilinear", align_corners=False)
                        if s != BASE
                        else images
                    )
                    x = (
                        F.interpolate(x, size=BASE, mode="bilinear", align_corners=False)
                        if s != BASE
                        else x
                    )
                    model(x)
                    out.append([feats[n].double().numpy() for n in LAYERS])
    finally:
        for h in handles:
            h.remove()
    return ref.minibatch_cka(batches_a, batches_b)


@pytest.mark.parametrize("chunk_bytes", [None, 4096])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_end_to_end_equals_independent_computation(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    data,
    chunk_bytes: int | None,
    memory_format: str,
) -> None:
    if chunk_bytes is not None:  # every layer centred in many chunks
        monkeypatch.setattr(kernels, "CENTER_CHUNK_BYTES", chunk_bytes)
    with pytest.warns(CKAScopeWarning, match="2 of the 26 images are left out"):
        result = compare_scales(
            model,
            data,
            (16, BASE),
            layers=LAYERS,
            image_size=BASE,
            batch_size=8,
            num_images=26,
            seed=5,
            memory_format=memory_format,
        )
    assert result.settings["memory_format"] == memory_format
    expected = _independent(model, data, (16, BASE), 26, 8, 5)
    assert result.layers_a == LAYERS == result.layers_b
    assert result.settings["images_used"] == 24  # the remainder batch of 2 is dropped
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_same_seed_same_result_and_repeats(model: nn.Module, data) -> None:
    kw = {"layers": "stages", "image_size": BASE, "batch_size": 8, "num_images": 16}
    one = compare_scales(model, data, (24, BASE), seed=1, **kw)
    again = compare_scales(model, data, (24, BASE), seed=1, **kw)
    np.testing.assert_array_equal(one.matrices, again.matrices)
    three = compare_scales(model, data, (24, BASE), seed=1, repeats=3, **kw)
    assert three.matrices.shape == (3, 5, 5)
    np.testing.assert_array_equal(three.matrices[0], one.matrices[0])
    seed2 = compare_scales(model, data, (24, BASE), seed=2, **kw)
    np.testing.assert_array_equal(three.matrices[1], seed2.matrices[0])
    np.testing.assert_allclose(three.std, three.matrices.std(axis=0, ddof=1))
    assert not np.array_equal(three.matrices[0], three.matrices[1])


def test_model_mode_restored_and_same_scale_gives_identity(model: nn.Module, data) -> None:
    model.train()
    try:
        result = compare_scales(
            model, data, (BASE, BASE), layers="stages", image_size=BASE, batch_size=8, num_images=16
        )
        assert model.training
    finally:
        model.eval()
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-12)


def test_compare_models_and_cross_block(model: nn.Module, data) -> None:
    other = models.build_model("resnet34", "none", num_classes=10, seed=1)
    kw = {"scale": 32, "image_size": BASE, "batch_size": 8, "num_images": 16}
    both = compare_models(model, other, data, layers="stages", **kw)
    assert both.matrix.shape == (5, 5)
    assert both.settings["mode"] == "models"
    with pytest.raises(InputError, match="same-layer"):
        both.diagonal()
    self_cmp = compare_models(model, model, data, layers="stages", **kw)
    np.testing.assert_allclose(np.diag(self_cmp.matrix), 1.0, atol=1e-12)


def test_scale_view_protocols() -> None:
    x = torch.randn(2, 3, 64, 64)
    assert ScaleView(16, "native", 64)(x).shape == (2, 3, 16, 16)
    up = ScaleView(16, "upsample", 64)(x)
    assert up.shape == (2, 3, 64, 64)
    expected = F.interpolate(F.interpolate(x, size=16, mode="bilinear"), size=64, mode="bilinear")
    torch.testing.assert_close(up, expected)
    assert ScaleView(64, "upsample", 64)(x) is x


def test_native_protocol_runs_small_inputs(model: nn.Module, data) -> None:
    result = compare_scales(
        model,
        data,
        (32, BASE),
        protocol="native",
        layers="stages",
        image_size=BASE,
        batch_size=8,
        num_images=8,
    )
    assert result.settings["protocol"] == "native"
    assert np.isfinite(result.matrix).all()


def test_save_load_round_trip_and_frame(model: nn.Module, data, tmp_path: Path) -> None:
    result = compare_scales(
        model,
        data,
        (16, BASE),
        layers="stages",
        image_size=BASE,
        batch_size=8,
        num_images=16,
        repeats=2,
    )
    out = result.save(tmp_path / "res")
    assert sorted(p.name for p in out.iterdir()) == ["cka.csv", "matrices.npz", "result.json"]
    back = CKAResult.load(out)
    np.testing.assert_array_equal(back.matrices, result.matrices)
    assert back.layers_a == result.layers_a
    assert back.settings == result.settings
    frame = back.to_frame()
    assert len(frame) == 2 * 5 * 5
    assert set(frame.columns) == {
        "repeat",
        "index_a",
        "layer_a",
        "index_b",
        "layer_b",
        "cka",
    }
    row = frame[(frame.repeat == 1) & (frame.index_a == 2) & (frame.index_b == 3)]
    assert float(row.cka.iloc[0]) == result.matrices[1, 2, 3]
    import pandas as pd

    assert pd.read_csv(out / "cka.csv").shape == frame.shape


def test_output_folder_rules(tmp_path: Path) -> None:
    result = CKAResult(np.eye(2), ["a", "b"], ["a", "b"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an earlier ckascope result"):
        result.save(foreign)
    with pytest.raises(InputError, match="--overwrite never replaces"):
        result.save(foreign, overwrite=True)  # other files are never deleted
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    earlier = tmp_path / "earlier"
    result.save(earlier)
    with pytest.raises(InputError, match="holds an earlier ckascope result"):
        result.save(earlier)  # an earlier result is replaced only when asked
    result.save(earlier, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    result.save(empty)


def test_failed_save_leaves_previous_result_and_no_staging(tmp_path: Path) -> None:
    dest = tmp_path / "res"
    CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"run": 1}).save(dest)

    def boom(folder: Path) -> None:
        (folder / "half.png").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CKAResult(np.zeros((2, 2)), ["a", "b"], ["a", "b"], {"run": 2}).save(
            dest, overwrite=True, extra=boom
        )
    assert CKAResult.load(dest).settings == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scales": (0, 224)}, "1..4096"),
        ({"scales": (32, 5000)}, "1..4096"),
        ({"scales": (32,)}, "exactly two"),
        ({"batch_size": 3}, "at least 4"),
        ({"protocol": "crop"}, "unknown protocol"),
        ({"resize_mode": "lanczos"}, "resize mode"),
        ({"layers": ["nope"]}, "unknown layer"),
        ({"num_images": 5000}, r"1\.\.40"),
        ({"kernel": "poly"}, "unknown kernel"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_arguments(model: nn.Module, data, kwargs: dict, match: str) -> None:
    kw = {"scales": (16, BASE), "image_size": BASE, "batch_size": 8, "num_images": 8, **kwargs}
    with pytest.raises(InputError, match=match):
        compare_scales(model, data, **kw)


def test_too_few_images_for_processes(model: nn.Module, data) -> None:
    with pytest.raises(InputError) as caught:
        compare_scales(
            model, data, (16, BASE), image_size=BASE, batch_size=8, num_images=8, world_size=2
        )
    assert str(caught.value) == (
        "8 images make only 1 batch of at least 4 images, and each of the 2 processes needs "
        "one. Hint: a --batch-size of 4 or less gives each process a batch, or fewer processes"
    )


def test_image_size_keeps_the_imagenet_resize_ratio_and_checks_options(model: nn.Module) -> None:
    result = compare_scales(
        model, None, (16, 48), layers="stages", image_size=48, batch_size=8, num_images=8
    )
    assert result.settings["resize_size"] == 55  # 48 * 256 / 224, not 256
    with pytest.raises(InputError, match="smaller than the crop"):
        compare_scales(
            model, None, (16, 48), image_size=48, resize_size=40, batch_size=8, num_images=8
        )
    with pytest.raises(InputError, match="--antialias works with bilinear"):
        compare_scales(
            model,
            None,
            (16, 48),
            image_size=48,
            resize_mode="nearest",
            antialias=True,
            batch_size=8,
            num_images=8,
        )


def _outside(low: float | None, high: float | None) -> list[float]:
    """Values just outside a field's range (its kind's step beyond each bound)."""
    step = 0.001 if isinstance(low, float) or isinstance(high, float) else 1
    return [b + d for b, d in ((low, -step), (high, step)) if b is not None]


def test_every_command_line_range_holds_at_construction() -> None:
    from dataclasses import fields

    from ckascope.compare import SweepOptions
    from ckascope.options import SweepFields, ViewFields
    from ckascope.views import ViewOptions

    checked = []
    for owner, group in ((ViewOptions, ViewFields), (SweepOptions, SweepFields)):
        for f in fields(group):
            if "min" not in f.metadata and "max" not in f.metadata:
                continue
            flag = f.metadata.get("option", "--" + f.name.replace("_", "-"))
            for value in _outside(f.metadata.get("min"), f.metadata.get("max")):
                with pytest.raises(InputError) as refused:
                    owner(**{f.name: value})
                assert f"{owner.__name__}.{f.name}" in str(refused.value) or flag in str(
                    refused.value
                )
                checked.append(f.name)
    assert {"image_size", "resize_size", "num_images", "ci", "repeats"} <= set(checked)
    with pytest.raises(
        InputError, match=r"ViewOptions\.image_size must be an integer in 4\.\.4096"
    ):
        ViewOptions(image_size=2)  # the command line refuses below 4 too
    with pytest.raises(InputError, match="an integer"):
        ViewOptions(image_size=32.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"--ci must be a coverage in 0\.5\.\.0\.999"):
        SweepOptions(ci=float("nan"))
    assert ViewOptions(image_size=4, resize_size=4096).image_size == 4  # the bounds themselves


def test_one_pixel_inputs_run_under_the_native_protocol() -> None:
    """The benchmarks' MLPs: (n, width, 1, 1) "images" fed as they are at scale 1."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    data = torch.utils.data.TensorDataset(torch.randn(16, 6, 1, 1), torch.zeros(16))
    result = compare_models(
        mlp, mlp, data, scale=1, protocol="native", layers=["2", "4"], batch_size=8
    )
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-12)


def _tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    return vit.eval()


def test_a_fixed_size_model_is_told_the_image_size_it_takes() -> None:
    vit, images = (
        _tiny_vit(),
        torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.zeros(8)),
    )
    options = {"layers": ["encoder.layers.encoder_layer_0"], "batch_size": 8}
    with pytest.raises(InputError, match="cannot run on") as upsampled:
        compare_scales(vit, images, (8, 16), image_size=16, **options)  # type: ignore[arg-type]
    hint = str(upsampled.value).split("Hint: ")[1]
    assert "pass --image-size 32 (--protocol upsample, the default" in hint
    with pytest.raises(InputError) as native:
        compare_scales(vit, images, (8, 16), image_size=16, protocol="native", **options)  # type: ignore[arg-type]
    assert "pass --image-size 32 with --protocol upsample" in str(native.value)
    wrapped = nn.Sequential(vit)  # no image_size attribute: the error says the size
    inner = {**options, "layers": ["0.encoder.layers.encoder_layer_0"]}
    with pytest.raises(InputError, match="takes 32-px inputs only"):
        compare_scales(wrapped, images, (8, 16), image_size=16, **inner)  # type: ignore[arg-type]
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32), torch.zeros(8))
    result = compare_scales(_tiny_vit(), data, (8, 32), image_size=32, **options)  # type: ignore[arg-type]
    assert result.matrix.shape == (1, 1)  # what the hint says runs


def test_a_cnn_too_small_for_its_inputs_is_told_to_use_larger_ones() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5), nn.Flatten())
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.zeros(8))
    with pytest.raises(InputError, match="Hint: use a larger scale, or --protocol upsample"):
        compare_scales(net, data, (4, 8), image_size=8, protocol="native", batch_size=8)
    with pytest.raises(InputError, match="Hint: use a larger --image-size"):
        compare_scales(net, data, (4, 8), image_size=4, batch_size=8)


def test_options_a_sweep_would_ignore_are_refused(model: nn.Module, data) -> None:
    from ckascope.compare import SweepOptions

    with pytest.raises(InputError, match="--sigma-frac sets the RBF kernel's bandwidth"):
        SweepOptions(sigma_frac=0.5)
    with pytest.raises(InputError, match="--bandwidth chooses how the RBF"):
        SweepOptions(bandwidth="first")
    with pytest.raises(InputError, match="--ci sets the coverage of the bootstrap interval"):
        SweepOptions(ci=0.9)
    SweepOptions(kernel="rbf", sigma_frac=0.5, bandwidth="first", bootstrap=10, ci=0.9)
    SweepOptions(sigma_frac=1.0, ci=0.95)  # the defaults: nothing says they were set
    kw = {"image_size": BASE, "batch_size": 8, "num_images": 8}
    with pytest.raises(InputError, match="--sigma-frac"):
        compare_scales(model, data, (16, BASE), sigma_frac=0.8, **kw)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="a dataset or loader brings its images"):
        compare_scales(model, data, (16, BASE), resize_size=64, **kw)  # type: ignore[arg-type]


def test_a_result_moved_aside_by_a_killed_save_comes_back(tmp_path: Path) -> None:
    CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"run": 1}).save(tmp_path / "res")
    (tmp_path / "res").rename(tmp_path / ".res.abc.old")  # killed between the two renames
    (tmp_path / ".res.def.tmp").mkdir()  # and its unfinished staging folder
    CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"run": 2}).save(tmp_path / "res")
    assert CKAResult.load(tmp_path / "res").settings == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_dataloader_is_used_batch_by_batch_like_its_dataset(model: nn.Module, data) -> None:
    idx = subset_indices(len(data), None, 0)
    plan = [idx[i : i + 8] for i in range(0, len(idx), 8)]
    kwargs = {"layers": LAYERS, "image_size": BASE}
    direct = compare_scales(model, data, (16, BASE), batch_size=8, **kwargs)
    loader = torch.utils.data.DataLoader(data, batch_sampler=plan)
    via_loader = compare_scales(model, loader, (16, BASE), **kwargs)
    images_only = [torch.stack([data[i][0] for i in batch]) for batch in plan]
    via_list = compare_scales(model, images_only, (16, BASE), **kwargs)
    np.testing.assert_allclose(via_loader.matrix, direct.matrix, rtol=0, atol=1e-12)
    np.testing.assert_allclose(via_list.matrix, direct.matrix, rtol=0, atol=1e-12)
    assert via_loader.settings["batches"] == "the caller's loader"
    assert via_loader.settings["batch_size"] is None
    assert via_loader.settings["images_used"] == len(data)


@pytest.mark.parametrize("option", [{"num_images": 8}, {"repeats": 2}])
def test_options_a_loader_decides_are_refused(model: nn.Module, data, option: dict) -> None:
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(InputError, match="do not apply"):
        compare_scales(model, loader, (16, BASE), layers=LAYERS, image_size=BASE, **option)


def test_a_loader_batch_that_is_not_images_is_refused(model: nn.Module) -> None:
    with pytest.raises(InputError, match=r"images \(n, C, H, W\)"):
        compare_scales(model, [torch.zeros(3, 8, 8)], (16, BASE), layers=LAYERS, image_size=BASE)
    raw = [torch.zeros(4, 3, BASE, BASE, dtype=torch.uint8)]
    with pytest.raises(InputError, match="ToDtype"):
        compare_scales(model, raw, (16, BASE), layers=LAYERS, image_size=BASE)


def test_synthetic_sweeps_draw_different_subsets(model: nn.Module) -> None:
    result = compare_scales(
        model,
        None,
        (16, BASE),
        layers=LAYERS,
        image_size=BASE,
        num_images=8,
        batch_size=8,
        repeats=3,
    )
    assert result.repeats == 3
    assert result.settings["num_images"] == 8
    assert result.settings["images_used"] == 24
    assert np.all(np.diag(result.std) > 1e-4)  # three different draws of 8 from 24 images


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_measured(model: nn.Module, data, dtype: torch.dtype) -> None:
    kwargs = {"layers": LAYERS, "image_size": BASE, "batch_size": 20}
    full = compare_scales(model, data, (16, BASE), **kwargs)
    half = models.build_model("resnet18", "none", num_classes=10, seed=0).to(dtype)
    result = compare_scales(half, data, (16, BASE), **kwargs)
    np.testing.assert_allclose(result.matrix, full.matrix, atol=0.05)  # the model's own rounding


def test_grams_stay_full_precision_under_a_callers_autocast() -> None:
    from ckascope.kernels import centered_gram

    x = torch.randn(32, 3, 20, 20) * 300  # fp16 would overflow: |G_ij| reaches ~1e8
    flat = x.double().reshape(32, -1)
    expected = (flat - flat.mean(0)) @ (flat - flat.mean(0)).T
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            gram = centered_gram(x, torch.float32)
        assert gram.dtype == torch.float32
        torch.testing.assert_close(gram.double(), expected, rtol=1e-5, atol=1e-2 * 300**2)


def test_the_typed_keywords_are_the_option_fields_with_their_types() -> None:
    """A field added to an options dataclass and not to its TypedDict (or typed otherwise) fails."""
    from typing import get_type_hints

    from ckascope.compare import SweepKwargs, SweepOptions, ViewKwargs
    from ckascope.views import ViewOptions

    assert get_type_hints(SweepKwargs) == get_type_hints(SweepOptions)
    assert get_type_hints(ViewKwargs) == get_type_hints(ViewOptions)


def test_the_documented_options_are_the_option_fields_in_order() -> None:
    """compare_scales' list of its keyword options, and ViewOptions' attributes, name every field."""
    import re
    from dataclasses import fields

    from ckascope.compare import SweepOptions, compare_scales
    from ckascope.views import ViewOptions

    def listed(kind: type) -> list[str]:
        text = " ".join((compare_scales.__doc__ or "").split())
        found = re.search(rf"``{kind.__name__}`` fields \(([^)]*)\)", text)
        assert found is not None, kind
        return found.group(1).split(", ")

    def attributes(kind: type) -> list[str]:
        section = (kind.__doc__ or "").split("Attributes:")[1]
        return re.findall(r"^ {8}(\w+):", section, re.M)

    for kind in (ViewOptions, SweepOptions):
        assert listed(kind) == [f.name for f in fields(kind)]
    assert attributes(ViewOptions) == [f.name for f in fields(ViewOptions)]


def test_compare_scales_and_compare_models_are_the_one_entry_point(model: nn.Module, data) -> None:
    from ckascope.compare import SideSpec, SweepOptions, compare_sides
    from ckascope.views import ViewOptions

    view = ViewOptions("native", image_size=BASE, resize_mode="bicubic")
    sweep = SweepOptions(batch_size=8, num_images=16, seed=3, kernel="rbf")
    direct = compare_sides(
        SideSpec(model, 24, LAYERS), SideSpec(model, BASE, LAYERS), data, view=view, sweep=sweep
    )
    wrapped = compare_scales(
        model,
        data,
        (24, BASE),
        layers=LAYERS,
        protocol="native",
        image_size=BASE,
        resize_mode="bicubic",
        batch_size=8,
        num_images=16,
        seed=3,
        kernel="rbf",
    )
    np.testing.assert_array_equal(direct.matrices, wrapped.matrices)
    assert direct.settings == wrapped.settings
    assert direct.settings["mode"] == "scales"
    assert direct.has_diagonal
    twin = models.build_model("resnet18", "none", num_classes=10, seed=0)
    other = compare_sides(
        SideSpec(model, 24, LAYERS), SideSpec(twin, 24, LAYERS[:2]), data, view=view, sweep=sweep
    )
    assert other.settings["mode"] == "models"
    assert other.settings["layers_b"] == LAYERS[:2]
    assert not other.has_diagonal
    fewer = compare_sides(
        SideSpec(model, 24, LAYERS), SideSpec(model, BASE, LAYERS[:2]), data, view=view, sweep=sweep
    )
    assert fewer.settings["layers_b"] == LAYERS[:2]  # the columns are named even for one model


def test_the_package_names_stay_functions_and_renamed_options_say_so(model: nn.Module) -> None:
    import types

    import ckascope

    assert callable(ckascope.compare_scales)
    for name in ("compare_sides", "compare_scales", "compare_models"):
        assert not isinstance(getattr(ckascope, name), types.ModuleType)
    with pytest.raises(InputError, match=r"'base_size'.*now image_size"):
        compare_scales(model, None, (8, 16), base_size=32)  # type: ignore[call-arg]
    with pytest.raises(InputError, match="no option 'sclaes'"):
        compare_models(model, model, None, sclaes=3)  # type: ignore[call-arg]


def test_numpy_numbers_are_options_too_and_stored_as_python_ones() -> None:
    """The settings are written as JSON, which has no NumPy scalars."""
    from ckascope.compare import SweepOptions
    from ckascope.views import ViewOptions

    view = ViewOptions(image_size=np.int64(32))
    sweep = SweepOptions(num_images=np.int32(64), repeats=np.int64(2), batch_size=np.int64(16))
    sweep = dataclasses.replace(sweep, seed=np.int64(3))
    plain = (view.image_size, sweep.num_images, sweep.repeats, sweep.batch_size, sweep.seed)
    assert plain == (32, 64, 2, 16, 3)
    assert {type(v) for v in plain} == {int}


def test_numpy_numbers_run_and_save_end_to_end(model: nn.Module, tmp_path: Path) -> None:
    result = compare_scales(
        model,
        None,
        (np.int64(16), np.int64(32)),
        image_size=32,
        num_images=np.int64(8),
        batch_size=np.int64(8),
        seed=np.int64(1),
        layers="stages",
    )
    result.save(tmp_path / "r")  # the settings are JSON: no NumPy scalar reaches them
    assert CKAResult.load(tmp_path / "r").settings["scales"] == [16, 32]


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()


def _images(n: int, side: int = 8) -> torch.utils.data.Dataset:
    return torch.utils.data.TensorDataset(torch.rand(n, 3, side, side), torch.zeros(n))


def test_images_no_batch_takes_are_a_note_naming_how_many_and_why() -> None:
    net, tiny = _tiny_net(), {"layers": ["1", "3"], "image_size": 8}
    with pytest.warns(CKAScopeWarning) as caught:
        result = compare_scales(net, _images(18), (4, 8), batch_size=8, **tiny)  # type: ignore[arg-type]
    notes = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert notes == [
        "2 of the 18 images are left out: batches of 8 leave a last one of 2, and the unbiased "
        "HSIC needs at least 4. Hint: --batch-size 9 uses all 18"
    ]
    assert result.settings["images_used"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the hint says uses them all, and says nothing
        assert (
            compare_scales(net, _images(18), (4, 8), batch_size=9, **tiny).settings[  # type: ignore[arg-type]
                "images_used"
            ]
            == 18
        )


@pytest.mark.parametrize(
    ("n", "batch_size", "world", "fits"),
    [(18, 8, 1, 9), (6, 4, 1, 6), (26, 8, 1, 9), (14, 4, 2, 5), (13, 4, 2, None)],
)
def test_the_batch_size_that_uses_every_image(
    n: int, batch_size: int, world: int, fits: int | None
) -> None:
    from ckascope.compare import whole_batch_size

    assert whole_batch_size(n, batch_size, world) == fits
    if fits is not None:
        assert n % fits == 0 or n % fits >= 4
        assert n // fits >= world  # each process gets a batch


def test_a_sweep_with_no_batch_says_why_and_the_fix_that_fits() -> None:
    net, tiny = _tiny_net(), {"layers": ["1", "3"], "image_size": 8, "batch_size": 16}
    with pytest.raises(InputError) as asked_few:
        compare_scales(net, None, (4, 8), num_images=3, **tiny)  # type: ignore[arg-type]
    assert str(asked_few.value) == (
        "3 images make no batch of at least 4 images, the fewest the unbiased HSIC takes. "
        "Hint: --num-images 4 or more"
    )
    with pytest.raises(InputError) as holds_few:
        compare_scales(net, _images(3), (4, 8), **tiny)  # type: ignore[arg-type]
    assert str(holds_few.value).endswith(
        "Hint: the data holds 3 images: give it at least 4 readable ones"
    )
    with pytest.raises(InputError) as two_processes:
        compare_scales(net, _images(6), (4, 8), world_size=2, **tiny)  # type: ignore[arg-type]
    assert str(two_processes.value) == (  # it holds 6: more --num-images cannot help
        "6 images make only 1 batch of at least 4 images, and each of the 2 processes needs "
        "one. Hint: the data holds 6 images: give it at least 8 readable ones, or fewer processes"
    )
    with pytest.raises(InputError) as asked_few_of_few:  # 16 would be more than the 10 it holds
        compare_scales(net, _images(10), (4, 8), num_images=8, world_size=4, **tiny)  # type: ignore[arg-type]
    assert str(asked_few_of_few.value).endswith(
        "Hint: the data holds 10 images: give it at least 16 readable ones, or fewer processes"
    )


def _folder(root: Path, good: int, bad: int) -> Path:
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(good):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "a" / f"{i}.png")
    for i in range(bad):
        (root / "a" / f"bad{i}.png").write_bytes(b"not an image")
    return root


@pytest.mark.filterwarnings("ignore:skipped unreadable image")
def test_unreadable_images_that_leave_no_batch_are_named_as_the_cause(tmp_path: Path) -> None:
    net, tiny = _tiny_net(), {"layers": ["1", "3"], "image_size": 8, "batch_size": 16}
    only_bad = str(_folder(tmp_path / "bad", 0, 2))
    with pytest.raises(InputError) as planned:
        compare_scales(net, only_bad, (4, 8), **tiny)  # type: ignore[arg-type]
    assert str(planned.value).endswith(
        "Hint: the folder holds 2 images, 2 of them unreadable: give it at least 4 readable ones"
    )
    half_bad = str(_folder(tmp_path / "half", 2, 2))
    with pytest.raises(InputError) as loaded:
        compare_scales(net, half_bad, (4, 8), **tiny)  # type: ignore[arg-type]
    assert str(loaded.value) == (
        "no batch held 4 readable images: 2 images could not be read (each named in a note). "
        "Hint: replace or remove the unreadable files, or add readable images"
    )


def test_a_scale_above_the_image_size_is_a_note() -> None:
    net, tiny = _tiny_net(), {"layers": ["1", "3"], "batch_size": 8}
    with pytest.warns(
        CKAScopeWarning, match="scale 16 is larger than the image size 8: its images"
    ):
        compare_scales(net, _images(8), (4, 16), image_size=8, **tiny)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_scales(net, _images(8), (4, 8), image_size=8, **tiny)  # type: ignore[arg-type]


def test_each_sweep_draws_its_images_when_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of many sweeps shows progress from its first batch: drawing every sweep's subset
    first (a permutation of the whole pool each) kept 100 000 sweeps silent for over an hour."""
    from ckascope import compare

    drawn: list[int] = []
    real = compare.subset_indices
    monkeypatch.setattr(compare, "subset_indices", lambda *a: drawn.append(a[2]) or real(*a))
    net = _tiny_net()
    at_first_batch: list[list[int]] = []
    net.register_forward_pre_hook(lambda m, i: at_first_batch.append(list(drawn)))
    tiny = {"layers": ["1", "3"], "image_size": 8, "batch_size": 8, "num_images": 8}
    result = compare_scales(net, None, (4, 8), repeats=3, seed=5, **tiny)  # type: ignore[arg-type]
    assert at_first_batch[0] == [5]  # the first sweep's subset alone
    assert drawn == [5, 6, 7]  # every sweep's, once, with its own seed
    assert result.repeats == 3
