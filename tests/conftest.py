"""Shared fixtures: CPU only, no workers, output under tmp_path, the real data staged once."""

from pathlib import Path

import pytest
import torch

from fmnist_lightning.data import SYSTEM_DATA_DIR, load_fashion_mnist

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the real Fashion-MNIST (from data/ or the system copy)."""
    repo_data = Path(__file__).parent.parent / "data"
    if (repo_data / "FashionMNIST" / "raw").is_dir():
        return repo_data
    path = tmp_path_factory.mktemp("data")
    load_fashion_mnist(path, SYSTEM_DATA_DIR, download=False)
    return path


@pytest.fixture(scope="session")
def arrays(data_dir: Path) -> dict[str, torch.Tensor]:
    return load_fashion_mnist(data_dir, download=False)


def fast_fit_args(data_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    """CLI overrides for a few-batch CPU run writing under ``log_dir``."""
    return [
        f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
