"""Where to split a backbone into per-scale subnets and a shared trunk, from cross-scale CKA.

The rule. The trunk is shared by every input scale, so its input should already look the same
at every scale: walking the legal split points in forward order, choose the first one whose
input (the output of the last analysed layer before the trunk) has a same-layer cross-scale CKA
of at least ``threshold``. The scale-sensitive shallow layers before it stay in per-scale
subnets; everything after is shared. The earliest such point also keeps the extra parameters of
the subnets smallest.

The split points are taken in forward order, their order in the analysed layers, whatever order
they were given in. The rule reads every split point's input, so each one must be measured: a
point whose input is not among the analysed layers (it lies before the first analysed layer, or
the stage before it has no analysed layer, or it cannot be placed among them at all) is refused,
naming it, rather than judged on values that were never measured.

The default threshold, 0.8, is where CKA is conventionally read as "highly similar". On the
paper's ResNet-50 curve (stem 0.53, layer1's blocks 0.85-0.86, layer2's 0.83-0.90, ...) it
separates the scale-sensitive stem from layer1's outputs and picks ``layer2``, the published
split. When no split point reaches the threshold, the one whose input is most scale-consistent
is chosen (the earliest on ties) and the reason says so; when all do, the earliest.

How sure the choice is. On a result with bootstrap replicates (``ckascope compare --bootstrap``)
the rule is applied again to every replicate's diagonal: ``stability`` is the share of
replicates that choose each candidate. The choice is called stable when at least
``STABLE_SHARE`` of them agree with it; otherwise other images could well have given another
split, and the output says so. A bootstrap over fewer than ``FEW_BATCHES`` minibatches is too
coarse to judge either way (``ckascope.calibration``): the output says so and names the fix.

A split point is placed among the analysed layers by module name: its trunk starts at the first
analysed layer that is, or lies inside, the split module, or that follows it among numbered
siblings (``features.26`` follows ``features.24``; ``layer3.1`` precedes ``layer4``, as its
stage ``layer3`` does); with none, just after the last analysed layer known to precede it.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.table import Table

from ckascope.calibration import FEW_BATCHES, MIN_BATCHES
from ckascope.errors import InputError
from ckascope.result import FILES, CKAResult, is_result_dir
from ckascope.vocab import DEFAULT_THRESHOLD

_NUMBERED = re.compile(r"^(.*?)(\d+)$")  # layer3, features.26
#: What the reason suggests when no split point reaches the threshold (suggest-split's options).
LOW_CKA_HINT = "a lower --threshold, or more layers in the analysis"
#: The share of bootstrap replicates that must agree with the choice for it to be called stable.
STABLE_SHARE = 0.8


@dataclass(frozen=True)
class SplitHints:
    """What a suggestion's stability and notes suggest: the fixes of a better analysis.

    The defaults name the options of ``ckascope compare`` and ``suggest-split`` (which takes
    them when it compares); a caller whose options are others (a trainer, whose analysis
    ``ckascope compare`` made) gives its own words, as it gives ``suggest_split``'s ``hint``.

    Attributes:
        trained_weights: The analysed network had random weights.
        more_batches: The bootstrap resampled too few minibatches to judge the stability.
        more_images: The choice is unstable over the bootstrap resamples.
        bootstrap: The analysis has no bootstrap resamples.
    """

    trained_weights: str = "--weights default, or --checkpoint of a trained model"
    more_batches: str = "more --num-images or a smaller --batch-size"
    more_images: str = (
        "more images (--num-images, --repeats), or weigh the candidates above by their cost"
    )
    bootstrap: str = "rerun ckascope compare with --bootstrap 1000 (no extra forward pass)"


#: suggest-split's own hints.
SUGGEST_SPLIT_HINTS = SplitHints()


@dataclass(frozen=True)
class SplitCandidate:
    """A legal split point.

    Attributes:
        name: The value a trainer's ``--split-at`` takes (e.g. "layer2", "denseblock2").
        module: Name of the module where the trunk starts in the analysed model (e.g.
            "features.denseblock2"); defaults to ``name``.
        extra_params: Parameters the per-scale subnets add to the vanilla model, if known.
        macs: Mean multiply-accumulates per image of the routed model, if known.
    """

    name: str
    module: str = ""
    extra_params: int | None = None
    macs: float | None = None

    @property
    def trunk_module(self) -> str:
        """The module where the trunk starts."""
        return self.module or self.name


@dataclass(frozen=True)
class SplitRow:
    """How one candidate looks in the analysis."""

    candidate: SplitCandidate
    input_layer: str | None
    input_cka: float | None
    min_subnet_cka: float | None
    min_subnet_layer: str | None

    def consistent(self, threshold: float) -> bool:
        """Whether the trunk's input reaches the threshold."""
        return self.input_cka is not None and self.input_cka >= threshold


