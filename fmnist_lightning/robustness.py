"""The robustness job: a checkpoint under corruption, its calibration, and how it tells garments from the rest.

:func:`evaluate_robustness` takes a run configuration and a checkpoint as ``test`` does (``--ckpt_path
best|last|PATH``, the same run folder) and writes ``robustness/`` (``robustness_1/``... for later
ones, never over an earlier one) beside ``test``'s ``report/`` in the run folder:

- ``corruptions.csv``: accuracy and calibration of every corruption at every severity
  (:mod:`fmnist_lightning.corruptions`), and of the clean images (``clean``, severity 0); also the
  results file that another model's run takes as ``--reference`` for its mCE;
- ``calibration.csv``: accuracy, ECE, adaptive ECE, Brier and NLL of the clean and of all the
  corrupted test images together, before and after temperature scaling
  (:mod:`fmnist_lightning.calibration`); ``temperature.json``: T fitted on the validation split;
- ``ood.csv``: AUROC and FPR95 of the MSP and energy scores against each set of other images
  (:mod:`fmnist_lightning.ood`);
- ``robustness.md`` (every table), ``metrics.json`` (every number), ``config.yaml`` (the run's
  configuration and the job's options) and the figures ``corruption_heatmap``, ``corruption_examples``,
  ``reliability`` and ``ood_scores`` (PNG, also sent to the run's TensorBoard under ``robustness/``).

The mean corruption error follows Hendrycks & Dietterich (ICLR 2019): with ``E_{s,c}`` the error at
severity s of corruption c, ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}`` against a reference model's
errors (its ``corruptions.csv``), ``mCE = mean_c CE_c``; the relative mCE subtracts each model's clean
error first. The test images are touched only after the temperature is fitted on the validation
split; the folder is written under a hidden name and renamed when complete, so a failed job leaves
nothing.
"""

import csv
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor

from fmnist_lightning.augment import tta_views
from fmnist_lightning.calibration import (
    TEMPERATURE_FILE,
    TemperatureFit,
    calibration_metrics,
    fit_temperature,
    reliability_figure,
    scaled_probs,
    write_temperature,
)
from fmnist_lightning.config import HELD_INFO, RunCLI
from fmnist_lightning.corruptions import LEVELS, PARAMETERS, SEVERITIES, check_corruptions, corrupt
from fmnist_lightning.errors import CheckpointError, ConfigError
from fmnist_lightning.evaluation import render, save_png
from fmnist_lightning.io import markdown_table, unused_path
from fmnist_lightning.ood import (
    OOD_SETS,
    SCORES,
    detection_metrics,
    energy_score,
    msp_score,
    ood_sets,
    score_histograms,
)
from fmnist_lightning.report import model_name
from fmnist_lightning.runs import check_writable, claim_run_dir, run_dir_of_checkpoint

__all__ = [
    "RobustnessOptions",
    "RobustnessResult",
    "evaluate_robustness",
    "fit_validation_temperature",
    "load_run",
    "read_corruption_results",
]

Config = Sequence[str] | Mapping[str, Any] | Namespace
#: The report folder's name in the run folder (numbered for later reports).
REPORT_DIR = "robustness"
#: The columns of ``corruptions.csv`` (and of a ``--reference`` file: at least :data:`REFERENCE_COLUMNS`).
CORRUPTION_COLUMNS = (
    "model",
    "checkpoint",
    "corruption",
    "severity",
    "images",
    "seed",
    "accuracy",
    "error",
    "ece",
    "adaptive_ece",
    "brier",
    "nll",
    "ece_scaled",
    "adaptive_ece_scaled",
    "brier_scaled",
    "nll_scaled",
)
REFERENCE_COLUMNS = ("model", "corruption", "severity", "images", "seed", "accuracy")
CLEAN = "clean"


