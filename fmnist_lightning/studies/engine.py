"""The study engine: an Optuna study whose trials are trainings, run by one or many workers.

How a plan (:mod:`.spec`) maps onto Optuna:

- **grid, ablation, k-fold**: every cell (point x fold x seed) is a trial queued as WAITING, with
  the point's parameters as categorical params and ``cell`` (its key), ``point``, ``fold``,
  ``seed`` as user attributes; its value is the cell's validation accuracy. Workers claim WAITING
  trials one at a time (the storage lets exactly one claim succeed), so no cell is trained twice
  by parallel workers, unlike ``GridSampler``, which hands the same point to several (optuna issue
  2039). Queuing only the cells that have no WAITING, RUNNING or COMPLETE trial makes a re-run
  complete exactly the missing work; if two processes queue the same cell at once, the copy with
  the higher trial number is dropped (PRUNED) when claimed.
- **search**: every point is a trial sampled by the file's sampler (TPE by default) when a worker
  asks for one; its cells run inside it, each stored as user attribute ``cell:<key>`` as it
  finishes (so a retried point keeps them), and its value is the mean validation accuracy. At most
  ``n_trials`` points are ever started: a point asked beyond that (parallel workers racing) is dropped.
- **refit**: once every cell is complete, the best point (every arm of an ablation) is queued as a
  ``refit`` cell: trained on the config's own train/validation split and tested.

Each training is an in-process ``fit`` through :func:`fmnist_lightning.cli.main` (a fresh model,
data module, Trainer and callbacks every time) into a normal run folder
``<study folder>/<point>/<fold>_<seed>/``, where ``cell.json`` records its result once it is
complete; a cell whose ``cell.json`` exists is never trained again, even if the worker died
before telling the storage.

``jobs`` worker processes share the study on one machine (torch threads = cores // jobs each); the
same command on other machines with one ``storage`` shares it across machines. Killed workers
are handled by :mod:`.storage`.
"""

import contextlib
import gc
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from fmnist_lightning.errors import FashionMNISTError
from fmnist_lightning.runs import unused_path
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, describe, make_sampler, with_scoring
from fmnist_lightning.studies.storage import (
    WORKER_ATTR,
    Heartbeat,
    open_storage,
    reclaim_dead_trials,
    retry_callback,
    this_worker,
)

CELL_FILE = "cell.json"
RESULT_ATTR = "result"
CELL_ATTR_PREFIX = "cell:"


class CellError(FashionMNISTError):
    """One training of a study failed (its message says why); the study goes on with the others."""


class StudyIncomplete(FashionMNISTError):
    """A study ended with cells that failed; the results written cover the cells that finished."""


@dataclass
class Session:
    """How to run a plan: storage, workers, heartbeats. Plain data, sent to worker processes.

    Attributes:
        plan: What to train.
        storage: None (journal file in the study folder), a journal file path or a database URL.
        jobs: Worker processes on this machine (1: train in this process); None: :func:`default_jobs`.
        refit: Refit the best point (every ablation arm) on the full split and test it.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without a heartbeat after which a trial counts as dead.
        threads: Torch threads per worker process; None: cores // jobs.
        command: The command line, for the results' header.
    """

    plan: StudyPlan
    storage: str | None = None
    jobs: int | None = None
    refit: bool = False
    heartbeat_interval: int = 20
    grace_period: int = 120
    threads: int | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.jobs is None:
            self.jobs = default_jobs()

    @property
    def study_name(self) -> str:
        """The study's name in its storage: ``<logger name>/<study folder>``."""
        return f"{self.plan.logger_name}/{self.plan.folder}"


def say(message: str) -> None:
    """Progress for the person at the terminal (stderr; the results table goes to stdout)."""
    print(f"[study] {message}", file=sys.stderr, flush=True)


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: Memory set aside per worker process by :func:`default_jobs`: a whole ``fit`` process peaks near
#: 1.1 GB (README, Performance), so twice that leaves room for the system and the other workers.
WORKER_MEMORY_BYTES = 2 * 1024**3


