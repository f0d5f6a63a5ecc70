"""Where a study lives (Optuna storages) and how trials of dead workers are found and queued again.

- Default: Optuna's journal file in the study folder (``optuna.journal``): embedded, nothing to
  start, safe for several processes (SQLite locks up under parallel writers, optuna issues 4002
  and 1457). A path given as ``storage`` puts the journal there instead (e.g. on a disk that
  several machines share).
- Any database URL Optuna accepts (``postgresql://user@host/db``, ``mysql://...``) gives an
  ``RDBStorage``, which many machines can share.

A worker killed with ``kill -9`` leaves its trial RUNNING for ever. Two mechanisms put it back in the
queue, both ending in Optuna's ``RetryHeartbeatStaleTrialCallback`` (a WAITING copy of the trial
with its parameters and user attributes, so finished folds of a search point are kept):

1. Heartbeats. ``RDBStorage`` has them; Optuna's ``JournalStorage`` does not (optuna 5.0), so
   :class:`HeartbeatJournalStorage` adds them, keeping the last beat as a trial system attribute.
   A RUNNING trial whose last beat is older than the grace period is stale (``fail_stale_trials``).
   This covers workers on other machines (clocks must agree within the grace period for journals;
   databases use the server's clock).
2. On this machine, at once: every claimed trial records its worker (host, boot, pid, process start
   time); a RUNNING trial whose worker process is gone is failed and queued again without waiting
   for the grace period (:func:`reclaim_dead_trials`). So a re-run right after ``kill -9``
   completes the missing cells immediately.
"""

import contextlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from fmnist_lightning.errors import ConfigError

JOURNAL_FILE = "optuna.journal"
HEARTBEAT_ATTR = "fmnist:heartbeat"
WORKER_ATTR = "fmnist:worker"
#: How many times a trial killed with its worker is queued again before it is left failed.
MAX_RETRY = 3


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a stale trial as WAITING, with its parameters and attributes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats, which it lacks (optuna 5.0).

    The last beat of a trial is its system attribute ``fmnist:heartbeat`` (seconds since the epoch,
    this machine's clock); a RUNNING trial is stale when neither its start nor its last beat is
    within ``grace_period`` seconds. The attribute is copied into a retried trial, so its start
    time counts too.

    Args:
        backend: The journal backend (a file).
        heartbeat_interval: Seconds between beats.
        grace_period: Seconds without a beat after which a RUNNING trial is stale.
        heartbeat_stale_trial_callback: Called with each trial failed as stale (Optuna's retry).
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        """Record that the trial's worker is alive now."""
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(started, float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)))
            if now - last > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        """Seconds between beats."""
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        """The callback run for each trial failed as stale."""
        return self._stale_callback


def is_database_url(storage: str) -> bool:
    """Whether ``storage`` is a database URL (``dialect://...``) rather than a journal file path."""
    return "://" in storage


def journal_path(storage: str | None, study_dir: Path) -> Path | None:
    """The journal file a study uses, or None when it lives in a database."""
    if storage is None:
        return study_dir / JOURNAL_FILE
    return None if is_database_url(storage) else Path(storage)


def open_storage(storage: str | None, study_dir: Path, heartbeat_interval: int, grace_period: int) -> BaseStorage:
    """Open (creating if needed) the storage of a study, with heartbeats and the retry callback.

    Args:
        storage: None for ``<study_dir>/optuna.journal``, a journal file path, or a database URL.
        study_dir: The study folder.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without heartbeat after which a running trial counts as dead.

    Raises:
        ConfigError: If the database cannot be reached or the journal cannot be written.
    """
    path = journal_path(storage, study_dir)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal_tail(path)
            backend = JournalFileBackend(str(path))
        except OSError as err:
            raise ConfigError(f"cannot write the study journal {path} ({err.strerror or err}).") from err
        return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, retry_callback())
    assert storage is not None
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    storage,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry_callback(),
                )
        except Exception as err:  # SQLAlchemy and the drivers raise many types; all mean "cannot use it"
            # Workers started together on an empty database race to create Optuna's tables; the
            # losers fail on a duplicate key and find the tables there when they try again.
            if attempt < 4 and "duplicate key" in str(err).lower():
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot open the study storage {storage}: {type(err).__name__}: {first}") from err
    raise AssertionError("unreachable")


