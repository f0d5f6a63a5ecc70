"""The test report: a folder a person can open, written once per ``test`` and never over an earlier one.

``report/`` (``report_1/``... for later tests of the same run) in the run folder holds
``metrics.json``, ``predictions.csv`` (:mod:`fmnist_lightning.predictions`), ``config.yaml`` (the
configuration of that test) and the figures ``confusion_matrix``, ``roc``, ``misclassified``,
``samples`` and ``training_curves`` as PNG. Under DDP every rank's predictions are gathered on rank
0, so the report covers every test image exactly once, as a one-process test would.
"""

import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassROC
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from fmnist_lightning.data import CLASS_NAMES, shard_indices
from fmnist_lightning.evaluation import add_image, confusion_figure, curves_figure, image_grid, render, save_png
from fmnist_lightning.io import unused_path
from fmnist_lightning.predictions import write_predictions
from fmnist_lightning.profiling import inference_speed, peak_memory
from fmnist_lightning.runs import read_history, trainer_run_dir


def summary_metrics(probs: Tensor, targets: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, loss, calibration and per-class metrics of predicted probabilities.

    Args:
        probs: Class probabilities ``(N, C)`` (after test-time augmentation, if any).
        targets: True classes ``(N,)``.
        num_classes: ``C``.

    Returns:
        ``accuracy``, ``macro_f1``, ``loss`` (mean cross-entropy of ``probs``, no label
        smoothing), ``expected_calibration_error`` (15 bins) and per-class tensors ``precision``,
        ``recall``, ``f1``, ``auc`` and ``confmat``.
    """
    c = num_classes
    return {
        "accuracy": float(multiclass_accuracy(probs, targets, c, average="micro")),
        "macro_f1": float(multiclass_f1_score(probs, targets, c, average="macro")),
        "loss": float(-probs.gather(1, targets[:, None]).clamp_min(1e-12).log().mean()),
        "expected_calibration_error": float(multiclass_calibration_error(probs, targets, c, n_bins=15)),
        "precision": multiclass_precision(probs, targets, c, average=None),
        "recall": multiclass_recall(probs, targets, c, average=None),
        "f1": multiclass_f1_score(probs, targets, c, average=None),
        "auc": multiclass_auroc(probs, targets, c, average=None),
        "confmat": multiclass_confusion_matrix(probs, targets, c),
    }


def _gather(trainer: Trainer, probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Every rank's predictions on rank 0, with their test-set indices; None on the other ranks."""
    world, rank = trainer.world_size, trainer.global_rank
    if world == 1 or not dist.is_available() or not dist.is_initialized():
        return torch.arange(len(targets)), probs, targets
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (probs, targets))  # a collective: every rank takes part
    if rank != 0:
        return None
    n = sum(len(t) for _, t in parts)
    # ShardSampler gave rank r the images r, r + W, ...; with limit_test_batches each rank stops early.
    indices = torch.cat([torch.tensor(shard_indices(10**9, r, world)[: len(t)]) for r, (_, t) in enumerate(parts)])
    order = indices.argsort()
    all_probs = torch.cat([p for p, _ in parts])[order]
    all_targets = torch.cat([t for _, t in parts])[order]
    assert len(all_targets) == n
    return indices[order], all_probs, all_targets


