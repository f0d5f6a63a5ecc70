"""The command line: ``python -m fmnist_lightning {fit,validate,test,predict} --config FILE``.

A LightningCLI over :class:`ClassificationTask` and :class:`FashionMNISTDataModule`, with the
project's default callbacks (checkpoint on ``val/acc``, early stopping on ``val/loss``, LR monitor,
prediction CSV writer) and ``--ckpt_path best|last`` resolved to the latest run of the configured
logger, whose directory then also receives the test/validate/predict logs.
"""

import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from fmnist_lightning import compare
from fmnist_lightning.callbacks import EpochTimer, PredictionCSVWriter
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import ConfigError, FashionMNISTError
from fmnist_lightning.evaluation import EvaluationReport
from fmnist_lightning.precision import resolve_precision
from fmnist_lightning.task import ClassificationTask

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "default"},
    },
}


class RunConfigSaver(SaveConfigCallback):
    """Save ``config.yaml`` for ``fit``; ``config_<stage>.yaml`` for later stages in the same run.

    ``fit`` refuses to overwrite an existing ``config.yaml`` (each fit gets a new version folder);
    a later ``test`` of that run writes its own file beside it and leaves the fit's config alone.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Pick the file name by stage, then save as Lightning does."""
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        if stage != "fit":
            self.config_filename, self.overwrite = f"config_{stage}.yaml", True
        super().setup(trainer, pl_module, stage)


def find_run_checkpoint(run_root: Path, which: str) -> tuple[Path, int]:
    """Resolve ``best`` or ``last`` to a checkpoint of the latest run under ``run_root``.

    Args:
        run_root: ``<save_dir>/<name>`` of a TensorBoard logger, holding ``version_N`` folders.
        which: ``best`` (the checkpoint ModelCheckpoint recorded as best) or ``last``.

    Returns:
        The checkpoint path and the run's version number.

    Raises:
        ConfigError: If no run with a ``last.ckpt`` exists there.
    """
    runs = sorted(
        (int(d.name.removeprefix("version_")), d)
        for d in run_root.glob("version_*")
        if d.name.removeprefix("version_").isdigit() and (d / "checkpoints" / "last.ckpt").is_file()
    )
    if not runs:
        raise ConfigError(
            f"--ckpt_path {which}: no finished run with checkpoints/last.ckpt under {run_root}. Run `fit` with "
            "the same config first, or give the checkpoint's path."
        )
    version, run = runs[-1]
    last = run / "checkpoints" / "last.ckpt"
    if which == "last":
        return last, version
    state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    for key, value in state.items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = Path(value["best_model_path"])
            # The run folder may have moved since: look for the file beside last.ckpt too.
            for candidate in (best, last.parent / best.name):
                if candidate.is_file():
                    return candidate, version
    raise ConfigError(f"--ckpt_path best: {last} records no best checkpoint that still exists; use its path.")


class FashionMNISTCLI(LightningCLI):
    """LightningCLI with the project's callbacks, logger and checkpoint resolution."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the default callbacks as configurable groups (``--checkpoint.*``, ``--early_stopping.*``)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 5})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
        parser.add_lightning_class_args(EpochTimer, "epoch_timer")
        parser.add_lightning_class_args(EvaluationReport, "evaluation")
        parser.add_argument(
            "--bf16_fallback",
            type=bool,
            default=True,
            help="Train in 32-true when bf16 is asked for on a CPU without native bf16 (emulated bf16 is "
            "several times slower); false keeps bf16.",
        )

    def before_instantiate_classes(self) -> None:
        """Fall back from bf16 to 32-true on CPUs that would only emulate it (see :mod:`.precision`)."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.get("bf16_fallback", True):
            cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then turn ``--ckpt_path best|last`` of validate/test/predict into a file of the latest run."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub not in ("validate", "test", "predict"):
            return
        cfg = self.config[sub]
        if cfg.get("ckpt_path") not in ("best", "last"):
            return
        logger = cfg.trainer.get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or "save_dir" not in init:
            raise ConfigError("--ckpt_path best|last needs a TensorBoardLogger in the config to find the run.")
        path, version = find_run_checkpoint(Path(init.save_dir) / (init.get("name") or ""), cfg.ckpt_path)
        cfg.ckpt_path = str(path)
        if init.get("version") is None:
            init.version = version  # log this stage into the run it evaluates


class _ParseOnlyCLI(FashionMNISTCLI):
    """Parses a command line the way the CLI does, without building or running anything."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_fit_config(fit_args: list[str]) -> Namespace:
    """The resolved ``fit`` configuration of a command line, e.g. ``["--config", "configs/fast.yaml"]``.

    Nothing is instantiated, trained or written; jsonargparse's errors still exit as the CLI does.

    Returns:
        The ``fit`` subcommand's namespace (``cfg.trainer.logger.init_args.save_dir``, ``cfg.data``...).
    """
    cli = _ParseOnlyCLI(
        ClassificationTask,
        FashionMNISTDataModule,
        save_config_callback=None,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=42,
        auto_configure_optimizers=False,
        args=["fit", *fit_args],
    )
    return cli.config.fit


def main(args: list[str] | dict[str, Any] | None = None) -> FashionMNISTCLI | Path:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks).

    ``compare RUN_DIR RUN_DIR ...`` compares tested runs (see :mod:`fmnist_lightning.compare`) and
    returns the folder it wrote; the other subcommands return the LightningCLI.

    Bad input (missing or corrupt data, impossible values) ends with one line on stderr and exit
    status 1; bad or unknown config keys end with jsonargparse's message and exit status 2.
    """
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls/convs on GPUs that have them
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, list) and argv[:1] == ["compare"]:
            return compare.main(argv[1:])
        return FashionMNISTCLI(
            ClassificationTask,
            FashionMNISTDataModule,
            save_config_callback=RunConfigSaver,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=42,
            auto_configure_optimizers=False,
            args=args,
        )
    except FashionMNISTError as err:
        sys.exit(f"fmnist_lightning: error: {err}")
