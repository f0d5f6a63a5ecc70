"""The study engine: an Optuna study whose trials are trainings, run by Optuna's own loop.

How a plan (:mod:`.spec`) maps onto Optuna:

- **grid, ablation, k-fold**: every cell (point x fold x seed) is a trial queued with
  ``study.enqueue_trial``, with the point's parameters and user attributes ``kind``, ``cell``,
  ``point``, ``fold`` and ``seed``. Workers run ``study.optimize``, which takes queued trials first,
  beats for them and fails the trials of dead workers (:mod:`.storage`). A cell's value is its
  validation accuracy and its user attribute ``result`` its record: the one record that it is done.
  Queuing only the cells with no WAITING, RUNNING or COMPLETE trial makes a re-run train exactly the
  missing cells; if two commands queue the same cell at once, the later copy is pruned when it starts.
- **search**: every point is a trial the file's sampler draws; its cells run inside it, each kept as
  user attribute ``cell:<key>`` when done (a retried point keeps them) and reported as an
  intermediate value; its value is the mean validation accuracy. A point drawn beyond ``n_trials``
  (parallel workers racing) is pruned.
- **intermediate values**: every training reports its val/acc after each epoch (:class:`ReportToTrial`;
  optuna-dashboard draws them as curves). A search's point reports at step ``cell index x max_epochs
  + epoch``, and with a ``pruner:`` in its sweep file stops when Optuna's pruner says so (the trial
  is then PRUNED and counts towards ``n_trials``).
- **refit**: once every cell is complete, the best point (every arm of an ablation) is queued as a
  ``refit`` trial: trained on the config's own split and tested.

Each training is :func:`fmnist_lightning.training.fit` with the cell's overrides, into
``<study folder>/<point>/<fold>_<seed>/``; one cut short by a killed worker continues from its
``last.ckpt`` when its trial is retried. ``jobs`` worker processes share a study on one machine;
the same command on other machines with one ``storage`` shares it across machines.
"""

import contextlib
import gc
import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm  # Lightning's own progress-bar library

from fmnist_lightning import robustness, training
from fmnist_lightning.errors import FashionMNISTError
from fmnist_lightning.predictions import read_predictions
from fmnist_lightning.signals import Interrupted, stop_on_signals
from fmnist_lightning.studies.results import CELL_ATTR_PREFIX, ROBUSTNESS_METRICS, collect, pack_correct
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, make_pruner, make_sampler
from fmnist_lightning.studies.storage import open_storage

#: Memory set aside per worker process by :func:`default_jobs`: a whole ``fit`` process peaks near
#: 1.1 GB (docs, Performance), so twice that leaves room for the system and the other workers.
WORKER_MEMORY_BYTES = 2 * 1024**3
_LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


class CellError(FashionMNISTError):
    """One training of a study failed (its message says why); the study goes on with the others."""


class StudyIncomplete(FashionMNISTError):
    """A study ended with cells that failed; the results written cover the cells that finished."""


@dataclass
class StudyOptions:
    """How to run a plan. Plain data, sent to worker processes.

    Attributes:
        jobs: Worker processes on this machine (1: train in this process); None: :func:`default_jobs`.
        storage: None (journal file in the study folder), a journal file path or a database URL.
        heartbeat_interval: Seconds between heartbeats of a running training.
        grace_period: Seconds without a heartbeat after which a training counts as dead and is redone.
        command: The command line, for the results' header.
        progress_bar: Draw a live progress bar over the cells (instead of a line per cell).
    """

    jobs: int | None = None
    storage: str | None = None
    heartbeat_interval: int = 10
    grace_period: int = 30
    command: str = ""
    progress_bar: bool = False


