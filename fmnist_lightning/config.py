"""A run's configuration: the one parser of every training and evaluation, and the objects it builds.

:class:`RunCLI` is Lightning's ``LightningCLI`` without subcommands (``run=False``, its documented use
for code that runs the Trainer itself): it parses a run's configuration (a command line, a YAML file,
a dict) with the package's defaults and callback groups (``--checkpoint.*``, ``--early_stopping.*``...),
settles the run folder and the checkpoint, and builds the task, the data module and the Trainer.
:mod:`fmnist_lightning.training` runs them; the command line and the studies both go through it.

Configuration keys: ``model`` (:class:`ClassificationTask`), ``data`` (:class:`FashionMNISTDataModule`),
``trainer`` (Lightning's Trainer), ``seed_everything``, the callback groups, ``bf16_fallback`` and
``ckpt_path``. ``--print_config`` shows the whole of it.
"""

import copy
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from fmnist_lightning.callbacks import (
    EarlyStopping,
    EpochTimer,
    HParamsLogger,
    MetricsHistory,
    PredictionCSVWriter,
    ValidationSchedule,
)
from fmnist_lightning.checkpoints import AtomicCheckpointIO, RunCheckpoint, load_checkpoint
from fmnist_lightning.data import FashionMNISTDataModule
from fmnist_lightning.errors import CheckpointError, ConfigError, FashionMNISTError
from fmnist_lightning.evaluation import EpochMetrics
from fmnist_lightning.io import unused_path
from fmnist_lightning.precision import resolve_precision
from fmnist_lightning.report import TestReport
from fmnist_lightning.runs import (
    check_plain_file_name,
    check_relative_name,
    find_run_checkpoint,
    run_dir_of_checkpoint,
)
from fmnist_lightning.task import ClassificationTask

DEBUG_ENV = "FMNIST_LIGHTNING_DEBUG"
PROG = "python -m fmnist_lightning"
STAGES = ("fit", "validate", "test", "predict")
CKPT_HELP = (
    "fit: `last` (the latest run of this name) or a checkpoint of a run, to resume it in place; "
    "validate/test/predict: `best`, `last` or a checkpoint's path, evaluated in its run's folder."
)


#: Set by the command line's ``--debug`` for the command it runs.
DEBUG = False


def debugging() -> bool:
    """Whether tracebacks are wanted (``--debug`` or ``FMNIST_LIGHTNING_DEBUG=1``)."""
    return DEBUG or bool(os.environ.get(DEBUG_ENV))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class PackageTrainer(Trainer):
    """Lightning's ``Trainer``, with ``limit_*_batches`` typed ``int | float`` for the parser.

    Lightning annotates them ``Union[float, int, None]`` and jsonargparse tries a union's types in
    order, so ``--trainer.limit_train_batches=1`` (or ``1`` in a YAML file) became 1.0, a whole
    epoch, where the Trainer's Python API reads the int 1 as one batch. With int first, 1 is one
    batch and 1.0 or 0.25 a fraction, as in Python.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


def trainer_defaults() -> dict[str, Any]:
    """The Trainer's defaults (fresh callback objects for every run: studies run many in one process)."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            # name None: the config file's name (configs/tinyvgg.yaml -> lightning_logs/tinyvgg/).
            # default_hp_metric off: HParamsLogger logs real metrics instead of hp_metric = -1.
            "init_args": {"save_dir": "lightning_logs", "name": None, "default_hp_metric": False},
        },
        "callbacks": [HParamsLogger(), MetricsHistory()],
    }


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run folder, never over an earlier record.

    ``fit`` writes ``config.yaml`` (a resumed fit ``config_resume.yaml``, numbered if taken); a
    later stage writes ``config_<stage>.yaml``, ``config_<stage>_1.yaml``... ``test`` also hands
    the YAML to the report, which keeps it beside its metrics.
    """

    resumed = False  # set on the instance when fit continues a run

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Pick a free file name by stage, then save as Lightning does."""
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        if stage != "fit" or self.resumed:
            name = "config_resume.yaml" if stage == "fit" else f"config_{stage}.yaml"
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            self.config_filename = unused_path(log_dir / name).name
        for callback in trainer.callbacks:
            if isinstance(callback, TestReport):
                callback.config = self.parser.dump(self.config, skip_none=False)
        super().setup(trainer, pl_module, stage)


class ConfigParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors on one line instead of the whole usage (100+ lines)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One line on stderr and exit status 2 (jsonargparse's behaviour otherwise)."""
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"fmnist_lightning: error: {' '.join(message.split())} (options: {prog} --help)\n")
        self.exit(2)


