"""ckascope as a platform: what other packages (a trainer, a model family's plugin) build on.

ckascope is a CKA library (``ckascope.__all__``) and, underneath, the machinery its command line
runs on: data sources, views, models and checkpoints, files, progress, distributed start-up,
errors. Another package that wants the same machinery imports it from here and only from here;
``tests/test_layering.py`` holds this repository's trainer to that. The names live in their home modules (this module
only re-exports them) and load on first use (PEP 562), so importing the light groups below
costs no torch: a command line's ``--help`` answers before torch is imported
(``tests/test_cli.py``).

Stability: the names in ``__all__`` are what other packages may rely on. Each keeps its name,
its meaning and the arguments callers pass today; it grows only in ways that leave callers as
they are (a new keyword with a default, a new name). Where it cannot, the change is made here
and in every caller in this repository at once. Everything else, the home modules' paths
included, may change without notice: a name reached through its home module is ckascope's own
business.

The groups:

Errors (no torch): the typed errors a command line prints as one line with a hint, exit 2 or 1.
    ``CKAScopeError``, ``InputError``, ``WeightsUnavailableError``, ``hint_close`` (an
    "unknown name 'x'. Hint: did you mean ...?" message), and ``warn`` (a note to the user:
    one ``note: ...`` line on a command line).

Command line (no torch): click and rich plumbing shared by the command lines. ``FriendlyGroup``
    (one-line errors, Ctrl-C as exit 130), ``config_field`` and ``config_options`` (a config
    dataclass whose fields are also the command's options; ``REQUIRED`` marks a field without
    a default), ``explicit_options`` (the options a user gave, not left at default),
    ``make_console``, ``renamed_flags`` (old flag names kept for a release, with a
    note), ``launched_rank`` (this process's rank and the number of processes as torchrun
    sets them, known before any process group: what the job says once, rank 0 says), and
    ``run`` (a console script's start, quiet on Ctrl-C before the command line is imported).

Vocabulary (no torch): the option values both packages accept. ``Kernel``, ``MAX_SCALE``,
    ``MEMORY_FORMATS``, ``MIN_IMAGE_SIZE``, ``MemoryFormat``, ``PROTOCOLS``, ``Precision``,
    ``Protocol``.

Plugins (no torch): ``register`` adds a model builder or a split vocabulary to ckascope's
    registries in code (installed packages use the entry points ``ckascope.plugins`` describes).

Progress (no torch): ``Reporter`` and ``make_progress``, a bar on a terminal and a line every
    few seconds in a log.

Data sources: images at an image size, from an ImageFolder, a torchvision set, Fashion-MNIST
    or the synthetic set. ``Batch``, ``IMAGENET_MEAN``, ``IMAGENET_STD``, ``build_dataset``,
    ``collate_skip``, ``dataset_len``, ``default_resize``, ``eval_transform``,
    ``plan_batches``, ``subset_indices``, ``to_rgb``, ``warn_skipped``.

Views: an image batch at another scale. ``check_protocol``, ``down_and_up``, ``resize``.

Distributed: one process or torchrun's many. ``DistInfo``, ``close_distributed``,
    ``init_distributed``.

Files and output folders: atomic writes and folders that never replace a result by accident.
    ``atomic_path``, ``atomic_write``, ``json_matrix``, ``torch_save``, ``write_json``,
    ``write_text``; ``OutputKind`` (what ``--overwrite`` may replace; ``RESULT_OUTPUT``: a
    ckascope result and its figures), ``check_output_dir``, ``next_free``, ``staged_folder``.

Models and checkpoints: torchvision models and self-describing checkpoints.
    ``CHECKPOINT_FORMAT``, ``build_model``, ``checkpoint_label``, ``ensure_weights`` (the
    pretrained weights ``build_model`` would load are at hand, checked before any work),
    ``input_side`` (the side a checkpoint's model was fed in training: one rule for its readers),
    ``is_self_describing``, ``load_checkpoint``, ``model_from_checkpoint``, ``read_checkpoint``.

Execution layouts: the memory format of the forward passes. ``Layout``, ``choose_layout``,
    ``in_layout``, ``to_layout``.

Multi-path models: the protocol a model with one path per scale meets to be compared.
    ``MultiPathModel``, ``PathView``, ``is_multipath``.

Measurement and split suggestion: the comparison itself and what is read from it.
    ``CKAResult``, ``compare_scales``, ``SplitCandidate``, ``SplitHints`` (the fixes a
    suggestion's stability and notes name, in the caller's options), ``SplitSuggestion``,
    ``load_analysis``, ``split_table``, ``suggest_split``, ``unanalysed`` (split points whose
    trunk input an analysis did not measure).

Plots: ``curve`` and ``heatmap`` of a result, and ``save`` (a figure as PNG and PDF, atomically).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Each public name and its home module, in the groups of the docstring.
_EXPORTS = {
    # errors
    "CKAScopeError": "ckascope.errors",
    "InputError": "ckascope.errors",
    "WeightsUnavailableError": "ckascope.errors",
    "hint_close": "ckascope.errors",
    "warn": "ckascope.errors",
    # command line
    "FriendlyGroup": "ckascope.cliutils",
    "REQUIRED": "ckascope.cliutils",
    "config_field": "ckascope.cliutils",
    "config_options": "ckascope.cliutils",
    "explicit_options": "ckascope.cliutils",
    "launched_rank": "ckascope.cliutils",
    "make_console": "ckascope.cliutils",
    "renamed_flags": "ckascope.cliutils",
    "run": "ckascope.entry",
    # vocabulary
    "Kernel": "ckascope.vocab",
    "MAX_SCALE": "ckascope.vocab",
    "MIN_IMAGE_SIZE": "ckascope.vocab",
    "MEMORY_FORMATS": "ckascope.vocab",
    "MemoryFormat": "ckascope.vocab",
    "PROTOCOLS": "ckascope.vocab",
    "Precision": "ckascope.vocab",
    "Protocol": "ckascope.vocab",
    # plugins
    "register": "ckascope.plugins",
    # progress
    "Reporter": "ckascope.progress",
    "make_progress": "ckascope.progress",
    # data sources
    "Batch": "ckascope.data",
    "IMAGENET_MEAN": "ckascope.data",
    "IMAGENET_STD": "ckascope.data",
    "build_dataset": "ckascope.data",
    "collate_skip": "ckascope.data",
    "dataset_len": "ckascope.data",
    "default_resize": "ckascope.data",
    "eval_transform": "ckascope.data",
    "plan_batches": "ckascope.data",
    "subset_indices": "ckascope.data",
    "to_rgb": "ckascope.data",
    "warn_skipped": "ckascope.data",
    # views
    "check_protocol": "ckascope.views",
    "down_and_up": "ckascope.views",
    "resize": "ckascope.views",
    # distributed
    "DistInfo": "ckascope.distributed",
    "close_distributed": "ckascope.distributed",
    "init_distributed": "ckascope.distributed",
    # files and output folders
    "atomic_path": "ckascope.fileio",
    "atomic_write": "ckascope.fileio",
    "json_matrix": "ckascope.fileio",
    "torch_save": "ckascope.fileio",
    "write_json": "ckascope.fileio",
    "write_text": "ckascope.fileio",
    "OutputKind": "ckascope.result",
    "RESULT_OUTPUT": "ckascope.result",
    "check_output_dir": "ckascope.result",
    "next_free": "ckascope.result",
    "staged_folder": "ckascope.result",
    # models and checkpoints
    "CHECKPOINT_FORMAT": "ckascope.models",
    "build_model": "ckascope.models",
    "checkpoint_label": "ckascope.models",
    "ensure_weights": "ckascope.models",
    "input_side": "ckascope.models",
    "is_self_describing": "ckascope.models",
    "load_checkpoint": "ckascope.models",
    "model_from_checkpoint": "ckascope.models",
    "read_checkpoint": "ckascope.models",
    # execution layouts
    "Layout": "ckascope.execution",
    "choose_layout": "ckascope.execution",
    "in_layout": "ckascope.execution",
    "to_layout": "ckascope.execution",
    # multi-path models
    "MultiPathModel": "ckascope.multipath",
    "PathView": "ckascope.multipath",
    "is_multipath": "ckascope.multipath",
    # measurement and split suggestion
    "CKAResult": "ckascope.result",
    "compare_scales": "ckascope.compare",
    "SplitCandidate": "ckascope.split",
    "SplitHints": "ckascope.split",
    "SplitSuggestion": "ckascope.split",
    "load_analysis": "ckascope.split",
    "split_table": "ckascope.split",
    "suggest_split": "ckascope.split",
    "unanalysed": "ckascope.split",
    # plots
    "curve": "ckascope.plot",
    "heatmap": "ckascope.plot",
    "save": "ckascope.plot",
}

__all__ = [
    "CHECKPOINT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_SCALE",
    "MEMORY_FORMATS",
    "MIN_IMAGE_SIZE",
    "PROTOCOLS",
    "REQUIRED",
    "RESULT_OUTPUT",
    "Batch",
    "CKAResult",
    "CKAScopeError",
    "DistInfo",
    "FriendlyGroup",
    "InputError",
    "Kernel",
    "Layout",
    "MemoryFormat",
    "MultiPathModel",
    "OutputKind",
    "PathView",
    "Precision",
    "Protocol",
    "Reporter",
    "SplitCandidate",
    "SplitHints",
    "SplitSuggestion",
    "WeightsUnavailableError",
    "atomic_path",
    "atomic_write",
    "build_dataset",
    "build_model",
    "check_output_dir",
    "check_protocol",
    "checkpoint_label",
    "choose_layout",
    "close_distributed",
    "collate_skip",
    "compare_scales",
    "config_field",
    "config_options",
    "curve",
    "dataset_len",
    "default_resize",
    "down_and_up",
    "ensure_weights",
    "eval_transform",
    "explicit_options",
    "heatmap",
    "hint_close",
    "in_layout",
    "init_distributed",
    "input_side",
    "is_multipath",
    "is_self_describing",
    "json_matrix",
    "launched_rank",
    "load_analysis",
    "load_checkpoint",
    "make_console",
    "make_progress",
    "model_from_checkpoint",
    "next_free",
    "plan_batches",
    "read_checkpoint",
    "register",
    "renamed_flags",
    "resize",
    "run",
    "save",
    "split_table",
    "staged_folder",
    "subset_indices",
    "suggest_split",
    "to_layout",
    "to_rgb",
    "torch_save",
    "unanalysed",
    "warn",
    "warn_skipped",
    "write_json",
    "write_text",
]


def __getattr__(name: str) -> Any:
    # Looked up in the home module at every access, never cached here: one object, one place,
    # so a test that patches a home module patches what the platform hands out.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ckascope.platform' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from ckascope.cliutils import (
        REQUIRED,
        FriendlyGroup,
        config_field,
        config_options,
        explicit_options,
        launched_rank,
        make_console,
        renamed_flags,
    )
    from ckascope.compare import compare_scales
    from ckascope.data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        Batch,
        build_dataset,
        collate_skip,
        dataset_len,
        default_resize,
        eval_transform,
        plan_batches,
        subset_indices,
        to_rgb,
        warn_skipped,
    )
    from ckascope.distributed import DistInfo, close_distributed, init_distributed
    from ckascope.entry import run
    from ckascope.errors import (
        CKAScopeError,
        InputError,
        WeightsUnavailableError,
        hint_close,
        warn,
    )
    from ckascope.execution import Layout, choose_layout, in_layout, to_layout
    from ckascope.fileio import (
        atomic_path,
        atomic_write,
        json_matrix,
        torch_save,
        write_json,
        write_text,
    )
    from ckascope.models import (
        CHECKPOINT_FORMAT,
        build_model,
        checkpoint_label,
        ensure_weights,
        input_side,
        is_self_describing,
        load_checkpoint,
        model_from_checkpoint,
        read_checkpoint,
    )
    from ckascope.multipath import MultiPathModel, PathView, is_multipath
    from ckascope.plot import curve, heatmap, save
    from ckascope.plugins import register
    from ckascope.progress import Reporter, make_progress
    from ckascope.result import (
        RESULT_OUTPUT,
        CKAResult,
        OutputKind,
        check_output_dir,
        next_free,
        staged_folder,
    )
    from ckascope.split import (
        SplitCandidate,
        SplitHints,
        SplitSuggestion,
        load_analysis,
        split_table,
        suggest_split,
        unanalysed,
    )
    from ckascope.views import check_protocol, down_and_up, resize
    from ckascope.vocab import (
        MAX_SCALE,
        MEMORY_FORMATS,
        MIN_IMAGE_SIZE,
        PROTOCOLS,
        Kernel,
        MemoryFormat,
        Precision,
        Protocol,
    )