@dataclass(frozen=True)
class RobustnessOptions:
    """What the robustness job evaluates, beside the run's configuration.

    Args:
        corruptions: Corruptions to run, by name (default: all twelve of fmnist_lightning.corruptions).
        severities: Severities to run, 1 to 5 (default: all five).
        corruption_seed: Seed of the corruptions' random draws; 0 is the benchmark (the same images for every model).
        reference: A reference model's corruptions.csv (written by this job) for the mCE.
        ood_sets: Sets of other images for OOD detection: mnist, kmnist, digits, uniform_noise, folder.
        ood_dir: A folder (or file) of your own images that are not garments, the "folder" OOD set.
        ood_download: Try to download MNIST and KMNIST into the data folder when they are not there.
        download_timeout: Seconds a download may wait for the network before the set is skipped.
        num_images: Test images to use, the first N (default: all, or as --trainer.limit_test_batches).
        corruption_images: Of those, the first N that every corruption is applied to (default 2,000, about 200 a
            class: the 60 corrupted sets then cost 12 passes over the test set instead of 60, which keeps the job
            near a minute on 2 CPU cores for the zoo's small networks; None: all). mCE needs the same N as its
            reference.
        batch_size: Images per forward pass (default: the data's eval_batch_size, 256, the fastest on 2 CPU cores).
        bins: Bins of the calibration errors and reliability diagrams.
    """

    corruptions: list[str] | None = None
    severities: list[int] | None = None
    corruption_seed: int = 0
    reference: str | None = None
    ood_sets: tuple[str, ...] = OOD_SETS
    ood_dir: str | None = None
    ood_download: bool = True
    download_timeout: float = 10.0
    num_images: int | None = None
    corruption_images: int | None = 2000
    batch_size: int | None = None
    bins: int = 15


@dataclass
class RobustnessResult:
    """What the robustness job found, and where it wrote it.

    Attributes:
        report_dir: The report folder (``<run>/robustness``...).
        checkpoint: The checkpoint evaluated.
        run_dir: Its run folder.
        summary: The headline numbers: ``clean_accuracy``, ``mean_corruption_accuracy``, ``mce`` and
            ``relative_mce`` (None without a reference), ``reference_model``, ``temperature``, the clean and
            corrupted ``ece``/``nll`` before and after scaling, and ``ood_auroc_<score>_<set>``.
        corruptions: The rows of ``corruptions.csv``.
        calibration: The rows of ``calibration.csv``.
        ood: The rows of ``ood.csv``.
        notes: What was skipped, one line each (an OOD set that could not be downloaded...).
        summary_table: The summary as a markdown table (what the command prints).
        seconds: Wall time of the job.
    """

    report_dir: Path
    checkpoint: Path
    run_dir: Path
    summary: dict[str, Any]
    corruptions: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    ood: list[dict[str, Any]]
    notes: list[str]
    summary_table: str
    seconds: float


# --- the reference file ------------------------------------------------------------------------


