"""Self-describing MSUN checkpoints, readable with ``torch.load(weights_only=True)``.

One file::

    {"format": "ckascope-model", "builder": "msun",
     "config": {"arch", "split_at", "scales", "num_classes", "routing", "bn"},
     "state_dict": {...}, **extra}

``bn`` is written only for a private-BN trunk; without it, as in files written before
private BatchNorm existed, the trunk is "shared". An MST network with private BatchNorm per
scale (``msun.privatebn.ScaleBNNet``) names the builder
``msun-scale-bn`` with config {"arch", "scales", "routing", "image_size", "num_classes"}.
A training run's checkpoints add its state and ``inputs`` (:func:`training_inputs`: what it
was trained on, the defaults of ``ckascope compare --checkpoint``); a fine-tuned plain network's
``inputs`` add ``input_size``, the side it is fed (:func:`input_size`).

``ckascope.models.load_checkpoint`` finds :func:`model_from_config` through its builder registry,
so ckascope loads these files without importing msun until it meets one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckascope.platform import (
    CHECKPOINT_FORMAT,
    InputError,
    input_side,
    model_from_checkpoint,
    read_checkpoint,
    torch_save,
)
from msun.backbones import classifier
from msun.config import TrainConfig
from msun.model import MSUN, build_msun
from msun.privatebn import ScaleBNNet, build_scale_bn_net

BUILDER = "msun"
SCALE_BN_BUILDER = "msun-scale-bn"
CONFIG_KEYS = ("arch", "split_at", "scales", "num_classes", "routing")
OPTIONAL_KEYS = ("bn",)
SCALE_BN_KEYS = ("arch", "scales", "routing", "image_size", "num_classes")
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

    An MSUN names msun's builder, a private-BatchNorm MST network ``msun-scale-bn``; any other
    network (a vanilla or MST run) torchvision's, with ``arch`` and its classifier's width.
    """
    builder: str
    if isinstance(model, MSUN):
        builder, config = BUILDER, model.config()
    elif isinstance(model, ScaleBNNet):
        builder, config = SCALE_BN_BUILDER, model.config()
    else:
        builder, config = "torchvision", {"arch": arch, "num_classes": _num_classes(model)}
    return {
        "format": CHECKPOINT_FORMAT,
        "builder": builder,
        "config": config,
        "state_dict": model.state_dict(),
    }


def training_inputs(
    model: nn.Module, cfg: TrainConfig, input_size: int | None = None
) -> dict[str, Any]:
    """A run checkpoint's ``inputs`` (``ckascope.models.read_inputs``): what it was trained on.

    The image size and data of the run, and the training scales of a network that has them
    (an MSUN's or a private-BatchNorm network's own, the config's for plain MST); a vanilla
    network's ``--scales`` only named test sizes, so it records none. ``input_size`` (a
    fine-tuned plain network's: the side every crop is resized to, which scoring it must feed
    it too, :func:`input_size`) is recorded where given.
    """
    if isinstance(model, MSUN | ScaleBNNet):
        scales: list[int] | None = list(model.scales)
    else:
        scales = list(cfg.scales) if cfg.method == "mst" else None
    return {
        "image_size": cfg.image_size,
        "data": cfg.data,
        **({"scales": scales} if scales else {}),
        **({"input_size": input_size} if input_size is not None else {}),
    }


def input_size(ckpt: Mapping[str, Any]) -> int:
    """The side a checkpoint's plain network was fed in training, and must be fed to be scored.

    ``ckascope``'s rule (``input_side``: a fine-tuned plain network's recorded ``input_size``,
    else its run's image size; a value that is no image side passed over), and ImageNet's 224
    for a file that records none (a plain state dict).
    """
    return input_side(ckpt) or 224


def _num_classes(model: nn.Module) -> int:
    return classifier(model)[1].out_features


def model_from_config(config: Mapping[str, Any]) -> MSUN:
    """A randomly initialised MSUN with the structure ``config`` describes.

    Raises:
        InputError: Missing or unknown keys, or values ``build_msun`` refuses.
    """
    _check_keys(config, CONFIG_KEYS, "MSUN", OPTIONAL_KEYS)
    return build_msun(
        str(config["arch"]),
        split_at=str(config["split_at"]),
        scales=list(config["scales"]),
        num_classes=config["num_classes"],
        routing=list(config["routing"]),
        bn=str(config.get("bn", "shared")),
    )


def scale_bn_from_config(config: Mapping[str, Any]) -> ScaleBNNet:
    """A randomly initialised private-BatchNorm MST network with the structure ``config`` says.

    Raises:
        InputError: Missing or unknown keys, or values ``build_scale_bn_net`` refuses.
    """
    _check_keys(config, SCALE_BN_KEYS, "private-BatchNorm network")
    return build_scale_bn_net(
        str(config["arch"]),
        scales=list(config["scales"]),
        routing=list(config["routing"]),
        image_size=int(config["image_size"]),
        num_classes=config["num_classes"],
    )


def _check_keys(
    config: Mapping[str, Any], keys: tuple[str, ...], what: str, optional: tuple[str, ...] = ()
) -> None:
    missing = [k for k in keys if k not in config]
    unknown = sorted(set(config) - set(keys) - set(optional))
    if missing or unknown:
        raise InputError(
            f"bad {what} config (missing {missing}, unknown {unknown}). "
            f"Hint: the keys are {', '.join(keys + optional)}"
        )


def load_msun(path: str | os.PathLike[str], *, arch: str | None = None) -> MSUN:
    """Rebuilds the MSUN saved in ``path`` (through ``ckascope.models.load_checkpoint``).

    ``ckascope.models.load_checkpoint`` loads any self-describing checkpoint; this one only
    an MSUN, and says so when the file holds something else.

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


def load_checkpoint(path: str | os.PathLike[str], *, arch: str | None = None) -> MSUN:
    """The old name of :func:`load_msun` (kept for one release; it warns)."""
    warnings.warn(
        "msun.load_checkpoint is now msun.load_msun (ckascope.models.load_checkpoint loads any "
        "model); the old name goes in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return load_msun(path, arch=arch)
