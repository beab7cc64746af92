from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ckascope.errors import InputError
from ckascope.plot import NULL_BAND, curve, heatmap, redraw, save, save_figures
from ckascope.result import CKAResult


def _result(mode: str = "scales", nan: bool = False) -> CKAResult:
    rng = np.random.default_rng(0)
    mats = rng.uniform(0, 1, (3, 4, 4))
    if nan:
        mats[:, 1, :] = np.nan
    layers = ["stem", "l1", "l2", "l3"]
    return CKAResult(
        mats,
        layers,
        layers,
        {"mode": mode, "scales": [32, 224], "model": "toy", "kernel": "linear"},
    )


def test_figures_render_from_a_saved_result_without_a_model(tmp_path: Path) -> None:
    folder = _result().save(tmp_path / "r")
    loaded = CKAResult.load(folder)
    paths = save_figures(loaded, tmp_path)
    assert sorted(p.name for p in paths) == ["curve.pdf", "curve.png", "heatmap.pdf", "heatmap.png"]
    for p in paths:
        assert p.stat().st_size > 1000
    with Image.open(tmp_path / "heatmap.png") as img:
        assert img.size[0] > 300


def test_heatmap_marks_nan_and_fixes_colour_scale() -> None:
    fig = heatmap(_result(nan=True))
    ax = fig.axes[0]
    mesh = ax.collections[0]
    assert mesh.get_clim() == (0.0, 1.0)
    assert ax.patch.get_hatch() == "xx"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["NaN"]  # below the axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stem", "l1", "l2", "l3"]


def test_heatmap_widens_scale_for_values_outside_unit_interval() -> None:
    r = _result()
    r.matrices[:, 0, 0] = -0.5
    assert heatmap(r).axes[0].collections[0].get_clim()[0] < 0


def _calibrated(permutations: int) -> CKAResult:
    r = _result()
    p_value = np.full((4, 4), 0.01)
    p_value[0, 1] = p_value[2, 3] = 0.4
    m = r.matrix
    r.calibration = {
        "ci_low": m - 0.05,
        "ci_high": m + 0.05,
        "null_mean": np.zeros((4, 4)),
        "null_std": np.full((4, 4), 0.02),
        "p_value": p_value,
    }
    r.settings.update(permutations=permutations, ci=0.9)
    return r


def test_heatmap_circles_the_cells_that_do_not_beat_the_null_and_can_annotate() -> None:
    fig = heatmap(_calibrated(20), annotate=True)
    ax = fig.axes[0]
    circles = ax.collections[-1].get_offsets()
    assert sorted(map(tuple, np.asarray(circles))) == [(1.5, 0.5), (3.5, 2.5)]  # (col, row) + 0.5
    assert "not above chance" in fig.legends[0].get_texts()[0].get_text()
    assert len(ax.texts) == 16  # every cell's value
    few = heatmap(_calibrated(10))
    assert "need 19" in few.legends[0].get_texts()[0].get_text()  # 1/11 > 0.05: nothing circled
    assert len(few.axes[0].collections) == len(heatmap(_result()).axes[0].collections)


def test_curve_draws_the_interval_and_the_null_band() -> None:
    r = _calibrated(20)
    ax = curve(r).axes[0]
    band, null = ax.collections[0], ax.collections[1]
    idx = np.arange(4)
    edges = set(np.round(band.get_paths()[0].vertices[:, 1], 9))  # both edges of the band
    for key in ("ci_low", "ci_high"):
        assert set(np.round(r.calibration[key][idx, idx], 9)) <= edges
    assert np.allclose(null.get_paths()[0].vertices[:, 1].max(), 0.04)  # null mean + 2 std
    assert "90 % interval" in ax.lines[0].get_label()


def test_curve_overlays_results_with_std_band() -> None:
    fig = curve([_result(), _result()], labels=["vanilla", "msun"])
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert len(ax.collections) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.diag(_result().matrix))


def test_the_curve_legend_names_a_band_only_where_one_is_drawn() -> None:
    one = CKAResult(_result().matrices[:1], *([_result().layers_a] * 2), _result().settings)
    ax = curve(one).axes[0]
    assert ax.lines[0].get_label() == "toy"  # one sweep: no spread, no band
    assert len(ax.collections) == 0
    one.calibration.update(ci_low=np.full((4, 4), np.nan), ci_high=np.full((4, 4), np.nan))
    assert curve(one).axes[0].lines[0].get_label() == "toy"  # one batch: a NaN interval
    three = curve(_result()).axes[0]
    assert three.lines[0].get_label() == "toy (± std over sweeps)"
    assert len(three.collections) == 1