def say(message: str) -> None:
    """Progress for the person at the terminal (stderr; the results table goes to stdout)."""
    print(f"[study] {message}", file=sys.stderr, flush=True)


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_bytes() -> int | None:
    """Physical memory of this machine, None where the OS does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_jobs() -> int:
    """Worker processes when ``--jobs`` is not given: one single-threaded worker per core on a CPU.

    Measured with ``benchmarks/sweep_throughput.py`` on 2 cores (``docs/results/sweep_throughput.csv``):
    two workers of one thread each trained 1.09x (LightweightCNN) and 1.10x (TinyVGG) as many images
    per second as one worker with two threads. Capped by memory (:data:`WORKER_MEMORY_BYTES` each).
    With a CUDA or MPS device, one worker (the trainings would share the device; not measured).
    """
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return 1
    return max_jobs()[0]


def max_jobs() -> tuple[int, str]:
    """The most worker processes this machine can hold, and why: one per core, :data:`WORKER_MEMORY_BYTES` each.

    More workers than cores share the cores (no faster, measured); more than memory holds swap or
    are killed by the OOM killer, mid-training.
    """
    cores, memory = cpu_count(), memory_bytes()
    by_memory = cores if memory is None else max(1, memory // WORKER_MEMORY_BYTES)
    gib = f"{memory / 1024**3:.0f} GiB of memory" if memory is not None else "memory unknown"
    return min(cores, by_memory), f"{cores} core(s), {gib}, {WORKER_MEMORY_BYTES // 1024**3} GiB a worker"


def study_name(plan: StudyPlan) -> str:
    """The study's name in its storage: ``<logger name>/<study folder>``."""
    return f"{plan.logger_name}/{plan.folder}"


def open_study(plan: StudyPlan, options: StudyOptions, worker: int = 0, create: bool = False) -> optuna.Study:
    """Open the plan's study (creating it if ``create``) with the plan's sampler."""
    storage = open_storage(options.storage, plan.study_dir, options.heartbeat_interval, options.grace_period)
    sampler = make_sampler(plan.sampler, worker) if plan.sampler else None
    pruner = make_pruner(plan.pruner)
    if not create:
        return optuna.load_study(study_name=study_name(plan), storage=storage, sampler=sampler, pruner=pruner)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name(plan),
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names(["val/acc"])  # optuna-dashboard's name for the objective
    if "sweep_file" not in study.user_attrs:
        study.set_user_attr("kind", plan.kind)
        study.set_user_attr("seeds", plan.seeds)
        study.set_user_attr("num_folds", plan.num_folds)
        study.set_user_attr("sweep_file", plan.sweep_text)
    return study


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_study(plan: StudyPlan, options: StudyOptions, refit: bool = False) -> optuna.Study:
    """Train every missing cell of the plan (then the refits, if asked), waiting for other workers.

    Returns when no cell is waiting or running anywhere, so that every command sharing the study
    ends with the whole table.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per cell comes from us instead
    study = open_study(plan, options, create=True)
    if plan.kind == "search":
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if "error" in t.user_attrs and not _superseded(study, t):  # failed points: try once more
                study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "retry_of": t.number})
    else:
        total, queued = len(plan.cells()), _enqueue(study, plan, plan.cells())
        say(f"{plan.study_dir}: {total - queued} of {total} cells already queued or done, {queued} queued now")
    refits_queued = not refit
    with CellsBar(plan, options) if options.progress_bar else contextlib.nullcontext():
        while True:
            _fail_stale(study)
            _fail_unstarted(study, options.grace_period)
            if _has_work(study, plan):
                _run_workers(plan, options)
            elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                say("waiting for the trainings other workers are running")
                time.sleep(options.heartbeat_interval)
            elif not refits_queued:
                refits_queued = True
                _enqueue(study, plan, _refit_cells(study, plan))
            else:
                return study


class CellsBar:
    """A live progress bar over a study's trainings (tqdm), for the command that waits on its workers.

    It reads the study's storage every :attr:`interval` seconds from a thread of its own, so it
    counts the cells every worker and every machine sharing the study finished: ``k/N cells`` (a
    search: points of ``n_trials``), the best val/acc so far, tqdm's rate and time left.
    """

    interval = 2.0

    def __init__(self, plan: StudyPlan, options: StudyOptions) -> None:
        self.plan, self.options = plan, options
        search = plan.kind == "search"
        total = plan.n_trials if search else len(plan.cells())
        self.bar = tqdm(total=total, unit="point" if search else "cell", desc=plan.folder, dynamic_ncols=True)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="cells-bar", daemon=True)

    def __enter__(self) -> "CellsBar":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.bar.close()

    def _poll(self) -> None:
        study = open_study(self.plan, self.options)
        while True:
            self.update(study)
            if self.stopped.wait(self.interval):
                self.update(study)
                return

    def update(self, study: optuna.Study) -> None:
        """Count the finished cells (search points) and the best val/acc in the storage."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        kind = "point" if self.plan.kind == "search" else "cell"
        done = [t for t in trials if t.user_attrs.get("kind") == kind]
        scores = [t.value for t in done if t.state == TrialState.COMPLETE and t.value is not None]
        self.bar.n = len({t.user_attrs.get(kind) for t in done})
        if scores:
            self.bar.set_postfix_str(f"best val/acc {max(scores):.4f}", refresh=False)
        self.bar.refresh()


