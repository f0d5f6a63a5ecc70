"""The package's jobs as functions: fit, validate, test and predict one run configuration.

These are the one entry point of every training and evaluation: the command line
(:mod:`fmnist_lightning.cli`) is a thin face over them, and the studies
(:mod:`fmnist_lightning.studies`) call them with a parsed configuration for every cell. Each takes a
configuration (a command line, or a dict or namespace such as a run's ``config.yaml``) and
``overrides`` (dotted keys), builds the run through :class:`~fmnist_lightning.config.RunCLI`, checks
what can be checked before the run folder exists, runs the Trainer, and returns what happened.

A failed run leaves no half-made run folder: what it created is removed, unless it saved a
checkpoint to resume from.
"""

import logging
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_lightning.callbacks import PredictionCSVWriter
from fmnist_lightning.config import HELD_INFO, PROG, RunCLI, first_line
from fmnist_lightning.errors import CheckpointError, ConfigError, TrainingDiverged, WriteError
from fmnist_lightning.inference import resolve_temperature
from fmnist_lightning.report import TestReport
from fmnist_lightning.runs import (
    check_writable,
    claim_run_dir,
    read_history,
    remove_new,
    snapshot,
    trainer_run_dir,
)
from fmnist_lightning.signals import Interrupted
from fmnist_lightning.task import ClassificationTask, needs_total_steps

__all__ = ["EvaluationResult", "RunResult", "fit", "predict", "test", "validate"]

Config = Sequence[str] | Mapping[str, Any] | Namespace


@dataclass
class RunResult:
    """What ``fit`` made: the run folder, its checkpoints and scores, its history.

    Attributes:
        run_dir: The run folder (``<save_dir>/<name>/version_N``), None without a logger.
        best_checkpoint: The checkpoint with the best ``val/acc``, None if none was saved.
        best_score: Its ``val/acc``.
        last_checkpoint: ``last.ckpt``, the state after the latest epoch (None if not kept).
        epochs: Epochs trained in all (a resumed run counts its earlier epochs too).
        train_images: Training images seen in all, ``epochs`` times an epoch's.
        seconds: Wall time of this ``fit`` call (the part after the restart, for a resumed run).
        resumed: Whether it continued an earlier run from its checkpoint.
        history: ``history.csv``, one row per epoch (:func:`~fmnist_lightning.runs.read_history`).
        config: The resolved configuration, as ``config.yaml`` holds it.
        trainer: The Trainer, for a closer look (its ``callback_metrics``...).
        task: The trained task.
        datamodule: Its data module.
    """

    run_dir: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    last_checkpoint: Path | None
    epochs: int
    train_images: int
    seconds: float
    resumed: bool
    history: list[dict[str, float]]
    config: dict[str, Any]
    trainer: Trainer = field(repr=False)
    task: LightningModule = field(repr=False)
    datamodule: LightningDataModule = field(repr=False)

    @property
    def best_epoch(self) -> dict[str, float] | None:
        """The history row of the best epoch (the first with the highest ``val/acc``), None if never validated."""
        validated = [row for row in self.history if not math.isnan(row.get("val/acc", math.nan))]
        return max(validated, key=lambda row: row["val/acc"]) if validated else None

    @property
    def last_epoch(self) -> dict[str, float] | None:
        """The history row of the last validated epoch, None if never validated."""
        validated = [row for row in self.history if not math.isnan(row.get("val/acc", math.nan))]
        return validated[-1] if validated else None


@dataclass
class EvaluationResult:
    """What ``validate`` or ``test`` found.

    Attributes:
        metrics: ``test``: the report's ``metrics.json`` (accuracy, macro-F1, calibration, per class...);
            without a report, and for ``validate``, the logged metrics (``val/acc``...).
        checkpoint: The checkpoint evaluated.
        run_dir: The run folder it logged into.
        report_dir: ``test``'s report folder, None without one.
        trainer: The Trainer.
    """

    metrics: dict[str, Any]
    checkpoint: Path
    run_dir: Path | None
    report_dir: Path | None
    trainer: Trainer = field(repr=False)


