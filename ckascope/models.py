"""Models for ckascope: torchvision classification models by name, their weights, and checkpoints.

Weights are ``none`` (random init from a seed), ``default`` (torchvision's DEFAULT enum), or an enum
member name such as ``IMAGENET1K_V2``. Pretrained files come from the torch hub cache; a missing
file is downloaded with a short timeout, and offline that fails within seconds with a message
naming ``--weights none`` and ``--checkpoint``.

Checkpoints are read with ``torch.load(weights_only=True)`` only. A plain state dict needs the
architecture's name; a self-describing checkpoint names a registered builder and carries the
config to rebuild the model:

    {"format": "ckascope-model", "builder": "<name>", "config": {...}, "state_dict": {...},
     "inputs": {"image_size": 32, "scales": [4, 16, 32], "data": "fashionmnist"}}

``inputs`` (optional, each key optional) says what the model was trained on; ``ckascope
compare --checkpoint`` takes its image size and scales from it unless told otherwise. A model
fed its images at another side than their crop (a network fine-tuned on smaller images, each
resized to the size it was first trained at) records that side as ``input_size``, which the
image size then is (:func:`input_side`: one rule for every reader).

Builders are the ``model_builders`` entries of ``ckascope.plugins`` (torchvision's is built in,
other families declare theirs as entry points), imported only when such a checkpoint is loaded;
a checkpoint cannot name arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

from ckascope import plugins
from ckascope.errors import InputError, WeightsUnavailableError, hint_close
from ckascope.vocab import MAX_SCALE, MIN_IMAGE_SIZE

#: Seconds a weight download may stall before it counts as offline.
DOWNLOAD_TIMEOUT = 10.0
CHECKPOINT_FORMAT = "ckascope-model"


def list_models() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raises InputError with close matches for a name that is not a torchvision classifier."""
    if arch not in list_models():
        raise InputError(hint_close(arch, list_models(), what="model"))


def resolve_weights(arch: str, weights: str | None) -> WeightsEnum | None:
    """Turns "none" / "default" / an enum member name into a torchvision weights enum (or None).

    Args:
        arch: torchvision model name, e.g. "resnet50".
        weights: None or "none", "default", "IMAGENET1K_V2" or "ResNet50_Weights.IMAGENET1K_V2".

    Returns:
        The weights enum member, or None for random initialisation.
    """
    check_arch(arch)
    if weights is None or weights.lower() == "none":
        return None
    enum = get_model_weights(arch)
    member = weights.rpartition(".")[2]
    if member.lower() == "default":
        return enum.DEFAULT
    if member not in enum.__members__:
        choices = ["none", "default", *enum.__members__]
        raise InputError(hint_close(weights, choices, what=f"weights for {arch}"))
    return enum[member]


def weights_file(weights: WeightsEnum) -> Path:
    """Where torch's hub cache keeps the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(weights.url))


def ensure_weights_file(weights: WeightsEnum, suffix: str = "") -> Path:
    """Returns the cached weight file, downloading it first when missing.

    ``suffix`` names the options of the model in the hint ("-b": ``--weights-b``).

    Raises:
        WeightsUnavailableError: The file is not cached and the download failed (offline).
    """
    dest = weights_file(weights)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(dest.name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        torch.hub.download_url_to_file(
            weights.url, str(dest), match.group(1) if match else None, progress=sys.stderr.isatty()
        )
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash a RuntimeError
        raise WeightsUnavailableError(
            f"pretrained weights {weights} are not cached at {dest} and could not be downloaded "
            f"({e}).",
            f"pass --weights{suffix} none for random weights, --checkpoint{suffix} FILE for a local "
            "file, or copy the file to that path",
        ) from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return dest


def ensure_weights(
    arch: str, weights: str | None, *, num_classes: int | None = None, suffix: str = ""
) -> WeightsEnum | None:
    """The pretrained weights ``build_model(arch, weights)`` loads, checked; nothing is built.

    The checks ``build_model`` makes before it builds (the name resolved, the classes, the file
    cached or downloaded once), for a caller that must refuse missing weights before it writes
    anything.

    Args:
        arch: torchvision model name.
        weights: "none", "default", or an enum member name.
        num_classes: The classes asked for (None: any); pretrained weights have their own.
        suffix: The command-line options' suffix in hints ("-b" for the second model).

    Returns:
        The weights enum member, its file at hand; None for random initialisation.

    Raises:
        InputError: An unknown architecture or weights name, or other classes than theirs.
        WeightsUnavailableError: The file is not cached and cannot be downloaded.
    """
    enum = resolve_weights(arch, weights)
    if enum is None:
        return None
    classes = len(enum.meta["categories"])
    if num_classes not in (None, classes):  # refused before any download
        raise InputError(
            f"{enum} has {classes} classes, not {num_classes}. Hint: drop --num-classes"
        )
    ensure_weights_file(enum, suffix)
    return enum


def build_model(
    arch: str,
    weights: str | None = "none",
    *,
    num_classes: int | None = None,
    seed: int = 0,
    suffix: str = "",
) -> nn.Module:
    """A torchvision classification model in eval mode.

    Args:
        arch: torchvision model name.
        weights: "none" (random, seeded), "default", or an enum member name.
        num_classes: Output classes for random init (default 1000); must match pretrained ones.
        seed: Seed of the random initialisation (the global RNG is left untouched).
        suffix: The command-line options' suffix in hints ("-b" for the second model).

    Returns:
        The model, on CPU, in eval mode.
    """
    enum = ensure_weights(arch, weights, num_classes=num_classes, suffix=suffix)
    if enum is not None:
        model: nn.Module = torchvision.models.get_model(arch, weights=enum)
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(
            arch, weights=None, **_random_kwargs(arch, num_classes)
        )
    return model.eval()


def weights_input_size(arch: str | None, weights: str | None) -> int | None:
    """The crop size pretrained weights were trained at (299 for inception_v3), else None.

    Read from the weights' own eval transforms; nothing is loaded or downloaded.
    """
    if arch is None or weights in (None, "none"):
        return None
    enum = resolve_weights(arch, weights)
    crop = getattr(enum.transforms(), "crop_size", None) if enum is not None else None
    return int(crop[0]) if crop else None


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised torchvision model from ``{"arch", "num_classes"}``.

    The builder of self-describing torchvision checkpoints (a family's single-path baselines).
    """
    if "arch" not in config:
        raise InputError("a torchvision checkpoint config needs 'arch'")
    return build_model(str(config["arch"]), "none", num_classes=config.get("num_classes"))


