"""Studies from one command: k-fold cross-validation, grid and Bayesian sweeps, multi-seed ablations.

A study is an Optuna study (:mod:`.engine`) whose trials are trainings of the package's normal
``fit`` (one run folder each), planned from a sweep file (:mod:`.spec`), stored in a journal file
or a database shared by many workers (:mod:`.storage`), and summarised in tables with honest
statistics (:mod:`.results`, :mod:`fmnist_lightning.stats`). Re-running the same command resumes
it: finished trainings are never repeated, killed ones are.

Library entry points: :func:`run_kfold` and :func:`run_sweep`; on the command line they are the
``kfold`` and ``sweep`` subcommands of ``python -m fmnist_lightning`` (:mod:`fmnist_lightning.cli`).
"""

from collections.abc import Sequence
from pathlib import Path

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.studies.engine import CellError, Session, StudyIncomplete, run_study
from fmnist_lightning.studies.results import collect, read_table, write_results
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, plan_kfold, plan_sweep

__all__ = [
    "Cell",
    "CellError",
    "Point",
    "Session",
    "StudyIncomplete",
    "StudyPlan",
    "plan_kfold",
    "plan_sweep",
    "read_table",
    "run_kfold",
    "run_session",
    "run_sweep",
]

#: Seconds between heartbeats of a running training, and without one before it counts as dead.
HEARTBEAT_INTERVAL, GRACE_PERIOD = 20, 120


def run_kfold(
    fit_args: Sequence[str],
    num_folds: int | None = None,
    seeds: int | Sequence[int] = 1,
    jobs: int | None = None,
    storage: str | None = None,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    command: str = "",
) -> Path:
    """Train every fold of a config (and seed), each a fresh ``fit``, and tabulate the folds.

    The study folder is ``<save_dir>/<name>/kfold<K>-<hash>`` (the hash covers the config, so the
    same command resumes the same study and a changed config starts a new one), with one run
    folder per fold (``fold0_seed42``...), ``results.csv`` (one row per fold and seed),
    ``results.md`` (the same with mean ± std of validation loss and accuracy) and ``cells.csv``.

    Args:
        fit_args: The ``fit`` command line without ``fit``, e.g. ``["--config", "configs/lightweight.yaml"]``.
        num_folds: K >= 2; None takes ``data.num_folds`` from the config.
        seeds: Number of training seeds counted up from the config's ``seed_everything``, or the seeds.
        jobs: Worker processes on this machine; None: one per core on a CPU
            (:func:`~fmnist_lightning.studies.engine.default_jobs`).
        storage: Optuna storage: None (a journal file in the study folder), a journal path or a database URL.
        heartbeat_interval: Seconds between heartbeats of a running training.
        grace_period: Seconds without a heartbeat after which a training counts as dead and is redone.
        command: The command line, shown at the top of ``results.md``.

    Returns:
        The study folder.

    Raises:
        ConfigError: For impossible arguments, before anything is trained or written.
        StudyIncomplete: If some folds failed (the results of the others are written).
    """
    plan = plan_kfold(fit_args, num_folds, seeds)
    return run_session(Session(plan, storage, jobs, False, heartbeat_interval, grace_period, command=command))


def run_sweep(
    fit_args: Sequence[str],
    sweep_file: str | Path,
    num_folds: int | None = None,
    seeds: int | Sequence[int] | None = None,
    jobs: int | None = None,
    storage: str | None = None,
    refit: bool = False,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    command: str = "",
) -> Path:
    """Run a sweep file (grid, search or ablation) over a config, scoring every point by CV or the split.

    The study folder is ``<save_dir>/<name>/<sweep file stem>-<hash>``: one folder per point, one
    run folder per fold and seed in it, ``refit/`` for refits, ``results.csv``/``results.md``
    (per point: mean ± std, best marked; ablations: differences, intervals, p-values), ``cells.csv``,
    ``hparams/`` (TensorBoard HParams) and, by default, the Optuna journal ``optuna.journal``.
    The same command again completes what is missing (after a crash or ``kill -9``) and trains
    nothing when all is done; on other machines with the same ``storage`` it shares the work.

    Args:
        fit_args: The ``fit`` command line without ``fit``.
        sweep_file: The sweep YAML (see :mod:`fmnist_lightning.studies.spec`).
        num_folds: Score every point by K-fold CV; None: the file's ``num_folds``, else the fixed split.
        seeds: Training seeds per point (count or list); None: the file's ``seeds``, else 1.
        jobs: Worker processes on this machine (each with cores // jobs torch threads); None: one per
            core on a CPU (:func:`~fmnist_lightning.studies.engine.default_jobs`).
        storage: Optuna storage: None (journal in the study folder), a journal path or a database URL.
        refit: Then train the best point (every arm of an ablation) on the config's own split and test it.
        heartbeat_interval: Seconds between heartbeats of a running training.
        grace_period: Seconds without a heartbeat after which a training counts as dead and is redone.
        command: The command line, shown at the top of ``results.md``.

    Returns:
        The study folder.

    Raises:
        ConfigError: For a bad sweep file or arguments, before anything is trained or written.
        StudyIncomplete: If some trainings failed (the results of the others are written).
    """
    plan = plan_sweep(fit_args, sweep_file, num_folds, seeds)
    session = Session(plan, storage, jobs, refit, heartbeat_interval, grace_period, command=command)
    return run_session(session)


def run_session(session: Session) -> Path:
    """Run a planned study to the end, write its results and return its folder."""
    if session.jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {session.jobs}.")
    if session.heartbeat_interval < 1 or session.grace_period <= session.heartbeat_interval:
        raise ConfigError("heartbeat_interval must be >= 1 s and grace_period longer than it.")
    study = run_study(session)
    results = write_results(study, session)
    collected = collect(study, session.plan)
    failed = collected.missing or list(collected.errors)
    if failed:
        raise StudyIncomplete(
            f"{len(failed)} training(s) failed, e.g. {failed[0]} (see {results}); run the same command again "
            "to retry them."
        )
    return session.plan.study_dir
