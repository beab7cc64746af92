"""``msun train --split-at auto``: the split point from a cross-scale CKA analysis.

The analysis is a saved ``ckascope compare`` result (``--cka-from``) or, when pretrained
weights of the architecture are available, one run now on the validation images: the pretrained
vanilla model at the smallest and the largest training scale. ``ckascope.split`` applies its
rule to msun's split points. Every process takes part in the analysis and reaches the same
choice; rank 0 writes the analysis beside the run. A resumed run keeps the split it chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckascope.cliutils import make_console
from ckascope.compare import compare_scales
from ckascope.distributed import DistInfo
from ckascope.errors import InputError, WeightsUnavailableError
from ckascope.fileio import write_json
from ckascope.models import build_model
from ckascope.result import CKAResult
from ckascope.split import SplitSuggestion, split_table, suggest_split
from msun.config import TrainConfig
from msun.splits import split_candidates

#: Images of the on-the-fly analysis (the paper used 1280; this is a quick, stable estimate).
ANALYSIS_IMAGES = 512


def analysis(cfg: TrainConfig, info: DistInfo) -> CKAResult:
    """The cross-scale CKA result the choice is made from."""
    if cfg.cka_from:
        result = CKAResult.load(cfg.cka_from)
        if result.arch != cfg.model:
            raise InputError(
                f"--cka-from {cfg.cka_from} analysed {result.arch}, not {cfg.model}. "
                "Hint: analyse the architecture you train"
            )
        return result
    try:
        model = build_model(cfg.model, "default")
    except WeightsUnavailableError as e:
        raise InputError(
            f"--split-at auto needs a CKA analysis, and pretrained {cfg.model} weights are not "
            f"available here. Hint: pass --cka-from DIR (from ckascope compare --model {cfg.model} "
            "--out DIR) or name the split with --split-at"
        ) from e
    scales = (min(cfg.scales), max(cfg.scales))
    return compare_scales(
        model,
        cfg.data,
        scales,
        image_size=cfg.image_size,
        num_images=ANALYSIS_IMAGES,
        batch_size=max(4, min(128, ANALYSIS_IMAGES // info.world_size)),  # a batch per process
        seed=cfg.seed,
        device=info.device,
        rank=info.rank,
        world_size=info.world_size,
        settings={"model": cfg.model, "arch": cfg.model, "weights": "default"},
    )


def choose(cfg: TrainConfig, saved: Mapping[str, Any] | None, info: DistInfo) -> str:
    """The split point for ``--split-at auto``.

    Every process takes part in the analysis (under torchrun its sweep is shared out and its
    sums combined, which are collective calls: rank 0 alone would wait forever), so every
    process reaches the same result and the same choice; rank 0 records it.
    """
    if saved is not None:
        return str(saved["train_config"]["split_at"])
    result = analysis(cfg, info)
    suggestion = suggest_split(result, split_candidates(cfg.model, cfg.scales))
    if info.is_main:
        _record(result, suggestion, Path(cfg.out))
    return suggestion.choice


def _record(result: CKAResult, suggestion: SplitSuggestion, out: Path) -> None:
    result.save(out / "split-analysis", overwrite=True)
    write_json(out / "split-analysis" / "suggestion.json", suggestion.to_dict())
    console = make_console()
    console.print(split_table(suggestion))
    console.print(f"--split-at auto -> {suggestion.choice}: {suggestion.reason}")
