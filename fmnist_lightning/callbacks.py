"""Callbacks the CLI adds besides Lightning's own."""

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import summary_v2

from fmnist_lightning.calibration import scaled_probs
from fmnist_lightning.data import CLASS_NAMES
from fmnist_lightning.errors import ConfigError, DataError
from fmnist_lightning.io import unused_path
from fmnist_lightning.predictions import PredictionsWriter
from fmnist_lightning.runs import append_history, trainer_run_dir


class PredictionCSVWriter(BasePredictionWriter):
    """Stream ``predict`` output, batch by batch, to a predictions CSV in the run's log directory.

    The layout is :mod:`fmnist_lightning.predictions`'s (index, file, label, predicted class, its
    probability, the top-3, every class probability): test-set images have their label and no file;
    the user's images (``--data.predict_dir``) have their path and an empty label. The file appears
    under its name, complete, when ``predict`` ends (``path`` is then set). If not one image could be
    read, nothing is written and :class:`~fmnist_lightning.errors.DataError` ends the run.

    Args:
        filename: File name inside the run's log directory; an existing file is never overwritten
            (a numbered name is used instead).
        class_names: Class names, in label order.
        temperature: Temperature scaling of the probabilities: a number, a ``temperature.json`` written
            by ``robustness`` (fitted on the validation split), or ``auto`` (the latest fitted for this
            checkpoint); None: none. ``predict`` resolves it against its checkpoint into :attr:`scale`.
    """

    def __init__(
        self,
        filename: str = "predictions.csv",
        class_names: Sequence[str] = CLASS_NAMES,
        temperature: float | str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")  # rows are written as batches come: memory stays flat
        self.filename = filename
        self.class_names = tuple(class_names)
        self.temperature = temperature
        self.scale: float | None = None  # the resolved temperature
        self.path: Path | None = None
        self._writer: PredictionsWriter | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pick a free file name in the run folder and start writing under a temporary name."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.path = None
        self._writer = PredictionsWriter(unused_path(log_dir / self.filename), self.class_names).open()

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append the batch's rows (``predict_step``'s probabilities, labels and files)."""
        if self._writer is not None:
            probs = prediction["probs"]
            if self.scale is not None:  # as robustness fits it: on the log of the (flip-averaged) probabilities
                probs = scaled_probs(probs.clamp_min(1e-12).log(), self.scale)
            self._writer.write(probs, labels=prediction["labels"], files=prediction.get("files"))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the file in place (``path``), or refuse an empty result."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if writer.rows == 0:
            writer.close(discard=True)
            source = getattr(trainer.datamodule, "predict_dir", None) or "the predict data"
            raise DataError(
                f"no image could be read from {source} (each unreadable file is named in a warning above); "
                "nothing was written."
            )
        writer.close()
        self.path = writer.path

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Remove the unfinished file: a failed run leaves no partial CSV."""
        if self._writer is not None:
            self._writer.close(discard=True)
            self._writer = None


