"""Fit, then test, one config of the package in two subprocesses, each timed from process start to exit.

The commands are the README's, with the run's folder and the data folder named:

    python -m fmnist_lightning fit  --config CFG --seed_everything S --trainer.logger.init_args.name NAME ...
    python -m fmnist_lightning test --config CFG --seed_everything S --trainer.logger.init_args.name NAME ... \
        --ckpt_path best

``test --ckpt_path best`` takes the best checkpoint of the latest run of that name, i.e. the ``fit``
just made. The results are read back from the test's report (``metrics.json``, whose folder the test
prints as ``Report: DIR``) and the run's ``history.csv``. Shared by ``time_to_accuracy.py`` and
``zoo_results.py``; only the standard library is imported at the top, so a child process started
from those scripts pays nothing for it (the package is imported when a run's results are read).
"""

import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPORT_LINE = re.compile(r"^Report: (.+)$", re.MULTILINE)
LIMIT_PREFIX, EPOCHS_PREFIX = "--trainer.limit_", "--trainer.max_epochs"
#: How the overrides that cut a run short begin (:func:`limit_overrides` writes them).
SHORTENING_PREFIXES = (LIMIT_PREFIX, EPOCHS_PREFIX)


class RunFailed(RuntimeError):
    """A subprocess of a benchmark exited with an error; the message ends with its output's tail."""


@dataclass
class PackageRun:
    """One config fitted and tested: times, the test report's metrics and the per-epoch history.

    Attributes:
        config: The config file, as given.
        seed: ``--seed_everything``.
        fit_seconds: Wall time of the ``fit`` process, start to exit.
        test_seconds: Wall time of the ``test`` process, start to exit.
        run_dir: The run folder (``<log_dir>/<name>/version_N``).
        metrics: The report's ``metrics.json``.
        history: ``history.csv``'s rows, one per epoch.
    """

    config: str
    seed: int
    fit_seconds: float
    test_seconds: float
    run_dir: Path
    metrics: dict
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Fit + test wall time."""
        return self.fit_seconds + self.test_seconds

    @property
    def seconds_per_epoch(self) -> float:
        """Median ``time/train_epoch_s`` over the epochs (validation excluded); NaN if none was logged.

        The median, as in the README's zoo table: an epoch slowed by another job on the same cores
        moves it less than the mean.
        """
        times = [r["time/train_epoch_s"] for r in self.history if not math.isnan(r.get("time/train_epoch_s", math.nan))]
        return statistics.median(times) if times else math.nan


def limit_overrides(limit_batches: int | None, max_epochs: int | None) -> list[str]:
    """CLI overrides for a shortened run: ``limit_*_batches`` for every stage, and the number of epochs."""
    args = []
    if limit_batches:
        args += [f"{LIMIT_PREFIX}{s}_batches={limit_batches}" for s in ("train", "val", "test")]
    if max_epochs:
        args.append(f"{EPOCHS_PREFIX}={max_epochs}")
    return args


def timed(command: list[str], what: str, cwd: str | Path | None = None) -> tuple[float, str]:
    """Run ``command`` to its end; its wall time (start to exit) and its stdout.

    Raises:
        RunFailed: On a non-zero exit, with the tail of its output.
    """
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = (done.stdout[-1500:] + "\n" + done.stderr[-3000:]).strip()
        raise RunFailed(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
    return seconds, done.stdout


def fit_and_test(
    config: str,
    seed: int,
    name: str,
    log_dir: str | Path,
    data_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
) -> PackageRun:
    """Fit ``config`` with ``seed`` into ``<log_dir>/<name>/version_N``, then test its best checkpoint.

    Args:
        config: A config file (``configs/fast.yaml``).
        seed: ``--seed_everything`` of both stages.
        name: The logger's run name.
        log_dir: The logger's ``save_dir``.
        data_dir: ``--data.data_dir``.
        overrides: More CLI arguments for both stages (``limit_overrides``...).

    Raises:
        RunFailed: If either stage fails or the test writes no report.
    """
    common = ["--config", str(config), "--seed_everything", str(seed), f"--data.data_dir={data_dir}"]
    common += [f"--trainer.logger.init_args.save_dir={log_dir}", f"--trainer.logger.init_args.name={name}"]
    common += list(overrides)
    cli = [sys.executable, "-m", "fmnist_lightning"]
    fit_seconds, _ = timed([*cli, "fit", *common], f"fit of {config} (seed {seed})")
    test_seconds, out = timed([*cli, "test", *common, "--ckpt_path", "best"], f"test of {config} (seed {seed})")
    reports = REPORT_LINE.findall(out)
    if not reports:
        raise RunFailed(f"test of {config} (seed {seed}) printed no 'Report: DIR' line:\n{out[-2000:]}")
    report = Path(reports[-1].strip())
    metrics = json.loads((report / "metrics.json").read_text())
    from fmnist_lightning.runs import read_history  # the package's one reader of history.csv

    return PackageRun(str(config), seed, fit_seconds, test_seconds, report.parent, metrics, read_history(report.parent))