@dataclass(frozen=True)
class SplitSuggestion:
    """The chosen split point, why, and the table of candidates."""

    choice: str
    reason: str
    threshold: float
    rows: list[SplitRow]
    stability: dict[str, float] | None = None  # candidate -> share of bootstrap replicates
    replicates: int = 0
    notes: tuple[str, ...] = ()  # what a reader must know about the analysis behind it
    minibatches: int | None = None  # batches a bootstrap replicate draws; 0: none; None: unknown
    hints: SplitHints = SUGGEST_SPLIT_HINTS  # the fixes its stability text names

    @property
    def coarse(self) -> bool:
        """Whether the bootstrap had too few minibatches (``FEW_BATCHES``) to judge stability."""
        return self.minibatches is not None and self.minibatches < FEW_BATCHES

    @property
    def stable(self) -> bool | None:
        """Whether at least ``STABLE_SHARE`` of the replicates choose the same; None: unknown."""
        if self.stability is None or self.coarse:
            return None
        return self.stability.get(self.choice, 0.0) >= STABLE_SHARE

    def stability_text(self) -> str:
        """The stability in words, e.g. "layer2 in 87 % of 1000 bootstrap resamples; ..."."""
        if self.stability is None:
            return _no_resamples(self.minibatches, self.hints)
        shares = sorted(self.stability.items(), key=lambda kv: -kv[1])
        listed = "; ".join(f"{name} in {100 * share:.0f} %" for name, share in shares if share)
        text = f"stability: {listed} of {self.replicates} bootstrap resamples"
        if self.coarse:
            # A handful of batches has few distinct resamples: 100 % agreement means little.
            return (
                f"{text}, but they resample only {self.minibatches} minibatches: too few to judge "
                f"stability (at least {FEW_BATCHES} needed). Hint: {self.hints.more_batches}"
            )
        if self.stable:
            return f"{text} (stable: at least {100 * STABLE_SHARE:.0f} % agree)"
        return (
            f"{text}. UNSTABLE: fewer than {100 * STABLE_SHARE:.0f} % of the resamples choose "
            f"{self.choice}; other images could give another split. Hint: {self.hints.more_images}"
        )

    def lines(self, chose: str = "--split-at") -> list[str]:
        """What to print under the table: the choice and why, its stability, the notes."""
        notes = [f"note: {note}" for note in self.notes]
        return [f"{chose} {self.choice}: {self.reason}", self.stability_text(), *notes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        rows = [
            {
                **asdict(r.candidate),
                **{k: v for k, v in asdict(r).items() if k != "candidate"},
                "consistent": r.consistent(self.threshold),
            }
            for r in self.rows
        ]
        return {
            "choice": self.choice,
            "reason": self.reason,
            "threshold": self.threshold,
            "candidates": rows,
            "stability": self.stability,
            "replicates": self.replicates,
            "stable": self.stable,
            "minibatches": self.minibatches,
            "notes": list(self.notes),
        }


def _no_resamples(minibatches: int | None, hints: SplitHints) -> str:
    """Why a result has no bootstrap replicates, and the fix (in ``hints``' words)."""
    if minibatches == 0:  # asked for, but one batch gives nothing to resample
        return (
            f"stability unknown: the bootstrap had fewer than {MIN_BATCHES} minibatches, "
            f"nothing to resample. Hint: {hints.more_batches}, for at least {FEW_BATCHES} "
            "minibatches"
        )
    return f"stability unknown: this result has no bootstrap resamples. Hint: {hints.bootstrap}"


def _relation(layer: str, module: str) -> int:
    """1 if ``layer`` is, lies inside or follows ``module``; -1 if it precedes it; 0 if unknown.

    Order is read from numbered siblings at the module's depth: ``layer3.1`` precedes ``layer4``
    (its ancestor ``layer3`` does), ``features.26`` follows ``features.24``.
    """
    base = layer.split("#")[0]
    if base == module or base.startswith(module + "."):
        return 1
    depth = module.count(".") + 1
    parts = base.split(".")
    if len(parts) < depth:
        return 0
    return _sibling_order(".".join(parts[:depth]), module)


def _sibling_order(name: str, module: str) -> int:
    """1 if ``name`` follows ``module`` among numbered siblings, -1 if it precedes, else 0."""
    a, b = _NUMBERED.match(name), _NUMBERED.match(module)
    if not (a and b) or a.group(1) != b.group(1):
        return 0
    return 1 if int(a.group(2)) > int(b.group(2)) else -1


def position(layers: Sequence[str], module: str) -> int | None:
    """Index of the first analysed layer in the trunk starting at ``module``.

    When no analysed layer is, lies inside or follows ``module``, the index after the last one
    known to precede it (``len(layers)`` when it is the last); None when the module cannot be
    placed among these layers at all.
    """
    relations = [_relation(layer, module) for layer in layers]
    if 1 in relations:
        return relations.index(1)
    before = [i for i, r in enumerate(relations) if r == -1]
    return before[-1] + 1 if before else None


def in_forward_order(
    layers: Sequence[str], candidates: Sequence[SplitCandidate]
) -> list[SplitCandidate]:
    """``candidates`` in the order of the analysed layers (as given on ties).

    As given when one cannot be placed among ``layers``: it has no depth to sort by (and
    ``check_analysed`` refuses it).
    """
    depths = [position(layers, c.trunk_module) for c in candidates]
    placed = [d for d in depths if d is not None]
    if len(placed) < len(depths):
        return list(candidates)
    return [c for _, c in sorted(zip(placed, candidates, strict=True), key=lambda dc: dc[0])]


def unanalysed(layers: Sequence[str], candidates: Sequence[SplitCandidate]) -> list[str]:
    """The candidates (given in forward order) whose trunk input is not among ``layers``.

    A candidate's input is the output of the stage before it (from the previous candidate on),
    so it is measured when an analysed layer lies in that stage: the candidate is placed after
    the first analysed layer, and after the previous candidate, which must be placed too.
    """
    depths = [position(layers, c.trunk_module) for c in candidates]
    missing = []
    for i, (candidate, depth) in enumerate(zip(candidates, depths, strict=True)):
        previous = depths[i - 1] if i else -1
        if not depth or previous is None or previous >= depth:
            missing.append(candidate.name)
    return missing


def check_analysed(
    layers: Sequence[str],
    candidates: Sequence[SplitCandidate],
    judged: Sequence[str] | None = None,
) -> None:
    """Refuses split points whose trunk input the analysis did not measure.

    Args:
        layers: The analysed layers, in forward order.
        candidates: Every split point, in forward order (a family's whole vocabulary, or those
            given): a point's input is measured when an analysed layer lies in the stage
            before it.
        judged: The names to check (default: all of ``candidates``).

    Raises:
        InputError: Naming the unmeasured points, with the analysed ones that could be judged.
    """
    names = [c.name for c in candidates] if judged is None else list(judged)
    missing = [name for name in unanalysed(layers, candidates) if name in names]
    if not missing:
        return
    measured = [name for name in names if name not in missing]
    them = "it" if len(missing) == 1 else "them"
    only = (
        f", or weigh only {', '.join(measured)} (suggest-split --split-points {','.join(measured)})"
        if measured
        else ""
    )
    raise InputError(
        f"the analysed layers ({_span(layers)}) do not show the trunk input of "
        f"{', '.join(missing)}: the rule cannot judge {them} on values never measured. Hint: "
        "compare with the default --layers (blocks), which show every split point's input" + only
    )


def _span(layers: Sequence[str]) -> str:
    """The analysed layers in a few words: all of them, or the first three and the last."""
    if len(layers) <= 5:
        return ", ".join(layers)
    return f"{', '.join(layers[:3])}, ..., {layers[-1]}"


def _row(candidate: SplitCandidate, layers: list[str], diag: list[float]) -> SplitRow:
    """How a candidate looks (its trunk starts after the first analysed layer: ``check_analysed``)."""
    pos = position(layers, candidate.trunk_module)
    assert pos, candidate  # None or 0: check_analysed refused it
    finite = [(v, layers[i]) for i, v in enumerate(diag[:pos]) if not math.isnan(v)]
    low = min(finite) if finite else (None, None)
    value = diag[pos - 1]
    return SplitRow(
        candidate, layers[pos - 1], None if math.isnan(value) else value, low[0], low[1]
    )


def suggest_split(
    result: CKAResult,
    split_points: Sequence[str | SplitCandidate],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    hint: str = LOW_CKA_HINT,
    hints: SplitHints = SUGGEST_SPLIT_HINTS,
) -> SplitSuggestion:
    """Applies the rule of the module docstring to a cross-scale result.

    Args:
        result: A result of one model at two scales (it needs a same-layer diagonal).
        split_points: Legal split points (names, or candidates with costs), in any order: they
            are taken in the order of the analysed layers.
        threshold: Minimum CKA of the trunk's input, in [0, 1].
        hint: What the reason suggests when no split point reaches the threshold; a caller
            whose options are not suggest-split's (a trainer) names its own.
        hints: What the stability and the notes suggest, in the same way.

    Returns:
        The suggestion; ``choice`` is always one of ``split_points``, ``rows`` are in forward
        order. With bootstrap replicates in the result, ``stability`` gives the share of them
        choosing each candidate.

    Raises:
        InputError: Threshold outside [0, 1], no diagonal, no split points, split points whose
            input the analysis did not measure (``check_analysed``), or only NaN inputs.
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(
            f"the threshold must be in [0, 1], got {threshold}. Hint: the default is {DEFAULT_THRESHOLD}"
        )
    diagonal = result.diagonal()
    layers, diag = list(diagonal["layer"]), [float(v) for v in diagonal["mean"]]
    if not split_points:
        raise InputError("no split points to choose from. Hint: give at least one")
    given = [c if isinstance(c, SplitCandidate) else SplitCandidate(c) for c in split_points]
    candidates = in_forward_order(layers, given)
    check_analysed(layers, candidates)
    suggestion = replace(
        _suggest(layers, diag, candidates, threshold, hint),
        notes=_notes(result, hints),
        minibatches=_minibatches(result),
        hints=hints,
    )
    replicates = result.calibration.get("bootstrap_diagonal")
    if replicates is None or not len(replicates):
        return suggestion
    return replace(
        suggestion,
        stability=_stability(layers, replicates, candidates, threshold),
        replicates=len(replicates),
    )


def _minibatches(result: CKAResult) -> int | None:
    """The batches a bootstrap replicate of the result draws (0: too few to resample).

    None when the result records none: no bootstrap, or a result older than the record.
    """
    draws = result.settings.get("bootstrap_draws")
    return None if draws is None else int(draws)


def _notes(result: CKAResult, hints: SplitHints) -> tuple[str, ...]:
    """Warnings about the analysis itself: a network with random weights says little."""
    s = result.settings
    if s.get("weights") == "none" and not s.get("checkpoint"):
        return (
            "the analysed network has random weights: its cross-scale CKA shows the "
            "architecture, not what training learns, and a split chosen from it says little "
            f"about a trained network. Hint: {hints.trained_weights}",
        )
    return ()


def _suggest(
    layers: list[str],
    diag: list[float],
    candidates: list[SplitCandidate],
    threshold: float,
    hint: str,
) -> SplitSuggestion:
    """The rule on one diagonal (every candidate's input analysed: ``check_analysed``)."""
    rows = _rows(layers, diag, candidates)
    if not _measured(rows):
        raise InputError(
            "the same-layer CKA of every split point's input is NaN in this result (constant "
            "or degenerate layers, or a failed analysis). Hint: check the compare run's "
            "warnings, or analyse other layers"
        )
    return _choose(rows, threshold, hint)


def _rows(layers: list[str], diag: list[float], candidates: list[SplitCandidate]) -> list[SplitRow]:
    return [_row(c, layers, diag) for c in candidates]


def _measured(rows: list[SplitRow]) -> bool:
    return any(r.input_cka is not None for r in rows)


def _stability(
    layers: list[str], replicates: Any, candidates: list[SplitCandidate], threshold: float
) -> dict[str, float]:
    """Share of bootstrap replicates (R, L) whose diagonal the rule sends to each candidate.

    A replicate whose every candidate input is NaN (degenerate layers) chooses none.
    """
    choices: Counter[str] = Counter()
    for diag in replicates:
        rows = _rows(layers, [float(v) for v in diag], candidates)
        if _measured(rows):
            choices[_choose(rows, threshold).choice] += 1
    return {c.name: choices[c.name] / len(replicates) for c in candidates}


def _choose(rows: list[SplitRow], threshold: float, hint: str = LOW_CKA_HINT) -> SplitSuggestion:
    """The rule on one diagonal's rows; ``hint`` ends the reason when no input reaches it."""
    for i, row in enumerate(rows):
        if row.consistent(threshold):
            # "considered": the candidates may be a given subset of the family's split points
            why = (
                f"the trunk's input ({row.input_layer}) has cross-scale CKA {row.input_cka:.3f} >= {threshold}"
                + (
                    f", while no earlier split point's input reaches {threshold}"
                    if i
                    else ", the earliest split point considered"
                )
            )
            return SplitSuggestion(row.candidate.name, why, threshold, rows)
    measured = [r for r in rows if r.input_cka is not None]
    best = max(measured, key=lambda r: (r.input_cka, -rows.index(r)))
    why = (
        f"no split point's input reaches CKA {threshold}; {best.input_layer} is the most scale-consistent "
        f"trunk input ({best.input_cka:.3f}). Hint: {hint}"
    )
    return SplitSuggestion(best.candidate.name, why, threshold, rows)


#: Suffixes of files torch.save writes by convention (a zip archive is recognised as well).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_analysis(path: str | Path, option: str, direct: str | None = None) -> CKAResult:
    """The saved ``ckascope compare`` result a split is chosen from; a file is refused.

    Args:
        path: The result's folder, as ``option`` gave it.
        option: The flag that named it (``--from``, ``--cka-from``), for the message.
        direct: A command that analyses a checkpoint at once (``ckascope suggest-split``),
            offered first when ``path`` is a checkpoint.

    Raises:
        InputError: ``path`` is a file (a checkpoint, one of a result's files, another file),
            with the hint that fits it; or what ``CKAResult.load`` refuses.
    """
    path = Path(path)
    if path.is_file():
        raise InputError(_file_instead_of_result(path, option, direct))
    return CKAResult.load(path)


def _file_instead_of_result(path: Path, option: str, direct: str | None) -> str:
    if path.name in FILES and is_result_dir(path.parent):
        return (
            f"{option} {path} is a file of a saved result; {option} takes its folder. "
            f"Hint: {option} {path.parent}"
        )
    if path.suffix in CHECKPOINT_SUFFIXES or zipfile.is_zipfile(path):
        now = f"{direct} --checkpoint {path} analyses it now, or " if direct else ""
        return (
            f"{option} {path} is a model checkpoint (a file), not a saved ckascope compare "
            f"result (a folder). Hint: {now}ckascope compare --checkpoint {path} --out DIR, "
            f"then {option} DIR"
        )
    return (
        f"{option} {path} is a file, not a saved ckascope compare result (a folder holding "
        "result.json). Hint: give the folder ckascope compare --out wrote"
    )


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.3f}"


def split_table(suggestion: SplitSuggestion) -> Table:
    """One row per candidate (rich table); the chosen one in bold."""
    table = Table(title=f"Split points (threshold {suggestion.threshold})")
    for column in (
        "--split-at",
        "trunk input",
        "input CKA",
        "lowest CKA in subnets",
        "extra params (M)",
        "mean GMACs",
        "consistent",
    ):
        table.add_column(column)
    for row in suggestion.rows:
        c = row.candidate
        table.add_row(
            c.name,
            row.input_layer or "-",
            _fmt(row.input_cka),
            f"{_fmt(row.min_subnet_cka)} ({row.min_subnet_layer or '-'})",
            _fmt(c.extra_params, 1e6),
            _fmt(c.macs, 1e9),
            "yes" if row.consistent(suggestion.threshold) else "no",
            style="bold" if c.name == suggestion.choice else None,
        )
    return table