def test_the_curve_legend_lists_chance_after_every_line() -> None:
    first, second = _result(), _result()
    for r in (first, second):
        r.calibration.update(null_mean=np.zeros((4, 4)), null_std=np.full((4, 4), 0.01))
    [legend] = curve([first, second], labels=["a", "b"]).legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["a (± std over sweeps)", "b (± std over sweeps)", NULL_BAND]


@pytest.mark.parametrize(
    ("settings", "inputs"),
    [
        ({"weights": "none", "checkpoint": None, "data": "shapes"}, "random weights, synthetic"),
        (
            {"weights": None, "checkpoint": "runs/fm/last.pt", "data": "fashionmnist"},
            "checkpoint fm/last.pt, fashionmnist",
        ),
        ({"weights": "default", "data": "cifar10:~/data"}, "pretrained weights, cifar10"),
        ({"weights": "IMAGENET1K_V2", "data": "/data/imagenet/val"}, "IMAGENET1K_V2 weights, "),
        ({"weights": "none", "data": "/data"}, "random weights, data)"),  # not //data
        ({"weights": "none", "data": "."}, "random weights, .)"),  # the folder as given
        (
            {"mode": "models", "model_b": "r34", "weights": "none", "weights_b": "default"},
            "toy: random weights, r34: pretrained weights",
        ),
    ],
)
def test_the_heatmap_names_its_weights_and_images_in_every_case(
    settings: dict[str, object], inputs: str
) -> None:
    base = _result()
    result = CKAResult(base.matrices, base.layers_a, base.layers_b, {**base.settings, **settings})
    title = " ".join(heatmap(result).axes[0].get_title().split())  # wrapped to its width
    assert f"({inputs}" in title
    if settings.get("data") == "/data/imagenet/val":
        assert title.endswith("(IMAGENET1K_V2 weights, imagenet/val)")


def test_two_model_results_get_only_a_heatmap(tmp_path: Path) -> None:
    paths = save_figures(_result(mode="models"), tmp_path)
    assert sorted(p.name for p in paths) == ["heatmap.pdf", "heatmap.png"]
    with pytest.raises(InputError, match="no same-layer"):
        curve(_result(mode="models"))


def test_save_creates_a_missing_folder(tmp_path: Path) -> None:
    paths = save(curve(_result()), tmp_path / "replot" / "deeper" / "curve")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "replot/deeper/curve.png",
        "replot/deeper/curve.pdf",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_redraw_keeps_what_the_folder_holds_and_replaces_figures_only_when_asked(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "talk.md").write_text("mine")
    (folder / "heatmap.png").write_bytes(b"my own drawing")
    with pytest.raises(InputError, match=r"already holds heatmap\.png\. Hint: pass --overwrite"):
        redraw(_result(), folder)
    assert (folder / "heatmap.png").read_bytes() == b"my own drawing"
    assert sorted(p.name for p in folder.iterdir()) == ["heatmap.png", "talk.md"]
    paths = redraw(_result(), folder, overwrite=True)
    assert sorted(p.name for p in paths) == ["curve.pdf", "curve.png", "heatmap.pdf", "heatmap.png"]
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "talk.md").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == [  # no staging folder left behind
        "curve.pdf",
        "curve.png",
        "heatmap.pdf",
        "heatmap.png",
        "talk.md",
    ]


def _layers(n: int) -> list[str]:
    return ["maxpool", *(f"layer{1 + i // 12}.{i % 12}" for i in range(n - 1))]


def _no_overlap(labels: list) -> bool:
    boxes = sorted(
        (b for b in (t.get_window_extent() for t in labels) if b.width), key=lambda b: b.y0
    )
    return all(a.y1 <= b.y0 + 0.5 for a, b in itertools.pairwise(boxes))


@pytest.mark.parametrize(("rows", "cols"), [(9, 17), (17, 9), (50, 50)])
def test_heatmaps_fill_their_canvas_with_readable_labels(rows: int, cols: int) -> None:
    settings = {"mode": "models", "model": "resnet18", "model_b": "resnet34", "scales": [224, 224]}
    result = CKAResult(
        np.random.default_rng(0).random((rows, cols)), _layers(rows), _layers(cols), settings
    )
    fig = heatmap(result)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert "resnet18" in ax.get_title()
    assert "resnet34" in ax.get_title()
    assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())
    assert _no_overlap(ax.get_yticklabels())
    canvas = fig.bbox.width * fig.bbox.height
    assert ax.get_window_extent().width * ax.get_window_extent().height > 0.3 * canvas
