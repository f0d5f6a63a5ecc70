"""Shared fixtures: CPU only, no workers, output under tmp_path, the real data staged once, and two real runs
trained and tested once for the whole session (the tests that only read a run share them; a test that
changes a run works on a copy)."""

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from fmnist_lightning import training
from fmnist_lightning.data import SYSTEM_DATA_DIR, load_fashion_mnist

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LINEAR = ["--config", str(ROOT / "configs" / "linear.yaml")]
TINYVGG = ["--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--model.model.init_args.widths=[8, 16]"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the real Fashion-MNIST (from data/ or the system copy)."""
    repo_data = ROOT / "data"
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


def quiet_trainer(root: Path, **overrides) -> Trainer:
    """A real CPU ``Trainer`` for an in-process test: a few batches, no sanity check, logger, checkpoints,
    bar or summary unless ``overrides`` ask for them (any ``Trainer`` argument), output under ``root``."""
    settings = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return Trainer(**{**settings, **overrides})


@dataclass(frozen=True)
class TrainedRun:
    """A run fitted and tested once for the session: read it, or :meth:`copy` it before changing it."""

    args: list[str]  # the command line it was fitted with (config and overrides)
    run_dir: Path
    best: Path
    last: Path
    report: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    def copy(self, to: Path) -> "TrainedRun":
        """The run copied to ``to/<name>/version_0`` (same layout, so best/last still resolve)."""
        target = to / self.run_dir.parent.name / self.run_dir.name
        shutil.copytree(self.run_dir, target)
        moved = {p: target / p.relative_to(self.run_dir) for p in (self.best, self.last, self.report)}
        return TrainedRun(self.args, target, moved[self.best], moved[self.last], moved[self.report])


def _fit_and_test(root: Path, args: list[str]) -> TrainedRun:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        fitted = training.fit(args)
        tested = training.test(args, {"ckpt_path": "best"})
    assert fitted.best_checkpoint
    assert fitted.last_checkpoint
    assert tested.report_dir
    return TrainedRun(args, fitted.run_dir, fitted.best_checkpoint, fitted.last_checkpoint, tested.report_dir)


@pytest.fixture(scope="session")
def tinyvgg_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """TinyVGG 8-16 (flip TTA, as tinyvgg.yaml) fitted for 30 batches (about 70% accurate), tested on 4 batches."""
    root = tmp_path_factory.mktemp("tinyvgg_run")
    extra = ("--trainer.limit_train_batches=30", "--trainer.limit_test_batches=4")
    return _fit_and_test(root, [*TINYVGG, *fast_fit_args(data_dir, root / "logs", *extra)])


@pytest.fixture(scope="session")
def linear_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The linear baseline fitted for 3 batches, tested on the same 4 batches as :func:`tinyvgg_run`."""
    root = tmp_path_factory.mktemp("linear_run")
    return _fit_and_test(root, [*LINEAR, *fast_fit_args(data_dir, root / "logs", "--trainer.limit_test_batches=4")])


def compact(line: str) -> str:
    """A markdown table row without its padding: ``| a | b |`` however wide the columns were drawn."""
    if not line.startswith("|"):
        return line
    return "| " + " | ".join(cell.strip() for cell in line.strip().strip("|").split("|")) + " |"


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``64k``, ``3m``) at ``folder``: a disk that fills up (skips where mount is refused)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
