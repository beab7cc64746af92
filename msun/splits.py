"""msun's split vocabulary: the split-point candidates with their costs, and the run's split.

Three things live here:

- ``split_candidates``: every legal split point of an architecture with the parameters and
  MACs it costs. ``split_vocabulary`` is msun's ``ckascope.split_vocabularies`` entry point
  (pyproject.toml): ckascope imports it only when it needs a vocabulary, and never names msun.
- ``--split-at auto`` (``choose``): the split point from a cross-scale CKA analysis. The analysis
  is a saved ``ckascope compare`` result (``--cka-from``) or, when pretrained weights of the
  architecture are available, one run now on the validation images: the pretrained vanilla
  model at the smallest and the largest training scale. ``ckascope.split`` applies its rule to
  msun's split points. Every process takes part in the analysis and reaches the same choice;
  rank 0 writes the analysis beside the run. A resumed run keeps the split it chose.
- ``resolve_split``: the one place ``msun train`` decides its split point (and an MSUN's scales).

What a split point means (the legal ones, how a model is cut there) is ``msun.backbones``'; the
published default is the architecture's recipe (``msun.recipes``); the rule that picks one from
an analysis is ``ckascope.split``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ckascope.platform import (
    RESULT_OUTPUT,
    CKAResult,
    DistInfo,
    InputError,
    SplitCandidate,
    SplitHints,
    SplitSuggestion,
    WeightsUnavailableError,
    build_model,
    check_output_dir,
    compare_scales,
    is_self_describing,
    load_analysis,
    make_console,
    split_table,
    suggest_split,
    unanalysed,
    warn,
    write_json,
)
from msun.backbones import backbone_for, check_split, meta_model, split_points, supported_archs
from msun.config import TrainConfig
from msun.flops import flops_report
from msun.model import build_msun
from msun.recipes import recipe_for

#: Images of the on-the-fly analysis (the paper used 1280; this is a quick, stable estimate).
ANALYSIS_IMAGES = 512
#: Bootstrap replicates of that analysis, so the choice comes with its stability (~1 % cost).
ANALYSIS_BOOTSTRAP = 1000
#: Batches of that analysis: a bootstrap over fewer than 10 is too coarse to judge the
#: stability (ckascope's calibration.FEW_BATCHES). 16 of 32 images; more, smaller ones when
#: torchrun runs over 16 processes (each gets a batch).
ANALYSIS_BATCHES = 16
#: What the choice's reason suggests when no split point's input reaches the threshold: the
#: trainer's options (ckascope suggest-split's own hint names its --threshold).
LOW_CKA_HINT = (
    "name the split with --split-at (the table compares the points), or give --cka-from DIR, "
    "an analysis of your own (more images or layers, a network trained on your data)"
)
#: What the choice's stability and notes suggest, in msun train's options (ckascope's own
#: name ``ckascope compare``'s, which msun train has not or means otherwise: --weights,
#: --batch-size): a better analysis, made by ckascope compare and given with --cka-from.
SPLIT_HINTS = SplitHints(
    trained_weights=(
        "give --cka-from an analysis of a trained network (ckascope compare --checkpoint "
        "RUN/last.pt), or leave --cka-from out where the pretrained weights can be downloaded"
    ),
    more_batches=(
        "give --cka-from an analysis of more minibatches (ckascope compare with more "
        "--num-images or a smaller --batch-size)"
    ),
    more_images=(
        "give --cka-from an analysis of more images (ckascope compare --num-images, --repeats), "
        "or name the split with --split-at, weighing the candidates above by their cost"
    ),
    bootstrap=(
        "give --cka-from an analysis with bootstrap resamples (ckascope compare --bootstrap "
        "1000, no extra forward pass)"
    ),
)
#: The run's ``split-analysis/`` folder: the analysis, its figures and the choice made from it.
SPLIT_ANALYSIS = RESULT_OUTPUT._replace(
    name="an earlier split analysis", files=RESULT_OUTPUT.files | {"suggestion.json"}
)


# ----------------------------------------------------------------------------- candidates


def trunk_module(arch: str, split_at: str) -> str:
    """The torchvision module name where the trunk starts (DenseNet's live under ``features``)."""
    return f"features.{split_at}" if backbone_for(arch).family == "densenet" else split_at


def split_candidates(
    arch: str, scales: Sequence[int] = (32, 128, 224), num_classes: int = 1000
) -> list[SplitCandidate]:
    """Every legal split point of ``arch`` in forward order, with its costs.

    The costs are the parameters the per-scale subnets add and the routed model's mean MACs per
    image over the 13 test sizes (the ``upsample`` protocol), counted on the meta device (shapes only).
    Counting them builds an MSUN per split point (seconds), so each answer is kept.
    """
    return list(_candidates(arch, tuple(scales), num_classes))


@functools.lru_cache(maxsize=64)
def _candidates(arch: str, scales: tuple[int, ...], num_classes: int) -> tuple[SplitCandidate, ...]:

    out = []
    for name in split_points(arch):
        with torch.device("meta"):
            model = build_msun(arch, split_at=name, scales=tuple(scales), num_classes=num_classes)
        report = flops_report(model.eval())
        extra = report.parameters.total - report.parameters.vanilla
        out.append(
            SplitCandidate(name, trunk_module(arch, name), extra, report.mean("upsample") / 2)
        )
    return tuple(out)


def split_vocabulary(arch: str, scales: tuple[int, int] = (32, 224)) -> list[SplitCandidate] | None:
    """The ``ckascope.split_vocabularies`` entry: ``split_candidates``, None for other archs.

    The costs are those of an MSUN for the compared scales (smallest, largest): the paper's
    three nominal sizes at their ratios, ``msun_scales``.
    """
    return split_candidates(arch, msun_scales(*scales)) if arch in supported_archs() else None


def msun_scales(smallest: int, largest: int) -> tuple[int, ...]:
    """The paper's nominal sizes for two compared scales: 32 / 128 / 224 for (32, 224).

    The middle one is 4/7 of the largest (128 of 224) when it lies strictly between.
    """
    middle = round(largest * 4 / 7)
    return (smallest, middle, largest) if smallest < middle < largest else (smallest, largest)


# ----------------------------------------------------------------------------- --split-at auto


def analysis(cfg: TrainConfig, info: DistInfo) -> CKAResult:
    """The cross-scale CKA result the choice is made from.

    Without ``--cka-from``, the pretrained vanilla model's: a random network's cross-scale CKA
    shows its architecture, not what training learns.
    """
    if cfg.cka_from:
        return saved_analysis(cfg)
    try:
        model = build_model(cfg.model, "default")
    except WeightsUnavailableError as e:
        raise InputError(
            f"--split-at auto without --cka-from analyses the pretrained {cfg.model} (a random "
            "network's cross-scale CKA says little), and its weights are not available here. "
            f"Hint: {offline_analysis(cfg)}, then --cka-from DIR; or name the split with --split-at"
        ) from e
    scales = (min(cfg.scales), max(cfg.scales))
    return compare_scales(
        model,
        cfg.data,
        scales,
        image_size=cfg.image_size,
        num_images=ANALYSIS_IMAGES,
        batch_size=analysis_batch(info.world_size),
        seed=cfg.seed,
        bootstrap=ANALYSIS_BOOTSTRAP,
        device=info.device,
        rank=info.rank,
        world_size=info.world_size,
        settings={"model": cfg.model, "arch": cfg.model, "weights": "default"},
    )


def saved_analysis(cfg: TrainConfig) -> CKAResult:
    """The ``--cka-from`` result, refused when it analysed another architecture.

    Raises:
        InputError: Another architecture (its split points are not this network's), or what
            ``load_analysis`` refuses.
    """
    result = load_analysis(str(cfg.cka_from), "--cka-from")
    if result.arch != cfg.model:
        raise InputError(
            f"--cka-from {cfg.cka_from} analysed {result.arch}, not {cfg.model}. "
            "Hint: analyse the architecture you train"
        )
    return result


def offline_analysis(cfg: TrainConfig) -> str:
    """The ckascope compare commands that make an analysis for ``--cka-from`` without a download."""
    options = f"--scales {min(cfg.scales)} {max(cfg.scales)} --image-size {cfg.image_size}"
    options += f" --data {cfg.data}" if cfg.data else ""
    return (
        f"analyse a vanilla {cfg.model} you trained (msun train --method vanilla --out RUN; "
        f"ckascope compare --checkpoint RUN/last.pt {options} --out DIR) or, saying less, "
        f"random weights (ckascope compare --model {cfg.model} --weights none {options} --out DIR)"
    )


def note_other_scales(cfg: TrainConfig, result: CKAResult) -> None:
    """Notes a ``--cka-from`` analysis of other scales than the run's smallest and largest.

    The rule judges how alike the two ends of the run's range look (msun's own analysis
    compares them); another pair may still guide the choice, so it is used, and said.
    """
    ends = [min(cfg.scales), max(cfg.scales)]
    compared = sorted(int(s) for s in result.settings.get("scales") or [])
    if compared != ends:
        warn(
            f"--cka-from {cfg.cka_from} compared scales {' and '.join(map(str, compared))}, not "
            f"this run's smallest and largest ({ends[0]} and {ends[1]}), the pair --split-at "
            "auto's own analysis compares: the split is chosen from the other pair. Hint: "
            f"ckascope compare --scales {ends[0]} {ends[1]} analyses this run's range"
        )


def analysis_batch(world_size: int) -> int:
    """The analysis' batch size: ``ANALYSIS_BATCHES`` batches, and a batch for every process."""
    return max(4, min(ANALYSIS_IMAGES // ANALYSIS_BATCHES, ANALYSIS_IMAGES // world_size))


def choose(cfg: TrainConfig, saved: Mapping[str, Any] | None, info: DistInfo) -> str:
    """The split point for ``--split-at auto``.

    Every process takes part in the analysis (under torchrun its sweep is shared out and its
    sums combined, which are collective calls: rank 0 alone would wait forever), so every
    process reaches the same result and the same choice; rank 0 records it.
    """
    if saved is not None:
        return str(saved["train_config"]["split_at"])
    # a run started again (no checkpoint yet) replaces its own analysis, nothing else
    check_output_dir(Path(cfg.out) / "split-analysis", True, SPLIT_ANALYSIS)
    result = analysis(cfg, info)
    candidates = split_candidates(cfg.model, cfg.scales)
    check_measured(cfg, result, candidates)
    suggestion = suggest_split(result, candidates, hint=LOW_CKA_HINT, hints=SPLIT_HINTS)
    if cfg.cka_from:  # after every refusal: a refused analysis needs no note
        note_other_scales(cfg, result)
    if info.is_main:
        _record(result, suggestion, Path(cfg.out))
    return suggestion.choice


def check_measured(
    cfg: TrainConfig, result: CKAResult, candidates: Sequence[SplitCandidate]
) -> None:
    """Refuses an analysis (``--cka-from``) that does not show every split point's trunk input.

    The rule takes the first point whose input passes, so an unmeasured earlier point would be
    skipped unseen (ckascope's own refusal names suggest-split's flags, not the trainer's).

    Raises:
        InputError: Naming the unmeasured points and how to choose anyway.
    """
    missing = unanalysed(result.layers_a, candidates)
    if missing:
        raise InputError(
            f"--cka-from {cfg.cka_from} does not show the trunk input of {', '.join(missing)} "
            "(left out by its --layers), so --split-at auto cannot judge every point. Hint: analyse "
            f"with ckascope compare's default --layers (blocks), or name the split with --split-at"
        )


def _record(result: CKAResult, suggestion: SplitSuggestion, out: Path) -> None:
    result.save(
        out / "split-analysis",
        overwrite=True,
        extra=lambda folder: write_json(folder / "suggestion.json", suggestion.to_dict()),
        kind=SPLIT_ANALYSIS,
    )
    console = make_console()
    console.print(split_table(suggestion))
    for line in suggestion.lines("--split-at auto ->"):
        console.print(line, soft_wrap=True)  # one line each: a terminal wraps it


# ----------------------------------------------------------------------------- the run's split


def init_msun(init: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The MSUN config (``arch``, ``split_at``, ``scales``, ...) of an ``--init-from`` checkpoint.

    None when there is no such checkpoint or it holds another network (which has no split).
    """
    if init is None or not is_self_describing(init) or init.get("builder") != "msun":
        return None
    config: Mapping[str, Any] = init["config"]
    return config


def resolve_split(
    cfg: TrainConfig,
    init: Mapping[str, Any] | None,
    saved: Mapping[str, Any] | None,
    info: DistInfo,
) -> tuple[str | None, tuple[int, ...]]:
    """The run's split point and scales, decided once (the config and checkpoints keep them).

    The split point is, in this order: None for a run that is not an MSUN; the ``--init-from``
    MSUN's (fine-tuning keeps its structure, and its scales with it); the CKA choice for
    ``auto`` (a resumed run's own choice when resuming); the published default for None; else
    ``cfg.split_at``, checked. A resumed run with another explicit split is left to
    ``check_resume`` to refuse, naming both.

    Args:
        cfg: The config, with the architecture and method already taken from ``init``.
        init: The ``--init-from`` checkpoint, or None.
        saved: The training checkpoint a ``--resume`` continues, or None.
        info: This process (the ``auto`` analysis is collective under torchrun).

    Returns:
        The split point (None unless ``cfg.method`` is msun) and the scales.

    Raises:
        InputError: An unsupported architecture or illegal split point (the message lists the
            legal ones), or an ``auto`` analysis that cannot be had.
    """
    scales = tuple(cfg.scales)
    if cfg.method != "msun":
        return None, scales
    fine_tuned = init_msun(init)
    if fine_tuned is not None:
        return str(fine_tuned["split_at"]), tuple(fine_tuned["scales"])
    if cfg.split_at == "auto":
        return choose(cfg, saved, info), scales
    split_at = recipe_for(cfg.model).default_split if cfg.split_at is None else cfg.split_at
    backbone = backbone_for(cfg.model)
    return check_split(backbone, meta_model(cfg.model), cfg.model, split_at), scales
