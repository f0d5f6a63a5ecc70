"""Evaluation of a trained model, into TensorBoard and into files a person can open.

Confusion matrices, per-class metrics, ROC, misclassified images, training curves and a report
(``metrics.json``, ``predictions.csv``, PNG figures) in the run folder.

Everything is computed with torchmetrics and drawn with its plotting on matplotlib ``Figure``s
(no pyplot state), sent to TensorBoard and saved as files a person can open.
"""

import csv
import json
import math
import re
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassROC,
)

from fmnist_lightning.data import CLASS_NAMES
from fmnist_lightning.runs import unused_path

CURVES = (("loss", ("train/loss", "val/loss")), ("accuracy", ("train/acc", "val/acc")))


def safe_tag(name: str) -> str:
    """A class name usable in a TensorBoard tag: ``"T-shirt/top"`` -> ``"T-shirt_top"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def read_scalars(run_dir: str | Path) -> dict[str, list[float]]:
    """Every scalar series of a run's TensorBoard event files, in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def confusion_figure(confmat: Tensor, class_names: Sequence[str], title: str) -> Figure:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    fig = Figure(figsize=(20, 9), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    metric = MulticlassConfusionMatrix(len(class_names))
    metric.plot(val=confmat, ax=ax_counts, labels=list(class_names))
    normalised = confmat.float() / confmat.sum(dim=1, keepdim=True).clamp_min(1)
    metric.plot(val=(normalised * 1000).round() / 10, ax=ax_norm, labels=list(class_names))
    ax_counts.set_title(f"{title}: counts")
    ax_norm.set_title(f"{title}: % of each true class")
    return fig


def image_grid(images: Tensor, titles: Sequence[str], colors: Sequence[str] | None = None, columns: int = 8) -> Figure:
    """A grid of grey images ``(N, 1, H, W)`` with a title above each."""
    rows = max(math.ceil(len(images) / columns), 1)
    fig = Figure(figsize=(columns * 1.6, rows * 1.9), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i, 0].float().cpu(), cmap="gray")
            ax.set_title(titles[i], fontsize=7, color=colors[i] if colors else "black")
    return fig