class EpochTimer(Callback):
    """Log wall-clock seconds per epoch, so speed is read from the same logs as accuracy.

    ``time/train_epoch_s`` counts the training batches only (validation excluded) and
    ``time/val_epoch_s`` the validation pass. On a GPU each clock reading first waits for the
    queued kernels (``torch.cuda.synchronize``, once per reading), so the seconds are the work's,
    not the time it took to queue it.
    """

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def __init__(self) -> None:
        self._train_start = self._val_start = 0.0
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch's clock."""
        self._train_start, self._val_seconds = self._now(pl_module), 0.0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the validation clock."""
        self._val_start = self._now(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the validation time (not during the sanity check)."""
        if trainer.sanity_checking:
            return
        self._val_seconds = self._now(pl_module) - self._val_start
        pl_module.log("time/val_epoch_s", self._val_seconds, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the training time of the epoch, validation excluded."""
        seconds = self._now(pl_module) - self._train_start - self._val_seconds
        pl_module.log("time/train_epoch_s", seconds, on_step=False, on_epoch=True, sync_dist=True)


class EarlyStopping(LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` that a config can switch off (``early_stopping: {enabled: false}``).

    Recipes with a one-cycle schedule end at their own time; stopping them early would cut the
    schedule before its learning rate has annealed.

    Args:
        enabled: Whether to stop early at all.
        **kwargs: Lightning's ``EarlyStopping`` arguments (``monitor``, ``patience``, ``mode``...).
    """

    def __init__(self, enabled: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.enabled = enabled

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning's check at the end of a training epoch, if enabled."""
        if self.enabled:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning's check after validation, if enabled."""
        if self.enabled:
            super().on_validation_end(trainer, pl_module)


class ValidationSchedule(Callback):
    """Validate after every epoch (Lightning's ``check_val_every_n_epoch``), or only after the last one.

    A one-cycle recipe's last epoch is its best, and on a 2-core CPU each validation of
    ``configs/fast.yaml`` (5k images with flip TTA, the confusion-matrix figure, a best checkpoint)
    costs about 2 s of a 90 s fit. ``last_epoch_only`` sets ``check_val_every_n_epoch`` to
    ``max_epochs`` when the fit starts, so it follows ``--trainer.max_epochs``; the checkpoint
    chosen by validation accuracy is then the last epoch's.

    Args:
        last_epoch_only: Validate only after the last epoch.

    Raises:
        ConfigError: At the start of a fit with ``last_epoch_only`` and no ``max_epochs`` (an
            open-ended fit has no last epoch).
    """

    def __init__(self, last_epoch_only: bool = False) -> None:
        self.last_epoch_only = last_epoch_only

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Before the checkpoint callback decides when to save (Lightning sets it up last)."""
        if not self.last_epoch_only or stage != "fit":
            return
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ConfigError(
                "validation_schedule.last_epoch_only needs trainer.max_epochs (an open-ended fit has no last "
                "epoch); set max_epochs or validate every epoch."
            )
        trainer.check_val_every_n_epoch = trainer.max_epochs


class MetricsHistory(Callback):
    """Append each epoch's metrics to the run's ``history.csv`` (training curves without TensorBoard).

    Args:
        keys: The epoch-level metrics to record, when logged.
    """

    def __init__(
        self,
        keys: Sequence[str] = (
            "train/loss",
            "train/acc",
            "val/loss",
            "val/acc",
            "val/f1",
            "time/train_epoch_s",
            "time/val_epoch_s",
        ),
    ) -> None:
        self.keys = tuple(keys)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the epoch's row (rank 0; skipped when there is no run folder)."""
        run_dir = trainer_run_dir(trainer)
        if not trainer.is_global_zero or run_dir is None:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row |= {k: float(metrics[k]) for k in self.keys if k in metrics}
        lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        if lrs:
            row["lr"] = lrs[0]
        append_history(run_dir, row)


#: The HParams columns, in the order TensorBoard lists them: (column, what it shows, its domain).
#: TensorBoard sorts the columns by their name and shows the first five by default, so each name
#: starts with its rank; the table and the filters show the display name (the text after the rank).
#: Only what a person tunes: the task's and the data module's other arguments (``_instantiator``,
#: folders, an optimizer's ``foreach``/``capturable`` flags...) are in the run's ``config.yaml``.
HPARAM_COLUMNS: tuple[tuple[str, str, summary_v2.Domain | None], ...] = tuple(
    (f"{rank:02d}_{name}", name, domain)
    for rank, (name, domain) in enumerate(
        [
            ("model", None),
            ("optimizer", None),
            ("optimizer/lr", None),
            ("batch_size", None),
            ("epochs", None),
            ("model/args", None),
            ("optimizer/weight_decay", None),
            ("lr_scheduler", None),
            ("augment", summary_v2.Discrete([False, True])),
            ("hflip_prob", None),
            ("flip_schedule", summary_v2.Discrete(["alternate", "random"])),
            ("crop_padding", None),
            ("rotation_degrees", None),
            ("erasing_prob", None),
            ("label_smoothing", None),
            ("tta_flip", summary_v2.Discrete([False, True])),
            ("tta_shift", None),
            ("precision", None),
            ("seed", None),
        ],
        start=1,
    )
)
#: Model arguments the data fixes rather than a person: left out of ``model/args``.
_DATA_FIXED_MODEL_ARGS = ("num_classes", "in_channels", "image_size")


def tuned_hparams(trainer: Trainer, pl_module: LightningModule) -> dict[str, bool | float | str]:
    """The run's values of the :data:`HPARAM_COLUMNS` (display name -> value) it has.

    Read from the objects the fit built (the optimizer, the scheduler, the network), so a run
    configured in Python has them as well as one from the CLI; ``model/args`` comes from the CLI's
    ``init_args`` (a network built in Python has none to show). Lists are shown as text.
    """
    values: dict[str, bool | float | str] = {}
    network = getattr(pl_module, "model", pl_module)
    values["model"] = getattr(network, "name", None) or type(network).__name__
    model_config = pl_module.hparams.get("model")
    if isinstance(model_config, Mapping):
        args = {k: v for k, v in (model_config.get("init_args") or {}).items() if k not in _DATA_FIXED_MODEL_ARGS}
        values["model/args"] = " ".join(f"{k}={_text(v)}" for k, v in args.items() if v is not None)
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        values["optimizer"] = type(optimizer).__name__
        for key in ("lr", "weight_decay"):  # the constructed values, before any scheduler changes lr
            if isinstance(optimizer.defaults.get(key), int | float):
                values[f"optimizer/{key}"] = float(optimizer.defaults[key])
    configs = trainer.lr_scheduler_configs
    values["lr_scheduler"] = type(configs[0].scheduler).__name__ if configs else "none"
    data = dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {}
    augmentation = ("augment", "hflip_prob", "flip_schedule", "crop_padding", "rotation_degrees", "erasing_prob")
    for key in ("batch_size", *augmentation):
        if key in data:
            values[key] = data[key]
    for key in ("label_smoothing", "tta_flip", "tta_shift"):
        if key in pl_module.hparams:
            values[key] = pl_module.hparams[key]
    if trainer.max_epochs is not None:
        values["epochs"] = trainer.max_epochs
    values["precision"] = str(trainer.precision)
    if os.environ.get("PL_GLOBAL_SEED", "").isdigit():  # what seed_everything seeded this process with
        values["seed"] = int(os.environ["PL_GLOBAL_SEED"])
    return {k: v if isinstance(v, bool | str) else float(v) for k, v in values.items() if v is not None}


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


class HParamsLogger(Callback):
    """TensorBoard's HParams view: each run's tuned hyper-parameters with its best ``val/acc`` and ``val/loss``.

    At the start of a new run, writes the run's values of :data:`HPARAM_COLUMNS` with the metrics
    ``hp/best_val_acc``, ``hp/best_val_loss`` and ``hp/test_acc``; after each validation epoch logs
    the best values so far, and ``test`` (into the same run folder) logs ``hp/test_acc``.
    Lightning's own ``hp_metric = -1`` is switched off by the CLI.

    TensorBoard takes the table's columns from one experiment summary found in the log folder (any
    run's, when there are several) and leaves out every value under another name: a summary with a
    sweep's own keys once left every other run's row empty. Every run writes the same summary (the
    fixed columns, not its own keys), so whichever is picked describes them all: a run lacking a
    value has an empty cell, and runs of different models share one table.
    """

    METRICS = ("hp/best_val_acc", "hp/best_val_loss", "hp/test_acc")

    def __init__(self) -> None:
        self.best_acc = -math.inf
        self.best_loss = math.inf

    def state_dict(self) -> dict[str, float]:
        """Best values so far, so that a resumed run carries on from them."""
        return {"best_acc": self.best_acc, "best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the best values of the run being resumed."""
        self.best_acc, self.best_loss = state_dict["best_acc"], state_dict["best_loss"]

    @staticmethod
    def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    @staticmethod
    def experiment_summary() -> summary_pb2.Summary:
        """The HParams experiment every run writes: :data:`HPARAM_COLUMNS` and the three metrics, metrics in order."""
        columns = [summary_v2.HParam(name, domain, display_name=shown) for name, shown, domain in HPARAM_COLUMNS]
        metrics = [summary_v2.Metric(tag) for tag in HParamsLogger.METRICS]
        return summary_v2.hparams_config_pb(columns, metrics)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the hyper-parameters of a new run (a resumed run has them already)."""
        logger = self._tensorboard(trainer)
        if logger is None or not trainer.is_global_zero or trainer.ckpt_path:
            return
        names = {shown: name for name, shown, _ in HPARAM_COLUMNS}
        values = {names[k]: v for k, v in tuned_hparams(trainer, pl_module).items()}
        # trial_id "": the row is named after the run folder (TensorBoard's run name) and is the
        # run's alone; the default, a hash of the values, would merge runs with the same values.
        # Written by hand rather than through logger.log_hyperparams, which would log every
        # hyper-parameter and placeholder metric values at step 0.
        for summary in (self.experiment_summary(), summary_v2.hparams_pb(values, trial_id="")):
            logger.experiment.file_writer.add_summary(summary)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the best validation accuracy and loss so far."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        if "val/acc" not in metrics or "val/loss" not in metrics:
            return
        self.best_acc = max(self.best_acc, float(metrics["val/acc"]))
        self.best_loss = min(self.best_loss, float(metrics["val/loss"]))
        logger = self._tensorboard(trainer)
        if logger is not None and trainer.state.fn == "fit":
            values = {"hp/best_val_acc": self.best_acc, "hp/best_val_loss": self.best_loss}
            logger.log_metrics(values, step=trainer.global_step)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the test accuracy next to the run's hyper-parameters (the epoch's metrics are final here)."""
        logger = self._tensorboard(trainer)
        if logger is not None and trainer.is_global_zero and "test/acc" in trainer.callback_metrics:
            logger.log_metrics({"hp/test_acc": float(trainer.callback_metrics["test/acc"])}, step=trainer.global_step)
