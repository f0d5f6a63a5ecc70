"""fmnist_lightning: Fashion-MNIST classification with PyTorch Lightning.

Importable pieces: the data module, the task, the models and the CLI's ``main``.
"""

from fmnist_lightning.augment import BatchAugment
from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule, load_fashion_mnist
from fmnist_lightning.errors import ConfigError, DataError, FashionMNISTError
from fmnist_lightning.task import ClassificationTask

__all__ = [
    "CLASS_NAMES",
    "BatchAugment",
    "ClassificationTask",
    "ConfigError",
    "DataError",
    "FashionMNISTDataModule",
    "FashionMNISTError",
    "load_fashion_mnist",
]
__version__ = "0.1.0"