class _NoAdverts(logging.Filter):
    """Lightning's advert, and its note on loading the data to count a one-cycle schedule's steps."""

    NOISE = ("litlogger", "to estimate number of stepping batches")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


def quiet_lightning() -> None:
    """Silence what is not the user's business: Lightning's advert and a deprecation inside Lightning.

    Lightning's "Received SIGTERM" line goes too: the package says in one line what a signal stopped
    and what was kept (:mod:`fmnist_lightning.signals`). Idempotent: a study that trains a hundred
    runs in one process adds the filter once.
    """
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel."""
    return "ipykernel" in sys.modules


def _mentions(config: Config, overrides: Mapping[str, Any] | None, word: str) -> bool:
    """Whether the caller set an option whose key holds ``word`` (on its command line or in its overrides)."""
    given = list(overrides or {})
    if isinstance(config, Sequence) and not isinstance(config, str):
        given += [str(a) for a in config]
    return any(word in key for key in given)


def build(config: Config, stage: str = "fit", overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> RunCLI:
    """Parse, check and build a run without running it (see :class:`~fmnist_lightning.config.RunCLI`)."""
    quiet_lightning()
    if in_notebook() and not _mentions(config, overrides, "enable_progress_bar"):
        # A notebook keeps every redraw of a progress bar in its outputs (hundreds of KB a fit); the
        # epoch lines (fmnist_lightning.progress) say the same once an epoch.
        overrides = {**(overrides or {}), "trainer.enable_progress_bar": False}
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls/convs on GPUs that have them
    return RunCLI(config, stage=stage, overrides=overrides, **kwargs)


def fit(
    config: Config,
    overrides: Mapping[str, Any] | None = None,
    prog: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train a model (or resume a run with ``ckpt_path``): checkpoints, logs and history in its run folder.

    Args:
        config: The run's configuration: a command line (``["--config", "configs/fast.yaml"]``) or a
            whole configuration (dict or namespace).
        overrides: Dotted keys merged over it (``{"trainer.max_epochs": 2}``).
        prog: The program name in parser errors.
        callbacks: Lightning callbacks added to the configured ones for this run (objects a config
            cannot hold, such as the studies' report to an Optuna trial).

    Returns:
        The run folder, best and last checkpoints, the best score and the per-epoch history.

    Raises:
        ConfigError: For values the parser or the classes refuse.
        CheckpointError: For a ``ckpt_path`` that is missing, unreadable or of another network.
        DataError: If the data cannot be found or read.
    """
    run = build(config, "fit", overrides, prog=prog)
    run.trainer.callbacks.extend(callbacks)
    try:
        _check_fit(run)
    except BaseException:
        HELD_INFO.drop()
        raise
    start = time.perf_counter()
    _run(run, lambda: run.trainer.fit(run.model, run.datamodule, ckpt_path=run.config.get("ckpt_path")))
    seconds = time.perf_counter() - start
    trainer, ckpt = run.trainer, run.trainer.checkpoint_callback
    run_dir = trainer_run_dir(trainer)
    best = getattr(ckpt, "best_model_path", "") or None
    score = getattr(ckpt, "best_model_score", None)
    last = getattr(ckpt, "last_model_path", "") or None
    per_epoch = min(trainer.num_training_batches * run.datamodule.batch_size, len(run.datamodule.train_set or ()))
    return RunResult(
        run_dir=run_dir,
        best_checkpoint=Path(best) if best else None,
        best_score=float(score) if score is not None else None,
        last_checkpoint=Path(last) if last else None,
        epochs=int(trainer.current_epoch),
        train_images=int(per_epoch * trainer.current_epoch),
        seconds=seconds,
        resumed=run.resumes_run,
        history=read_history(run_dir) if run_dir else [],
        config=run.dump(),
        trainer=trainer,
        task=run.model,
        datamodule=run.datamodule,
    )


def validate(config: Config, overrides: Mapping[str, Any] | None = None, prog: str | None = None) -> EvaluationResult:
    """Evaluate a checkpoint (``ckpt_path``: best, last or a path) on the validation split.

    Returns:
        ``val/acc``, ``val/loss``... as logged, the checkpoint and its run folder.
    """
    run = build(config, "validate", overrides, prog=prog)
    _run(run, lambda: run.trainer.validate(run.model, run.datamodule, ckpt_path=run.config.ckpt_path, verbose=False))
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if v.numel() == 1}
    return EvaluationResult(metrics, Path(run.config.ckpt_path), trainer_run_dir(run.trainer), None, run.trainer)


