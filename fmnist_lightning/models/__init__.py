"""The package's networks: plain ``nn.Module``s, each taking ``num_classes`` and ``in_channels`` first.

This module is the registry: every model is imported here and listed in ``__all__``, and the tests
loop over ``__all__``.
"""

from fmnist_lightning.models.convnet import (
    ConvNet,
    FashionCNN,
    FashionCNNShallow,
    LightweightCNN,
    Network1,
    Network2,
)
from fmnist_lightning.models.linear import LinearClassifier
from fmnist_lightning.models.mlp import MLP
from fmnist_lightning.models.resnet import ResNet
from fmnist_lightning.models.tinyvgg import TinyVGG
from fmnist_lightning.models.transfer import ResNet18Transfer

__all__ = [
    "MLP",
    "ConvNet",
    "FashionCNN",
    "FashionCNNShallow",
    "LightweightCNN",
    "LinearClassifier",
    "Network1",
    "Network2",
    "ResNet",
    "ResNet18Transfer",
    "TinyVGG",
]