def default_jobs() -> int:
    """Worker processes when ``--jobs`` is not given: one single-threaded worker per core on a CPU.

    Measured with ``benchmarks/sweep_throughput.py`` on 2 cores (README, Studies;
    ``docs/results/sweep_throughput.json``): two workers of one thread each trained 1.09x
    (LightweightCNN) and 1.10x (TinyVGG) as many images per second as one worker with two threads,
    as one training does not keep two cores busy through its start-up, validation and per-step
    overhead. Capped by memory (:data:`WORKER_MEMORY_BYTES` each). With a CUDA or MPS device, one
    worker (the trainings would share the device; not measured).
    """
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): cores decide
        memory = cpu_count() * WORKER_MEMORY_BYTES
    return max(1, min(cpu_count(), memory // WORKER_MEMORY_BYTES))


# ---------------------------------------------------------------------------------------------
# The coordinator


def open_study(session: Session, worker: int = 0, create: bool = False) -> optuna.Study:
    """Open the session's study (creating it if ``create``) with the plan's sampler."""
    plan = session.plan
    storage = open_storage(session.storage, plan.study_dir, session.heartbeat_interval, session.grace_period)
    sampler = make_sampler(plan.sampler, worker) if plan.kind == "search" and plan.sampler else None
    if create:
        study = optuna.create_study(
            storage=storage, study_name=session.study_name, direction="maximize", sampler=sampler, load_if_exists=True
        )
        if "plan" not in study.user_attrs:
            study.set_user_attr("plan", describe(plan))
            study.set_user_attr("sweep_file", plan.sweep_text)
        return study
    return optuna.load_study(study_name=session.study_name, storage=storage, sampler=sampler)


def run_study(session: Session) -> optuna.Study:
    """Train every missing cell of the plan (then the refits, if asked), waiting for other workers.

    Returns when no cell is waiting or running anywhere, so that every command sharing the study
    ends with the whole table.
    """
    plan = session.plan
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per cell comes from us instead
    study = open_study(session, create=True)
    reclaimed = reclaim_dead_trials(study)
    if reclaimed:
        say(f"queued again {reclaimed} trial(s) whose worker died")
    if plan.kind == "search":
        requeue_failed_points(study)
    else:
        queued = enqueue_missing(study, plan, plan.cells())
        total = len(plan.cells())
        say(f"{plan.study_dir}: {total - queued} of {total} cells already queued or done, {queued} queued now")
    refit_queued = False
    while True:
        reclaim_dead_trials(study)
        if has_work(study, plan):
            run_workers(session, study)
            continue
        if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(min(2.0, session.heartbeat_interval))  # another machine's workers are at it
            continue
        if session.refit and not refit_queued:
            refit_queued = True
            cells = refit_cells(study, plan)
            if cells and enqueue_missing(study, plan, cells):
                continue
        return study


def has_work(study: optuna.Study, plan: StudyPlan) -> bool:
    """Whether a trial is waiting, or a search has points left to start."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return plan.kind == "search" and len(_original_points(trials)) < (plan.n_trials or 0)


def enqueue_missing(study: optuna.Study, plan: StudyPlan, cells: Sequence[Cell]) -> int:
    """Queue the cells that have no WAITING, RUNNING or COMPLETE trial; returns how many were queued."""
    live = {
        t.user_attrs.get("cell")
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    }
    distributions = plan.distributions()
    queued = 0
    for cell in cells:
        if cell.key in live:
            continue
        params = plan.optuna_params(cell.point)
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=params,
                distributions={k: distributions[k] for k in params},
                user_attrs={
                    "kind": "refit" if cell.refit else "cell",
                    "cell": cell.key,
                    "point": cell.point.name,
                    "fold": cell.fold,
                    "seed": cell.seed,
                },
            )
        )
        queued += 1
    return queued


def requeue_failed_points(study: optuna.Study) -> None:
    """Give search points that failed with an error another go (once per command), keeping their finished cells.

    Grid and ablation cells need no such step: a failed cell has no live trial, so it is queued again.
    """
    trials = study.get_trials(deepcopy=False)
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    continued = {t.system_attrs.get("failed_trial", t.number) for t in trials if t.state in live}
    for t in trials:
        root = t.system_attrs.get("failed_trial", t.number)
        if (
            t.state == TrialState.FAIL
            and "error" in t.user_attrs
            and "cell" not in t.user_attrs
            and root not in continued
        ):
            retry_callback()(study, t)
            continued.add(root)


def refit_cells(study: optuna.Study, plan: StudyPlan) -> list[Cell]:
    """The refit cells once every cell is complete: the best point, or every arm of an ablation.

    None while cells are missing: a refit of a half-scored sweep could pick the wrong point.
    """
    from fmnist_lightning.studies.results import collect  # results imports this module

    collected = collect(study, plan)
    if collected.missing:
        say(f"{len(collected.missing)} cell(s) did not finish, so no refit (run the same command again to retry)")
        return []
    if plan.kind == "ablation":
        points = plan.points
    else:
        best = collected.best_point()
        points = [] if best is None else [best]
    return [Cell(p, None, plan.seeds[0], refit=True) for p in points]


def run_workers(session: Session, study: optuna.Study) -> None:
    """Work through the queue: in this process for one job, else in ``jobs`` processes started together."""
    if session.jobs <= 1:
        work(session, study, 0)
        return
    threads = session.threads or max(1, cpu_count() // session.jobs)
    context = mp.get_context("spawn")  # a clean interpreter: no forked OpenMP or Lightning state
    barrier = context.Barrier(session.jobs)
    parent = os.getpid()
    procs = [
        context.Process(target=_worker_process, args=(session, i, threads, barrier, parent), name=f"study-worker-{i}")
        for i in range(session.jobs)
    ]
    with _thread_env(threads):  # read by OpenMP when torch loads in the child
        for p in procs:
            p.start()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.5)
            if any(p.exitcode for p in procs):
                barrier.abort()  # a worker died before the start: the others must not wait for it
    except KeyboardInterrupt:
        for p in procs:  # they got the Ctrl-C too, and put their trials back in the queue
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    crashed = [p.exitcode for p in procs if p.exitcode]
    if len(crashed) == len(procs):  # e.g. the package fails to import: retrying would loop for ever
        raise StudyIncomplete(f"every worker process failed (exit codes {crashed}); see their errors above.")
    if crashed:
        say(f"{len(crashed)} worker process(es) ended abnormally (exit codes {crashed}); their cells are queued again")


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _worker_process(session: Session, index: int, threads: int, barrier: Any, parent: int) -> None:
    """Body of a worker process: load the study, start together with the others, work the queue."""
    _exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(session, worker=index)
    with contextlib.suppress(threading.BrokenBarrierError):
        # Start claiming together, so the first process up does not take the whole queue
        # while the others are still importing torch.
        barrier.wait(timeout=120)
    try:
        work(session, study, index)
    except KeyboardInterrupt:
        sys.exit(130)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this worker process soon after the sweep command that started it is gone, even by ``kill -9``.

    Otherwise orphaned workers would go on claiming and training cells that nobody waits for. The
    cell it was training stays RUNNING with this process's id, and is queued again by the next run
    (its process is gone) or by heartbeats elsewhere; checkpoints are written atomically, so dying
    mid-write loses at most the epoch under way.
    """
    if sys.platform.startswith("linux"):  # the kernel kills it the moment the parent dies
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG

    def watch() -> None:  # elsewhere (and if the parent died before prctl): poll
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# A worker


def work(session: Session, study: optuna.Study, worker: int) -> None:
    """Claim and run trials until none is left for this worker."""
    while True:
        reclaim_dead_trials(study)
        trial = claim(study, session.plan)
        if trial is None:
            return
        execute(session, study, trial)


def _original_points(trials: Sequence[FrozenTrial]) -> list[int]:
    """Numbers of a search's point trials that count towards ``n_trials`` (not retries, not dropped)."""
    return [
        t.number
        for t in trials
        if "cell" not in t.user_attrs and "failed_trial" not in t.system_attrs and t.state != TrialState.PRUNED
    ]


def claim(study: optuna.Study, plan: StudyPlan) -> optuna.Trial | None:
    """Take a WAITING trial (or, in a search with points left, a new sampled point); None if none."""
    storage = study._storage  # Optuna pops enqueued trials the same way, on the storage
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                continue  # another worker took it first
        except UpdateFinishedTrialError:
            continue
        try:
            trial = _accept(study, plan, waiting._trial_id)
        except UpdateFinishedTrialError:
            continue  # reclaimed as unsigned before this worker signed it (it stalled a whole grace period)
        if trial is not None:
            return trial
    if plan.kind == "search" and len(_original_points(study.get_trials(deepcopy=False))) < (plan.n_trials or 0):
        asked = study.ask(plan.distributions())
        return _accept(study, plan, asked._trial_id)
    return None


def _accept(study: optuna.Study, plan: StudyPlan, trial_id: int) -> optuna.Trial | None:
    """Sign a claimed trial with this worker; drop it (PRUNED) if it duplicates a lower-numbered trial."""
    storage = study._storage
    number = storage.get_trial(trial_id).number
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        # Beat before signing: a signed trial then always has a heartbeat, which any machine can
        # see go stale (an unsigned one is reclaimed by its start time, see reclaim_dead_trials).
        storage.record_heartbeat(trial_id)
    storage.set_trial_system_attr(trial_id, WORKER_ATTR, this_worker(number))
    frozen = storage.get_trial(trial_id)
    key = frozen.user_attrs.get("cell")
    trials = study.get_trials(deepcopy=False)
    if key is not None:
        duplicate = any(
            t.user_attrs.get("cell") == key
            and t.number < number
            and t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
            for t in trials
        )
    else:  # a search point: the n_trials-th started point is the last one
        originals = _original_points(trials)
        duplicate = number in originals and originals.index(number) >= (plan.n_trials or 0)
    if duplicate:
        storage.set_trial_state_values(trial_id, state=TrialState.PRUNED)
        return None
    return optuna.Trial(study, trial_id)


class _InterruptWatch:
    """Tell a Ctrl-C apart from a failed training: the CLI turns both into SystemExit."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_InterruptWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def execute(session: Session, study: optuna.Study, trial: optuna.Trial) -> None:
    """Run a claimed trial (a cell, a refit or a search point) and tell the storage how it ended."""
    storage, plan = study._storage, session.plan
    frozen = storage.get_trial(trial._trial_id)
    kind = frozen.user_attrs.get("kind", "point")
    value: float | None = None
    error: str | None = None
    with Heartbeat(storage, trial._trial_id), _InterruptWatch() as watch:
        try:
            if kind == "point":
                value = _run_point(session, study, trial, frozen)
            else:
                record = train_cell(session, _cell_of(plan, frozen))
                storage.set_trial_user_attr(trial._trial_id, RESULT_ATTR, record)
                value = record["val_acc"]
        except KeyboardInterrupt:
            watch.interrupted = True
        except (Exception, SystemExit) as err:
            if not watch.interrupted:
                error = str(err) or type(err).__name__
                with contextlib.suppress(UpdateFinishedTrialError):
                    storage.set_trial_user_attr(trial._trial_id, "error", error[:2000])
    if watch.interrupted:
        _requeue(study, trial._trial_id)
        raise KeyboardInterrupt
    try:
        if error is not None:
            say(f"FAILED {frozen.user_attrs.get('cell') or frozen.user_attrs.get('point', trial.number)}: {error}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
    except UpdateFinishedTrialError:
        # Declared dead while it ran (no heartbeat for a whole grace period). Its retry finds cell.json.
        say(f"trial {trial.number} was given up by another worker while it ran; its retry reuses the result")


def _requeue(study: optuna.Study, trial_id: int) -> None:
    """Fail an interrupted trial and queue its retry, so another worker can take it now."""
    storage = study._storage
    with contextlib.suppress(UpdateFinishedTrialError):
        if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            retry_callback()(study, storage.get_trial(trial_id))


def _point_name(frozen: FrozenTrial, plan: StudyPlan) -> str:
    name = frozen.user_attrs.get("point")
    if name:
        return name
    original = frozen.system_attrs.get("failed_trial", frozen.number)
    return plan.search_point(original, frozen.params).name


def _cell_of(plan: StudyPlan, frozen: FrozenTrial) -> Cell:
    attrs = frozen.user_attrs
    if plan.kind == "search":
        found = plan.search_point(0, frozen.params)
        point = Point(attrs["point"], found.params, found.overrides)
    else:
        point = next(p for p in plan.points if p.name == attrs["point"])
    return Cell(point, attrs["fold"], attrs["seed"], refit=attrs.get("kind") == "refit")


def _run_point(session: Session, study: optuna.Study, trial: optuna.Trial, frozen: FrozenTrial) -> float:
    """A search point: train its cells in turn (skipping those a killed earlier attempt finished)."""
    storage, plan = study._storage, session.plan
    name = _point_name(frozen, plan)
    found = plan.search_point(0, frozen.params)
    point = Point(name, found.params, found.overrides)
    storage.set_trial_user_attr(trial._trial_id, "kind", "point")
    storage.set_trial_user_attr(trial._trial_id, "point", name)
    accs = []
    for cell in plan.cells([point]):
        attr = CELL_ATTR_PREFIX + cell.key
        record = frozen.user_attrs.get(attr)
        if record is None:
            record = train_cell(session, cell)
            storage.set_trial_user_attr(trial._trial_id, attr, record)
        accs.append(record["val_acc"])
    return statistics.fmean(accs)


# ---------------------------------------------------------------------------------------------
# One training


def _runs_of(parent: Path, cell: Cell) -> list[Path]:
    """Run folders made for this cell: ``seed42``, then ``seed42_1``... for later attempts."""
    pattern = re.compile(rf"{re.escape(cell.run_name)}(_\d+)?")
    runs = [p for p in parent.glob(f"{cell.run_name}*") if p.is_dir() and pattern.fullmatch(p.name)]
    return sorted(runs, key=lambda p: int(p.name.rsplit("_", 1)[1]) if p.name != cell.run_name else 0)


def _finished_record(parent: Path, cell: Cell) -> dict[str, Any] | None:
    """The record of a run of this cell that completed earlier (its ``cell.json``), if any."""
    for run in _runs_of(parent, cell):
        try:
            record = json.loads((run / CELL_FILE).read_text())
        except (OSError, ValueError):
            continue
        if record.get("cell") == cell.key:
            return record
    return None


def _unfinished_run(parent: Path, cell: Cell) -> Path | None:
    """The latest run of this cell cut short (by a killed worker) after at least one epoch, if any."""
    runs = [r for r in _runs_of(parent, cell) if (r / "checkpoints" / "last.ckpt").is_file()]
    return runs[-1] if runs and not (runs[-1] / CELL_FILE).exists() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # complete or absent, never half-written


def _call_cli(args: list[str]) -> Any:
    from fmnist_lightning.cli import main  # imported late: workers import it after setting threads

    try:
        return main(args)
    except SystemExit as exit_:  # the CLI ends bad input with sys.exit(message)
        raise CellError(f"`{args[0]}` refused: {exit_.code}") from None


def cell_args(plan: StudyPlan, cell: Cell, run_dir: Path, quiet: bool) -> list[str]:
    """The ``fit`` overrides of a cell after the base command line: point, seed, fold, run folder."""
    base = plan.fit_args if cell.refit else with_scoring(plan.fit_args, plan.scoring)
    args = [*base, *cell.point.overrides, f"--seed_everything={cell.seed}"]
    if cell.fold is None:
        args.append("--data.num_folds=null")
    else:
        args += [f"--data.num_folds={plan.num_folds}", f"--data.fold={cell.fold}"]
    name = run_dir.parent.relative_to(Path(plan.save_dir)).as_posix()
    args += [f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.version={run_dir.name}"]
    if quiet:  # several workers share the terminal: no progress bars
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return args


def train_cell(session: Session, cell: Cell) -> dict[str, Any]:
    """Train one cell (and test it, for a refit) into its run folder; returns its record.

    A cell whose earlier run completed (``cell.json``) is not trained again: its record is returned.
    A run cut short after some epochs (its worker was killed) continues from its ``last.ckpt``,
    in the same folder (the CLI's ``fit --ckpt_path``); one killed before its first epoch ended
    starts again in a new folder (``seed42_1``).

    Raises:
        CellError: If the CLI refuses the configuration or the training gives no validation score.
    """
    plan = session.plan
    parent = plan.study_dir / "refit" / cell.point.name if cell.refit else plan.study_dir / cell.point.name
    earlier = _finished_record(parent, cell)
    if earlier is not None:
        say(f"{cell.key}: finished earlier, result kept ({earlier['run_dir']})")
        return earlier
    if cell.refit and plan.num_folds is None and not plan.scoring:
        reused = _test_scoring_run(session, cell, parent)
        if reused is not None:
            return reused
    resumed = _unfinished_run(parent, cell)
    run_dir = resumed or unused_path(parent / cell.run_name)
    args = cell_args(plan, cell, run_dir, quiet=session.jobs > 1)
    resume = [f"--ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}"] if resumed else []
    if resumed:
        say(f"{cell.key}: continuing the interrupted run {resumed}")
    start = time.perf_counter()
    cli = _call_cli(["fit", *args, *resume])
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.best_model_score is None:
        raise CellError(f"{cell.key}: no val/acc was logged, so the cell has no score (is validation disabled?)")
    run_dir = Path(trainer.log_dir)
    curve = val_curve(run_dir)
    best = max(range(len(curve)), key=lambda i: curve[i]["acc"]) if curve else None
    # The epochs' values come from the event files, which cover every epoch of a resumed run too;
    # the trainer's own metrics only what it ran (nothing, if the killed run had just finished).
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/acc", "val/loss")}
    last = curve[-1] if curve else {"acc": metrics.get("val/acc", math.nan), "loss": metrics.get("val/loss", math.nan)}
    batch_size = cli.datamodule.batch_size
    per_epoch = min(trainer.num_training_batches * batch_size, len(cli.datamodule.train_set))
    record: dict[str, Any] = {
        "cell": cell.key,
        "point": cell.point.name,
        "fold": cell.fold,
        "seed": cell.seed,
        "val_acc": float(checkpoint.best_model_score),
        "val_loss": curve[best]["loss"] if best is not None else last["loss"],
        "best_epoch": curve[best]["epoch"] if best is not None else None,
        "last_val_acc": last["acc"],
        "last_val_loss": last["loss"],
        "epochs": int(trainer.current_epoch),
        "train_images": int(per_epoch * trainer.current_epoch),
        "fit_seconds": round(seconds, 2),
        "resumed": resumed is not None,
        "worker": f"{os.uname().nodename}:{os.getpid()}",
        "run_dir": str(run_dir),
        "best_checkpoint": str(checkpoint.best_model_path),
    }
    del cli, trainer, checkpoint
    gc.collect()
    if cell.refit:
        record.update(_test_refit(plan, cell, run_dir, args, record["best_checkpoint"]))
    _write_json(run_dir / CELL_FILE, record)
    say(
        f"{cell.key}: val/acc {record['val_acc']:.4f}, val/loss {record['val_loss']:.4f}"
        + (f", test/acc {record['test_acc']:.4f}" if cell.refit else "")
        + f" ({seconds:.0f} s, {record['worker']})"
    )
    return record


def _test_scoring_run(session: Session, cell: Cell, parent: Path) -> dict[str, Any] | None:
    """A refit on the fixed split is the scoring training of the same point and seed: test that run.

    Saves training the same thing twice. The refit's folder then holds only ``cell.json``, which
    points to the run it tested. None if that run is not on this machine (then it is trained anew).
    """
    plan = session.plan
    scoring = Cell(cell.point, None, cell.seed)
    earlier = _finished_record(plan.study_dir / cell.point.name, scoring)
    if earlier is None:
        return None
    run_dir = Path(earlier["run_dir"])
    args = cell_args(plan, scoring, run_dir, quiet=session.jobs > 1)
    record = {**earlier, "cell": cell.key, "tested_run_of": scoring.key}
    record.update(_test_refit(plan, cell, run_dir, args, earlier["best_checkpoint"]))
    marker = unused_path(parent / cell.run_name)
    marker.mkdir(parents=True)
    _write_json(marker / CELL_FILE, record)
    say(f"{cell.key}: tested the run of {scoring.key}: test/acc {record['test_acc']:.4f}")
    return record


def _test_refit(plan: StudyPlan, cell: Cell, run_dir: Path, args: list[str], checkpoint: str) -> dict[str, Any]:
    """Test a refit's best checkpoint into its run folder; its accuracy and per-image correctness."""
    from fmnist_lightning.predictions import read_predictions

    _call_cli(["test", *args, f"--ckpt_path={checkpoint}"])
    reports = sorted(
        (p for p in run_dir.glob("report*") if (p / "metrics.json").is_file()), key=lambda p: p.stat().st_mtime
    )
    if not reports:
        raise CellError(f"{cell.key}: `test` wrote no report/metrics.json in {run_dir}")
    metrics = json.loads((reports[-1] / "metrics.json").read_text())
    predictions = read_predictions(reports[-1] / "predictions.csv")
    index_text = ",".join(map(str, predictions.index))
    return {
        "test_acc": float(metrics["accuracy"]),
        "test_f1": float(metrics["macro_f1"]),
        "report_dir": str(reports[-1]),
        # Per-image correctness for McNemar between refits; kept in the storage, so machines
        # that did not train the refit can still compare it.
        "test_correct": "".join("1" if c else "0" for c in predictions.correct),
        "test_index_sha": hashlib.sha256(index_text.encode()).hexdigest()[:16],
    }


def val_curve(run_dir: Path) -> list[dict[str, float]]:
    """Validation accuracy and loss of every epoch, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        events.Reload()
    tags = set(events.Tags().get("scalars", []))
    if not {"val/acc", "val/loss"} <= tags:
        return []
    loss = {e.step: e.value for e in events.Scalars("val/loss")}
    epoch = {e.step: e.value for e in events.Scalars("epoch")} if "epoch" in tags else {}
    return [
        {"acc": e.value, "loss": loss.get(e.step, float("nan")), "epoch": int(epoch.get(e.step, i))}
        for i, e in enumerate(events.Scalars("val/acc"))
    ]