def _fail_unstarted(study: optuna.Study, grace_period: float) -> None:
    """Fail and queue again a trial taken over a grace period ago whose objective never began.

    Its worker died between ``optimize`` taking it and the objective starting (which signs it with
    ``started`` first thing): on a database it has no heartbeat row, so Optuna never sees it stale,
    and every later command would wait for it.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("started") == t.number or t.datetime_start is None:
            continue
        if (datetime.now() - t.datetime_start).total_seconds() > grace_period:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "retry_of": t.number})


def _superseded(study: optuna.Study, failed: FrozenTrial) -> bool:
    """Whether a failed trial was queued again (or its cell completed) since."""
    key = failed.user_attrs.get("cell") or failed.user_attrs.get("point")
    return any(
        t.number > failed.number and (t.user_attrs.get("cell") or t.user_attrs.get("point")) == key
        for t in study.get_trials(deepcopy=False, states=_LIVE)
    )


def _enqueue(study: optuna.Study, plan: StudyPlan, cells: Sequence[Cell]) -> int:
    """Queue the cells that have no WAITING, RUNNING or COMPLETE trial; how many were queued."""
    live = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False, states=_LIVE)}
    missing = [c for c in cells if c.key not in live]
    for cell in missing:
        attrs = {"kind": "refit" if cell.refit else "cell", "cell": cell.key, "point": cell.point.name}
        attrs |= {"fold": cell.fold, "seed": cell.seed}
        study.enqueue_trial(plan.optuna_params(cell.point), user_attrs=attrs)
    return len(missing)


def _original_points(trials: Sequence[FrozenTrial]) -> list[int]:
    """Numbers of a search's point trials that count towards ``n_trials``: not retries, not spares.

    A point the pruner stopped counts (as in Optuna's own ``n_trials``); a spare, drawn beyond
    ``n_trials`` by racing workers, is pruned before it becomes a point and does not.
    """
    return [
        t.number
        for t in trials
        if "cell" not in t.user_attrs and "retry_of" not in t.user_attrs and "failed_trial" not in t.system_attrs
        if t.state != TrialState.PRUNED or t.user_attrs.get("kind") == "point"
    ]


def _has_work(study: optuna.Study, plan: StudyPlan) -> bool:
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return plan.kind == "search" and len(_original_points(trials)) < (plan.n_trials or 0)


def _refit_cells(study: optuna.Study, plan: StudyPlan) -> list[Cell]:
    collected = collect(study, plan)
    if collected.missing:
        say(f"no refit: {len(collected.missing)} training(s) did not complete")
        return []
    points = collected.points if plan.kind == "ablation" else [p for p in [collected.best_point()] if p]
    return [Cell(p, None, plan.seeds[0], refit=True) for p in points]


# ---------------------------------------------------------------------------------------------
# Workers


def _run_workers(plan: StudyPlan, options: StudyOptions) -> None:
    """Work the queue in this process (one job) or in ``jobs`` worker processes until it is empty."""
    jobs = options.jobs or default_jobs()
    limit, why = max_jobs()
    if jobs > limit:
        say(f"--jobs {jobs} capped to {limit} ({why})")
        jobs = limit
    if plan.kind != "search":  # a worker without a queued cell would only start and stop
        waiting = open_study(plan, options).get_trials(deepcopy=False, states=(TrialState.WAITING,))
        jobs = max(1, min(jobs, len(waiting)))
    if jobs == 1:
        bar = options.progress_bar  # its own bar over cells, instead of Lightning's over batches
        optimize(open_study(plan, options), plan, quiet=bar, workers=1, lines=not bar)
        return
    threads = max(1, cpu_count() // jobs)
    context = mp.get_context("spawn")  # a fresh interpreter: no state (threads, CUDA) copied from here
    args = (plan, options, threads, jobs, os.getpid())
    procs = [context.Process(target=_worker, args=(i, *args)) for i in range(jobs)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except (KeyboardInterrupt, Interrupted):
        # Pass the stop on (a Ctrl-C reached them already; a SIGTERM to this process did not): each
        # worker queues its cell again and ends; one that does not end in time is killed, and its
        # trial is failed as stale and queued again by the next run of the study.
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        raise


def _worker(index: int, plan: StudyPlan, options: StudyOptions, threads: int, workers: int, parent: int) -> None:
    """Body of a worker process: end with the command that started it, then work the queue."""

    def watch() -> None:  # a killed command's workers would go on training cells nobody waits for
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with stop_on_signals():
            study = open_study(plan, options, worker=index)
            optimize(study, plan, quiet=True, workers=workers, lines=not options.progress_bar)
    except Interrupted as err:
        sys.exit(err.exit_status)
    except KeyboardInterrupt:
        sys.exit(130)


def optimize(study: optuna.Study, plan: StudyPlan, quiet: bool, workers: int = 1, lines: bool = True) -> None:
    """Optuna's loop on this worker: queued trials first (a search draws new points), until none is left."""

    def stop_when_done(study: optuna.Study, trial: FrozenTrial) -> None:
        if not _has_work(study, plan):
            study.stop()

    if _has_work(study, plan):
        objective = Objective(plan, quiet, workers, lines)
        study.optimize(objective, catch=(CellError,), callbacks=[stop_when_done], gc_after_trial=True)


class Objective:
    """A trial's work: a queued cell or refit, or a search point (its cells one after the other).

    Args:
        plan: The study's plan.
        quiet: No progress bars and model summaries (several workers share the terminal).
        workers: Worker processes sharing the study on this machine, for the estimate of the time left.
        lines: A line per finished cell (off under the command's progress bar over cells).
    """

    def __init__(self, plan: StudyPlan, quiet: bool, workers: int = 1, lines: bool = True) -> None:
        self.plan, self.quiet, self.workers, self.lines = plan, quiet, workers, lines
        self.started, self.trained = time.monotonic(), 0

    def __call__(self, trial: optuna.Trial) -> float:
        """Train what the trial stands for; its value is the validation accuracy."""
        trial.set_user_attr("started", trial.number)  # signed: see _fail_unstarted
        attrs, plan = trial.user_attrs, self.plan
        trials = trial.study.get_trials(deepcopy=False)
        if attrs.get("kind") is None and (plan.kind != "search" or self._surplus(trial, trials)):
            trial.set_user_attr("kind", "spare")  # drawn after the queue emptied (workers racing): nothing to do
            trial.study.stop()
            raise optuna.TrialPruned()
        if "cell" in attrs and any(
            t.user_attrs.get("cell") == attrs["cell"] and t.number < trial.number and t.state in _LIVE
            and t.number != attrs.get("retry_of") for t in trials
        ):  # fmt: skip
            raise optuna.TrialPruned()  # the same cell was queued twice (two commands at once)
        try:
            if "cell" in attrs:
                return self._cell(trial)
            return self._point(trial)
        except optuna.TrialPruned:
            raise
        except (KeyboardInterrupt, Interrupted) as stop:  # queue it again for whoever runs the study next, then stop
            trial.study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "retry_of": trial.number})
            if isinstance(stop, Interrupted):  # Optuna's loop lets a BaseException through without telling
                trial.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except (Exception, SystemExit) as err:
            error = str(err.code if isinstance(err, SystemExit) else err) or type(err).__name__
            trial.set_user_attr("error", error[:2000])
            say(f"FAILED {attrs.get('cell') or attrs.get('point') or f'trial {trial.number}'}: {error}")
            raise CellError(error) from err

    def _surplus(self, trial: optuna.Trial, trials: Sequence[FrozenTrial]) -> bool:
        """Whether a newly drawn search point is one more than ``n_trials`` (a retry never is)."""
        if trial.number not in _original_points([t for t in trials if t.number == trial.number]):
            return False
        return len(_original_points([t for t in trials if t.number < trial.number])) >= (self.plan.n_trials or 0)

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {key: _suggest(trial, key, dist) for key, dist in self.plan.distributions().items()}

    def _cell(self, trial: optuna.Trial) -> float:
        plan, attrs = self.plan, trial.user_attrs
        params = self._suggest(trial)
        if plan.kind == "search":
            point = Point(attrs["point"], plan.search_point(0, params).params)
        else:
            point = next(p for p in plan.points if p.name == attrs["point"])
        cell = Cell(point, attrs["fold"], attrs["seed"], refit=attrs["kind"] == "refit")
        record = train_cell(plan, cell, self.quiet, trial.study, [ReportToTrial(trial)], self.lines)
        trial.set_user_attr("result", record)
        if not cell.refit and self.lines:
            self._say_progress(trial.study, record["val_acc"])
        return record["val_acc"]

    def _say_progress(self, study: optuna.Study, val_acc: float) -> None:
        """``cell k of N``, the best score so far and the time left (this worker's pace times the workers)."""
        self.trained += 1
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        complete = [t for t in trials if t.user_attrs.get("kind") == "cell" and t.value is not None]
        done = len({t.user_attrs["cell"] for t in complete}) + 1  # + this one, not yet told complete
        total = len(self.plan.cells()) if self.plan.kind != "search" else None
        best = max([val_acc, *(t.value for t in complete)])
        line = f"cell {done} of {total}" if total else f"{done} cells"
        line += f" done, best val/acc so far {best:.4f}"
        if total and done < total:
            pace = (time.monotonic() - self.started) / self.trained  # seconds a cell, on this worker
            left = (total - done) * pace / self.workers
            line += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        say(line)

    def _point(self, trial: optuna.Trial) -> float:
        plan = self.plan
        params = self._suggest(trial)
        name = trial.user_attrs.get("point") or plan.search_point(trial.number, params).name
        trial.set_user_attr("kind", "point")
        trial.set_user_attr("point", name)
        point = Point(name, plan.search_point(0, params).params)
        accs = []
        for position, cell in enumerate(plan.cells([point])):
            record = trial.user_attrs.get(CELL_ATTR_PREFIX + cell.key)
            if record is None:
                reporter = ReportToTrial(trial, position, prune=plan.pruner is not None)
                record = train_cell(plan, cell, self.quiet, trial.study, [reporter], self.lines)
                if reporter.pruned_at is not None:  # epochs counted from 1, as the epoch lines count them
                    why = f"pruned by {plan.pruner['name']} after epoch {reporter.pruned_at + 1}"
                    trial.set_user_attr("pruned", f"after epoch {reporter.pruned_at + 1} of {cell.key}")
                    if self.lines:
                        say(f"{cell.key}: {why}")
                    raise optuna.TrialPruned(f"{cell.key}: {why}")
                trial.set_user_attr(CELL_ATTR_PREFIX + cell.key, record)
            accs.append(record["val_acc"])
        return statistics.fmean(accs)