def nested(overrides: Mapping[str, Any]) -> Namespace:
    """Dotted keys (``model.optimizer.init_args.lr``) as the nested namespace a parser merges."""
    out = Namespace()
    for key, value in overrides.items():
        out[key] = value
    return out


class RunCLI(LightningCLI):
    """One run's configuration, parsed, checked and built (``LightningCLI`` with ``run=False``).

    After construction: ``config`` (the resolved configuration), ``checkpoint`` (the loaded
    ``ckpt_path``, if any), ``resumes_run``, and, when built, ``model``, ``datamodule`` and ``trainer``.

    Args:
        args: A command line (``["--config", "configs/fast.yaml", "--trainer.max_epochs=2"]``), or a
            whole configuration as a dict or namespace (a run's ``config.yaml``, loaded).
        stage: What the run is for: ``fit``, ``validate``, ``test`` or ``predict`` (how ``ckpt_path`` is
            read, which folder the run logs into).
        overrides: Dotted keys merged over ``args`` as a later config file would be
            (``{"model.optimizer.init_args.lr": 0.01, "seed_everything": 3}``).
        build: Build the objects; False only parses and checks the configuration (nothing is
            instantiated, read or written, though the global seed is set as for a run).
        prog: The program name in help and errors.
        exit_on_error: Exit with one line on stderr for what the parser refuses (the command line);
            False raises jsonargparse's ``ArgumentError`` instead.

    Raises:
        SystemExit: For what the parser refuses (unknown keys, wrong types), with one line on stderr.
        ConfigError: For impossible values the classes refuse, or a bad run name.
        CheckpointError: For a checkpoint that is missing, unreadable or of another network.
    """

    def __init__(
        self,
        args: Sequence[str] | Mapping[str, Any] | Namespace,
        stage: str = "fit",
        overrides: Mapping[str, Any] | None = None,
        build: bool = True,
        prog: str | None = None,
        exit_on_error: bool = True,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage, self.build, self.overrides = stage, build, dict(overrides or {})
        self.checkpoint: dict[str, Any] | None = None
        self.resumes_run = False
        description = __doc__.splitlines()[0]
        super().__init__(
            ClassificationTask,
            FashionMNISTDataModule,
            save_config_callback=RunConfigSaver,
            trainer_class=PackageTrainer,
            parser_class=ConfigParser,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=42,
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": prog or f"{PROG} {stage}",
                "description": description,
                "exit_on_error": exit_on_error,
            },
            args=args,  # type: ignore[arg-type]
            run=False,
        )

    # --- the parser ---------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The package's callbacks as configurable groups, links, and the run's own options."""
        add_run_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (a command line or an object), merge the overrides, then settle the run."""
        is_object = isinstance(args, Mapping | Namespace)
        # A copy: jsonargparse turns a dict's nested class dicts (callbacks...) into namespaces in place,
        # which would change a study's plan (its folder's hash) after its first training.
        config = parser.parse_object(copy.deepcopy(args)) if is_object else parser.parse_args(list(args))
        if self.overrides:
            # The base positionally: it is `cfg_base` in jsonargparse 4.40, `namespace` in later releases.
            config = parser.parse_object(nested(self.overrides), config)
        self.config = config
        self._settle_run(config)

    # --- settling the run folder and the checkpoint --------------------------------------------
    def _settle_run(self, cfg: Namespace) -> None:
        init = settle_logger(cfg)
        check_plain_file_name(cfg.prediction_writer.filename, "--prediction_writer.filename")
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path:
            if self.stage != "fit" and self.build:
                raise ConfigError(f"{self.stage} needs --ckpt_path: best, last or a checkpoint written by fit.")
            return
        if ckpt_path in ("best", "last") and (self.stage != "fit" or ckpt_path == "last"):
            if init is None or "save_dir" not in init:
                raise ConfigError(f"--ckpt_path {ckpt_path} needs a TensorBoardLogger in the config to find the run.")
            cfg.ckpt_path = str(find_run_checkpoint(Path(init.save_dir) / init.name, ckpt_path))
        elif ckpt_path in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
            raise ConfigError(f"--ckpt_path {ckpt_path} is not supported by fit; use `last` or a checkpoint's path.")
        if not self.build:
            return
        self.checkpoint = load_checkpoint(cfg.ckpt_path)
        check_architecture(self.checkpoint, cfg)
        check_normalization(self.checkpoint, cfg)
        run = run_dir_of_checkpoint(Path(cfg.ckpt_path))
        if run is not None and init is not None and "save_dir" in init:
            # Continue (fit) or evaluate (the rest) in the checkpoint's own run folder.
            init.save_dir, init.name, init.version = str(run.parent.parent), run.parent.name, run.name
            self.resumes_run = self.stage == "fit"

    # --- building -----------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Fall back from bf16 to 32-true on CPUs that would only emulate it (see :mod:`.precision`)."""
        cfg = self.config
        if self.build and cfg.get("bf16_fallback", True):
            cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))

    def instantiate_classes(self) -> None:
        """Build model, data, callbacks and Trainer; a value they refuse is a config error."""
        if not self.build:
            return
        try:
            super().instantiate_classes()
        except FashionMNISTError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"invalid configuration: {first_line(err)}. Fix it in the config or on the command line."
            ) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with atomic checkpoint writes unless the config names its own CheckpointIO."""
        plugins = self.config_init.trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.resumed = self.resumes_run
        return trainer

    def dump(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what ``config.yaml`` holds)."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))


def add_run_arguments(parser: LightningArgumentParser) -> None:
    """The package's callback groups (``--checkpoint.*``...), links and run options, on a run parser."""
    # First: it sets check_val_every_n_epoch in its setup, before EarlyStopping's setup reads it.
    parser.add_lightning_class_args(ValidationSchedule, "validation_schedule")
    parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
    parser.set_defaults(
        {
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        }
    )
    parser.add_lightning_class_args(EarlyStopping, "early_stopping")
    parser.set_defaults({"early_stopping.monitor": "val/loss", "early_stopping.patience": 5})
    parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
    parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")
    parser.add_lightning_class_args(EpochTimer, "epoch_timer")
    parser.add_lightning_class_args(EpochMetrics, "epoch_metrics")
    parser.add_lightning_class_args(TestReport, "test_report")
    for key in ("epoch_metrics", "test_report", "prediction_writer"):  # class names declared once: the data's
        parser.link_arguments("data.class_names", f"{key}.class_names", apply_on="instantiate")
    parser.link_arguments("data.class_names", "model.num_classes", compute_fn=len, apply_on="instantiate")
    parser.add_argument(
        "--bf16_fallback",
        type=bool,
        default=True,
        help="Train in 32-true when bf16 is asked for on a CPU without native bf16 (emulated bf16 is "
        "several times slower); false keeps bf16.",
    )
    parser.add_argument("--ckpt_path", type=str | None, default=None, help=CKPT_HELP)


