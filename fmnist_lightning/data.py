"""Fashion-MNIST as in-memory uint8 tensors: a LightningDataModule with seeded stratified splits.

The whole dataset is 47 MB of uint8, so it stays in memory (on the accelerator when there is one).
Each batch is built by one tensor index, and conversion, augmentation and normalisation run batched
on the batch's device in ``on_after_batch_transfer``; no per-image Python work in the training path.
"""

import functools
import inspect
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

from fmnist_lightning.augment import BatchAugment
from fmnist_lightning.errors import ConfigError, DataError
from fmnist_lightning.images import ImageFilesDataset

#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX ``.gz`` files.
SYSTEM_DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = tuple(FashionMNIST.classes)
IDX_FILES: tuple[str, ...] = tuple(name for name, _ in FashionMNIST.resources)
#: Mean and std of the 60k training pixels in [0, 1] (checked in tests/test_data.py).
DATASET_MEAN, DATASET_STD = 0.2860, 0.3530
NORMALIZATIONS = {"unit": (0.0, 1.0), "symmetric": (0.5, 0.5), "dataset": (DATASET_MEAN, DATASET_STD)}
_EXPECTED = {True: 60_000, False: 10_000}
IMAGE_SIZE = 28
# The augmentation's defaults are declared once, in BatchAugment's signature.
_AUGMENT_DEFAULTS = {k: p.default for k, p in inspect.signature(BatchAugment).parameters.items()}
_HOW_TO_GET = (
    "Get the data in one of two ways: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts the "
    f"IDX files in {SYSTEM_DATA_DIR}), or run with internet access and `download: true` so torchvision "
    "downloads them into data_dir."
)


def _stage_idx_files(source: Path, data_dir: Path) -> None:
    """Decompress the four ``.gz`` IDX files from ``source`` into torchvision's raw folder.

    All or nothing: if one file is corrupt, the files and folders this call made are removed.
    """
    raw = data_dir / "FashionMNIST" / "raw"
    made = [p for p in (raw, raw.parent, data_dir) if not p.exists()]  # innermost first
    raw.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    try:
        for name in IDX_FILES:
            # Extract beside the target and rename, so an interrupted copy never leaves a truncated file.
            with tempfile.TemporaryDirectory(dir=raw) as tmp:
                try:
                    extracted = extract_archive(str(source / name), tmp)
                except (OSError, EOFError) as err:
                    raise DataError(f"Fashion-MNIST file {source / name} is corrupt ({err}). {_HOW_TO_GET}") from err
                target = raw / name.removesuffix(".gz")
                shutil.move(extracted, target)
                staged.append(target)
    except BaseException:
        for path in staged:
            path.unlink(missing_ok=True)
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _has_gz_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in IDX_FILES)


def locate_fashion_mnist(
    data_dir: str | Path = "data", system_dir: str | Path = SYSTEM_DATA_DIR, download: bool = True
) -> Path:
    """Find the four Fashion-MNIST IDX files, staging or downloading them into ``data_dir`` if needed.

    Looks, in order, for torchvision's layout under ``data_dir`` (``FashionMNIST/raw``), the four
    ``.gz`` files in ``data_dir`` itself, the system copy in ``system_dir`` (Debian's
    ``dataset-fashion-mnist``), and finally torchvision's download. Nothing is parsed.

    Args:
        data_dir: The package's data directory.
        system_dir: Folder holding the four official IDX ``.gz`` files.
        download: Whether to download with torchvision when no local copy exists.

    Returns:
        The folder holding the four decompressed IDX files (``<data_dir>/FashionMNIST/raw``).

    Raises:
        DataError: If the data cannot be found, staged or fetched.
    """
    data_dir, system_dir = Path(data_dir), Path(system_dir)
    raw = data_dir / "FashionMNIST" / "raw"
    if all((raw / name.removesuffix(".gz")).is_file() for name in IDX_FILES):
        return raw
    source = next((d for d in (data_dir, system_dir) if _has_gz_files(d)), None)
    try:
        if source is not None:
            _stage_idx_files(source, data_dir)
        elif download:
            try:
                FashionMNIST(str(data_dir), train=True, download=True)
            except Exception as err:  # network errors come in many types (URLError is an OSError too)
                raise DataError(
                    f"Fashion-MNIST is not in {data_dir} or {system_dir}, and torchvision's download "
                    f"failed ({type(err).__name__}: {err}). {_HOW_TO_GET}"
                ) from err
        else:
            raise DataError(f"Fashion-MNIST is not in {data_dir} or {system_dir} and download is off. {_HOW_TO_GET}")
    except OSError as err:  # permissions, a full disk, a read-only data_dir
        raise DataError(
            f"cannot stage Fashion-MNIST into {data_dir} ({err.strerror or err}: {err.filename}); choose a writable "
            "--data.data_dir."
        ) from err
    return raw


