"""Fashion-MNIST as in-memory uint8 tensors: a LightningDataModule with seeded stratified splits.

The whole dataset is 47 MB of uint8, so it stays in memory (on the accelerator when there is one).
Each batch is built by one tensor index, and conversion, augmentation and normalisation run batched
on the batch's device in ``on_after_batch_transfer``; no per-image Python work in the training path.
"""

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

from fmnist_lightning.augment import BatchAugment
from fmnist_lightning.errors import ConfigError, DataError

#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX ``.gz`` files.
SYSTEM_DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = tuple(FashionMNIST.classes)
IDX_FILES: tuple[str, ...] = tuple(name for name, _ in FashionMNIST.resources)
#: Mean and std of the 60k training pixels in [0, 1] (checked in tests/test_data.py).
DATASET_MEAN, DATASET_STD = 0.2860, 0.3530
NORMALIZATIONS = {"unit": (0.0, 1.0), "symmetric": (0.5, 0.5), "dataset": (DATASET_MEAN, DATASET_STD)}
_EXPECTED = {True: 60_000, False: 10_000}
_HOW_TO_GET = (
    "Get the data in one of two ways: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts the "
    f"IDX files in {SYSTEM_DATA_DIR}), or run with internet access and `download: true` so torchvision "
    "downloads them into data_dir."
)


def _stage_idx_files(source: Path, data_dir: Path) -> None:
    """Decompress the four ``.gz`` IDX files from ``source`` into torchvision's raw folder."""
    raw = data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        # Extract beside the target and rename, so an interrupted copy never leaves a truncated file.
        with tempfile.TemporaryDirectory(dir=raw) as tmp:
            try:
                extracted = extract_archive(str(source / name), tmp)
            except (OSError, EOFError) as err:
                raise DataError(f"Fashion-MNIST file {source / name} is corrupt ({err}). {_HOW_TO_GET}") from err
            shutil.move(extracted, raw / name.removesuffix(".gz"))


def _has_gz_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IDX_FILES)


def load_fashion_mnist(
    data_dir: str | Path = "data", system_dir: str | Path = SYSTEM_DATA_DIR, download: bool = True
) -> dict[str, Tensor]:
    """Load the four Fashion-MNIST arrays, finding the files by themselves.

    Looks, in order, for torchvision's layout under ``data_dir`` (``FashionMNIST/raw``), the four
    ``.gz`` files in ``data_dir`` itself, the system copy in ``system_dir`` (Debian's
    ``dataset-fashion-mnist``), and finally torchvision's download. Parsing is torchvision's.

    Args:
        data_dir: The package's data directory.
        system_dir: Folder holding the four official IDX ``.gz`` files.
        download: Whether to download with torchvision when no local copy exists.

    Returns:
        ``train_images`` (60000, 28, 28) and ``test_images`` (10000, 28, 28) as uint8, and
        ``train_labels`` / ``test_labels`` as int64.

    Raises:
        DataError: If the data cannot be found, fetched or parsed.
    """
    data_dir, system_dir = Path(data_dir), Path(system_dir)
    raw = data_dir / "FashionMNIST" / "raw"
    if not all((raw / name.removesuffix(".gz")).is_file() for name in IDX_FILES):
        source = next((d for d in (data_dir, system_dir) if _has_gz_files(d)), None)
        if source is not None:
            _stage_idx_files(source, data_dir)
        elif download:
            try:
                FashionMNIST(str(data_dir), train=True, download=True)
            except Exception as err:  # network errors come in many types; all mean the same here
                raise DataError(
                    f"Fashion-MNIST is not in {data_dir} or {system_dir}, and torchvision's download "
                    f"failed ({type(err).__name__}: {err}). {_HOW_TO_GET}"
                ) from err
        else:
            raise DataError(f"Fashion-MNIST is not in {data_dir} or {system_dir} and download is off. {_HOW_TO_GET}")
    arrays = {}
    for train, split in ((True, "train"), (False, "test")):
        try:
            ds = FashionMNIST(str(data_dir), train=train, download=False)
        except Exception as err:  # torchvision raises assorted errors on a damaged IDX file
            raise DataError(
                f"Fashion-MNIST files in {raw} are corrupt ({type(err).__name__}: "
                f"{err}). Delete that folder and run again. {_HOW_TO_GET}"
            ) from err
        images, labels = ds.data, ds.targets
        n = _EXPECTED[train]
        if images.shape != (n, 28, 28) or labels.shape != (n,) or images.dtype != torch.uint8:
            raise DataError(
                f"Fashion-MNIST {split} files in {raw} hold {tuple(images.shape)} "
                f"images and {tuple(labels.shape)} labels, expected ({n}, 28, 28) and ({n},). Delete that folder "
                f"and run again. {_HOW_TO_GET}"
            )
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.long()
    return arrays