def curves_figure(scalars: dict[str, list[float]]) -> Figure:
    """Loss and accuracy per epoch for train and validation, from a run's own logs."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, (label, tags) in zip(fig.subplots(1, 2), CURVES, strict=True):
        for tag in tags:
            values = scalars.get(tag, [])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=tag)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


class EvaluationReport(Callback):
    """Confusion matrices and per-class metrics every validation epoch; a full report at test.

    At every validation epoch (and at test): the confusion matrix (counts and row-normalised) as a
    TensorBoard figure, and per-class precision, recall and F1 as scalars
    (``val/f1/T-shirt_top``...). At test, also: one-vs-rest ROC curves with per-class AUC, a grid of
    misclassified test images, a grid of sample predictions, and a report folder in the run
    directory (``report/``, or ``report_1/``... if one exists) with ``metrics.json``,
    ``predictions.csv`` and the PNG figures, training curves included.

    Args:
        confusion_matrix: Log the confusion matrix figure.
        per_class: Log per-class precision, recall and F1 scalars.
        test_report: At test, draw the ROC and image grids and write the report folder.
        class_names: Names of the classes, in label order.
        num_images: Images in each grid.
        throughput_batch_size: Batch size of the inference throughput measurement.
    """

    def __init__(
        self,
        confusion_matrix: bool = True,
        per_class: bool = True,
        test_report: bool = True,
        class_names: Sequence[str] = CLASS_NAMES,
        num_images: int = 32,
        throughput_batch_size: int = 1024,
    ) -> None:
        self.confusion_matrix = confusion_matrix
        self.per_class = per_class
        self.test_report = test_report
        self.class_names = tuple(class_names)
        self.num_images = num_images
        self.throughput_batch_size = throughput_batch_size
        n = len(self.class_names)
        self.metrics = {
            stage: MetricCollection(
                {
                    "confmat": MulticlassConfusionMatrix(n),
                    "precision": MulticlassPrecision(n, average=None),
                    "recall": MulticlassRecall(n, average=None),
                    "f1": MulticlassF1Score(n, average=None),
                }
            )
            for stage in ("val", "test")
        }
        self.test_extra = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "macro_f1": MulticlassF1Score(n, average="macro"),
                "auroc": MulticlassAUROC(n, average=None),
                "roc": MulticlassROC(n),
                "ece": MulticlassCalibrationError(n, n_bins=15),
            }
        )
        self._test_outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        self.report_dir: Path | None = None

    @property
    def _active(self) -> bool:
        return self.confusion_matrix or self.per_class

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Keep the metric states on the module's device."""
        for metrics in (*self.metrics.values(), self.test_extra):
            metrics.to(pl_module.device)

    # --- validation ---------------------------------------------------------------------------
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Accumulate the batch's confusion counts."""
        if self._active and not trainer.sanity_checking and isinstance(outputs, dict):
            self.metrics["val"].update(outputs["logits"], outputs["targets"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the epoch's confusion matrix and per-class metrics."""
        if self._active and not trainer.sanity_checking:
            self._log_epoch(trainer, pl_module, "val")

    # --- test ---------------------------------------------------------------------------------
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Accumulate metrics, and keep probabilities and images for the report."""
        if not isinstance(outputs, dict):
            return
        logits, targets = outputs["logits"], outputs["targets"]
        self.metrics["test"].update(logits, targets)
        if self.test_report:
            probs = logits.float().softmax(dim=1)
            self.test_extra.update(probs, targets)
            self._test_outputs.append((probs.cpu(), targets.cpu(), batch[0].detach().cpu()))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the test confusion matrix and per-class metrics, then write the report."""
        results = self._log_epoch(trainer, pl_module, "test")
        if self.test_report and self._test_outputs and trainer.is_global_zero:
            self._write_report(trainer, pl_module, results)
        self._test_outputs.clear()
        self.test_extra.reset()

    # --- shared -------------------------------------------------------------------------------
    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Tensor]:
        results = self.metrics[stage].compute()
        self.metrics[stage].reset()
        if self.per_class:
            for metric in ("precision", "recall", "f1"):
                for name, value in zip(self.class_names, results[metric], strict=True):
                    pl_module.log(f"{stage}/{metric}/{safe_tag(name)}", value, on_epoch=True)
        if self.confusion_matrix and trainer.is_global_zero:
            fig = confusion_figure(results["confmat"].cpu(), self.class_names, f"{stage} epoch {trainer.current_epoch}")
            self._add_figure(trainer, f"{stage}/confusion_matrix", fig)
        return results

    @staticmethod
    def _add_figure(trainer: Trainer, tag: str, fig: Figure) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)

    def _write_report(self, trainer: Trainer, pl_module: LightningModule, results: dict[str, Tensor]) -> None:
        probs = torch.cat([p for p, _, _ in self._test_outputs])
        targets = torch.cat([t for _, t, _ in self._test_outputs])
        images = torch.cat([x for _, _, x in self._test_outputs])
        preds = probs.argmax(dim=1)
        extra = self.test_extra.compute()
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.report_dir = out = unused_path(run_dir / "report")
        out.mkdir(parents=True)
        names = self.class_names

        figures = {"confusion_matrix": confusion_figure(results["confmat"].cpu(), names, "test")}
        roc_fig = Figure(figsize=(8, 7), layout="constrained")
        ax = roc_fig.subplots()
        self.test_extra["roc"].plot(
            ax=ax, labels=[f"{n} (AUC {a:.4f})" for n, a in zip(names, extra["auroc"], strict=True)]
        )
        ax.set_title("Test ROC, one class vs rest")
        figures["roc"] = roc_fig
        wrong = (preds != targets).nonzero().squeeze(1)[: self.num_images]
        figures["misclassified"] = image_grid(
            images[wrong], [f"true {names[targets[i]]}\npred {names[preds[i]]}" for i in wrong.tolist()]
        )
        sample = torch.arange(min(self.num_images, len(targets)))
        figures["samples"] = image_grid(
            images[sample],
            [f"{names[preds[i]]} {probs[i].max():.2f}" for i in sample.tolist()],
            ["green" if preds[i] == targets[i] else "red" for i in sample.tolist()],
        )
        scalars = read_scalars(run_dir)
        if scalars.get("val/acc"):
            figures["training_curves"] = curves_figure(scalars)
        for name, fig in figures.items():
            fig.savefig(out / f"{name}.png", dpi=110)
            if name != "confusion_matrix":  # already logged by _log_epoch
                self._add_figure(trainer, f"test/{name}", fig)

        with (out / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "pred", *(f"p_{n}" for n in names)])
            for i, (label, pred, p) in enumerate(zip(targets.tolist(), preds.tolist(), probs.tolist(), strict=True)):
                writer.writerow([i, label, pred, *(f"{v:.6f}" for v in p)])

        ckpt = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        epoch_times = scalars.get("time/train_epoch_s", [])
        metrics = {
            "model": type(getattr(pl_module, "model", pl_module)).__name__,
            "checkpoint": str(ckpt) if ckpt else None,
            "num_test_images": len(targets),
            "accuracy": float(extra["accuracy"]),
            "macro_f1": float(extra["macro_f1"]),
            "loss": float(trainer.callback_metrics.get("test/loss", float("nan"))),
            "expected_calibration_error": float(extra["ece"]),
            "per_class": {
                n: {
                    "precision": float(results["precision"][i]),
                    "recall": float(results["recall"][i]),
                    "f1": float(results["f1"][i]),
                    "auc": float(extra["auroc"][i]),
                }
                for i, n in enumerate(names)
            },
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "checkpoint_mb": ckpt.stat().st_size / 1e6 if ckpt and ckpt.is_file() else None,
            "epochs_trained": len(scalars.get("val/acc", [])),
            "train_seconds_per_epoch": statistics.mean(epoch_times) if epoch_times else None,
            **self._speed(trainer, pl_module, images[:1]),
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    def _speed(self, trainer: Trainer, pl_module: LightningModule, example: Tensor) -> dict[str, float]:
        """Inference images/s at a large batch and milliseconds per single image, at the trainer's precision."""
        device = pl_module.device
        big = example.to(device).expand(self.throughput_batch_size, -1, -1, -1).contiguous()
        one = example.to(device)
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(), trainer.precision_plugin.forward_context():
            pl_module(big)  # warm-up
            _sync(device)
            start, reps = time.perf_counter(), 3
            for _ in range(reps):
                pl_module(big)
            _sync(device)
            throughput = reps * self.throughput_batch_size / (time.perf_counter() - start)
            latencies = []
            for _ in range(30):
                start = time.perf_counter()
                pl_module(one)
                _sync(device)
                latencies.append(time.perf_counter() - start)
        pl_module.train(was_training)
        return {
            "inference_images_per_s": throughput,
            "inference_batch_size": self.throughput_batch_size,
            "latency_ms_batch1": 1000 * statistics.median(latencies),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