@functools.lru_cache(maxsize=2)
def _parse_idx(raw: Path, signature: tuple[tuple[str, int, int], ...]) -> dict[str, Tensor]:
    """Parse the four IDX files once per process (``signature``: names, sizes and mtimes, so edits re-parse)."""
    arrays = {}
    for train, split in ((True, "train"), (False, "test")):
        try:
            ds = FashionMNIST(str(raw.parent.parent), train=train, download=False)
        except PermissionError as err:
            raise DataError(
                f"cannot read the Fashion-MNIST files in {raw}: permission denied ({err.filename}). Make them "
                "readable (chmod a+r) or point --data.data_dir elsewhere."
            ) from err
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
        if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
            raise DataError(
                f"Fashion-MNIST {split} labels in {raw} run from {int(labels.min())} to {int(labels.max())}, "
                f"expected 0 to {len(CLASS_NAMES) - 1}: the file is damaged or not Fashion-MNIST. Delete that folder "
                f"and run again. {_HOW_TO_GET}"
            )
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.long()
    return arrays


def load_fashion_mnist(
    data_dir: str | Path = "data", system_dir: str | Path = SYSTEM_DATA_DIR, download: bool = True
) -> dict[str, Tensor]:
    """Load the four Fashion-MNIST arrays, finding the files by themselves (see :func:`locate_fashion_mnist`).

    Parsing is torchvision's, done once per process for the same files (k-fold and sweeps train
    many models in one process).

    Args:
        data_dir: The package's data directory.
        system_dir: Folder holding the four official IDX ``.gz`` files.
        download: Whether to download with torchvision when no local copy exists.

    Returns:
        ``train_images`` (60000, 28, 28) and ``test_images`` (10000, 28, 28) as uint8, and
        ``train_labels`` / ``test_labels`` as int64 in [0, 9]. The tensors are shared between
        calls: do not modify them in place.

    Raises:
        DataError: If the data cannot be found, fetched, read or parsed.
    """
    raw = locate_fashion_mnist(data_dir, system_dir, download).resolve()
    files = sorted(raw.glob("*-ubyte"))
    return _parse_idx(raw, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


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


def validation_size(val_split: int | float, n: int) -> int:
    """Number of validation images for ``val_split`` (a fraction or a count) of ``n`` images."""
    return round(val_split * n) if isinstance(val_split, float) else val_split


def _check_split(val_split: int | float, num_folds: int | None, fold: int | None) -> None:
    """Refuse splits that cannot work on the 60k training images (6,000 per class), before any data is read."""
    n, per_class = _EXPECTED[True], _EXPECTED[True] // len(CLASS_NAMES)
    if num_folds is not None:
        if not 2 <= num_folds <= per_class:
            raise ConfigError(
                f"num_folds must be in [2, {per_class}] (each fold needs an image of every class; a class has "
                f"{per_class} training images), got {num_folds}."
            )
        if fold is not None and not 0 <= fold < num_folds:
            raise ConfigError(f"fold must be in [0, num_folds) = [0, {num_folds}), got {fold}.")
        return
    if fold is not None:
        raise ConfigError(f"fold={fold} needs num_folds (e.g. --data.num_folds 5); without it val_split is used.")
    if isinstance(val_split, bool) or not isinstance(val_split, int | float):
        raise ConfigError(f"val_split must be a fraction in (0, 1) or a count of images, got {val_split!r}.")
    if isinstance(val_split, float) and not 0 < val_split < 1:
        raise ConfigError(f"val_split as a fraction must be in (0, 1), got {val_split}.")
    size = validation_size(val_split, n)
    if not 1 <= size <= n - 1:
        what = f"val_split={val_split} gives {size} of {n} images"
        raise ConfigError(f"{what}: the validation and training sets both need images (1 to {n - 1}).")


class ShardSampler(DistributedSampler):
    """Evaluation sampler under DDP: rank r takes images r, r + W, r + 2W..., each image exactly once.

    Lightning's ``DistributedSampler`` pads the dataset so that every rank gets as many images,
    which counts some validation and test images twice. Being a ``DistributedSampler`` itself,
    this one is left in place by Lightning; ranks may get one image more or less than each other.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(shard_indices(len(self.dataset), self.rank, self.num_replicas))

    def __len__(self) -> int:
        return len(shard_indices(len(self.dataset), self.rank, self.num_replicas))


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The dataset indices that rank ``rank`` of ``world_size`` evaluates (see :class:`ShardSampler`)."""
    return range(rank, n, world_size)


class InMemoryDataset(Dataset):
    """Images and labels held as tensors; a whole batch is fetched with one index operation.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices when it exists, so samplers
    (Lightning's ``DistributedSampler`` under DDP included) keep working while batches are built by
    tensor indexing instead of per-image calls and collation.

    Args:
        images: ``(N, ...)`` images.
        labels: ``(N,)`` labels.
        with_index: Batches also carry the images' indices into the dataset, ``(images, labels, index)``.
    """

    def __init__(self, images: Tensor, labels: Tensor, with_index: bool = False) -> None:
        self.images, self.labels, self.with_index = images, labels, with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(indices, device=self.images.device)
        return (self.images[idx], self.labels[idx], idx) if self.with_index else (self.images[idx], self.labels[idx])


def _batch_as_is(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for batches that ``__getitems__`` already built."""
    return batch


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST with a seeded stratified validation split (or k-fold) of the 60k training images.

    The official 10k test set is used by ``test`` (and by ``predict`` without ``predict_dir``) only; early stopping, LR
    schedules and checkpoint choice see the validation split.

    Args:
        data_dir: Where to keep the data (see :func:`load_fashion_mnist` for the search order).
        system_dir: Folder with the four IDX ``.gz`` files of Debian's ``dataset-fashion-mnist``.
        download: Download with torchvision when no local copy exists.
        val_split: Validation share of the 60k training images: a fraction in (0, 1) or a count.
            Ignored when ``num_folds`` is set.
        num_folds: If set, k-fold cross-validation: fold ``fold`` of ``num_folds`` stratified folds
            is the validation set and the rest is the training set.
        fold: Which fold is the validation set, in ``[0, num_folds)`` (0 when ``num_folds`` is set
            and this is not).
        seed: Seed of the split and of the folds (independent of the training seed).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and predict (on a 2-core CPU 256 beats 1000:
            the activations of 1000 images overflow the caches).
        normalization: ``unit`` keeps pixels in [0, 1]; ``symmetric`` maps them to [-1, 1] (mean 0.5,
            std 0.5, as study 001); ``dataset`` standardises with the training set's mean and std.
        augment: Master switch of train-time augmentation; the four options below set each operation.
        crop_padding: Random crop after padding by this many pixels (0: off).
        hflip_prob: Probability of a horizontal flip (0: off).
        flip_schedule: ``random``: each training image is flipped with ``hflip_prob`` afresh every
            epoch. ``alternate`` (airbench's alternating flips): a random share ``hflip_prob`` of the
            images is flipped in the first epoch and every image is flipped in the epochs where it
            was not before, so every two epochs show each image both ways.
        rotation_degrees: Maximum rotation angle in degrees (0: off).
        erasing_prob: Probability of random erasing (0: off).
        data_on_device: Keep the whole dataset on the accelerator (GPU/MPS) when training on one.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory batches.
        predict_dir: An image file, or a folder of images (searched recursively), that ``predict``
            reads instead of the test set: any size and mode, brought to the Fashion-MNIST layout
            (:mod:`fmnist_lightning.images`) and streamed in batches of ``eval_batch_size``.
    """

    def __init__(
        self,
        data_dir: str = "data",
        system_dir: str = SYSTEM_DATA_DIR,
        download: bool = True,
        val_split: int | float = 0.1,
        num_folds: int | None = None,
        fold: int | None = None,
        seed: int = 42,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        normalization: Literal["unit", "symmetric", "dataset"] = "dataset",
        augment: bool = True,
        crop_padding: int = _AUGMENT_DEFAULTS["crop_padding"],
        hflip_prob: float = _AUGMENT_DEFAULTS["hflip_prob"],
        flip_schedule: Literal["random", "alternate"] = "random",
        rotation_degrees: float = _AUGMENT_DEFAULTS["rotation_degrees"],
        erasing_prob: float = _AUGMENT_DEFAULTS["erasing_prob"],
        data_on_device: bool = True,
        num_workers: int = 0,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_split(val_split, num_folds, fold)
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}.")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.")
        for name, p in (("hflip_prob", hflip_prob), ("erasing_prob", erasing_prob)):
            if not 0 <= p <= 1:
                raise ConfigError(f"{name} is a probability and must be in [0, 1], got {p}.")
        if not 0 <= crop_padding < IMAGE_SIZE:
            raise ConfigError(f"crop_padding must be in [0, {IMAGE_SIZE - 1}] pixels, got {crop_padding}.")
        if not 0 <= rotation_degrees <= 180:
            raise ConfigError(f"rotation_degrees must be in [0, 180] (a rotation in [-d, d]), got {rotation_degrees}.")
        self.save_hyperparameters()
        self.data_dir, self.system_dir, self.download = data_dir, system_dir, download
        self.val_split, self.num_folds, self.seed = val_split, num_folds, seed
        self.fold = 0 if fold is None else fold
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.normalization, self.data_on_device = normalization, data_on_device
        if flip_schedule not in ("random", "alternate"):
            raise ConfigError(f"flip_schedule must be 'random' or 'alternate', got {flip_schedule!r}.")
        alternate = flip_schedule == "alternate" and augment and hflip_prob > 0
        # Alternating flips are applied by this module (they need each image's index), the rest by BatchAugment.
        self.augmentation = BatchAugment(crop_padding, 0.0 if alternate else hflip_prob, rotation_degrees, erasing_prob)
        self.augment = augment and (self.augmentation.enabled or alternate)
        self.alternate_flips, self.hflip_prob = alternate, hflip_prob
        self.first_flips: Tensor | None = None  # alternate: which training images the first epoch flips
        self.class_names = CLASS_NAMES
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None
        self.predict_dir = predict_dir
        self.predict_set: ImageFilesDataset | None = None
        self.train_idx: Tensor | None = None
        self.val_idx: Tensor | None = None

    def prepare_data(self) -> None:
        """Find, stage or download the files (Lightning calls this on one process only); parsing is in setup."""
        # Predicting the user's images needs no Fashion-MNIST file. (No stage yet: before a run, as the
        # CLI checks; a fit with predict_dir set still finds the data in its own prepare_data.)
        stage = self.trainer.state.fn if self.trainer is not None else None
        if self.predict_dir is not None and stage in (None, "predict"):
            return
        locate_fashion_mnist(self.data_dir, self.system_dir, self.download)

    def split_indices(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Train and validation indices into the 60k training images for this configuration."""
        if self.num_folds is not None:
            fold_of = stratified_folds(labels, self.num_folds, self.seed)
            return (fold_of != self.fold).nonzero().squeeze(1), (fold_of == self.fold).nonzero().squeeze(1)
        return stratified_split(labels, validation_size(self.val_split, len(labels)), self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs into memory (on the accelerator if asked) and split it.

        ``fit`` and ``validate`` get the train/validation split of the 60k training images only;
        the 10k test images are loaded for ``test`` and ``predict`` alone, and ``predict`` with
        ``predict_dir`` lists the user's files instead (their images are read batch by batch).
        """
        device = torch.device("cpu")
        if self.data_on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
        arrays = None
        if stage in (None, "fit", "validate") and self.train_set is None:
            arrays = load_fashion_mnist(self.data_dir, self.system_dir, download=False)
            self.train_idx, self.val_idx = self.split_indices(arrays["train_labels"])
            images, labels = arrays["train_images"], arrays["train_labels"]
            train_images, train_labels = images[self.train_idx].to(device), labels[self.train_idx].to(device)
            self.train_set = InMemoryDataset(train_images, train_labels, with_index=self.alternate_flips)
            if self.alternate_flips:  # drawn from the training seed (seed_everything), as the other augmentations
                self.first_flips = torch.rand(len(train_labels), device=device) < self.hflip_prob
            self.val_set = InMemoryDataset(images[self.val_idx].to(device), labels[self.val_idx].to(device))
        if stage in (None, "predict") and self.predict_dir is not None and self.predict_set is None:
            self.predict_set = ImageFilesDataset(self.predict_dir)
        test_images = stage in (None, "test") or (stage == "predict" and self.predict_dir is None)
        if test_images and self.test_set is None:
            arrays = arrays or load_fashion_mnist(self.data_dir, self.system_dir, download=False)
            self.test_set = InMemoryDataset(arrays["test_images"].to(device), arrays["test_labels"].to(device))

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        on_cpu = dataset.images.device.type == "cpu"
        sampler = None
        if not shuffle and self.trainer is not None and self.trainer.world_size > 1:
            # Each evaluation image exactly once across ranks (Lightning's sampler would pad).
            sampler = ShardSampler(dataset, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
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
        """Batches of the official 10k test set, in order, for prediction; with ``predict_dir``, the user's images.

        The user's images come as ``(uint8 (B, 28, 28), None, files)``: no labels, and the path of each.
        """
        if self.predict_dir is None:
            return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') before asking for a dataloader")
        # Each batch is decoded when asked for (in the workers, if any): never the whole folder in memory.
        return DataLoader(
            self.predict_set, batch_size=self.eval_batch_size, collate_fn=_batch_as_is, num_workers=self.num_workers
        )

    def transform(self, images: Tensor, train: bool) -> Tensor:
        """Turn uint8 images ``(B, 28, 28)`` into normalised float ``(B, 1, 28, 28)``, augmenting if ``train``."""
        x = images.unsqueeze(1).float().div_(255)
        if train and self.augment:
            x = self.augmentation(x)
        mean, std = NORMALIZATIONS[self.normalization]
        return (x - mean) / std

    def on_after_batch_transfer(self, batch: tuple, dataloader_idx: int) -> tuple:
        """Convert, augment (training batches only) and normalise on the batch's device."""
        images, labels, *files = batch  # the user's images (predict_dir) carry their paths too
        train = self.trainer is not None and self.trainer.training
        if train and self.alternate_flips:
            (index,) = files  # the training set carries each image's index
            files = []
            flip = self.first_flips[index] ^ bool(self.trainer.current_epoch % 2)
            images = torch.where(flip.view(-1, 1, 1), images.flip(-1), images)
        return (self.transform(images, train), labels, *files)
