"""``ClassificationTask``: the one LightningModule, wrapping any ``nn.Module`` that returns logits."""

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, OneCycleLR, ReduceLROnPlateau
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fmnist_lightning.augment import tta_views
from fmnist_lightning.errors import ConfigError, TrainingDiverged

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler | ReduceLROnPlateau]
# Schedulers whose step() is meant to run after every batch rather than every epoch.
_PER_STEP_SCHEDULERS = (OneCycleLR, CyclicLR)


def needs_total_steps(factory: Callable) -> bool:
    """Whether a scheduler factory (e.g. for OneCycleLR) still lacks its number of steps."""
    keywords = getattr(factory, "keywords", None) or {}
    if "total_steps" in keywords:  # jsonargparse's partial lists every argument of the class
        return keywords["total_steps"] is None and keywords.get("epochs") is None
    try:
        return "total_steps" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


class ClassificationTask(LightningModule):
    """Train, validate, test and predict with any classifier ``model`` (images -> logits).

    Args:
        model: The network; ``forward`` maps ``(B, C, H, W)`` to logits ``(B, num_classes)``.
        optimizer: Builds the optimizer from the parameters (from the CLI: ``class_path`` plus
            ``init_args``, e.g. ``torch.optim.AdamW`` with ``lr``). Default: Adam with its default lr 1e-3.
        lr_scheduler: Builds the LR scheduler from the optimizer, or None for a constant LR.
            ReduceLROnPlateau watches ``val/loss``; OneCycleLR and CyclicLR step every batch, with
            OneCycleLR's ``total_steps`` filled in from the trainer when not given; others step
            every epoch.
        num_classes: Number of classes, for the metrics.
        label_smoothing: Label smoothing of the cross-entropy loss, in [0, 1).
        tta_flip: At validation, test and predict time, average the softmax of each image and its
            horizontal mirror (test-time augmentation).
        tta_shift: At validation, test and predict time, also average over each view translated by
            ``(s, s)`` and ``(-s, -s)`` pixels (weight 1/4 each, the untranslated views 1/2), as
            airbench's test-time augmentation; 0 disables it.
        channels_last: Run the network in channels-last memory format (NHWC), which oneDNN and
            cuDNN convolutions prefer (faster TinyVGG training on this project's 2-core CPU).
        compile: Compile the network's forward with ``torch.compile`` (``nn.Module.compile``, in place:
            its weights, checkpoints and exports are unchanged) when the fit, test or predict starts.
            Its first batches wait for the compilation (tens of seconds); it pays on a GPU, where a
            compiled step runs faster; on 2 CPU cores eager FashionCNN trained faster (docs:
            Experiments log).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr_scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        tta_flip: bool = False,
        tta_shift: int = 0,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if tta_shift < 0:
            raise ConfigError(f"tta_shift must be >= 0 pixels, got {tta_shift}.")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        # From the CLI, the hyper-parameters are the config (class paths and init args), so
        # load_from_checkpoint rebuilds the network alone. Objects handed over in Python cannot be
        # stored that way and are dropped; pass model=... to load_from_checkpoint then.
        with warnings.catch_warnings():  # objects given in Python are dropped just below, on purpose
            warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
            self.save_hyperparameters()
        objects = [k for k in ("model", "optimizer", "lr_scheduler") if callable(self.hparams.get(k))]
        self.remove_ignored_hparams(objects)
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last, self.compile_network, self._compiled = channels_last, compile, False
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.tta_flip, self.tta_shift = tta_flip, tta_shift
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # validate_args=False: the argument checks call .item() and would sync the host every step.
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self._train_loss_sum, self._train_count = torch.zeros(()), 0  # the epoch's, see _log_step
        self._all_finite: Tensor | None = None  # see check_finite_loss
        self._finite_steps, self._epoch_start_step = torch.zeros((), dtype=torch.long), 0
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of the network for images ``(B, C, H, W)``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities ``(B, num_classes)``, averaged over the test-time views (``tta_flip``, ``tta_shift``)."""
        views = tta_views(x, self.tta_flip, self.tta_shift)
        return sum(w * self(v).float().softmax(dim=1) for v, w in views)

    @property
    def tta(self) -> bool:
        """Whether predictions average several views of each image."""
        return self.tta_flip or self.tta_shift > 0

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        if stage == "train" or not self.tta:
            logits = self(x)
            loss = self.loss_fn(logits, y)
        else:
            # Loss of the averaged probabilities (its log), which is what TTA predicts with.
            logits = self.predict_proba(x).clamp_min(1e-12).log()
            loss = nn.functional.nll_loss(logits, y)
        return loss, logits, y

    def _log_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> dict[str, Tensor]:
        loss, logits, y = self._shared_step(batch, stage)
        metrics.update(logits, y)
        if stage == "train":
            # Lightning's self.log + log_dict cost about 0.75 ms a call on a 2-core CPU, a third of a
            # small network's whole step: the loss is summed here (on the device, no host sync) and
            # logged once an epoch, as the metrics are, on its last batch.
            self._train_loss_sum += loss.detach() * len(y)
            self._train_count += len(y)
            # Where the loss first went non-finite, without a host sync: the count of finite steps
            # before it (checked once an epoch, see check_finite_loss).
            self._all_finite &= loss.detach().isfinite()
            self._finite_steps += self._all_finite
            if self.trainer.is_last_batch:
                self._log_train_epoch()
        else:
            # Epoch-level only: Lightning accumulates on the device, so no host sync per step.
            self.log(
                f"{stage}/loss",
                loss,
                on_step=False,
                on_epoch=True,
                batch_size=len(y),
                prog_bar=stage == "val",
                sync_dist=True,
            )
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        # Callbacks (confusion matrix, report) read the logits from the step's output.
        return {"loss": loss, "logits": logits.detach(), "targets": y}

    def _log_train_epoch(self) -> None:
        """Log the epoch's mean training loss and the training metrics (updated every step)."""
        loss = self._train_loss_sum / self._train_count
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        self._train_count = 0

    def on_train_epoch_start(self) -> None:
        """Start the epoch's loss sum."""
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_count = 0
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._finite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self._epoch_start_step = self.trainer.global_step

    def check_finite_loss(self) -> None:
        """Stop the run if this epoch's training loss went NaN or infinite (one host sync).

        Called before anything of the epoch is saved (its validation, which may save a "best"
        checkpoint, and ``last.ckpt``): the run keeps the checkpoints of the epochs before.

        Raises:
            TrainingDiverged: Naming the epoch and the step where the loss first went non-finite.
        """
        if getattr(self, "_all_finite", None) is None or bool(self._all_finite):
            return
        batch = int(self._finite_steps)
        raise TrainingDiverged(
            f"the training loss became NaN or infinite at epoch {self.current_epoch}, batch {batch} (step "
            f"{self._epoch_start_step + batch}); lower the learning rate (--model.optimizer.init_args.lr) or clip "
            "gradients (--trainer.gradient_clip_val 1.0)."
        )

    def on_validation_start(self) -> None:
        """During ``fit``, stop on a diverged epoch before its validation can save a checkpoint of it."""
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.check_finite_loss()

    def on_train_epoch_end(self) -> None:
        """Log the epoch if it ended before its last batch (``max_steps`` reached mid-epoch)."""
        if self._train_count:
            self._log_train_epoch()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One optimisation step's loss (with the batch's logits for callbacks)."""
        return self._log_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Accumulate validation loss, accuracy and macro-F1; the logits go on to callbacks."""
        return self._log_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Accumulate test loss, accuracy and macro-F1; the logits go on to callbacks."""
        return self._log_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Probabilities, predicted class and (where known) the true label of each image.

        ``batch`` is ``(images, labels)`` for dataset images, or ``(images, None, files)`` for the
        user's images (``predict_dir``); the output then has ``labels`` None and the ``files``.
        """
        x, y, *files = batch
        probs = self.predict_proba(x)
        out = {"probs": probs, "preds": probs.argmax(dim=1), "labels": y}
        if files:
            out["files"] = files[0]
        return out

    def setup(self, stage: str) -> None:
        """Compile the network in place when asked (Lightning calls this before every fit, test and predict).

        Here rather than in ``configure_model``: Lightning's weight averaging (EMA) warns about any
        task that overrides that hook, which is meant for sharded models.
        """
        if self.compile_network and not self._compiled:
            self.model.compile()
            self._compiled = True

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Give a network with a data-dependent initialisation its first training batch.

        A network that defines ``init_from_batch(images) -> bool`` (:class:`~fmnist_lightning.models.AirbenchNet`'s
        whitening stem) is handed the first (normalised, augmented) batch of each epoch; it changes
        nothing once set (so only a new fit's first batch counts) and returns whether it did; under DDP
        rank 0's result is then copied to every rank, which each saw another batch.
        """
        init = getattr(self.model, "init_from_batch", None)
        if init is None or batch_idx != 0:  # the network itself does nothing once it is set
            return
        if init(batch[0]) and self.trainer.world_size > 1:
            state = self.trainer.strategy.broadcast(self.model.state_dict(), src=0)
            self.model.load_state_dict(state)

    def on_train_start(self) -> None:
        """Refuse a one-cycle schedule that would run out of steps (e.g. a resume with more epochs)."""
        trainer = self.trainer
        steps = int(trainer.estimated_stepping_batches)
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.num_training_batches != float("inf"):
            # A resumed run has taken its earlier epochs' steps, whose batches per epoch may have differed.
            per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            steps = max(steps, trainer.global_step + (trainer.max_epochs - trainer.current_epoch) * per_epoch)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, OneCycleLR) and steps > scheduler.total_steps:
                resumed = self.trainer.ckpt_path is not None
                raise ConfigError(
                    f"OneCycleLR was built for {scheduler.total_steps} steps"
                    + (" by the run being resumed" if resumed else "")
                    + f", but this fit takes {steps} (max_epochs, batch size or limit_train_batches "
                    + (
                        "changed since; resume with the run's own values (its config.yaml), or start a new run)."
                        if resumed
                        else "differ from total_steps; leave total_steps unset to fit the run)."
                    )
                )

    def configure_optimizers(self) -> Any:
        """The optimizer, and the scheduler with the interval and monitor it needs."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if needs_total_steps(self.scheduler_factory):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        elif isinstance(scheduler, _PER_STEP_SCHEDULERS):
            config["interval"] = "step"
        return {"optimizer": optimizer, "lr_scheduler": config}