class TestReport(Callback):
    """Write the test report folder (see the module docstring) and its figures to TensorBoard.

    Args:
        enabled: Write the report at all.
        class_names: Names of the classes, in label order (the CLI links the data module's).
        num_images: Images in each grid (misclassified, samples).
        throughput_batch_size: Batch size of the inference throughput measurement.
        config: The YAML of the test's configuration, saved as the report's ``config.yaml``
            (set by the CLI).
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        enabled: bool = True,
        class_names: Sequence[str] = CLASS_NAMES,
        num_images: int = 16,
        throughput_batch_size: int = 1024,
    ) -> None:
        self.enabled = enabled
        self.class_names = tuple(class_names)
        self.num_images = num_images
        self.throughput_batch_size = throughput_batch_size
        self.config: str | None = None
        self._probs: list[Tensor] = []
        self._targets: list[Tensor] = []
        self.report_dir: Path | None = None
        self.metrics: dict[str, Any] = {}

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start with empty buffers."""
        self._probs.clear()
        self._targets.clear()
        self.report_dir, self.metrics = None, {}

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's probabilities and labels (on the CPU)."""
        if self.enabled and isinstance(outputs, dict):
            # The task returns log-probabilities when it averages over flips (TTA): softmax is right for both.
            self._probs.append(outputs["logits"].float().softmax(dim=1).cpu())
            self._targets.append(outputs["targets"].cpu())

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather on rank 0 and write the report there."""
        if not self.enabled or not self._probs:
            return
        gathered = _gather(trainer, torch.cat(self._probs), torch.cat(self._targets))
        self._probs.clear()
        self._targets.clear()
        if gathered is not None:
            self._write(trainer, pl_module, *gathered)
        trainer.strategy.barrier()

    def _write(
        self, trainer: Trainer, pl_module: LightningModule, index: Tensor, probs: Tensor, targets: Tensor
    ) -> None:
        names = self.class_names
        results = summary_metrics(probs, targets, len(names))
        preds = probs.argmax(dim=1)
        run_dir = trainer_run_dir(trainer) or Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Written in a hidden folder, renamed when complete: a failed test leaves no half report.
        tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=run_dir))
        try:
            figures = self._figures(trainer, index, probs, targets, preds, results)
            for name, fig in figures.items():
                fig.set_dpi(110)
                pixels = render(fig)  # drawn once for both the PNG and TensorBoard
                save_png(pixels, tmp / f"{name}.png")
                if name not in ("confusion_matrix", "training_curves"):  # EpochMetrics logs the matrix
                    add_image(trainer, f"test/{name}", pixels)
            write_predictions(tmp / "predictions.csv", probs, names, labels=targets, indices=index.tolist())
            if self.config is not None:
                (tmp / "config.yaml").write_text(self.config)
            history = read_history(run_dir)
            epoch_times = [
                r["time/train_epoch_s"] for r in history if not math.isnan(r.get("time/train_epoch_s", math.nan))
            ]
            ckpt = Path(trainer.ckpt_path) if trainer.ckpt_path else None
            example = None
            if _has_test_set(trainer):  # one real test image, converted as the data module feeds the model
                example = trainer.datamodule.transform(trainer.datamodule.test_set.images[:1], train=False)
            self.metrics = {
                "model": model_name(getattr(pl_module, "model", pl_module)),
                "checkpoint": str(ckpt) if ckpt else None,
                "num_test_images": len(targets),
                **{k: results[k] for k in ("accuracy", "macro_f1", "loss", "expected_calibration_error")},
                "per_class": {
                    n: {m: float(results[m][i]) for m in ("precision", "recall", "f1", "auc")}
                    for i, n in enumerate(names)
                },
                "parameters": sum(p.numel() for p in pl_module.parameters()),
                "checkpoint_mb": ckpt.stat().st_size / 1e6 if ckpt and ckpt.is_file() else None,
                "epochs_trained": len(history),
                "train_seconds_per_epoch": statistics.mean(epoch_times) if epoch_times else None,
                **(
                    inference_speed(
                        pl_module,
                        example.to(pl_module.device),
                        self.throughput_batch_size,
                        context=trainer.precision_plugin.forward_context(),
                    )
                    if example is not None
                    else {}
                ),
                **peak_memory(),
            }
            (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=1))
            self.report_dir = unused_path(run_dir / "report")
            os.rename(tmp, self.report_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _figures(
        self, trainer: Trainer, index: Tensor, probs: Tensor, targets: Tensor, preds: Tensor, results: dict[str, Any]
    ) -> dict[str, Figure]:
        names = self.class_names
        figures = {"confusion_matrix": confusion_figure(results["confmat"], names, "test")}
        roc = MulticlassROC(len(names), sync_on_compute=False)  # rank 0 alone: syncing would wait for ever
        roc.update(probs, targets)
        # Small figures with 9-point text: still legible scaled into a TensorBoard card (about 400 px).
        fig = Figure(figsize=(5, 4.6), layout="constrained")
        ax = fig.subplots()
        roc.plot(ax=ax, labels=[f"{n} (AUC {a:.3f})" for n, a in zip(names, results["auc"], strict=True)])
        ax.legend(fontsize=9, loc="lower right")
        ax.set_title("Test ROC, one class vs rest")
        figures["roc"] = fig
        if _has_test_set(trainer):
            images = trainer.datamodule.test_set.images
            wrong = (preds != targets).nonzero().squeeze(1)[: self.num_images]
            figures["misclassified"] = image_grid(
                images[index[wrong].to(images.device)].cpu(),
                [f"true {names[targets[i]]}\npred {names[preds[i]]}" for i in wrong.tolist()],
                columns=4,
            )
            sample = torch.arange(min(self.num_images, len(targets)))
            figures["samples"] = image_grid(
                images[index[sample].to(images.device)].cpu(),
                [f"{names[preds[i]]} {probs[i].max():.2f}" for i in sample.tolist()],
                ["green" if preds[i] == targets[i] else "red" for i in sample.tolist()],
                columns=4,
            )
        history = read_history(trainer_run_dir(trainer) or Path(trainer.default_root_dir))
        if any("val/acc" in row for row in history):
            figures["training_curves"] = curves_figure(history)
        return figures


def model_name(model: torch.nn.Module) -> str:
    """The network's name for reports: a ConvNet preset's name (``FashionCNN``), else its class name."""
    return getattr(model, "name", None) or type(model).__name__


def _has_test_set(trainer: Trainer) -> bool:
    return getattr(trainer.datamodule, "test_set", None) is not None
