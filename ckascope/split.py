"""Where to split a backbone into per-scale subnets and a shared trunk, from cross-scale CKA.

The rule. The trunk is shared by every input scale, so its input should already look the same
at every scale: walking the legal split points in forward order, choose the first one whose
input (the output of the last analysed layer before the trunk) has a same-layer cross-scale CKA
of at least ``threshold``. The scale-sensitive shallow layers before it stay in per-scale
subnets; everything after is shared. The earliest such point also keeps the extra parameters of
the subnets smallest.

The default threshold, 0.8, is where CKA is conventionally read as "highly similar". On the
paper's ResNet-50 curve (stem 0.53, layer1's blocks 0.85-0.86, layer2's 0.83-0.90, ...) it
separates the scale-sensitive stem from layer1's outputs and picks ``layer2``, the published
split. When no split point reaches the threshold, the one whose input is most scale-consistent
is chosen (the earliest on ties) and the reason says so; when all do, the earliest.

How sure the choice is. On a result with bootstrap replicates (``ckascope compare --bootstrap``)
the rule is applied again to every replicate's diagonal: ``stability`` is the share of
replicates that choose each candidate. The choice is called stable when at least
``STABLE_SHARE`` of them agree with it; otherwise other images could well have given another
split, and the output says so.

A split point is placed among the analysed layers by module name: its trunk starts at the first
analysed layer that is, or lies inside, the split module, or that follows it among numbered
siblings (``features.26`` follows ``features.24``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from rich.table import Table

from ckascope.errors import InputError
from ckascope.result import CKAResult
from ckascope.vocab import DEFAULT_THRESHOLD

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")
#: The share of bootstrap replicates that must agree with the choice for it to be called stable.
STABLE_SHARE = 0.8


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

    @property
    def stable(self) -> bool | None:
        """Whether at least ``STABLE_SHARE`` of the replicates choose the same; None: unknown."""
        if self.stability is None:
            return None
        return self.stability.get(self.choice, 0.0) >= STABLE_SHARE

    def stability_text(self) -> str:
        """The stability in words, e.g. "layer2 in 87 % of 1000 bootstrap resamples; ..."."""
        if self.stability is None:
            return (
                "stability unknown: this result has no bootstrap resamples. Hint: rerun "
                "ckascope compare with --bootstrap 1000 (no extra forward pass)"
            )
        shares = sorted(self.stability.items(), key=lambda kv: -kv[1])
        listed = "; ".join(f"{name} in {100 * share:.0f} %" for name, share in shares if share)
        text = f"stability: {listed} of {self.replicates} bootstrap resamples"
        if self.stable:
            return f"{text} (stable: at least {100 * STABLE_SHARE:.0f} % agree)"
        return (
            f"{text}. UNSTABLE: fewer than {100 * STABLE_SHARE:.0f} % of the resamples choose "
            f"{self.choice}; other images could give another split. Hint: more images "
            "(--num-images, --repeats), or weigh the candidates above by their cost"
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
            "notes": list(self.notes),
        }


def _inside_or_after(layer: str, module: str) -> bool:
    base = layer.split("#")[0]
    if base == module or base.startswith(module + "."):
        return True
    return _sibling_order(base, module) == 1


def _sibling_order(layer: str, module: str) -> int:
    """1 if ``layer`` follows ``module`` among numbered siblings, -1 if it precedes, else 0."""
    a, b = _NUMBERED.match(layer), _NUMBERED.match(module)
    if not (a and b) or a.group(1) != b.group(1):
        return 0
    return 1 if int(a.group(2)) > int(b.group(2)) else -1


def position(layers: Sequence[str], module: str) -> int | None:
    """Index of the first analysed layer in the trunk starting at ``module``.

    ``len(layers)`` when every analysed layer precedes it among numbered siblings; None when
    the module cannot be placed among these layers at all.
    """
    for i, layer in enumerate(layers):
        if _inside_or_after(layer, module):
            return i
    if any(_sibling_order(layer.split("#")[0], module) == -1 for layer in layers):
        return len(layers)
    return None


def _row(candidate: SplitCandidate, layers: list[str], diag: list[float]) -> SplitRow | None:
    pos = position(layers, candidate.trunk_module)
    if pos is None:
        return None
    if pos == 0:
        return SplitRow(candidate, None, None, None, None)
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
) -> SplitSuggestion:
    """Applies the rule of the module docstring to a cross-scale result.

    Args:
        result: A result of one model at two scales (it needs a same-layer diagonal).
        split_points: Legal split points in forward order (names, or candidates with costs).
        threshold: Minimum CKA of the trunk's input, in [0, 1].

    Returns:
        The suggestion; ``choice`` is always one of ``split_points``. With bootstrap replicates
        in the result, ``stability`` gives the share of them choosing each candidate.

    Raises:
        InputError: Threshold outside [0, 1], no diagonal, or split points that do not fit the
            analysed layers.
    """
    if not 0.0 <= threshold <= 1.0:
        raise InputError(
            f"the threshold must be in [0, 1], got {threshold}. Hint: the default is {DEFAULT_THRESHOLD}"
        )
    diagonal = result.diagonal()
    layers, diag = list(diagonal["layer"]), [float(v) for v in diagonal["mean"]]
    candidates = [c if isinstance(c, SplitCandidate) else SplitCandidate(c) for c in split_points]
    suggestion = replace(_suggest(layers, diag, candidates, threshold), notes=_notes(result))
    replicates = result.calibration.get("bootstrap_diagonal")
    if replicates is None or not len(replicates):
        return suggestion
    return replace(
        suggestion,
        stability=_stability(layers, replicates, candidates, threshold),
        replicates=len(replicates),
    )


def _notes(result: CKAResult) -> tuple[str, ...]:
    """Warnings about the analysis itself: a network with random weights says little."""
    s = result.settings
    if s.get("weights") == "none" and not s.get("checkpoint"):
        return (
            "the analysed network has random weights (--weights none): its cross-scale CKA shows "
            "the architecture, not what training learns, and a split chosen from it says little "
            "about a trained network. Hint: --weights default, or --checkpoint of a trained model",
        )
    return ()


def _suggest(
    layers: list[str], diag: list[float], candidates: list[SplitCandidate], threshold: float
) -> SplitSuggestion:
    """The rule on one diagonal."""
    rows = _rows(layers, diag, candidates)
    if any(r.input_layer is not None for r in rows) and not _measured(rows):
        raise InputError(
            "the same-layer CKA of every split point's input is NaN in this result (constant "
            "or degenerate layers, or a failed analysis). Hint: check the compare run's "
            "warnings, or analyse other layers"
        )
    if not _measured(rows):
        names = ", ".join(c.name for c in candidates)
        raise InputError(
            f"the split points ({names}) do not fit the analysed layers ({', '.join(layers[:6])}, ...). "
            "Hint: give the split points of this model's family, and analyse layers before and after them"
        )
    return _choose(rows, threshold)


def _rows(layers: list[str], diag: list[float], candidates: list[SplitCandidate]) -> list[SplitRow]:
    return [r for r in (_row(c, layers, diag) for c in candidates) if r is not None]


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


def _choose(rows: list[SplitRow], threshold: float) -> SplitSuggestion:
    for row in rows:
        if row.consistent(threshold):
            earlier = [r for r in rows if r is not row and rows.index(r) < rows.index(row)]
            why = (
                f"the trunk's input ({row.input_layer}) has cross-scale CKA {row.input_cka:.3f} >= {threshold}"
                + (
                    ", while every earlier split point's input is below it"
                    if earlier
                    else ", the earliest legal split point"
                )
            )
            return SplitSuggestion(row.candidate.name, why, threshold, rows)
    measured = [r for r in rows if r.input_cka is not None]
    best = max(measured, key=lambda r: (r.input_cka, -rows.index(r)))
    why = (
        f"no split point's input reaches CKA {threshold}; {best.input_layer} is the most scale-consistent "
        f"trunk input ({best.input_cka:.3f}). Hint: a lower --threshold, or more layers in the analysis"
    )
    return SplitSuggestion(best.candidate.name, why, threshold, rows)


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