def test(config: Config, overrides: Mapping[str, Any] | None = None, prog: str | None = None) -> EvaluationResult:
    """Evaluate a checkpoint on the 10k test set and write its report into the checkpoint's run folder.

    Returns:
        The report's metrics (accuracy, macro-F1, calibration, per-class...) and its folder.
    """
    run = build(config, "test", overrides, prog=prog)
    _run(run, lambda: run.trainer.test(run.model, run.datamodule, ckpt_path=run.config.ckpt_path, verbose=False))
    report = next((c for c in run.trainer.callbacks if isinstance(c, TestReport)), None)
    if report is not None and report.report_dir is not None:
        metrics, report_dir = dict(report.metrics), report.report_dir
    else:
        metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if v.numel() == 1}
        metrics |= {"accuracy": metrics.get("test/acc"), "macro_f1": metrics.get("test/f1")}
        report_dir = None
    return EvaluationResult(metrics, Path(run.config.ckpt_path), trainer_run_dir(run.trainer), report_dir, run.trainer)


test.__test__ = False  # type: ignore[attr-defined]  # a job, not a pytest test, whatever its name


def predict(config: Config, overrides: Mapping[str, Any] | None = None, prog: str | None = None) -> Path | None:
    """Predict the test set, or your own images (``data.predict_dir``), into a CSV in the run folder.

    ``prediction_writer.temperature`` (a number, a ``temperature.json`` of ``robustness``, or ``auto``)
    scales the probabilities by a temperature fitted on the validation split.

    Returns:
        The predictions CSV (None if the prediction writer is switched off).
    """
    run = build(config, "predict", overrides, prog=prog)
    ckpt_path = run.config.ckpt_path
    writer = next((c for c in run.trainer.callbacks if isinstance(c, PredictionCSVWriter)), None)
    if writer is not None and writer.temperature is not None:
        writer.scale = resolve_temperature(writer.temperature, ckpt_path)
    _run(run, lambda: run.trainer.predict(run.model, run.datamodule, ckpt_path=ckpt_path, return_predictions=False))
    return writer.path if writer is not None else None


# ---------------------------------------------------------------------------------------------
# Checks before a run, and the clean-up of a failed one


def _run(run: RunCLI, job: Any) -> None:
    """Check what can be checked before the run folder exists, then run ``job``; clean up if it fails."""
    try:
        _checked_run(run, job)
    except BaseException:
        HELD_INFO.drop()  # Lightning's "Seed set"... lines, held for a run that did not start
        raise


def _checked_run(run: RunCLI, job: Any) -> None:
    if run.checkpoint is not None:
        _check_state_dict(run.model, run.checkpoint, run.config.ckpt_path)
    run_dir = trainer_run_dir(run.trainer)
    if run_dir is not None:
        check_writable(run_dir, "log folder")
    run.datamodule.prepare_data()  # finds (or stages) the data files now, not inside the run
    created = _parents_to_create(run_dir) if run_dir else []
    claimed = _claim_version(run) if run_dir is not None else None
    if claimed is not None:
        run_dir, created = claimed
    before = snapshot(run_dir) if run_dir else set()
    try:
        try:
            job()
        except SIGTERMException:  # Lightning's own stop (no handler of ours installed): a SystemExit with code 0
            raise Interrupted(signal.SIGTERM) from None
    except BaseException as err:
        if run_dir is not None and run.trainer.is_global_zero:
            _clean_up_failed_run(run_dir, created, before)
            if isinstance(err, Interrupted) and not err.kept:
                err.kept = _what_was_kept(run, run_dir)
            if isinstance(err, TrainingDiverged):
                raise TrainingDiverged(f"{err} {_what_was_kept(run, run_dir, diverged=True)}") from err
            if isinstance(err, OSError) and err.strerror:  # a full disk, a folder gone read-only...
                where = f" ({err.filename})" if err.filename else ""
                kept = _what_was_kept(run, run_dir)
                raise WriteError(f"{err.strerror}{where}. Free some space or fix the folder: {kept}") from err
        raise


