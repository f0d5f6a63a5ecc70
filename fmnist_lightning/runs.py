"""Run folders: finding a run's checkpoints, its epoch history, new result names, paths kept inside.

A run folder is what TensorBoardLogger makes: ``<save_dir>/<name>/version_N/`` with ``config.yaml``
(the resolved config of ``fit``), ``checkpoints/`` (``best-*.ckpt`` and ``last.ckpt``), the
TensorBoard event files, ``history.csv`` (one row per epoch) and, once tested, ``report/``.
"""

import csv
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from lightning.pytorch import Trainer

from fmnist_lightning.checkpoints import load_checkpoint
from fmnist_lightning.errors import CheckpointError, ConfigError
from fmnist_lightning.io import atomic_write

HISTORY_FILE = "history.csv"


def check_relative_name(value: object, what: str) -> None:
    """Refuse a name from user input that would lead outside its parent folder (``../x``, ``/x``).

    Raises:
        ConfigError: If ``value`` is absolute, empty or has a ``..`` component.
    """
    if value is None or isinstance(value, int):
        return
    path = Path(str(value))
    if str(value).strip() == "" or path.is_absolute() or ".." in path.parts:
        raise ConfigError(
            f"{what} {str(value)!r} must be a relative name inside the log folder (no '..', not absolute, not empty)."
        )


def check_plain_file_name(value: str, what: str) -> None:
    """Refuse a file name with a folder part (``a/b.csv``, ``../x.csv``): it is written in the run folder.

    Raises:
        ConfigError: If ``value`` is not a plain file name.
    """
    if not value or Path(value).name != value or value in (".", ".."):
        raise ConfigError(f"{what} {value!r} must be a plain file name (it is written inside the run folder).")


def check_writable(folder: Path, what: str) -> None:
    """Check that ``folder`` can be created and written, without leaving anything behind.

    Raises:
        ConfigError: If the nearest existing ancestor is not a writable folder.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder} cannot be created: {existing} is a file, not a folder.")
    try:  # a real write: permission bits lie for root, read-only mounts do not show in os.access
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ConfigError(
            f"{what} {folder} is not writable ({err.strerror or err} in {existing}); choose another folder."
        ) from err


def trainer_run_dir(trainer: Trainer) -> Path | None:
    """The run folder of a Trainer's logger, or None without a logger.

    ``Trainer.log_dir`` broadcasts from rank 0 under DDP, a collective: called from code that only
    rank 0 runs, it waits for the other ranks for ever. The logger's own ``log_dir`` is local.
    """
    logger = trainer.logger
    if logger is None:
        return None
    folder = getattr(logger, "log_dir", None) or logger.save_dir
    return Path(folder) if folder else None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run folder written by ``fit``."""
    return (path / "config.yaml").is_file() or (path / "hparams.yaml").is_file() or (path / "checkpoints").is_dir()


