"""The published training recipe of every supported architecture, one record each.

Like timm's per-architecture default configs: ``recipe_for(arch)`` is the one place where the
values that differ between architectures are looked up — the learning rate and the global batch
it is quoted for, the epochs, the scale-invariance dead zone τ and the default split point. The
values shared by every architecture (optimiser, augmentation, schedule shape) are
``msun.config.TrainConfig``'s defaults.

Source: docs/msun.md ("The network", "The objective", "The recipe"), which follows the authors'
code (SmallPigPeppa/MSC): ImageNet on 8 GPUs, ResNet-50 at lr 0.5 with 128 images per GPU and
the other published backbones at lr 0.1 with 32, scaled linearly with the global batch; 90
epochs, MobileNetV2 300; τ 0.01 in every ResNet-family file of that code (resnet18_l2,
resnext50_l2, resnet50), 0.001 for DenseNet, VGG and MobileNetV2. The family of an architecture
is its adapter's in ``msun.backbones``; a family's other members take its evaluated model's
values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from msun.backbones import BACKBONES, DENSENETS, MOBILENETS, RESNETS, backbone_for


@dataclass(frozen=True)
class Recipe:
    """The published training recipe of one architecture.

    Attributes:
        arch: The torchvision model name.
        family: Its adapter's family in ``msun.backbones`` ("resnet" covers ResNet, ResNeXt and
            Wide-ResNet).
        lr: Peak learning rate at a global batch of ``lr_batch`` images.
        lr_batch: The global batch ``lr`` is published for; other batches scale it linearly.
        epochs: Training epochs.
        si_threshold: τ, the dead zone of the scale-invariance loss.
        default_split: First stage of the shared trunk in the published configuration.
    """

    arch: str
    family: str
    lr: float
    lr_batch: int
    epochs: int
    si_threshold: float
    default_split: str

    def lr_at(self, batch_size: int) -> float:
        """The peak learning rate scaled linearly to a global batch of ``batch_size`` images."""
        return self.lr / self.lr_batch * batch_size


class _Training(NamedTuple):
    """The training values a family shares (their meaning is ``Recipe``'s)."""

    lr: float
    lr_batch: int
    epochs: int
    si_threshold: float


#: Per family: a family without an entry here fails at import instead of getting a guessed recipe.
_TRAINING: dict[str, _Training] = {
    "resnet": _Training(lr=0.5, lr_batch=1024, epochs=90, si_threshold=0.01),
    "densenet": _Training(lr=0.1, lr_batch=256, epochs=90, si_threshold=0.001),
    "vgg": _Training(lr=0.1, lr_batch=256, epochs=90, si_threshold=0.001),
    "mobilenet_v2": _Training(lr=0.1, lr_batch=256, epochs=300, si_threshold=0.001),
}

#: The published split of each family's evaluated model (docs/msun.md's table), at the same
#: stage in the other members. VGG's is after the third max-pool, whose index in ``features``
#: depends on the depth and on BatchNorm, so it is given per model.
_DEFAULT_SPLITS: dict[str, str] = {
    **dict.fromkeys(RESNETS, "layer2"),
    **dict.fromkeys(DENSENETS, "denseblock2"),
    "vgg11": "features.11",
    "vgg11_bn": "features.15",
    "vgg13": "features.15",
    "vgg13_bn": "features.21",
    "vgg16": "features.17",
    "vgg16_bn": "features.24",
    "vgg19": "features.19",
    "vgg19_bn": "features.27",
    **dict.fromkeys(MOBILENETS, "features.10"),
}


def _recipe(arch: str, family: str) -> Recipe:
    training = _TRAINING[family]
    return Recipe(
        arch=arch,
        family=family,
        lr=training.lr,
        lr_batch=training.lr_batch,
        epochs=training.epochs,
        si_threshold=training.si_threshold,
        default_split=_DEFAULT_SPLITS[arch],
    )


_RECIPES: dict[str, Recipe] = {
    arch: _recipe(arch, backbone.family) for backbone in BACKBONES for arch in backbone.archs
}


def recipe_for(arch: str) -> Recipe:
    """The published recipe of ``arch``.

    Raises:
        InputError: ``arch`` is not supported (the message names the closest supported ones).
    """
    backbone_for(arch)  # an unknown arch gets the one unsupported-architecture error and hint
    return _RECIPES[arch]


def list_recipes() -> tuple[Recipe, ...]:
    """Every supported architecture's recipe, in ``msun.supported_archs()`` order."""
    return tuple(_RECIPES.values())