def _random_kwargs(arch: str, num_classes: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": num_classes or 1000}
    if arch in ("googlenet", "inception_v3"):  # no auxiliary heads; avoids the init warning
        kwargs.update(aux_logits=False, init_weights=True)
    return kwargs


def checkpoint_label(path: str | os.PathLike[str]) -> str:
    """How a checkpoint is called in results: its run folder for ``last.pt`` / ``best.pt``."""
    p = Path(path)
    return p.parent.name if p.stem in ("last", "best") else p.stem


#: What ``torch.load`` raises for a file that is not a readable checkpoint.
_UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
    IndexError,
)


def read_inputs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``inputs`` a self-describing checkpoint records: what its model was trained on.

    Memory-mapped, so the weights stay on disk. Only well-formed entries are kept (they set
    defaults, nothing more): ``image_size`` (int), ``scales`` (ints, two or more), ``data``
    (str), and ``input_size``: the side its model was fed (:func:`input_side`).

    Returns:
        The entries found; {} for a file without them or one that cannot be read (loading
        the model reports why).
    """
    ckpt = _load_for_inputs(path)
    inputs = _mapping(ckpt.get("inputs"))
    size, scales, data = (inputs.get(k) for k in ("image_size", "scales", "data"))
    fed = input_side(ckpt)
    return {
        **({"image_size": size} if _is_side(size, MIN_IMAGE_SIZE) else {}),
        **({"input_size": fed} if fed is not None else {}),
        **(
            {"scales": [int(s) for s in scales]}
            if isinstance(scales, list | tuple) and len(scales) >= 2 and all(map(_is_side, scales))
            else {}
        ),
        **({"data": data} if isinstance(data, str) and data else {}),
    }


def input_side(ckpt: Mapping[str, Any]) -> int | None:
    """The side a checkpoint's model was fed in training, and is fed to be measured or scored.

    ``inputs["input_size"]`` (a network fed its crops resized to another side records it), else
    its training config's ``image_size``, else ``inputs["image_size"]``. A value that is no
    image side (an int in ``MIN_IMAGE_SIZE..MAX_SCALE``: a bad file's 0 or "32") is passed
    over, as :func:`read_inputs` passes it over.

    Returns:
        The side; None where the checkpoint records none (a plain state dict).
    """
    inputs, config = (_mapping(ckpt.get(key)) for key in ("inputs", "train_config"))
    sides: tuple[Any, ...] = (
        inputs.get("input_size"),
        config.get("image_size"),
        inputs.get("image_size"),
    )
    return next((int(s) for s in sides if _is_side(s, MIN_IMAGE_SIZE)), None)


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` where it is a mapping, else an empty one (a file's entries are not trusted)."""
    return value if isinstance(value, Mapping) else {}


def _load_for_inputs(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """A self-describing checkpoint, memory-mapped where its format allows; else {}.

    Files in torch's legacy (pre-zip) format cannot be mapped and are read whole.
    """
    for mmap in (True, False):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except _UNREADABLE:
            continue
        return ckpt if is_self_describing(ckpt) else {}
    return {}


def _is_side(value: Any, smallest: int = 1) -> bool:
    """Whether ``value`` is an image side ckascope accepts (an int in smallest..MAX_SCALE)."""
    return isinstance(value, int) and not isinstance(value, bool) and smallest <= value <= MAX_SCALE


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors for bad files.

    Raises:
        InputError: Missing, truncated, corrupted, or holding pickled code (refused).
    """
    p = Path(path)
    if p.is_dir():
        held = sorted(f.name for f in p.glob("*.pt"))[:4]
        hint = " or ".join(str(p / name) for name in held) or "a .pt file"
        raise InputError(f"{p} is a folder, not a checkpoint. Hint: give {hint}")
    if not p.is_file():
        raise InputError(f"checkpoint {p} does not exist. Hint: check the path")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a disallowed class: not a checkpoint at all
            raise _unreadable(p) from e
        raise InputError(
            f"refusing to load {p}: it holds Python objects other than tensors and plain "
            "containers, which could run code (only weights_only checkpoints are accepted)"
        ) from e
    except _UNREADABLE as e:  # torch.load's own error says where its parser stopped, not why
        raise _unreadable(p) from e


def _unreadable(path: Path) -> InputError:
    """The error for a file ``torch.load`` cannot read: what it is not, and what to give."""
    return InputError(
        f"{path} is not a readable checkpoint: not a file torch.save wrote, or one truncated or "
        "corrupted. Hint: give a checkpoint file written by torch.save"
    )


def load_checkpoint(path: str | os.PathLike[str], arch: str | None = None) -> nn.Module:
    """Loads a model from a self-describing checkpoint, or a state dict for ``arch``.

    Args:
        path: The file.
        arch: torchvision model name; required for plain state dicts, checked otherwise.

    Returns:
        The model, on CPU, in eval mode.
    """
    return model_from_checkpoint(read_checkpoint(path), path, arch)


def is_self_describing(ckpt: Any) -> bool:
    """Whether a loaded checkpoint names its builder and config."""
    return isinstance(ckpt, Mapping) and ckpt.get("format") == CHECKPOINT_FORMAT


def model_from_checkpoint(
    ckpt: Any, path: str | os.PathLike[str], arch: str | None = None
) -> nn.Module:
    """``load_checkpoint`` for a checkpoint already read with ``read_checkpoint``."""
    if is_self_describing(ckpt):
        return _from_self_describing(ckpt, path, arch)
    state = _state_dict_of(ckpt, path)
    if arch is None:
        raise InputError(
            f"{path} is a plain state dict. Hint: name its architecture with --model NAME"
        )
    with torch.device("meta"):  # structure only: the state dict provides every tensor
        model = build_model(arch, "none", num_classes=_num_classes(state))
    _load_state(model, state, path, arch)
    return model.eval()


def _from_self_describing(
    ckpt: Mapping[str, Any], path: str | os.PathLike[str], arch: str | None
) -> nn.Module:
    name = str(ckpt.get("builder"))
    if name not in plugins.list_entries("model_builders"):
        raise InputError(
            f"{path} names an unknown model builder {name!r}; known: "
            f"{', '.join(plugins.list_entries('model_builders'))}. Hint: install the package "
            "that wrote it"
        )
    config = dict(ckpt.get("config") or {})
    if arch is not None and config.get("arch") not in (None, arch):
        raise InputError(
            f"{path} holds a {config.get('arch')} model, not {arch}. Hint: drop --model"
        )
    with torch.device("meta"):  # structure only: the state dict provides every tensor
        model: nn.Module = plugins.load("model_builders", name)(config)
    describe = getattr(model, "describe", None)  # a family's own words for its model
    what = describe() if callable(describe) else str(config.get("arch", name))
    _load_state(model, _state_dict_of(ckpt, path), path, what)
    return model.eval()


def _state_dict_of(ckpt: Any, path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), Mapping):
                return ckpt[key]  # type: ignore[no-any-return]
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise InputError(f"{path} holds no state dict (expected tensors by parameter name)")


def _num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The output width of the last 2-D weight (the classifier's)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any, what: str) -> None:
    """Loads ``state`` into a model built on the meta device, taking its tensors as they are."""
    try:
        keys = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that differ
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise InputError(
            f"{path} does not fit a {what} model ({detail}). Hint: check --model"
        ) from e
    problems = [
        f"{len(v)} {kind} key(s), e.g. {v[0]}"
        for kind, v in (("missing", keys.missing_keys), ("unexpected", keys.unexpected_keys))
        if v
    ]
    if problems or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        detail = "; ".join(problems) or "tensors missing"
        raise InputError(f"{path} does not fit a {what} model ({detail}). Hint: check --model")
