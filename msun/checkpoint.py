"""Self-describing MSUN checkpoints, readable with ``torch.load(weights_only=True)``.

One file::

    {"format": "ckascope-model", "builder": "msun",
     "config": {"arch", "split_at", "scales", "num_classes", "routing"},
     "state_dict": {...}, **extra}

``ckascope.models.load_checkpoint`` finds :func:`model_from_config` through its builder registry,
so ckascope loads these files without importing msun until it meets one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckascope.errors import InputError
from ckascope.fileio import torch_save
from ckascope.models import CHECKPOINT_FORMAT, model_from_checkpoint, read_checkpoint
from msun.backbones import classifier
from msun.model import MSUN, build_msun

BUILDER = "msun"
CONFIG_KEYS = ("arch", "split_at", "scales", "num_classes", "routing")
RESERVED = ("format", "builder", "config", "state_dict")


def save_checkpoint(model: MSUN, path: str | os.PathLike[str], **extra: Any) -> None:
    """Writes ``model`` (config + state dict) and ``extra`` entries atomically.

    Args:
        model: The network.
        path: Destination file.
        **extra: More entries (e.g. optimizer state, epoch); they must hold only tensors,
            dicts, lists, str, int, float, bool and None to stay loadable.

    Raises:
        InputError: An extra key collides with the format's own keys.
    """
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise InputError(f"extra checkpoint keys {clash} are reserved: {', '.join(RESERVED)}")
    torch_save({**model_payload(model, model.arch), **extra}, path)


def model_payload(model: nn.Module, arch: str) -> dict[str, Any]:
    """The self-describing part of a checkpoint: format, builder, config, state dict.

    An MSUN names msun's builder; any other network (a vanilla or MST run) torchvision's, with
    ``arch`` and its classifier's width.
    """
    if isinstance(model, MSUN):
        builder, config = BUILDER, model.config()
    else:
        builder, config = "torchvision", {"arch": arch, "num_classes": _num_classes(model)}
    return {
        "format": CHECKPOINT_FORMAT,
        "builder": builder,
        "config": config,
        "state_dict": model.state_dict(),
    }


def _num_classes(model: nn.Module) -> int:
    return classifier(model)[1].out_features


def model_from_config(config: Mapping[str, Any]) -> MSUN:
    """A randomly initialised MSUN with the structure ``config`` describes.

    Raises:
        InputError: Missing or unknown keys, or values ``build_msun`` refuses.
    """
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if missing or unknown:
        raise InputError(
            f"bad MSUN config (missing {missing}, unknown {unknown}). "
            f"Hint: the keys are {', '.join(CONFIG_KEYS)}"
        )
    return build_msun(
        str(config["arch"]),
        split_at=str(config["split_at"]),
        scales=list(config["scales"]),
        num_classes=config["num_classes"],
        routing=list(config["routing"]),
    )


def load_checkpoint(path: str | os.PathLike[str], *, arch: str | None = None) -> MSUN:
    """Rebuilds the MSUN saved in ``path`` (through ``ckascope.models.load_checkpoint``).

    Args:
        path: A file written by :func:`save_checkpoint`.
        arch: If given, the architecture the checkpoint must hold.

    Returns:
        The model on CPU, in eval mode.

    Raises:
        InputError: Missing, corrupt or unsafe file; not an MSUN checkpoint; another
            architecture than ``arch``; a state dict that does not fit the config.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping) or ckpt.get("builder") != BUILDER:
        raise InputError(
            f"{path} is not an MSUN checkpoint. Hint: use a file written by msun "
            "(ckascope.models.load_checkpoint reads plain torchvision state dicts)"
        )
    model = model_from_checkpoint(ckpt, path, arch)
    assert isinstance(model, MSUN)  # the "msun" builder makes one
    return model
