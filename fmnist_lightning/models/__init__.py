"""The package's networks: plain ``nn.Module``s, each taking ``num_classes`` and ``in_channels`` first.

This module is the registry: every model class is imported here and listed in ``__all__``, and the
studies' CNNs are presets of :class:`ConvNet` (:data:`PRESETS`); the tests loop over both.
"""

from typing import Any

from torch import nn

from fmnist_lightning.models.airbench import AirbenchNet
from fmnist_lightning.models.convnet import PRESET_PARAMETERS, PRESETS, ConvNet
from fmnist_lightning.models.linear import LinearClassifier
from fmnist_lightning.models.mlp import MLP
from fmnist_lightning.models.resnet import ResNet
from fmnist_lightning.models.tinyvgg import TinyVGG
from fmnist_lightning.models.transfer import ResNet18Transfer

__all__ = [
    "MLP",
    "PRESETS",
    "PRESET_PARAMETERS",
    "AirbenchNet",
    "ConvNet",
    "LinearClassifier",
    "ResNet",
    "ResNet18Transfer",
    "TinyVGG",
    "build",
]
MODEL_CLASSES = (AirbenchNet, ConvNet, LinearClassifier, MLP, ResNet, ResNet18Transfer, TinyVGG)


def build(name: str, **kwargs: Any) -> nn.Module:
    """A network of the zoo by name: a model class (``"TinyVGG"``) or a ConvNet preset (``"FashionCNN"``).

    Raises:
        ValueError: If ``name`` is neither.
    """
    if name in PRESETS:
        return ConvNet(preset=name, **kwargs)
    classes = {cls.__name__: cls for cls in MODEL_CLASSES}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join([*classes, *PRESETS])}")
    return classes[name](**kwargs)
