"""Where a study lives: Optuna's journal file (the default) or any database Optuna accepts, with heartbeats.

The default is a journal file in the study folder (``optuna.journal``): embedded, nothing to start,
safe for several processes (SQLite locks up under parallel writers, optuna issues 4002 and 1457); a
path as ``storage`` puts it elsewhere (a disk several machines share). A database URL
(``postgresql://user@host/db``) gives an ``RDBStorage`` that many machines share.

A worker killed with ``kill -9`` leaves its trial RUNNING. Optuna's heartbeats find it: every running
trial beats from a thread of ``study.optimize``, and a trial whose last beat is older than the grace
period is failed by the next ``optimize`` and queued again by ``RetryHeartbeatStaleTrialCallback``
with its parameters and user attributes. ``RDBStorage`` has heartbeats; ``JournalStorage`` does not
(optuna issue 6615), which :class:`HeartbeatJournalStorage` fills.
"""

import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback

# Private, and needed: BaseHeartbeat is the interface optimize() looks for to run heartbeats and to fail
# stale trials; optuna exports no public name for it. tests/test_study.py fails loudly if it moves.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url  # SQLAlchemy is Optuna's dependency, and RDBStorage's engine
from sqlalchemy.exc import ArgumentError

from fmnist_lightning.errors import ConfigError

JOURNAL_FILE = "optuna.journal"
HEARTBEAT_ATTR = "fmnist:heartbeat"
#: How many times a trial whose worker died is queued again before it is left failed.
MAX_RETRY = 3
#: Optuna's journal lock: ``<journal>`` + this (``JournalFileSymlinkLock``; tests/test_study.py checks it).
LOCK_SUFFIX = ".lock"
#: A journal lock older than this when a command starts was left by a killed process (a write takes ms).
STALE_LOCK_SECONDS = 10
#: How to install the PostgreSQL driver the package is tested with (the ``postgres`` extra: psycopg2).
POSTGRES_INSTALL = "pip install 'fmnist_lightning[postgres]' (psycopg2)"


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a stale trial as WAITING, with its parameters and attributes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeats it lacks.

    A trial's last beat is its system attribute ``fmnist:heartbeat`` (seconds since the epoch, the
    worker's clock: machines sharing a journal must agree on the time within the grace period). A
    RUNNING trial is stale when neither its start nor its last beat is within ``grace_period`` seconds.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        """Record that the trial's worker is alive now."""
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's hook (private by name, abstract in ``BaseHeartbeat``): the RUNNING trials gone quiet."""
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - max(started, float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0))) > self.grace_period:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        return stale

    def get_heartbeat_interval(self) -> int:
        """Seconds between beats."""
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        """The callback run for each trial failed as stale."""
        return self.stale_callback


def journal_path(storage: str | None, study_dir: Path) -> Path | None:
    """The journal file a study uses (absolute), or None when it lives in a database (``dialect://...``)."""
    if storage is not None and "://" in storage:
        return None
    return (study_dir / JOURNAL_FILE if storage is None else Path(storage)).absolute()


def open_storage(storage: str | None, study_dir: Path, heartbeat_interval: int, grace_period: int) -> BaseStorage:
    """Open (creating if needed) a study's storage, with heartbeats and the retry callback.

    Args:
        storage: None for ``<study_dir>/optuna.journal``, a journal file path, or a database URL.
        study_dir: The study folder.
        heartbeat_interval: Seconds between heartbeats of a running trial.
        grace_period: Seconds without heartbeat after which a running trial counts as dead.

    Raises:
        ConfigError: If the database cannot be reached or the journal cannot be written.
    """
    path = journal_path(storage, study_dir)
    if path is not None and path.is_dir():
        raise ConfigError(
            f"--storage {storage} is a folder; give a journal file in it ({path / JOURNAL_FILE}) or a database URL."
        )
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            break_stale_lock(path)
            repair_journal_tail(path)
            backend = JournalFileBackend(str(path))  # absolute: the lock's symlink must point somewhere real
        except OSError as err:
            raise ConfigError(f"cannot write the study journal {path} ({err.strerror or err}).") from err
        return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, retry_callback())
    url = database_url(str(storage))
    shown = make_url(str(storage)).render_as_string(hide_password=True)  # where, without the password
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    url,
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
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if isinstance(err, ImportError):
                raise ConfigError(
                    f"cannot open the study storage {shown}: its database driver is not installed ({first}); "
                    f"install it (PostgreSQL: {POSTGRES_INSTALL})."
                ) from err
            raise ConfigError(f"cannot open the study storage {shown}: {type(err).__name__}: {first}") from err
    raise AssertionError("unreachable")


def database_url(storage: str) -> str:
    """``storage`` with a PostgreSQL driver that is installed, when the URL names none.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, while the package's ``postgres``
    extra installs psycopg2: the docs' own ``postgresql://user@host/db`` would end in an
    ImportError. Without a driver in the URL and without psycopg, psycopg2 is named
    (``postgresql+psycopg2://``); with psycopg, or with a driver in the URL, the URL is kept as it is.

    Raises:
        ConfigError: If ``storage`` is not a database URL, or PostgreSQL has neither driver installed.
    """
    try:
        url = make_url(storage)
    except (ArgumentError, ValueError) as err:  # unparseable, or a port that is not a number
        raise ConfigError(
            f"--storage {storage} is not a database URL (dialect://user@host/database) nor a journal file path."
        ) from err
    if url.drivername != "postgresql" or _imports("psycopg"):
        return storage
    if _imports("psycopg2"):
        return url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    raise ConfigError(
        f"--storage {url.render_as_string(hide_password=True)}: PostgreSQL needs a driver, and neither psycopg2 "
        f"nor psycopg is installed; {POSTGRES_INSTALL}."
    )


def _imports(module: str) -> bool:
    """Whether ``module`` imports (psycopg without its C library is installed and still fails)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def break_stale_lock(path: Path) -> None:
    """Remove a journal lock that a killed process left, with a line saying so.

    Optuna's lock is a symbolic link ``<journal>.lock`` made for the moment of one write (a few
    milliseconds); a process killed in that moment leaves it, and every other process then waits
    until Optuna's own grace period (30 s without a write) breaks it. A lock older than
    :data:`STALE_LOCK_SECONDS` when a command starts cannot belong to a live write: it goes at once.
    """
    lock = Path(f"{path}{LOCK_SUFFIX}")
    try:
        age = time.time() - lock.lstat().st_mtime  # the link's own time: when it was taken
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
        print(
            f"[study] removed the lock {lock}, left {age:.0f} s ago by a process killed while writing", file=sys.stderr
        )


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