class ReportToTrial(Callback):
    """Reports a training's val/acc to its Optuna trial after every validated epoch; prunes if asked.

    The step is ``position x max_epochs + epoch``: a search point's cells (folds, seeds) run one
    after the other in one trial, and each epoch of each cell is then compared with the same epoch
    of the same cell of other points. With ``prune``, when Optuna's pruner says the trial is behind,
    the training stops at the end of that epoch (its checkpoints written as usual) and
    :attr:`pruned_at` holds the epoch.
    """

    def __init__(self, trial: optuna.Trial, position: int = 0, prune: bool = False) -> None:
        self.trial, self.position, self.prune = trial, position, prune
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report this epoch's val/acc; ask the pruner."""
        value = trainer.callback_metrics.get("val/acc")
        if trainer.sanity_checking or value is None or not trainer.is_global_zero:
            return
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1_000_000
        self.trial.report(float(value), self.position * epochs + trainer.current_epoch)
        if self.prune and self.trial.should_prune():
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


def _suggest(trial: optuna.Trial, key: str, dist: optuna.distributions.BaseDistribution) -> Any:
    """``trial.suggest_*`` for a distribution (a queued trial's fixed value comes back as it was queued)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


# ---------------------------------------------------------------------------------------------
# One training


def train_cell(
    plan: StudyPlan,
    cell: Cell,
    quiet: bool,
    study: optuna.Study | None = None,
    callbacks: Sequence[Callback] = (),
    lines: bool = True,
) -> dict[str, Any]:
    """Train one cell (and test it, for a refit) into its run folder; returns its record.

    ``callbacks`` join the run's own (:class:`ReportToTrial`: the per-epoch values optuna-dashboard
    draws, and pruning); ``lines``: say the cell's result in a line.

    A run cut short after some epochs (its worker was killed) continues from its ``last.ckpt``, in
    the same folder; one killed before its first checkpoint starts again.

    Raises:
        CellError: If the training gives no validation score.
    """
    if cell.refit and plan.num_folds is None and not plan.scoring and study is not None and not plan.test:
        reused = _test_scoring_run(plan, cell, study)
        if reused is not None:
            return reused
    overrides, run_dir = plan.cell_overrides(cell), plan.run_dir(cell)
    last = run_dir / "checkpoints" / "last.ckpt"
    overrides["ckpt_path"] = str(last) if last.is_file() else None
    if last.is_file():
        say(f"{cell.key}: continuing the interrupted run {run_dir}")
    elif run_dir.exists():  # a start cut short before its first checkpoint: nothing in it to keep
        shutil.rmtree(run_dir)
    if quiet:  # several workers share the terminal
        overrides |= {
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "epoch_summary.enabled": False,
        }
    result = training.fit(cell.point.base or plan.base, overrides, callbacks=callbacks)
    best, last_row = result.best_epoch, result.last_epoch
    if result.best_score is None or best is None or last_row is None:
        raise CellError(f"{cell.key}: no val/acc was logged, so the cell has no score (is validation disabled?)")
    record: dict[str, Any] = {
        "cell": cell.key,
        "point": cell.point.name,
        "fold": cell.fold,
        "seed": cell.seed,
        "val_acc": result.best_score,
        "val_loss": best["val/loss"],
        "best_epoch": int(best["epoch"]),
        "last_val_acc": last_row["val/acc"],
        "last_val_loss": last_row["val/loss"],
        "epochs": result.epochs,
        "train_images": result.train_images,
        "fit_seconds": round(result.seconds, 2),
        "resumed": result.resumed,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "run_dir": str(result.run_dir),
        "best_checkpoint": str(result.best_checkpoint),
    }
    epoch_seconds = [r["time/train_epoch_s"] for r in result.history if r.get("time/train_epoch_s", 0) > 0]
    record["seconds_per_epoch"] = statistics.median(epoch_seconds) if epoch_seconds else None
    config = result.config
    del result
    gc.collect()
    if cell.refit or plan.test:
        record |= _test(config, record["best_checkpoint"])
    if plan.robustness:
        record |= _robustness(config, record["best_checkpoint"])
    if lines:
        say(
            f"{cell.key}: val/acc {record['val_acc']:.4f}, val/loss {record['val_loss']:.4f}"
            + (f", test/acc {record['test_acc']:.4f}" if "test_acc" in record else "")
            + f" ({record['fit_seconds']:.0f} s, {record['worker']})"
        )
    return record


def _test_scoring_run(plan: StudyPlan, cell: Cell, study: optuna.Study) -> dict[str, Any] | None:
    """A refit on the fixed split is the scoring training of the same point and seed: test that run.

    Saves training the same thing twice; the refit's record points to the run it tested.
    """
    scoring = Cell(cell.point, None, cell.seed).key
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = [t.user_attrs["result"] for t in complete if t.user_attrs.get("cell") == scoring]
    if not done or not os.path.isfile(done[0]["best_checkpoint"]):
        return None
    earlier = done[0]
    config = training.build(plan.base, "fit", plan.cell_overrides(Cell(cell.point, None, cell.seed)), build=False)
    record = {**earlier, "cell": cell.key, "tested_run_of": scoring, **_test(config.dump(), earlier["best_checkpoint"])}
    say(f"{cell.key}: tested the run of {scoring}: test/acc {record['test_acc']:.4f}")
    return record


def _robustness(config: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The corruption benchmark, calibration and OOD detection of a checkpoint, into its run folder.

    The OOD sets are the offline ones (scikit-learn's digits where installed, uniform noise): every cell
    of a study, on every machine, then scores the same sets.
    """
    options = robustness.RobustnessOptions(ood_sets=("digits", "uniform_noise"), ood_download=False)
    overrides = {"ckpt_path": checkpoint, "trainer.enable_progress_bar": False}
    result = robustness.evaluate_robustness(config, overrides, options)
    summary = result.summary
    record = {key: summary.get(name) for key, name in ROBUSTNESS_METRICS.items()}
    return record | {"robustness_dir": str(result.report_dir), "robustness_seconds": round(result.seconds, 2)}


def _test(config: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """Test a checkpoint into its run folder: accuracy, and per-image correctness for McNemar between refits."""
    start = time.perf_counter()
    result = training.test(config, {"ckpt_path": checkpoint, "trainer.enable_progress_bar": False})
    seconds = time.perf_counter() - start
    if result.report_dir is None:
        raise CellError(f"`test` of {checkpoint} wrote no report (is test_report.enabled false?)")
    predictions = read_predictions(result.report_dir / "predictions.csv")
    return {
        "test_acc": float(result.metrics["accuracy"]),
        "test_f1": float(result.metrics["macro_f1"]),
        "test_seconds": round(seconds, 2),
        "model": result.metrics["model"],
        "parameters": result.metrics["parameters"],
        "report_dir": str(result.report_dir),
        # Kept in the storage, so machines that did not train the refit can still compare it.
        "test_correct": pack_correct(predictions.correct),
        "test_index_sha": hashlib.sha256(",".join(map(str, predictions.index)).encode()).hexdigest()[:16],
    }