def run_dir_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder holding ``ckpt`` (``<run>/checkpoints/x.ckpt``), or None if it is not in one."""
    ckpt = Path(os.path.normpath(ckpt))  # keeps a relative path relative, as the run recorded it
    if ckpt.parent.name == "checkpoints" and is_run_dir(ckpt.parent.parent):
        return ckpt.parent.parent
    return None


def run_versions(run_root: Path) -> list[tuple[int, Path]]:
    """The ``version_N`` folders under ``<save_dir>/<name>``, by N."""
    found = (
        (int(d.name.removeprefix("version_")), d)
        for d in run_root.glob("version_*")
        if d.name.removeprefix("version_").isdigit() and d.is_dir()
    )
    return sorted(found)


def latest_run(run_root: Path) -> Path | None:
    """The run folder (``version_N``, see :func:`is_run_dir`) with the highest N under ``<save_dir>/<name>``."""
    runs = [d for _, d in run_versions(run_root) if is_run_dir(d)]
    return runs[-1] if runs else None


def claim_run_dir(run_root: Path) -> tuple[Path, list[Path]]:
    """Make the next ``version_N`` folder under ``run_root``, atomically: racing commands get distinct N.

    TensorBoardLogger picks the next N by listing the folder, so two ``fit`` started at once can pick
    the same one and write into each other's run. ``mkdir`` either makes the folder or fails because
    another command made it first; then the next N is tried.

    Returns:
        The folder made, and it with the parents made for it (innermost first), for a failed run's
        clean-up.
    """
    while True:
        versions = run_versions(run_root)
        candidate = run_root / f"version_{versions[-1][0] + 1 if versions else 0}"
        created = [candidate]
        for parent in candidate.parents:
            if parent.exists():
                break
            created.append(parent)
        run_root.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate, created


def best_checkpoint(last_ckpt: Mapping) -> str | None:
    """The best checkpoint path recorded by the ModelCheckpoint state inside a loaded checkpoint."""
    for key, value in last_ckpt.get("callbacks", {}).items():
        is_checkpoint_state = key.startswith(("RunCheckpoint", "ModelCheckpoint")) and isinstance(value, Mapping)
        if is_checkpoint_state and value.get("best_model_path"):
            return str(value["best_model_path"])
    return None


def find_run_checkpoint(run_root: Path, which: str) -> Path:
    """Resolve ``best`` or ``last`` to a checkpoint of the latest run under ``run_root``, and only that run.

    Args:
        run_root: ``<save_dir>/<name>`` of a TensorBoard logger, holding ``version_N`` folders.
        which: ``best`` (the checkpoint ModelCheckpoint recorded as best) or ``last``.

    Returns:
        The checkpoint's path.

    Raises:
        ConfigError: If there is no run, the latest run has no ``last.ckpt``, or its best checkpoint is gone.
        CheckpointError: If ``last.ckpt`` is unreadable.
    """
    run = latest_run(run_root)
    if run is None:
        raise ConfigError(
            f"--ckpt_path {which}: no run under {run_root}. Run `fit` with the same config first, or give the "
            "checkpoint's path."
        )
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():  # never another run in its place: resuming or testing it would be a silent mix-up
        raise ConfigError(
            f"--ckpt_path {which}: the latest run {run} has no checkpoints/last.ckpt (removed, still in its first "
            "epoch, or trained with checkpoint.save_last false); give a checkpoint's path instead."
        )
    if which == "last":
        return last
    try:
        recorded = best_checkpoint(load_checkpoint(last))
    except CheckpointError as err:
        raise CheckpointError(f"--ckpt_path best: {err} Give the best checkpoint's path instead.") from err
    if recorded:
        # The run folder may have moved since: look for the file beside last.ckpt too.
        for candidate in (Path(recorded), last.parent / Path(recorded).name):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"--ckpt_path best: {last} records no best checkpoint that still exists; give its path.")


def snapshot(folder: Path) -> set[Path]:
    """Every path under ``folder`` (to remove what a failed command added, see :func:`remove_new`)."""
    return set(folder.rglob("*")) if folder.is_dir() else set()


def remove_new(folder: Path, before: set[Path], keep_checkpoints: bool = True) -> None:
    """Remove what appeared under ``folder`` since ``before`` (checkpoints kept, so a run can resume)."""
    for path in sorted(snapshot(folder) - before, key=lambda p: len(p.parts)):
        if keep_checkpoints and (path.suffix == ".ckpt" or path.name == "checkpoints"):
            continue
        if path.is_dir() and not any(p.suffix == ".ckpt" for p in path.rglob("*")):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.suffix != ".ckpt":
            path.unlink(missing_ok=True)


def append_history(run_dir: Path, row: Mapping[str, float]) -> None:
    """Append one epoch's metrics to ``<run_dir>/history.csv`` (new columns start a new header)."""
    file = run_dir / HISTORY_FILE
    rows = read_history(run_dir)
    keys = list(dict.fromkeys([*(k for r in rows for k in r), *row]))
    if rows and keys != list(rows[0]):  # a column appeared: rewrite with the wider header
        rows.append(dict(row))
        _write_history(file, keys, rows)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    new = not file.is_file()
    with file.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        if new:
            writer.writeheader()
        writer.writerow(dict(row))


def _write_history(file: Path, keys: Iterable[str], rows: list[Mapping[str, float]]) -> None:
    with atomic_write(file, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys))
        writer.writeheader()
        # read_history parses every cell as a float: the counters go back to integers ("3", not "3.0").
        writer.writerows({k: int(v) if k in ("epoch", "step") else v for k, v in row.items()} for row in rows)


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """The per-epoch rows of ``history.csv``, one per epoch (a redone epoch after a resume counts once)."""
    file = Path(run_dir) / HISTORY_FILE
    if not file.is_file():
        return []
    with file.open(newline="") as f:
        rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
    by_epoch = {int(r.get("epoch", i)): r for i, r in enumerate(rows)}
    return [by_epoch[e] for e in sorted(by_epoch)]