def settle_logger(cfg: Namespace) -> Namespace | None:
    """Name the run after the config file unless named, and keep the names inside the log folder."""
    logger = cfg.trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is not None and "save_dir" in init:
        if init.get("name") is None:
            configs = cfg.get("config") or []
            init.name = Path(str(configs[0])).stem if configs else "default"
        check_relative_name(init.name, "--trainer.logger.init_args.name")
        check_relative_name(init.get("version"), "--trainer.logger.init_args.version")
    return init


def check_architecture(checkpoint: Mapping[str, Any], cfg: Namespace) -> None:
    """Refuse a checkpoint whose network is not the config's, before it could be used silently."""
    saved = checkpoint.get("hyper_parameters", {}).get("model")
    wanted = cfg.model.get("model")
    if not isinstance(saved, dict) or wanted is None:
        return
    wanted = wanted.as_dict() if isinstance(wanted, Namespace) else wanted

    def describe(model: dict) -> str:
        args = json.loads(json.dumps(model.get("init_args") or {}, default=str))
        return f"{model.get('class_path', '?').rsplit('.', 1)[-1]}({', '.join(f'{k}={v}' for k, v in args.items())})"

    if describe(saved) != describe(wanted):
        raise CheckpointError(
            f"checkpoint {cfg.ckpt_path} holds a {describe(saved)}, but the config builds a {describe(wanted)}. "
            "Use the config the checkpoint was trained with (its run folder's config.yaml)."
        )


def check_normalization(checkpoint: Mapping[str, Any], cfg: Namespace) -> None:
    """Refuse a checkpoint trained on differently normalised inputs: its predictions would be wrong, silently."""
    saved = (checkpoint.get("datamodule_hyper_parameters") or {}).get("normalization")
    wanted = (cfg.get("data") or {}).get("normalization")
    if saved is None or wanted is None or saved == wanted:
        return
    raise CheckpointError(
        f"checkpoint {cfg.ckpt_path} was trained with --data.normalization {saved}, but the config gives "
        f"{wanted}. Use the config the checkpoint was trained with (its run folder's config.yaml), or "
        f"--data.normalization {saved}."
    )


def parse(
    args: Sequence[str] | Mapping[str, Any] | Namespace,
    stage: str = "fit",
    overrides: Mapping[str, Any] | None = None,
) -> Namespace:
    """A run's resolved configuration, e.g. ``parse(["--config", "configs/fast.yaml"])``; nothing is built.

    Raises:
        SystemExit: For what the parser refuses (one line on stderr).
        ConfigError: For a run name outside the log folder.
    """
    return RunCLI(args, stage=stage, overrides=overrides, build=False).config
