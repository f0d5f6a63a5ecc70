"""Checkpoints you can trust: written atomically, ``last.ckpt`` every epoch, read back with clear errors."""

import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fmnist_lightning.errors import CheckpointError
from fmnist_lightning.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, then rename it into place.

    Lightning's ``TorchCheckpointIO`` truncates the target and writes into it, so a full disk or a
    kill in the middle leaves a truncated, unloadable file where a good checkpoint was. Here the
    rename is atomic on POSIX: the file under the final name is always a whole checkpoint, the old
    one or the new one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Raises:
            CheckpointError: If the file cannot be written (disk full, permissions...); the file
                that was at ``path`` before, if any, is left as it was.
        """
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        target = Path(path)
        try:
            with atomic_write(target, "wb", sync=True) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
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
    if (target.parent / "last.ckpt").is_file():
        return f"{kept}. Free some space or fix the folder, then resume with `fit --ckpt_path last` (same config)."
    # No last.ckpt to resume from (the first epoch's failed): advice that works, not a refused resume.
    return f"{kept}. Free some space or fix the folder, then run the same command again."


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for the best epochs, and ``last.ckpt`` rewritten after every epoch, improved or not.

    Lightning 2.6's ``save_last`` writes ``last.ckpt`` only at an epoch where a top-k checkpoint was
    written, so after epochs without improvement ``last`` would be an old epoch and a resumed run
    would redo them. Here ``last.ckpt`` is saved at the end of every training epoch (after its
    validation, when there is one) through ``Trainer.save_checkpoint``.

    Args:
        save_last: Keep ``last.ckpt``, the state after the latest epoch.
        **kwargs: Lightning's ``ModelCheckpoint`` arguments (``monitor``, ``mode``, ``filename``...).
    """

    def __init__(self, save_last: bool = True, **kwargs: Any) -> None:
        super().__init__(save_last=False, **kwargs)
        self.save_last_every_epoch = save_last

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save a top-k checkpoint as Lightning does, then ``last.ckpt`` whatever happened.

        Nothing of an epoch whose loss went non-finite (the task's ``check_finite_loss`` raises).
        """
        check_finite_loss = getattr(pl_module, "check_finite_loss", None)
        if check_finite_loss is not None:
            check_finite_loss()
        super().on_train_epoch_end(trainer, pl_module)
        if not self.save_last_every_epoch or trainer.sanity_checking or trainer.fast_dev_run or self.dirpath is None:
            return
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)

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
    except pickle.UnpicklingError as err:  # torch's refusal of pickled classes, or a broken pickle
        classes = _pickled_classes(path)
        if classes:
            raise CheckpointError(_pickled_objects_message(path, classes, how)) from err
        raise CheckpointError(_corrupt_message(path, err, how)) from err
    except Exception as err:  # zip, pickle and torch errors for truncated or foreign files
        raise CheckpointError(_corrupt_message(path, err, how)) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict); {how}.")
    return ckpt


def _plain(text: str) -> str:
    """``text`` without terminal escape codes (torch's messages embolden words with them)."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _corrupt_message(path: Path, err: BaseException, how: str) -> str:
    first = (_plain(str(err)).strip().splitlines() or [""])[0]
    return f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(err).__name__}: {first}); {how}."


def _pickled_classes(path: Path) -> list[str]:
    """The classes a PyTorch file pickles beyond tensors and containers (read, never run), [] if none or unreadable."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # torch < 2.5 lacks the function; a broken archive has nothing to list
        return []


def _pickled_objects_message(path: Path, classes: list[str], how: str) -> str:
    """What a file of pickled objects holds, in one line: a whole ``nn.Module`` says so.

    A class counts as a module when it is already imported and an ``nn.Module``: nothing named by an
    untrusted file is imported to find out.
    """

    def is_module(name: str) -> bool:
        module, _, attr = name.rpartition(".")
        cls = getattr(sys.modules.get(module), attr, None)
        return isinstance(cls, type) and issubclass(cls, torch.nn.Module)

    modules = [name for name in classes if is_module(name)]
    if modules:
        # The user's own class (perhaps defined in their script, so not importable here) says more
        # than torch's layers inside it.
        model = next((name for name in classes if not name.startswith("torch.")), modules[0])
        return (
            f"checkpoint {path} holds a pickled whole model (a {model.rsplit('.', 1)[-1]}, saved with "
            f"torch.save(model, path)), not a Lightning checkpoint written by `fit`; {how}."
        )
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    return (
        f"checkpoint {path} holds pickled Python objects ({shown}), not a Lightning checkpoint written by `fit`; {how}."
    )
