import gzip
from pathlib import Path

import pytest
import torch

from fmnist_lightning import BatchAugment, ClassificationTask, ConfigError, DataError, FashionMNISTDataModule
from fmnist_lightning.data import (
    DATASET_MEAN,
    DATASET_STD,
    IDX_FILES,
    load_fashion_mnist,
    stratified_folds,
    stratified_split,
)
from fmnist_lightning.models import TinyVGG

from .conftest import quiet_trainer


def test_arrays_are_the_real_dataset(arrays):
    assert arrays["train_images"].shape == (60_000, 28, 28)
    assert arrays["test_images"].shape == (10_000, 28, 28)
    assert arrays["train_images"].dtype == torch.uint8
    assert torch.bincount(arrays["train_labels"]).tolist() == [6000] * 10
    assert torch.bincount(arrays["test_labels"]).tolist() == [1000] * 10


def test_dataset_normalisation_constants_match_the_data(arrays):
    x = arrays["train_images"].double() / 255
    assert x.mean().item() == pytest.approx(DATASET_MEAN, abs=5e-4)
    assert x.std().item() == pytest.approx(DATASET_STD, abs=5e-4)


def test_split_is_seeded_stratified_disjoint_and_covering(arrays):
    labels = arrays["train_labels"]
    train, val = stratified_split(labels, 6000, seed=1)
    train2, val2 = stratified_split(labels, 6000, seed=1)
    _, val3 = stratified_split(labels, 6000, seed=2)
    assert torch.equal(val, val2)
    assert torch.equal(train, train2)
    assert not torch.equal(val, val3)
    assert len(val) == 6000
    assert len(train) == 54_000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60_000))
    assert torch.bincount(labels[val]).tolist() == [600] * 10


def test_split_count_is_exact_when_classes_do_not_divide_it(arrays):
    labels = arrays["train_labels"]
    _, val = stratified_split(labels, 5003, seed=0)
    counts = torch.bincount(labels[val], minlength=10)
    assert len(val) == 5003
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize(("val_split", "expected"), [(0.2, 12_000), (5000, 5000)])
def test_val_split_as_fraction_or_count(arrays, val_split, expected):
    dm = FashionMNISTDataModule(val_split=val_split)
    train, val = dm.split_indices(arrays["train_labels"])
    assert len(val) == expected
    assert len(train) == 60_000 - expected


def test_folds_are_stratified_disjoint_covering_and_seeded(arrays):
    labels = arrays["train_labels"]
    vals = []
    for fold in range(5):
        dm = FashionMNISTDataModule(num_folds=5, fold=fold, seed=3)
        train, val = dm.split_indices(labels)
        assert len(val) == 12_000
        assert len(train) == 48_000
        assert torch.bincount(labels[val]).tolist() == [1200] * 10
        assert not set(train.tolist()) & set(val.tolist())
        vals.append(val)
    assert torch.equal(torch.cat(vals).sort().values, torch.arange(60_000))
    assert torch.equal(stratified_folds(labels, 5, 3), stratified_folds(labels, 5, 3))
    assert not torch.equal(stratified_folds(labels, 5, 3), stratified_folds(labels, 5, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_split": 1.0}, "val_split"),
        ({"val_split": 0.0}, "val_split"),
        ({"val_split": 60_000}, "val_split"),
        ({"num_folds": 5, "fold": 5}, "fold must be in"),
        ({"num_folds": 1}, "num_folds"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"batch_size": 0}, "batch sizes"),
    ],
)
def test_impossible_values_raise_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FashionMNISTDataModule(**kwargs)


def test_missing_data_error_names_both_ways_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path / "data", system_dir=tmp_path / "nowhere", download=False)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "download" in str(err.value)


def test_corrupt_gz_files_give_a_clear_error(tmp_path):
    source = tmp_path / "system"
    source.mkdir()
    for name in IDX_FILES:
        (source / name).write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="corrupt"):
        load_fashion_mnist(tmp_path / "data", system_dir=source, download=False)


def test_truncated_idx_file_gives_a_clear_error(tmp_path, data_dir):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        target = raw / name.removesuffix(".gz")
        target.write_bytes((Path(data_dir) / "FashionMNIST" / "raw" / target.name).read_bytes()[:1000])
    with pytest.raises(DataError, match=r"corrupt|expected"):
        load_fashion_mnist(tmp_path / "data", download=False)


def test_gz_files_in_data_dir_are_found(tmp_path, data_dir):
    for name in IDX_FILES:
        raw = (Path(data_dir) / "FashionMNIST" / "raw" / name.removesuffix(".gz")).read_bytes()
        (tmp_path / name).write_bytes(gzip.compress(raw, compresslevel=1))
    arrays = load_fashion_mnist(tmp_path, system_dir=tmp_path / "nowhere", download=False)
    assert arrays["train_images"].shape == (60_000, 28, 28)


