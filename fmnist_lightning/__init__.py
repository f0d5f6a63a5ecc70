"""fmnist_lightning: Fashion-MNIST classification with PyTorch Lightning, as a command line and as a library.

What is importable from here (each name also lives in the module in brackets):

- data: :class:`FashionMNISTDataModule` (seeded stratified split or k-fold of the 60k training images,
  the 10k test set, or a folder of your own images with ``predict_dir``), :data:`CLASS_NAMES`,
  :func:`load_fashion_mnist` (the four arrays as uint8 tensors), :class:`BatchAugment` [``data``, ``augment``];
- the task: :class:`ClassificationTask`, the one LightningModule, around any ``nn.Module`` [``task``];
- the jobs: :func:`fit`, :func:`validate`, :func:`test` and :func:`predict` run one configuration (a
  command line such as ``["--config", "configs/fast.yaml"]``, or a dict such as a run's ``config.yaml``)
  as the command line does, and return a :class:`RunResult` or an :class:`EvaluationResult` [``training``];
- studies: :func:`run_kfold` and :func:`run_sweep` (k-fold, grid, search and ablation studies on Optuna),
  with :class:`StudyOptions` (workers, storage) [``studies``];
- models: the :mod:`models` subpackage (every network, one family per file) and :func:`build`, a
  network by name (``"TinyVGG"``, ``"LightweightCNN"``...) [``models``];
- evaluation: :func:`summary_metrics` (accuracy, macro-F1, calibration, per-class metrics and the
  confusion matrix of predicted probabilities) [``report``]; the figures :func:`confusion_figure`,
  :func:`curves_figure` and :func:`image_grid` (matplotlib ``Figure`` objects) [``evaluation``];
  :class:`MetricsHistory`, the callback that writes a run's ``history.csv`` [``callbacks``], and
  :func:`read_history`, its reader [``runs``];
- comparison: :func:`compare_runs` (table, chart and McNemar tests of tested runs) and
  :func:`mcnemar_exact` [``compare``];
- robustness: :func:`evaluate_robustness` (a checkpoint under twelve corruptions at five severities, its
  calibration before and after temperature scaling, and its out-of-distribution detection, written into
  its run folder as the ``robustness`` subcommand does), with :class:`RobustnessOptions` (what to
  evaluate) and :class:`RobustnessResult` [``robustness``]; :func:`corrupt`, the seeded corruptions of a
  batch of images [``corruptions``]; the metrics are in ``calibration`` and ``ood``;
- the predictions CSV: :func:`write_predictions`, :func:`read_predictions` and what it returns,
  :class:`Predictions` [``predictions``];
- your own images: :func:`predict_images` (a CLI checkpoint on a folder) [``inference``], :func:`read_image`
  (any photo to a Fashion-MNIST-like uint8 ``(28, 28)``), :func:`compose_photo` (a photo-like image made
  from a dataset image), :func:`top_k`, :class:`UnreadableImageWarning` [``images``];
- export: :func:`export_checkpoint` (a CLI checkpoint), :func:`export_task` (a task trained in
  Python), :func:`load_exported` [``export``]; ONNX needs the optional extra
  ``pip install 'fmnist_lightning[export]'``, imported only when an ONNX file is written or run;
- the command line: :func:`main` (``main(["fit", "--config", "configs/fast.yaml"])`` runs what
  ``python -m fmnist_lightning fit --config configs/fast.yaml`` runs and returns its exit status 0) [``cli``];
- errors: :class:`FashionMNISTError`, the base of :class:`DataError`, :class:`ConfigError` and
  :class:`CheckpointError` [``errors``].

Train, evaluate, plot and predict without the command line (``my_photos/``: any photos of garments)::

    import torch
    from pathlib import Path
    from lightning.pytorch import Trainer
    import fmnist_lightning as fl

    dm = fl.FashionMNISTDataModule(val_split=5000)  # finds the data (data/, Debian's package) or downloads it
    task = fl.ClassificationTask(fl.build("LightweightCNN"), tta_flip=True)
    trainer = Trainer(max_epochs=5, callbacks=[fl.MetricsHistory()])  # run folder: lightning_logs/version_N
    trainer.fit(task, datamodule=dm)
    fl.curves_figure(fl.read_history(Path(trainer.log_dir))).savefig("curves.png")
    out = trainer.predict(task, datamodule=dm)  # the 10k test images, in order
    probs, labels = (torch.cat([batch[key] for batch in out]) for key in ("probs", "labels"))
    metrics = fl.summary_metrics(probs, labels, len(fl.CLASS_NAMES))  # accuracy, macro_f1, confmat...
    fl.confusion_figure(metrics["confmat"], fl.CLASS_NAMES, "test").savefig("confusion.png")
    photos = trainer.predict(task, datamodule=fl.FashionMNISTDataModule(predict_dir="my_photos"))
    for batch in photos:
        for file, top3 in zip(batch["files"], fl.top_k(batch["probs"], fl.CLASS_NAMES)):
            print(file, top3)

The notebooks in ``notebooks/`` go further: ``quickstart``, ``comparing_runs`` and ``own_images``.
"""

from fmnist_lightning import models
from fmnist_lightning.augment import BatchAugment
from fmnist_lightning.callbacks import MetricsHistory
from fmnist_lightning.cli import main
from fmnist_lightning.compare import compare_runs, mcnemar_exact
from fmnist_lightning.corruptions import corrupt
from fmnist_lightning.data import CLASS_NAMES, FashionMNISTDataModule, load_fashion_mnist
from fmnist_lightning.errors import CheckpointError, ConfigError, DataError, FashionMNISTError
from fmnist_lightning.evaluation import confusion_figure, curves_figure, image_grid

# export.py imports onnx, onnxruntime and onnxscript (the optional `export` extra) only when an ONNX
# file is written or run, so importing it here works without them (tests/test_api.py checks).
from fmnist_lightning.export import export_checkpoint, export_task, load_exported
from fmnist_lightning.images import UnreadableImageWarning, compose_photo, read_image, top_k
from fmnist_lightning.inference import predict_images
from fmnist_lightning.models import build
from fmnist_lightning.predictions import Predictions, read_predictions, write_predictions
from fmnist_lightning.report import summary_metrics
from fmnist_lightning.robustness import RobustnessOptions, RobustnessResult, evaluate_robustness
from fmnist_lightning.runs import read_history
from fmnist_lightning.studies import StudyOptions, run_kfold, run_sweep
from fmnist_lightning.task import ClassificationTask
from fmnist_lightning.training import EvaluationResult, RunResult, fit, predict, test, validate

__all__ = [
    "CLASS_NAMES",
    "BatchAugment",
    "CheckpointError",
    "ClassificationTask",
    "ConfigError",
    "DataError",
    "EvaluationResult",
    "FashionMNISTDataModule",
    "FashionMNISTError",
    "MetricsHistory",
    "Predictions",
    "RobustnessOptions",
    "RobustnessResult",
    "RunResult",
    "StudyOptions",
    "UnreadableImageWarning",
    "build",
    "compare_runs",
    "compose_photo",
    "confusion_figure",
    "corrupt",
    "curves_figure",
    "evaluate_robustness",
    "export_checkpoint",
    "export_task",
    "fit",
    "image_grid",
    "load_exported",
    "load_fashion_mnist",
    "main",
    "mcnemar_exact",
    "models",
    "predict",
    "predict_images",
    "read_history",
    "read_image",
    "read_predictions",
    "run_kfold",
    "run_sweep",
    "summary_metrics",
    "test",
    "top_k",
    "validate",
    "write_predictions",
]
__version__ = "0.1.0"
