"""Checkpoints you can trust: written atomically, ``last.ckpt`` every epoch, read back with clear errors."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fmnist_lightning.errors import CheckpointError
from fmnist_lightning.runs import new_file_mode


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, then rename it into place.

    Lightning's ``TorchCheckpointIO`` truncates the target and writes into it, so a full disk or a
    kill in the middle leaves a truncated, unloadable file where a good checkpoint was. Here the
    rename is atomic on POSIX: the file under the final name is always a whole checkpoint, the old
    one or the new one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Raises:
            CheckpointError: If the file cannot be written (disk full, permissions...); the file
                that was at ``path`` before, if any, is left as it was.
        """
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        target = Path(path)
        tmp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            tmp = Path(name)
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise CheckpointError(f"could not write checkpoint {target} ({_why(err, target)}){_kept(target)}") from err


def _why(err: BaseException, target: Path) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(target.parent).free < 16 * 2**20:
            return "No space left on device"
    except OSError:
        pass
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def _kept(target: Path) -> str:
    kept = f"; {target} still holds the previous checkpoint" if target.is_file() else ""
    return f"{kept}. Free some space or fix the folder, then resume with `fit --ckpt_path last` (same config)."


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is rewritten after every epoch, improved or not.

    Lightning 2.6 writes ``last.ckpt`` only at an epoch where a top-k checkpoint was written, so
    after epochs without improvement ``last`` is an old epoch and a resumed run would redo them.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the top-k checkpoint as Lightning does, then ``last`` whatever happened."""
        super().on_validation_end(trainer, pl_module)
        if self.save_last and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The same, for runs that save at the end of the training epoch (no validation)."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best-k state when the folder is the same, however its path is written.

        Lightning compares the saved ``dirpath`` as a string, so a run saved under a relative
        ``lightning_logs/...`` and resumed through an absolute path would lose its best score and
        could then call a worse epoch "best".
        """
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.realpath(saved) == os.path.realpath(self.dirpath):
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)

    def _save_last_every_epoch(self, trainer: Trainer) -> None:
        # _should_skip_saving_checkpoint is also true once this step has been saved (top-k + last).
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU, with one clear error for every way it can be bad.

    Raises:
        CheckpointError: If the file is missing, empty, truncated, not a checkpoint or unreadable.
    """
    path = Path(path)
    how = "give the path of a .ckpt file written by `fit` (see the run's checkpoints/ folder)"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; {how}.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; {how}.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); {how}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: permission denied ({err.strerror}).") from err
    except Exception as err:  # zip, pickle and torch errors for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {how}."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict); {how}.")
    return ckpt
