"""Per-epoch evaluation in TensorBoard, and the figures the package draws.

:class:`EpochMetrics` logs the confusion matrix and per-class precision, recall and F1 of every
validation epoch and of the test; the test report itself is :mod:`fmnist_lightning.report`.
Figures are matplotlib ``Figure`` objects (no pyplot state), drawn with torchmetrics' plotting.
"""

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fmnist_lightning.data import CLASS_NAMES

CURVES = (("loss", ("train/loss", "val/loss")), ("accuracy", ("train/acc", "val/acc")))


def safe_tag(name: str) -> str:
    """A class name usable in a TensorBoard tag: ``"T-shirt/top"`` -> ``"T-shirt_top"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def per_class_tag(stage: str, metric: str, class_name: str) -> str:
    """The TensorBoard tag of a class's metric: ``val_per_class/f1/T-shirt_top``.

    TensorBoard groups scalars by the tag's first part: per-class metrics (30 of them) get a group
    of their own, so that ``val`` holds the run-level ``val/acc``, ``val/loss`` and ``val/f1``.
    """
    return f"{stage}_per_class/{metric}/{safe_tag(class_name)}"


def _plot_confusion(ax: Any, confmat: Tensor, class_names: Sequence[str], percent: bool, title: str) -> None:
    """Counts, or each true class's row as a percentage of it (its recall on the diagonal), on ``ax``."""
    metric = MulticlassConfusionMatrix(len(class_names))
    if percent:
        normalised = confmat.float() / confmat.sum(dim=1, keepdim=True).clamp_min(1)
        metric.plot(val=(normalised * 1000).round() / 10, ax=ax, labels=list(class_names))
        ax.set_title(f"{title}: % of each true class")
    else:
        metric.plot(val=confmat, ax=ax, labels=list(class_names))
        ax.set_title(f"{title}: counts")


