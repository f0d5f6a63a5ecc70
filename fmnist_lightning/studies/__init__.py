"""Studies from one command: k-fold cross-validation, grid and Bayesian sweeps, multi-seed ablations.

A study is an Optuna study (:mod:`.engine`) whose trials are trainings by
:func:`fmnist_lightning.training.fit` (one run folder each), planned from a sweep file (:mod:`.spec`),
stored in a journal file or a database shared by many workers (:mod:`.storage`), and summarised in
tables with honest statistics (:mod:`.results`, :mod:`fmnist_lightning.stats`). Re-running the same
command resumes it: finished trainings are never repeated, killed ones are.

Library entry points: :func:`run_kfold` and :func:`run_sweep`; on the command line they are the
``kfold`` and ``sweep`` subcommands of ``python -m fmnist_lightning`` (:mod:`fmnist_lightning.cli`).
"""

from collections.abc import Sequence
from pathlib import Path

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.signals import Interrupted
from fmnist_lightning.studies.engine import CellError, StudyIncomplete, StudyOptions, run_study
from fmnist_lightning.studies.results import read_table, write_results
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, check_plan, plan_configs, plan_kfold, plan_sweep
from fmnist_lightning.studies.storage import journal_path
from fmnist_lightning.training import Config

__all__ = [
    "Cell",
    "CellError",
    "Point",
    "StudyIncomplete",
    "StudyOptions",
    "StudyPlan",
    "plan_configs",
    "plan_kfold",
    "plan_sweep",
    "read_table",
    "run_kfold",
    "run_plan",
    "run_sweep",
]


def run_kfold(
    config: Config, num_folds: int | None = None, seeds: int | Sequence[int] = 1, options: StudyOptions | None = None
) -> Path:
    """Train every fold of a config (and seed), each a fresh ``fit``, and tabulate the folds.

    The study folder is ``<save_dir>/<name>/kfold<K>-<hash>`` (the hash covers the config, so the
    same command resumes the same study and a changed config starts a new one), with one run
    folder per fold (``fold0_seed42``...), ``results.csv`` (one row per fold and seed),
    ``results.md`` (the same with mean ± std of validation loss and accuracy) and ``cells.csv``.

    Args:
        config: The run configuration: a command line (``["--config", "configs/lightweight.yaml"]``)
            or a whole configuration (dict or namespace).
        num_folds: K >= 2; None takes ``data.num_folds`` from the config.
        seeds: Number of training seeds counted up from the config's ``seed_everything``, or the seeds.
        options: Workers, storage and heartbeats (:class:`StudyOptions`); None: the defaults.

    Returns:
        The study folder.

    Raises:
        ConfigError: For impossible arguments, before anything is trained or written.
        StudyIncomplete: If some folds failed (the results of the others are written).
    """
    return run_plan(plan_kfold(config, num_folds, seeds), options)


def run_sweep(
    config: Config,
    sweep_file: str | Path,
    num_folds: int | None = None,
    seeds: int | Sequence[int] | None = None,
    options: StudyOptions | None = None,
    refit: bool = False,
) -> Path:
    """Run a sweep file (grid, search or ablation) over a config, scoring every point by CV or the split.

    The study folder is ``<save_dir>/<name>/<sweep file stem>-<hash>``: one folder per point, one
    run folder per fold and seed in it, ``refit/`` for refits, ``results.csv``/``results.md``
    (per point: mean ± std, best marked; ablations: differences, intervals, p-values), ``cells.csv``
    and, by default, the Optuna journal ``optuna.journal``; each run folder has its TensorBoard HParams row.
    The same command again completes what is missing (after a crash or ``kill -9``) and trains
    nothing when all is done; on other machines with the same ``storage`` it shares the work.

    Args:
        config: The base run configuration (a command line, or a dict or namespace).
        sweep_file: The sweep YAML (see :mod:`fmnist_lightning.studies.spec`).
        num_folds: Score every point by K-fold CV; None: the file's ``num_folds``, else the fixed split.
        seeds: Training seeds per point (count or list); None: the file's ``seeds``, else 1.
        options: Workers, storage and heartbeats (:class:`StudyOptions`); None: the defaults.
        refit: Then train the best point (every arm of an ablation) on the config's own split and test it.

    Returns:
        The study folder.

    Raises:
        ConfigError: For a bad sweep file or arguments, before anything is trained or written.
        StudyIncomplete: If some trainings failed (the results of the others are written).
    """
    return run_plan(plan_sweep(config, sweep_file, num_folds, seeds), options, refit)


def run_plan(plan: StudyPlan, options: StudyOptions | None = None, refit: bool = False) -> Path:
    """Run a planned study to the end, write its results and return its folder."""
    options = options or StudyOptions()
    if options.jobs is not None and options.jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {options.jobs}.")
    if options.heartbeat_interval < 1 or options.grace_period <= options.heartbeat_interval:
        raise ConfigError("heartbeat_interval must be >= 1 s and grace_period longer than it.")
    check_plan(plan)
    try:
        study = run_study(plan, options, refit)
    except Interrupted as stop:
        stop.kept = (
            f"the finished trainings are kept in {plan.study_dir} and the running ones were queued again; run the "
            "same command to continue."
        )
        raise
    journal = journal_path(options.storage, plan.study_dir)
    collected = write_results(study, plan, str(journal) if journal else _masked(options.storage or ""), options.command)
    failed = collected.missing or list(collected.errors)
    if failed:
        raise StudyIncomplete(
            f"{len(failed)} training(s) failed, e.g. {failed[0]} (see {plan.study_dir / 'results.md'}); run the "
            "same command again to retry them."
        )
    return plan.study_dir


def _masked(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url  # installed with optuna

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy knows: show it as given
        return url
