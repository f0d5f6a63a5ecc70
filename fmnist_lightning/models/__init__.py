"""The package's networks: plain ``nn.Module``s, each taking ``num_classes`` and ``in_channels`` first.

This module is the registry: every model is imported here and listed in ``__all__``, and the tests
loop over ``__all__``.
"""

from fmnist_lightning.models.linear import LinearClassifier
from fmnist_lightning.models.tinyvgg import TinyVGG

__all__ = ["LinearClassifier", "TinyVGG"]