def confusion_figure(confmat: Tensor, class_names: Sequence[str], title: str) -> Figure:
    """Counts and row-normalised (recall per true class) confusion matrices side by side (the report's PNG)."""
    fig = Figure(figsize=(20, 9), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    _plot_confusion(ax_counts, confmat, class_names, False, title)
    _plot_confusion(ax_norm, confmat, class_names, True, title)
    return fig


def confusion_panel(confmat: Tensor, class_names: Sequence[str], title: str, percent: bool = False) -> Figure:
    """One confusion matrix (counts, or % of each true class), sized for TensorBoard's image card.

    TensorBoard scales an image down to its card (a few hundred pixels wide by default): the
    two-panel :func:`confusion_figure` (2000 pixels wide) became unreadable there, while one panel
    of 500 x 460 pixels keeps its class names and cell values legible at about 350 pixels wide.
    """
    fig = Figure(figsize=(5, 4.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    _plot_confusion(ax, confmat, class_names, percent, title)
    for text in ax.texts:  # torchmetrics' cell values are drawn for a bigger figure: "1000" would spill over
        text.set_fontsize(10)
    for label in (ax.xaxis.label, ax.yaxis.label):  # 15 points: more of the picture for the matrix
        label.set_fontsize(11)
    return fig


def image_grid(images: Tensor, titles: Sequence[str], colors: Sequence[str] | None = None, columns: int = 8) -> Figure:
    """A grid of grey images ``(N, 1, H, W)`` or ``(N, H, W)`` with a title above each.

    The images are pasted into one picture shown by a single axes, with the titles as text on it:
    one axes per image (32 of them in a report) took matplotlib several times longer to lay out
    and draw, a second or more of every ``test``.
    """
    images = images.detach().float().cpu()
    images = images[:, 0] if images.dim() == 4 else images
    n = len(images)
    rows = max(math.ceil(n / columns), 1)
    h, w = images.shape[-2:] if n else (28, 28)
    pad, title = max(h // 14, 1), h // 2  # pixels between images, and above each for its title
    cell_h, cell_w = title + h + pad, w + pad
    canvas = torch.ones(rows * cell_h, columns * cell_w)  # white between the images
    for i in range(n):
        r, c = divmod(i, columns)
        image = images[i]
        span = (image.max() - image.min()).clamp_min(1e-12)
        canvas[r * cell_h + title : r * cell_h + title + h, c * cell_w : c * cell_w + w] = (image - image.min()) / span
    scale = 1.5 / cell_w  # inches per pixel: each image about 1.4 inches wide
    fig = Figure(figsize=(canvas.shape[1] * scale, canvas.shape[0] * scale))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n):
        r, c = divmod(i, columns)
        ax.text(
            c * cell_w + w / 2,
            r * cell_h + title - 0.5,
            titles[i],
            ha="center",
            va="bottom",
            fontsize=9,
            color=colors[i] if colors else "black",
        )
    return fig


def curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss and accuracy per epoch for train and validation, from a run's ``history.csv`` rows."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    epochs = [int(row.get("epoch", i)) + 1 for i, row in enumerate(history)]
    for ax, (label, tags) in zip(fig.subplots(1, 2), CURVES, strict=True):
        for tag in tags:
            points = [
                (e, row[tag]) for e, row in zip(epochs, history, strict=True) if not math.isnan(row.get(tag, math.nan))
            ]
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", markersize=3, label=tag)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def render(fig: Figure) -> np.ndarray:
    """Draw ``fig`` once with Agg at its own dpi; its pixels ``(H, W, 4)``, uint8 RGBA.

    Drawing is what a figure costs (most of a ``test``'s report): draw once, then save the PNG
    (:func:`save_png`) and log to TensorBoard (:func:`add_image`) from the same pixels.
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def save_png(pixels: np.ndarray, path: str | Path) -> None:
    """Write rendered pixels (:func:`render`) as a PNG file."""
    Image.fromarray(pixels, mode="RGBA").save(path, format="PNG")


def add_image(trainer: Trainer, tag: str, pixels: np.ndarray) -> None:
    """Send rendered pixels (:func:`render`) to the run's TensorBoard logger (if any) at the current step."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, pixels[..., :3], global_step=trainer.global_step, dataformats="HWC")


def add_figure(trainer: Trainer, tag: str, fig: Figure) -> None:
    """Send a figure to the run's TensorBoard logger (if any) at the current step."""
    if any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
        add_image(trainer, tag, render(fig))


class EpochMetrics(Callback):
    """The confusion matrix and per-class metrics of every validation epoch and of the test.

    Logs the confusion matrix as two TensorBoard images (``val/confusion_matrix``, counts, and
    ``val/confusion_matrix_pct``, % of each true class), and per-class precision, recall and F1 as
    scalars in their own group (``val_per_class/f1/T-shirt_top``, ``test_per_class/recall/Bag``...). The
    metric states are synchronised across processes under DDP; figures are drawn on rank 0.

    Args:
        confusion_matrix: Log the confusion matrix figure.
        per_class: Log per-class precision, recall and F1 scalars.
        class_names: Names of the classes, in label order (the CLI links the data module's).
    """

    def __init__(
        self, confusion_matrix: bool = True, per_class: bool = True, class_names: Sequence[str] = CLASS_NAMES
    ) -> None:
        self.confusion_matrix = confusion_matrix
        self.per_class = per_class
        self.class_names = tuple(class_names)
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

    @property
    def _active(self) -> bool:
        return self.confusion_matrix or self.per_class

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Keep the metric states on the module's device."""
        for metrics in self.metrics.values():
            metrics.to(pl_module.device)

    def _update(self, trainer: Trainer, stage: str, outputs: Any) -> None:
        if self._active and not trainer.sanity_checking and isinstance(outputs, dict):
            self.metrics[stage].update(outputs["logits"], outputs["targets"])

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
        self._update(trainer, "val", outputs)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Accumulate the batch's confusion counts."""
        self._update(trainer, "test", outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the epoch's confusion matrix and per-class metrics."""
        if self._active and not trainer.sanity_checking:
            self._log_epoch(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the test's confusion matrix and per-class metrics."""
        if self._active:
            self._log_epoch(trainer, pl_module, "test")

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        results = self.metrics[stage].compute()  # a collective under DDP: every rank computes
        self.metrics[stage].reset()
        if self.per_class:
            for metric in ("precision", "recall", "f1"):
                for name, value in zip(self.class_names, results[metric], strict=True):
                    # Already synchronised by torchmetrics; sync_dist keeps Lightning from warning.
                    pl_module.log(per_class_tag(stage, metric, name), value, on_epoch=True, sync_dist=True)
        if self.confusion_matrix and trainer.is_global_zero:
            confmat, title = results["confmat"].cpu(), f"{stage} epoch {trainer.current_epoch}"
            for tag, percent in ((f"{stage}/confusion_matrix", False), (f"{stage}/confusion_matrix_pct", True)):
                add_figure(trainer, tag, confusion_panel(confmat, self.class_names, title, percent))
