"""What a person at the terminal sees of a run: one header line, then one line per epoch.

Lightning's progress bar is gone once an epoch ends, and its model summary is a table of every
module; a person following a 40-epoch run wants what a paper's training log shows: one line per
epoch with the losses, the accuracies, the time and the learning rate, kept in the scrollback
(and in a SLURM job's output file, where a progress bar is noise).
"""

import math
import os
import sys
import time

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["EpochSummary"]


class EpochSummary(Callback):
    """A header line when ``fit`` starts, then one line per epoch (rank 0, on stderr).

    ``epoch 3/20  train/loss 0.4123  train/acc 0.8511  val/loss 0.3877  val/acc 0.8612  11.9 s  lr 1.20e-03``

    Args:
        enabled: False prints nothing (a study's workers share one terminal).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._start = 0.0

    def _say(self, trainer: Trainer, line: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled:
            bar.print(line, file=sys.stderr)  # above the bar, not through it
        else:
            print(line, file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The header: network, parameters, device, precision, images."""
        if not self.enabled or not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", pl_module)
        params = sum(p.numel() for p in model.parameters())
        data = trainer.datamodule
        sizes = ""
        if data is not None and getattr(data, "train_set", None) is not None:
            sizes = f", {len(data.train_set):,} training / {len(data.val_set or ()):,} validation images"
        device = trainer.strategy.root_device.type
        devices = f"{trainer.world_size} x {device}" if trainer.world_size > 1 else device
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "no limit of"
        seed = os.environ.get("PL_GLOBAL_SEED")  # what seed_everything set, as Lightning records it
        self._say(
            trainer,
            f"Training {type(model).__name__} ({params:,} parameters) on {devices}, precision {trainer.precision}"
            f"{sizes}, {epochs} epochs" + (f", seed {seed}" if seed is not None else ""),
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the epoch's clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The epoch's line (after its validation, which Lightning runs before this hook)."""
        if not self.enabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        total = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        parts = [f"epoch {trainer.current_epoch + 1}{total}"]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            if key in metrics and metrics[key].numel() == 1:
                value = float(metrics[key])
                parts.append(f"{key} {value:.4f}" if math.isfinite(value) else f"{key} {value}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        lrs = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        if lrs:
            parts.append(f"lr {float(lrs[0]):.2e}")
        self._say(trainer, "  ".join(parts))