def stratified_split(labels: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into train and validation, keeping class proportions, reproducibly.

    Args:
        labels: Class label of every sample, shape (N,).
        val_size: Number of validation samples, 0 < val_size < N.
        seed: Seed of the permutation; the same seed gives the same split.

    Returns:
        Sorted ``(train_idx, val_idx)``, disjoint and together covering ``range(N)``.
    """
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    # Largest-remainder allocation: each class gets its share of val_size, rounded so they sum to it.
    exact = counts.double() * val_size / len(labels)
    per_class = exact.floor().long()
    short = val_size - int(per_class.sum())
    per_class[torch.argsort(exact - per_class, descending=True)[:short]] += 1
    val_parts = []
    for cls, k in zip(classes.tolist(), per_class.tolist(), strict=True):
        idx = (labels == cls).nonzero().squeeze(1)
        val_parts.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    val_idx = torch.cat(val_parts).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return mask.nonzero().squeeze(1), val_idx


def stratified_folds(labels: Tensor, num_folds: int, seed: int) -> Tensor:
    """Assign every sample to one of ``num_folds`` folds, each with the same class proportions.

    Args:
        labels: Class label of every sample, shape (N,).
        num_folds: Number of folds (>= 2).
        seed: Seed of the permutation; the same seed gives the same folds.

    Returns:
        Fold id in ``[0, num_folds)`` of every sample, shape (N,).
    """
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(labels)
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold_of[idx] = torch.arange(len(idx)) % num_folds
    return fold_of


class InMemoryDataset(Dataset):
    """Images and labels held as tensors; a whole batch is fetched with one index operation.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices when it exists, so samplers
    (Lightning's ``DistributedSampler`` under DDP included) keep working while batches are built by
    tensor indexing instead of per-image calls and collation.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, device=self.images.device)
        return self.images[idx], self.labels[idx]


def _batch_as_is(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for batches that ``__getitems__`` already built."""
    return batch


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST with a seeded stratified validation split (or k-fold) of the 60k training images.

    The official 10k test set is used by ``test`` (and by ``predict``) only; early stopping, LR
    schedules and checkpoint choice see the validation split.

    Args:
        data_dir: Where to keep the data (see :func:`load_fashion_mnist` for the search order).
        system_dir: Folder with the four IDX ``.gz`` files of Debian's ``dataset-fashion-mnist``.
        download: Download with torchvision when no local copy exists.
        val_split: Validation share of the 60k training images: a fraction in (0, 1) or a count.
            Ignored when ``num_folds`` is set.
        num_folds: If set, k-fold cross-validation: fold ``fold`` of ``num_folds`` stratified folds
            is the validation set and the rest is the training set.
        fold: Which fold is the validation set, in ``[0, num_folds)``.
        seed: Seed of the split and of the folds (independent of the training seed).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and predict (on a 2-core CPU 256 beats 1000:
            the activations of 1000 images overflow the caches).
        normalization: ``unit`` keeps pixels in [0, 1]; ``symmetric`` maps them to [-1, 1] (mean 0.5,
            std 0.5, as study 001); ``dataset`` standardises with the training set's mean and std.
        augment: Master switch of train-time augmentation; the four options below set each operation.
        crop_padding: Random crop after padding by this many pixels (0: off).
        hflip_prob: Probability of a horizontal flip (0: off).
        rotation_degrees: Maximum rotation angle in degrees (0: off).
        erasing_prob: Probability of random erasing (0: off).
        data_on_device: Keep the whole dataset on the accelerator (GPU/MPS) when training on one.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory batches.
    """

    def __init__(
        self,
        data_dir: str = "data",
        system_dir: str = SYSTEM_DATA_DIR,
        download: bool = True,
        val_split: int | float = 0.1,
        num_folds: int | None = None,
        fold: int = 0,
        seed: int = 42,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        normalization: Literal["unit", "symmetric", "dataset"] = "dataset",
        augment: bool = True,
        crop_padding: int = 2,
        hflip_prob: float = 0.5,
        rotation_degrees: float = 0.0,
        erasing_prob: float = 0.0,
        data_on_device: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_folds is not None:
            if num_folds < 2:
                raise ConfigError(f"num_folds must be at least 2, got {num_folds}.")
            if not 0 <= fold < num_folds:
                raise ConfigError(f"fold must be in [0, num_folds) = [0, {num_folds}), got {fold}.")
        elif isinstance(val_split, float) and not 0 < val_split < 1:
            raise ConfigError(f"val_split as a fraction must be in (0, 1), got {val_split}.")
        elif isinstance(val_split, int) and not 0 < val_split < _EXPECTED[True]:
            raise ConfigError(f"val_split as a count must be in [1, {_EXPECTED[True] - 1}], got {val_split}.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}.")
        for name, p in (("hflip_prob", hflip_prob), ("erasing_prob", erasing_prob)):
            if not 0 <= p <= 1:
                raise ConfigError(f"{name} is a probability and must be in [0, 1], got {p}.")
        if crop_padding < 0 or rotation_degrees < 0:
            raise ConfigError("crop_padding and rotation_degrees must be >= 0.")
        self.save_hyperparameters()
        self.data_dir, self.system_dir, self.download = data_dir, system_dir, download
        self.val_split, self.num_folds, self.fold, self.seed = val_split, num_folds, fold, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.normalization, self.data_on_device = normalization, data_on_device
        self.augmentation = BatchAugment(crop_padding, hflip_prob, rotation_degrees, erasing_prob)
        self.augment = augment and self.augmentation.enabled
        self.class_names = CLASS_NAMES
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None

    def prepare_data(self) -> None:
        """Find, stage or download the files once (Lightning calls this on one process only)."""
        load_fashion_mnist(self.data_dir, self.system_dir, self.download)

    def split_indices(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Train and validation indices into the 60k training images for this configuration."""
        if self.num_folds is not None:
            fold_of = stratified_folds(labels, self.num_folds, self.seed)
            return (fold_of != self.fold).nonzero().squeeze(1), (fold_of == self.fold).nonzero().squeeze(1)
        val_size = round(self.val_split * len(labels)) if isinstance(self.val_split, float) else self.val_split
        return stratified_split(labels, val_size, self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs into memory (on the accelerator if asked) and split it.

        ``fit`` and ``validate`` get the train/validation split of the 60k training images only;
        the 10k test images are loaded for ``test`` and ``predict`` alone.
        """
        device = torch.device("cpu")
        if self.data_on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
        arrays = None
        if stage in (None, "fit", "validate") and self.train_set is None:
            arrays = load_fashion_mnist(self.data_dir, self.system_dir, download=False)
            self.train_idx, self.val_idx = self.split_indices(arrays["train_labels"])
            images, labels = arrays["train_images"], arrays["train_labels"]
            self.train_set = InMemoryDataset(images[self.train_idx].to(device), labels[self.train_idx].to(device))
            self.val_set = InMemoryDataset(images[self.val_idx].to(device), labels[self.val_idx].to(device))
        if stage in (None, "test", "predict") and self.test_set is None:
            arrays = arrays or load_fashion_mnist(self.data_dir, self.system_dir, download=False)
            self.test_set = InMemoryDataset(arrays["test_images"].to(device), arrays["test_labels"].to(device))

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        on_cpu = dataset.images.device.type == "cpu"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=_batch_as_is,
            num_workers=self.num_workers if on_cpu else 0,  # workers cannot share accelerator tensors
            persistent_workers=bool(self.num_workers and on_cpu),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of uint8 images ``(B, 28, 28)`` and labels ``(B,)``."""
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (a split of the 60k training images, never the test set)."""
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the official 10k test set."""
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the official 10k test set, in order, for prediction."""
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def transform(self, images: Tensor, train: bool) -> Tensor:
        """Turn uint8 images ``(B, 28, 28)`` into normalised float ``(B, 1, 28, 28)``, augmenting if ``train``."""
        x = images.unsqueeze(1).float().div_(255)
        if train and self.augment:
            x = self.augmentation(x)
        mean, std = NORMALIZATIONS[self.normalization]
        return (x - mean) / std

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Convert, augment (training batches only) and normalise on the batch's device."""
        images, labels = batch
        train = self.trainer is not None and self.trainer.training
        return self.transform(images, train), labels