def write_corruption_results(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``corruptions.csv`` (:data:`CORRUPTION_COLUMNS`), the layout :func:`read_corruption_results` reads."""
    _write_csv(path, [{k: row.get(k) for k in CORRUPTION_COLUMNS} for row in rows])


def read_corruption_results(path: str | Path) -> dict[str, Any]:
    """Read a ``corruptions.csv`` written by the robustness job (a ``--reference``).

    Returns:
        ``model``, ``images``, ``seed`` and ``accuracy``: (corruption, severity) -> accuracy, the clean
        images under ``("clean", 0)``.

    Raises:
        ConfigError: If the file is missing or unreadable, lacks a column of :data:`REFERENCE_COLUMNS`,
            or holds a value that is not a number in range.
    """
    path = Path(path)
    what = "a corruptions.csv written by `robustness`"
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise ConfigError(f"--reference {path} does not exist; give {what}.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"--reference {path} cannot be read ({err}); give {what}.") from err
    missing = [c for c in REFERENCE_COLUMNS if c not in header]
    if not rows or missing:
        found = f"lacks the column(s) {', '.join(missing)}" if rows else "holds no rows"
        raise ConfigError(f"--reference {path} {found}: give {what}.")
    accuracy: dict[tuple[str, int], float] = {}
    try:
        for row in rows:
            value = float(row["accuracy"])
            if not 0 <= value <= 1:
                raise ValueError(f"accuracy {value} is not in [0, 1]")
            accuracy[(row["corruption"], int(row["severity"]))] = value
        corrupted = [r for r in rows if r["corruption"] != CLEAN] or rows  # the clean row may cover more images
        images, seed = {int(r["images"]) for r in corrupted}, {int(r["seed"]) for r in rows}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--reference {path} has a bad value ({err}); give {what}.") from err
    models = {r["model"] for r in rows}
    if len(models) != 1 or len(images) != 1 or len(seed) != 1:
        raise ConfigError(f"--reference {path} mixes several models, image counts or seeds; give {what}.")
    return {"model": models.pop(), "images": images.pop(), "seed": seed.pop(), "accuracy": accuracy}


def _check_reference(reference: Mapping[str, Any], path: str, corruptions: list[str], severities: list[int]) -> None:
    """Refuse a reference that lacks a (corruption, severity) of this job."""
    absent = [f"{c} {s}" for c in corruptions for s in severities if (c, s) not in reference["accuracy"]]
    if absent:
        shown = ", ".join(absent[:4]) + (", ..." if len(absent) > 4 else "")
        raise ConfigError(
            f"--reference {path} has no results for {shown}: run the reference with the same corruptions and "
            "severities."
        )


def corruption_errors(
    accuracy: Mapping[tuple[str, int], float],
    reference: Mapping[tuple[str, int], float],
    corruptions: Sequence[str],
    severities: Sequence[int],
) -> dict[str, Any]:
    """Hendrycks & Dietterich's corruption errors against a reference (see the module docstring).

    Args:
        accuracy: (corruption, severity) -> this model's accuracy, with ``("clean", 0)`` for the relative mCE.
        reference: The same for the reference model.
        corruptions: The corruptions averaged over.
        severities: The severities summed over.

    Returns:
        ``ce`` and ``relative_ce`` (corruption -> value, NaN where the reference's denominator is 0),
        ``mce`` and ``relative_mce`` (None if any corruption's is NaN, or without clean rows for the relative one).
    """
    ce, relative = {}, {}
    clean, ref_clean = 1 - accuracy.get((CLEAN, 0), math.nan), 1 - reference.get((CLEAN, 0), math.nan)
    for c in corruptions:
        errors = [1 - accuracy[(c, s)] for s in severities]
        ref_errors = [1 - reference[(c, s)] for s in severities]
        ce[c] = sum(errors) / sum(ref_errors) if sum(ref_errors) > 0 else math.nan
        denominator = sum(e - ref_clean for e in ref_errors)
        relative[c] = sum(e - clean for e in errors) / denominator if denominator > 0 else math.nan

    def mean(values: Mapping[str, float]) -> float | None:
        vals = list(values.values())
        return sum(vals) / len(vals) if vals and all(math.isfinite(v) for v in vals) else None

    return {"ce": ce, "relative_ce": relative, "mce": mean(ce), "relative_mce": mean(relative)}


# --- running the network -----------------------------------------------------------------------


@dataclass
class _Outputs:
    """A model's outputs on a set of images: what it predicts with, and the energy score."""

    outputs: Tensor  # (N, C): logits, or the log of the flip-averaged probabilities under TTA
    energy: Tensor  # (N,): logsumexp of the raw logits (averaged over the flips under TTA)


class _Runner:
    """Runs the task on uint8 images in large batches, as ``test`` predicts (normalisation, flip TTA, precision)."""

    def __init__(self, run: RunCLI, batch_size: int | None = None) -> None:
        self.task, self.dm = run.model, run.datamodule
        self.device = run.trainer.strategy.root_device
        self.precision = run.trainer.precision_plugin
        # The data module's eval batch: 256 ran LightweightCNN's 10k images with flip TTA in 0.53 s on 2 AVX2
        # cores, 1024 in 1.3 s (the activations of a larger batch overflow the caches).
        self.batch_size = batch_size or self.dm.eval_batch_size
        self.task.to(self.device).eval()

    def context(self) -> AbstractContextManager:
        return self.precision.forward_context()  # autocast for a mixed precision (bf16 only where native on a CPU)

    def __call__(self, images: Tensor) -> _Outputs:
        outputs, energies = [], []
        flip, shift = bool(getattr(self.task, "tta_flip", False)), int(getattr(self.task, "tta_shift", 0))
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                x = self.dm.transform(chunk.to(self.device), train=False)
                views = tta_views(x, flip, shift)
                with self.context():
                    logits = [(self.task(v).float(), w) for v, w in views]
                # Under TTA as ClassificationTask.predict_proba: the views' weighted mean softmax, here its log.
                if len(views) == 1:
                    out = logits[0][0]
                else:
                    out = sum(w * v.softmax(dim=1) for v, w in logits).clamp_min(1e-12).log()
                outputs.append(out.cpu())
                energies.append(sum(w * energy_score(v) for v, w in logits).cpu())
        return _Outputs(torch.cat(outputs), torch.cat(energies))


def _limited(n: int, limit: int | float | None, batch_size: int) -> int:
    """Images that a Trainer's ``limit_*_batches`` (an int counts batches, a float is a fraction) lets through."""
    batches = math.ceil(n / batch_size)
    if isinstance(limit, float) and limit < 1:
        batches = max(1, int(batches * limit)) if limit > 0 else 0
    elif isinstance(limit, int):
        batches = min(batches, limit)
    return min(n, batches * batch_size)


def _validation_outputs(runner: _Runner, run: RunCLI) -> tuple[_Outputs, Tensor]:
    """The model's outputs on the validation split (the data module's ``val_set``; the test set is not read)."""
    dm = runner.dm
    dm.setup("validate")
    val = dm.val_set
    n = _limited(len(val), run.trainer.limit_val_batches, dm.eval_batch_size)
    return runner(val.images[:n]), val.labels[:n].cpu()


def load_run(config: Config, overrides: Mapping[str, Any] | None = None, prog: str | None = None) -> RunCLI:
    """Parse and build a run as ``test`` does, with the checkpoint's weights loaded into its task.

    Raises:
        CheckpointError: For a missing, unreadable or foreign checkpoint.
        ConfigError: For what the configuration classes refuse (``test`` needs ``ckpt_path``).
    """
    try:
        run = RunCLI(config, stage="test", overrides=overrides, prog=prog)
    finally:
        HELD_INFO.drop()  # no Trainer job runs: Lightning's "Seed set"... lines would only be noise
    if run.checkpoint is None:
        raise ConfigError("robustness needs --ckpt_path: best, last or a checkpoint written by fit.")
    try:
        run.model.load_state_dict(run.checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {run.config.ckpt_path} does not fit the configured network ({str(err).splitlines()[0]}). "
            "Use the config it was trained with (its run folder's config.yaml)."
        ) from err
    return run


def fit_validation_temperature(run: RunCLI, batch_size: int | None = None) -> TemperatureFit:
    """Temperature scaling of a run's task (:func:`load_run`), fitted on its validation split alone.

    Only the data module's ``val_set`` is read (``limit_val_batches`` applies); the test set is never loaded.
    """
    outputs, labels = _validation_outputs(_Runner(run, batch_size), run)
    return fit_temperature(outputs.outputs, labels)


# --- the job -----------------------------------------------------------------------------------


def evaluate_robustness(
    config: Config,
    overrides: Mapping[str, Any] | None = None,
    options: RobustnessOptions | None = None,
    prog: str | None = None,
) -> RobustnessResult:
    """Evaluate a checkpoint's robustness, calibration and OOD detection; write the report into its run folder.

    Args:
        config: The run's configuration, as ``test`` takes it: a command line (``["--config",
            "configs/lightweight.yaml", "--ckpt_path", "best"]``) or a whole configuration (dict or namespace).
        overrides: Dotted keys merged over it (``{"ckpt_path": "best"}``).
        options: What to evaluate (:class:`RobustnessOptions`; default: everything).
        prog: The program name in parser errors.

    Returns:
        The report folder, the headline numbers and every table (:class:`RobustnessResult`).

    Raises:
        ConfigError: For an unknown corruption or OOD set, a severity out of range, a ``--reference`` file
            of another layout or without this job's corruptions, or impossible values.
        CheckpointError: For a missing, unreadable or foreign checkpoint.
        DataError: For missing data, or an ``ood_dir`` that is missing, empty or holds no readable image.
    """
    start = time.perf_counter()
    options = options or RobustnessOptions()
    corruptions, severities = check_corruptions(options.corruptions, options.severities)
    for name, value, low in (("batch_size", options.batch_size, 1), ("bins", options.bins, 1)):
        if value is not None and value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}.")
    for name in ("num_images", "corruption_images"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(options, name)}.")
    reference = None
    if options.reference is not None:
        reference = read_corruption_results(options.reference)
        _check_reference(reference, options.reference, corruptions, severities)
    names = tuple(options.ood_sets)
    if options.ood_dir is not None and "folder" not in names:
        names += ("folder",)
    run = load_run(config, overrides, prog)
    ckpt = Path(run.config.ckpt_path)
    dm = run.datamodule
    dm.prepare_data()
    # The user's own images, and the other sets, first: a bad folder is refused before any work.
    sets, notes = ood_sets(names, dm.data_dir, options.ood_dir, options.ood_download, options.download_timeout)
    run_dir, made = _run_folder(run, ckpt)
    try:
        return _evaluate(run, ckpt, run_dir, options, corruptions, severities, reference, sets, notes, start)
    except BaseException:
        if made:  # a new run folder made for a bare checkpoint goes with the failed job, and the parents made for it
            shutil.rmtree(made[0], ignore_errors=True)
            for parent in made[1:]:
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
        raise


def _run_folder(run: RunCLI, ckpt: Path) -> tuple[Path, list[Path]]:
    """The checkpoint's run folder; for a checkpoint outside one, a new run folder (as ``test`` would log into)."""
    found = run_dir_of_checkpoint(ckpt)
    if found is not None:
        check_writable(found, "run folder")
        return found, []
    logger = run.trainer.logger
    if isinstance(logger, TensorBoardLogger):
        root = Path(logger.root_dir)
        check_writable(root, "log folder")
        return claim_run_dir(root)
    folder = Path(run.trainer.default_root_dir)
    check_writable(folder, "folder")
    return folder, []


def _evaluate(
    run: RunCLI,
    ckpt: Path,
    run_dir: Path,
    options: RobustnessOptions,
    corruptions: list[str],
    severities: list[int],
    reference: dict[str, Any] | None,
    sets: list[Any],
    notes: list[str],
    start: float,
) -> RobustnessResult:
    runner = _Runner(run, options.batch_size)
    dm, bins = runner.dm, options.bins
    model = model_name(getattr(run.model, "model", run.model))
    # 1. Temperature, from the validation split only (the test set is not loaded yet).
    val_outputs, val_labels = _validation_outputs(runner, run)
    fit = fit_temperature(val_outputs.outputs, val_labels)
    t = fit.temperature
    # 2. The clean test images and every corruption of them.
    dm.setup("test")
    n = _limited(len(dm.test_set), run.trainer.limit_test_batches, dm.eval_batch_size)
    n = min(n, options.num_images or n)
    m = min(n, options.corruption_images or n)  # the corrupted sets: the first m of the n clean images
    if reference is not None and (reference["images"], reference["seed"]) != (m, options.corruption_seed):
        raise ConfigError(
            f"--reference {options.reference} was evaluated on {reference['images']} corrupted test images with "
            f"corruption seed {reference['seed']}, this job on {m} with seed {options.corruption_seed}: errors on "
            "other images do not compare; run both the same way."
        )
    images, labels = dm.test_set.images[:n].cpu(), dm.test_set.labels[:n].cpu()
    clean = runner(images)
    rows = [_row(model, ckpt, CLEAN, 0, n, options.corruption_seed, clean.outputs, labels, t, bins)]
    corrupted_outputs, examples = [], {}
    for c in corruptions:
        for s in severities:
            bad = corrupt(images[:m], c, s, options.corruption_seed)
            examples[(c, s)] = bad[0]
            out = runner(bad).outputs
            corrupted_outputs.append(out)
            rows.append(_row(model, ckpt, c, s, m, options.corruption_seed, out, labels[:m], t, bins))
    accuracy = {(r["corruption"], r["severity"]): r["accuracy"] for r in rows}
    mean_corruption_accuracy = sum(r["accuracy"] for r in rows[1:]) / len(rows[1:])
    errors = corruption_errors(accuracy, reference["accuracy"], corruptions, severities) if reference else None
    # 3. Calibration of the clean and of all corrupted images, before and after scaling.
    pooled = torch.cat(corrupted_outputs)
    pooled_labels = labels[:m].repeat(len(corrupted_outputs))
    calibration = []
    for test_set, outputs, targets in ((CLEAN, clean.outputs, labels), ("corrupted", pooled, pooled_labels)):
        for scaling, temperature in (("none", 1.0), ("temperature", t)):
            metrics = calibration_metrics(scaled_probs(outputs, temperature), targets, bins)
            calibration.append(
                {
                    "test_set": test_set,
                    "scaling": scaling,
                    "temperature": temperature,
                    "images": len(targets),
                    **metrics,
                }
            )
    # 4. Out-of-distribution detection: the clean test images are the positives.
    in_scores = {"msp": msp_score(clean.outputs), "energy": clean.energy}
    out_scores, ood_rows = {}, []
    for ood in sets:
        outs = runner(ood.images)
        out_scores[ood.name] = {"msp": msp_score(outs.outputs), "energy": outs.energy}
        row = {"dataset": ood.name, "images": len(ood.images), "source": ood.source}
        for score in SCORES:
            for key, value in detection_metrics(in_scores[score], out_scores[ood.name][score]).items():
                row[f"{key}_{score}"] = value
        ood_rows.append(row)
    summary = {
        "model": model,
        "checkpoint": str(ckpt),
        "test_images": n,
        "corrupted_images": m,
        "clean_accuracy": rows[0]["accuracy"],
        "mean_corruption_accuracy": mean_corruption_accuracy,
        "mce": errors["mce"] if errors else None,
        "relative_mce": errors["relative_mce"] if errors else None,
        "reference_model": reference["model"] if reference else None,
        "reference": str(options.reference) if reference else None,
        "temperature": t,
        "val_images": fit.images,
        "val_nll_before": fit.nll_before,
        "val_nll_after": fit.nll_after,
        **{
            f"{r['test_set']}_{m}{'' if r['scaling'] == 'none' else '_scaled'}": r[m]
            for r in calibration
            for m in ("ece", "adaptive_ece", "brier", "nll")
        },
        **{f"ood_{k}_{r['dataset']}": r[k] for r in ood_rows for k in r if k.startswith(("auroc", "fpr95"))},
    }
    tables = _tables(summary, rows, corruptions, severities, errors, calibration, ood_rows, notes)
    figures = {
        "corruption_heatmap": _heatmap(accuracy, corruptions, severities, summary),
        "corruption_examples": _examples_figure(images[0], examples, corruptions, severities),
        "reliability": reliability_figure(
            {
                "clean test": (scaled_probs(clean.outputs), labels),
                f"clean test, T = {t:.3f}": (scaled_probs(clean.outputs, t), labels),
                "corrupted test": (scaled_probs(pooled), pooled_labels),
                f"corrupted test, T = {t:.3f}": (scaled_probs(pooled, t), pooled_labels),
            },
            bins,
        ),
    }
    if sets:
        figures["ood_scores"] = score_histograms(in_scores, out_scores)
    pixels = {}
    for name, fig in figures.items():
        fig.set_dpi(110)
        pixels[name] = render(fig)  # drawn once for the PNG and TensorBoard
    seconds = time.perf_counter() - start
    summary["seconds"] = seconds
    record = {
        "summary": summary,
        "corruptions": rows,
        "corruption_errors": errors,
        "calibration": calibration,
        "ood": ood_rows,
        "notes": notes,
        "severities": {c: SEVERITIES[c] for c in corruptions},
        "options": asdict(options),
    }
    config = {**run.dump(), "robustness": json.loads(json.dumps(asdict(options)))}  # tuples as YAML lists
    report_dir = _write_report(run_dir, ckpt, fit, model, rows, calibration, ood_rows, tables, pixels, record, config)
    _log_tensorboard(run, run_dir, pixels, summary)
    return RobustnessResult(
        report_dir, ckpt, run_dir, summary, rows, calibration, ood_rows, notes, tables["summary"], seconds
    )


def _row(
    model: str,
    ckpt: Path,
    corruption: str,
    severity: int,
    n: int,
    seed: int,
    outputs: Tensor,
    labels: Tensor,
    t: float,
    bins: int,
) -> dict[str, Any]:
    raw = calibration_metrics(scaled_probs(outputs), labels, bins)
    scaled = calibration_metrics(scaled_probs(outputs, t), labels, bins)
    return {
        "model": model,
        "checkpoint": str(ckpt),
        "corruption": corruption,
        "severity": severity,
        "images": n,
        "seed": seed,
        "accuracy": raw["accuracy"],
        "error": 1 - raw["accuracy"],
        **{k: raw[k] for k in ("ece", "adaptive_ece", "brier", "nll")},
        **{f"{k}_scaled": scaled[k] for k in ("ece", "adaptive_ece", "brier", "nll")},
    }


# --- the report --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _tables(
    summary: Mapping[str, Any],
    rows: list[dict[str, Any]],
    corruptions: list[str],
    severities: list[int],
    errors: Mapping[str, Any] | None,
    calibration: list[dict[str, Any]],
    ood_rows: list[dict[str, Any]],
    notes: list[str],
) -> dict[str, str]:
    s = summary
    reference = (
        f" (reference: {s['reference_model']}, {s['reference']})" if s["reference_model"] else " (no --reference)"
    )
    lines = [
        {"metric": "model", "value": s["model"]},
        {"metric": "test images", "value": f"{s['test_images']:,}"},
        {"metric": "corrupted images (the first of them)", "value": f"{s['corrupted_images']:,}"},
        {"metric": "clean accuracy", "value": _fmt(s["clean_accuracy"])},
        {
            "metric": f"mean corruption accuracy ({len(corruptions)} corruptions x {len(severities)} severities)",
            "value": _fmt(s["mean_corruption_accuracy"]),
        },
        {"metric": f"mCE{reference}", "value": _fmt(s["mce"], 3)},
        {"metric": "relative mCE", "value": _fmt(s["relative_mce"], 3)},
        {
            "metric": f"temperature (fitted on {s['val_images']:,} validation images)",
            "value": _fmt(s["temperature"], 3),
        },
        {
            "metric": "ECE clean, before / after scaling",
            "value": f"{_fmt(s['clean_ece'])} / {_fmt(s['clean_ece_scaled'])}",
        },
        {
            "metric": "ECE corrupted, before / after scaling",
            "value": f"{_fmt(s['corrupted_ece'])} / {_fmt(s['corrupted_ece_scaled'])}",
        },
        *(
            {
                "metric": f"OOD AUROC vs {r['dataset']}, MSP / energy",
                "value": f"{_fmt(r['auroc_msp'])} / {_fmt(r['auroc_energy'])}",
            }
            for r in ood_rows
        ),
    ]
    summary_table = markdown_table(lines, {"metric": "metric", "value": "value"}, align="lr")
    by_key = {(r["corruption"], r["severity"]): r for r in rows}
    grid = []
    for c in corruptions:
        cells = {str(sev): _fmt(by_key[(c, sev)]["accuracy"]) for sev in severities}
        mean = sum(by_key[(c, sev)]["accuracy"] for sev in severities) / len(severities)
        ce = {"ce": _fmt(errors["ce"][c], 3), "rce": _fmt(errors["relative_ce"][c], 3)} if errors else {}
        grid.append({"corruption": c, **cells, "mean": _fmt(mean), **ce})
    columns = {"corruption": "corruption", **{str(sev): f"severity {sev}" for sev in severities}, "mean": "mean"}
    if errors:
        columns |= {"ce": "CE", "rce": "relative CE"}
    corruption_table = markdown_table(grid, columns, align="l" + "r" * (len(columns) - 1))
    calibration_table = markdown_table(
        calibration,
        {
            "test_set": "test set",
            "scaling": "scaling",
            "images": "images",
            "accuracy": "accuracy",
            "ece": "ECE",
            "adaptive_ece": "AdaECE",
            "brier": "Brier",
            "nll": "NLL",
        },
        {"images": lambda v: f"{v:,}", **{k: _fmt for k in ("accuracy", "ece", "adaptive_ece", "brier", "nll")}},
        align="llrrrrrr",
    )
    ood_table = markdown_table(
        ood_rows,
        {
            "dataset": "other images",
            "images": "images",
            "auroc_msp": "AUROC MSP",
            "fpr95_msp": "FPR95 MSP",
            "auroc_energy": "AUROC energy",
            "fpr95_energy": "FPR95 energy",
        },
        {"images": lambda v: f"{v:,}", **{k: _fmt for k in ("auroc_msp", "fpr95_msp", "auroc_energy", "fpr95_energy")}},
        align="lrrrrr",
    )
    severity_table = markdown_table(
        [
            {"corruption": c, "what": PARAMETERS[c], **{str(i): f"{SEVERITIES[c][i - 1]:g}" for i in LEVELS}}
            for c in corruptions
        ],
        {"corruption": "corruption", "what": "what it does (parameter s)", **{str(i): f"s at {i}" for i in LEVELS}},
    )
    notes_text = "".join(f"- {note}\n" for note in notes)
    return {
        "summary": summary_table,
        "corruptions": corruption_table,
        "calibration": calibration_table,
        "ood": ood_table,
        "severities": severity_table,
        "notes": notes_text,
    }


def _markdown(summary: Mapping[str, Any], tables: Mapping[str, str], ood: bool) -> str:
    parts = [
        f"# Robustness of {summary['model']}\n",
        f"Checkpoint: `{summary['checkpoint']}`. Written by `python -m fmnist_lightning robustness` in "
        f"{summary['seconds']:.1f} s.\n",
        "## Summary\n",
        tables["summary"] + "\n",
        "## Accuracy under corruption\n",
        f"Each corruption of the first {summary['corrupted_images']:,} test images at each severity "
        "(`fmnist_lightning.corruptions`); CE is the "
        "corruption error relative to the reference model (Hendrycks & Dietterich, ICLR 2019).\n",
        tables["corruptions"] + "\n",
        "## Calibration\n",
        "ECE over 15 equal-width bins, AdaECE over equal-mass bins, Brier score and NLL; the temperature was fitted on "
        f"the validation split (T = {summary['temperature']:.3f}, validation NLL {summary['val_nll_before']:.4f} -> "
        f"{summary['val_nll_after']:.4f}).\n",
        tables["calibration"] + "\n",
        "## Out-of-distribution detection\n",
        "Fashion-MNIST test images are the positives; MSP is the maximum softmax probability, energy the logsumexp "
        "of the logits.\n",
        (tables["ood"] if ood else "No set of other images was available.") + "\n",
    ]
    if tables["notes"]:
        parts += ["Skipped:\n", tables["notes"]]
    parts += ["## The corruptions\n", tables["severities"] + "\n"]
    return "\n".join(parts)


def _heatmap(
    accuracy: Mapping[tuple[str, int], float], corruptions: list[str], severities: list[int], summary: Mapping[str, Any]
) -> Figure:
    """Accuracy of every corruption (rows) at every severity (columns), each cell labelled."""
    values = torch.tensor([[accuracy[(c, s)] for s in severities] for c in corruptions])
    fig = Figure(figsize=(1.1 * len(severities) + 3.2, 0.42 * len(corruptions) + 1.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(len(corruptions)):
        for j in range(len(severities)):
            v = float(values[i, j])
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(corruptions)), corruptions)
    ax.set_xlabel("severity")
    mce = f", mCE {summary['mce']:.3f} vs {summary['reference_model']}" if summary.get("mce") is not None else ""
    ax.set_title(
        f"{summary['model']}: accuracy under corruption\nclean {summary['clean_accuracy']:.4f}, "
        f"mean {summary['mean_corruption_accuracy']:.4f}{mce}",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="accuracy")
    return fig


def _examples_figure(
    clean: Tensor, examples: Mapping[tuple[str, int], Tensor], corruptions: list[str], severities: list[int]
) -> Figure:
    """One test image, clean and under every corruption (rows) at every severity (columns).

    Drawn on one fixed grey scale (0 black, 255 white): a per-image stretch (as ``image_grid`` does for
    the test report) would hide brightness and contrast, the very corruptions shown.
    """
    h, w = clean.shape[-2:]
    pad = 2
    rows, cols = len(corruptions), len(severities) + 1
    canvas = torch.ones(rows * (h + pad), cols * (w + pad))
    for i, c in enumerate(corruptions):
        for j, image in enumerate([clean, *(examples[(c, s)] for s in severities)]):
            canvas[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = image.float() / 255
    fig = Figure(figsize=(1.0 * cols + 1.6, 1.0 * rows + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (w + pad) + w / 2 for j in range(cols)], ["clean", *(f"severity {s}" for s in severities)])
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(rows)], corruptions)
    ax.tick_params(length=0, labelsize=8)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def _write_report(
    run_dir: Path,
    ckpt: Path,
    fit: TemperatureFit,
    model: str,
    rows: list[dict[str, Any]],
    calibration: list[dict[str, Any]],
    ood_rows: list[dict[str, Any]],
    tables: Mapping[str, str],
    figures: Mapping[str, np.ndarray],
    record: Mapping[str, Any],
    config: Mapping[str, Any],
) -> Path:
    """Write the report in a hidden folder, then rename it into place: complete or absent."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{REPORT_DIR}.", dir=run_dir))
    try:
        write_corruption_results(tmp / "corruptions.csv", rows)
        _write_csv(tmp / "calibration.csv", calibration)
        _write_csv(tmp / "ood.csv", ood_rows)
        write_temperature(tmp / TEMPERATURE_FILE, fit, ckpt, model=model)
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "robustness.md").write_text(_markdown(record["summary"], tables, bool(ood_rows)))
        for name, pixels in figures.items():
            save_png(pixels, tmp / f"{name}.png")
        report_dir = unused_path(run_dir / REPORT_DIR)
        os.rename(tmp, report_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report_dir


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _log_tensorboard(run: RunCLI, run_dir: Path, figures: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> None:
    """The figures and headline numbers in the run's TensorBoard, at the checkpoint's step."""
    if not isinstance(run.trainer.logger, TensorBoardLogger):
        return
    from torch.utils.tensorboard import SummaryWriter

    step = int((run.checkpoint or {}).get("global_step", 0))
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for name, pixels in figures.items():
            writer.add_image(f"robustness/{name}", pixels[..., :3], global_step=step, dataformats="HWC")
        for key, value in summary.items():
            if isinstance(value, float) and math.isfinite(value) and key != "seconds":
                writer.add_scalar(f"robustness/{key}", value, global_step=step)
    finally:
        writer.close()
