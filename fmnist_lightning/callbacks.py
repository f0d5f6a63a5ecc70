"""Callbacks the CLI adds besides Lightning's own."""

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from fmnist_lightning.data import CLASS_NAMES
from fmnist_lightning.runs import unused_path


class PredictionCSVWriter(BasePredictionWriter):
    """Write ``predict`` output to a CSV file: index, label, predicted class and class probabilities.

    Args:
        filename: File name inside the run's log directory; an existing file is never overwritten
            (a numbered name is used instead).
        class_names: Column names for the probabilities.
    """

    def __init__(self, filename: str = "predictions.csv", class_names: Sequence[str] = CLASS_NAMES) -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.class_names = tuple(class_names)
        self.path: Path | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        """Gather the batches' outputs and write one row per image."""
        if not predictions:
            return
        outputs = predictions[0] if isinstance(predictions[0], list) else predictions  # one dataloader
        probs = torch.cat([o["probs"] for o in outputs]).cpu()
        preds = torch.cat([o["preds"] for o in outputs]).cpu()
        labels = torch.cat([o["labels"] for o in outputs]).cpu()
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = unused_path(log_dir / self.filename)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "pred", *(f"p_{name}" for name in self.class_names)])
            for i, (label, pred, p) in enumerate(zip(labels.tolist(), preds.tolist(), probs.tolist(), strict=True)):
                writer.writerow([i, label, pred, *(f"{v:.6f}" for v in p)])


class EpochTimer(Callback):
    """Log wall-clock seconds per epoch, so speed is read from the same logs as accuracy.

    ``time/train_epoch_s`` counts the training batches only (validation excluded) and
    ``time/val_epoch_s`` the validation pass.
    """

    def __init__(self) -> None:
        self._train_start = self._val_start = 0.0
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch's clock."""
        self._train_start, self._val_seconds = time.perf_counter(), 0.0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the validation clock."""
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the validation time (not during the sanity check)."""
        if trainer.sanity_checking:
            return
        self._val_seconds = time.perf_counter() - self._val_start
        pl_module.log("time/val_epoch_s", self._val_seconds, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the training time of the epoch, validation excluded."""
        seconds = time.perf_counter() - self._train_start - self._val_seconds
        pl_module.log("time/train_epoch_s", seconds, on_step=False, on_epoch=True)