def test_fit_setup_never_loads_the_test_set(data_dir):
    dm = FashionMNISTDataModule(data_dir=str(data_dir))
    dm.setup("fit")
    assert dm.test_set is None
    assert len(dm.train_set) + len(dm.val_set) == 60_000
    dm.setup("test")
    assert len(dm.test_set) == 10_000


def test_batches_are_built_by_one_index(data_dir):
    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=64)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (64,)


@pytest.mark.parametrize(
    ("aug", "min_distinct"),
    [
        (BatchAugment(crop_padding=2, hflip_prob=0), 10),  # up to 25 shifts
        (BatchAugment(crop_padding=0, hflip_prob=0.5), 2),  # flipped or not
        (BatchAugment(crop_padding=0, hflip_prob=0, rotation_degrees=15), 30),
        (BatchAugment(crop_padding=0, hflip_prob=0, erasing_prob=0.5), 10),
    ],
    ids=["crop", "flip", "rotation", "erasing"],
)
def test_each_augmentation_changes_images_independently(arrays, aug, min_distinct):
    # 64 copies of one image: independent parameters per image give many distinct results.
    x = arrays["train_images"][:1].float().div(255).unsqueeze(1).repeat(64, 1, 1, 1)
    out = aug(x)
    assert out.shape == x.shape
    assert (out != x).flatten(1).any(1).any()
    assert len(torch.unique(out.flatten(1), dim=0)) >= min_distinct


def test_crop_and_flip_only_move_pixels(arrays):
    x = arrays["train_images"][:256].float().div(255).unsqueeze(1)
    out = BatchAugment(crop_padding=2, hflip_prob=0.5)(x)
    # Integer shifts and flips keep pixel values exact (no interpolation).
    assert set(torch.unique(out).tolist()) <= set(torch.unique(x).tolist())


class RecordingDataModule(FashionMNISTDataModule):
    """The real data module, recording each batch before and after its on-device transform."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        self.records.append((self.trainer.state.stage.value, batch[0].clone(), out[0].clone()))
        return out


def test_augmentation_only_on_training_batches(data_dir, tmp_path):
    dm = RecordingDataModule(data_dir=str(data_dir), batch_size=32, eval_batch_size=32, rotation_degrees=10)
    trainer = quiet_trainer(tmp_path, limit_val_batches=2, limit_test_batches=2)
    task = ClassificationTask(TinyVGG(widths=(8, 16)))
    trainer.fit(task, datamodule=dm)
    trainer.test(task, datamodule=dm)
    stages = {stage for stage, _, _ in dm.records}
    assert stages == {"train", "validate", "test"}
    for stage, raw, out in dm.records:
        plain = dm.transform(raw, train=False)
        if stage == "train":
            assert not torch.allclose(out, plain)
        else:
            assert torch.equal(out, plain)


class IndexRecordingDataModule(FashionMNISTDataModule):
    """The real data module, recording each training batch's epoch, indices, raw images and output."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        out = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer.training:
            epoch, (raw, _, index) = self.trainer.current_epoch, batch
            self.records.append((epoch, index.clone(), raw.clone(), out[0].clone()))
        return out


def test_alternating_flips_show_each_image_both_ways_every_two_epochs(data_dir, tmp_path):
    dm = IndexRecordingDataModule(
        data_dir=str(data_dir), batch_size=256, crop_padding=0, flip_schedule="alternate", val_split=0.5
    )
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=3)
    trainer.fit(ClassificationTask(TinyVGG(widths=(8, 16))), datamodule=dm)
    assert dm.first_flips.shape == (30_000,)
    assert 0.45 < dm.first_flips.float().mean() < 0.55
    assert {epoch for epoch, *_ in dm.records} == {0, 1, 2}
    for epoch, index, raw, out in dm.records:
        # Only the batch's indices (stripped before the task sees them) say which images flip.
        assert out.shape == (256, 1, 28, 28)
        plain, mirrored = dm.transform(raw, train=False), dm.transform(raw.flip(-1), train=False)
        flipped = dm.first_flips[index] ^ (epoch % 2 == 1)
        assert torch.equal(out[flipped], mirrored[flipped])
        assert torch.equal(out[~flipped], plain[~flipped])
        assert 0 < flipped.sum() < 256


def test_alternating_flips_follow_the_augment_switches(data_dir):
    assert FashionMNISTDataModule(flip_schedule="alternate").alternate_flips
    assert not FashionMNISTDataModule(flip_schedule="alternate", hflip_prob=0).alternate_flips
    assert not FashionMNISTDataModule(flip_schedule="alternate", augment=False).augment
    with pytest.raises(ConfigError, match="flip_schedule"):
        FashionMNISTDataModule(flip_schedule="sometimes")
    dm = FashionMNISTDataModule(data_dir=str(data_dir), flip_schedule="alternate")
    dm.setup("fit")
    # The validation set never carries indices (nor flips).
    assert len(next(iter(dm.val_dataloader()))) == 2
    assert len(next(iter(dm.train_dataloader()))) == 3