def repair_journal_tail(path: Path) -> None:
    """Cut a half-written last line off a journal (a writer killed mid-write), under the journal's lock.

    Optuna ignores such a line while it is last, but the next write would be appended to it and
    make the journal unreadable from then on.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Workers and their liveness


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), None if it does not run (or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc/self/stat").exists():  # no procfs: ask the kernel whether the pid exists
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return ""
            return ""
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):  # killed but not yet reaped by its parent: dead
        return None
    return fields[19]


def this_worker(trial_number: int) -> dict[str, Any]:
    """Who runs a trial: host, boot, pid and start time of this process, and the trial's number."""
    return {
        "trial": trial_number,
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()) or "",
    }


def _is_dead_here(worker: Any, trial_number: int) -> bool:
    """Whether ``worker`` (a WORKER_ATTR value) ran on this machine and its process has ended."""
    if not isinstance(worker, dict) or worker.get("trial") != trial_number:
        return False  # copied from the trial this one retries, or written by something else
    if worker.get("host") != socket.gethostname() or worker.get("boot") != _boot_id():
        return False
    start = _process_start(int(worker["pid"]))
    return start is None or (bool(worker.get("start")) and bool(start) and start != worker["start"])


def _grace_period(storage: BaseStorage) -> float | None:
    """Seconds without a beat after which a RUNNING trial is stale; None without heartbeats."""
    storage = getattr(storage, "_backend", storage)  # a study wraps a database in Optuna's _CachedStorage
    if isinstance(storage, HeartbeatJournalStorage):
        return storage._grace_period
    if isinstance(storage, RDBStorage) and storage.heartbeat_interval:
        return storage.grace_period or 2 * storage.heartbeat_interval  # Optuna's own default
    return None


def _unsigned_for(trial: FrozenTrial, worker: Any, grace: float | None) -> bool:
    """Whether a RUNNING trial was claimed over ``grace`` seconds ago and never signed by its worker.

    A worker killed between claiming a trial and signing it leaves no worker and, on a database,
    no heartbeat row, which Optuna's ``fail_stale_trials`` skips: the trial would wait for ever.
    Claims are signed (and beat once) within milliseconds, so a grace period is ample.
    """
    if grace is None or trial.datetime_start is None:
        return False
    if isinstance(worker, dict) and worker.get("trial") == trial.number:
        return False
    return (datetime.now() - trial.datetime_start).total_seconds() > grace


def reclaim_dead_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker is dead and queue them again; returns how many.

    Stale heartbeats (any machine) go through Optuna's ``fail_stale_trials``; trials of processes
    that ended on this machine are failed at once, and so are trials claimed more than a grace
    period ago by a worker that died before it signed them (:func:`_unsigned_for`). Either way the
    storage's retry callback makes the WAITING copy, exactly once per trial: of two processes failing
    the same trial, the second gets ``UpdateFinishedTrialError``.
    """
    storage = study._storage  # Optuna's own callbacks work on it; there is no public handle
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    callback = retry_callback()
    grace = _grace_period(storage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(WORKER_ATTR)
        if not (_is_dead_here(worker, trial.number) or _unsigned_for(trial, worker, grace)):
            continue
        try:
            failed = storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process failed (or finished) it first
        if failed:
            callback(study, storage.get_trial(trial._trial_id))
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return len(after - before)


class Heartbeat:
    """Beat for a trial from a thread while it trains (a no-op for storages without heartbeats).

    Use as a context manager around the trial's work; the thread stops before the trial is told.
    """

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        assert self._interval is not None
        while True:
            # A failure (the trial was failed by another process, the storage hiccupped) is left to
            # the next beat; a real loss of contact shows as a stale trial.
            with contextlib.suppress(Exception):
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "Heartbeat":
        if self._interval:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