def _claim_version(run: RunCLI) -> tuple[Path, list[Path]] | None:
    """Give a new run its ``version_N`` folder atomically (see :func:`~fmnist_lightning.runs.claim_run_dir`).

    The folder is made now and the logger rebuilt with its version; a logger whose version is set
    (a resumed run, ``--trainer.logger.init_args.version``) is left as it is.

    Returns:
        The run folder and the folders made for it, or None if nothing was claimed.
    """
    logger, config = run.trainer.logger, run.config.trainer.get("logger")
    if not isinstance(logger, TensorBoardLogger) or not isinstance(config, Namespace):
        return None
    init = config.get("init_args")
    if init is None or init.get("version") is not None or not run.trainer.is_global_zero:
        return None
    run_dir, created = claim_run_dir(Path(logger.root_dir))
    version = int(run_dir.name.removeprefix("version_"))  # an int, as Lightning numbers it (v_num in the bar)
    run.trainer.logger = type(logger)(**{**init.as_dict(), "version": version})
    return run_dir, created


def _what_was_kept(run: RunCLI, run_dir: Path, diverged: bool = False) -> str:
    """What a stopped job leaves, and how to go on from it (one sentence)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if run.stage != "fit":
        return "nothing was written; run the same command again."
    if not last.is_file():
        again = "run again with other values" if diverged else "run the same command again"
        return f"no epoch had completed, so nothing was kept; {again}."
    epochs = len(read_history(run_dir))
    if diverged:
        return f"The run {run_dir} keeps its checkpoints of the {epochs} epoch(s) before."
    return (
        f"the run {run_dir} keeps its last completed epoch ({epochs} trained); continue it with "
        f"`{PROG} fit --config {run_dir / 'config.yaml'} --ckpt_path {last}`."
    )


def _check_fit(run: RunCLI) -> None:
    """What fit refuses before the run starts: a Trainer that trains nothing, an optimizer that cannot be built."""
    if run.trainer.max_epochs == 0 or run.trainer.max_steps == 0:  # Lightning runs it: a run folder and no model
        raise ConfigError("--trainer.max_epochs / --trainer.max_steps 0 trains nothing; give 1 or more (-1: no limit).")
    _check_optimizer(run.model)


def _check_optimizer(task: LightningModule) -> None:
    """Build the optimizer and scheduler once, so that a bad value is refused before the run starts."""
    if not isinstance(task, ClassificationTask):
        return
    try:
        optimizer = task.optimizer_factory(task.parameters())
        if task.scheduler_factory is not None:
            steps = {"total_steps": 1} if needs_total_steps(task.scheduler_factory) else {}
            task.scheduler_factory(optimizer, **steps)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(
            f"model.optimizer / model.lr_scheduler: {first_line(err)}. Fix the value in the config or on the "
            "command line."
        ) from err


def _parents_to_create(run_dir: Path) -> list[Path]:
    """``run_dir`` and its ancestors that do not exist yet (what a run would create)."""
    missing = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _clean_up_failed_run(run_dir: Path, created: list[Path], before: set[Path]) -> None:
    """Leave no half-made run: remove what a failed command made, unless it saved a checkpoint to resume."""
    if created and run_dir in created:
        if not any(run_dir.rglob("*.ckpt")):
            for path in created:  # innermost first: the run folder, then parents made for it
                if path == run_dir:
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        return
    remove_new(run_dir, before)


def _check_state_dict(task: LightningModule, checkpoint: Mapping[str, Any], path: str) -> None:
    """Refuse a checkpoint whose weights do not fit the configured network (names or shapes)."""
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    if expected == saved:
        return
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shapes = [
        f"{k} {saved[k]} vs {expected[k]}" for k in sorted(expected.keys() & saved.keys()) if saved[k] != expected[k]
    ]
    details = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shapes differ: {', '.join(shapes[:3])}" if shapes else "",
        )
        if part
    )
    raise CheckpointError(
        f"checkpoint {path} does not fit the configured network ({details}). Use the config it was trained with "
        "(its run folder's config.yaml)."
    )
