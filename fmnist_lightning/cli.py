"""The command line: ``python -m fmnist_lightning SUBCOMMAND ...``, one jsonargparse parser for all of it.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's, over :class:`ClassificationTask`
and :class:`FashionMNISTDataModule` with the project's default callbacks; the other subcommands
(``compare``...) are tools added to the same parser, so ``--help`` lists them all.

A run lives in one folder, ``<save_dir>/<name>/version_N`` (the logger's name defaults to the config
file's name): ``fit --ckpt_path last`` (or a checkpoint of a run) resumes that run in place, and
``validate``/``test``/``predict`` with ``--ckpt_path best|last`` or a run's checkpoint log into that
run's folder. Bad input ends in one line on stderr and a non-zero exit, before any run folder is
made; ``--debug`` (or ``FMNIST_LIGHTNING_DEBUG=1``) shows the traceback instead.
"""

import json
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from fmnist_lightning import compare
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
from fmnist_lightning.precision import resolve_precision
from fmnist_lightning.report import TestReport
from fmnist_lightning.runs import (
    check_plain_file_name,
    check_relative_name,
    check_writable,
    find_run_checkpoint,
    remove_new,
    run_dir_of_checkpoint,
    snapshot,
    trainer_run_dir,
    unused_path,
)
from fmnist_lightning.task import ClassificationTask, needs_total_steps

DEBUG_ENV = "FMNIST_LIGHTNING_DEBUG"
STAGE_HELP = {
    "fit": "Train a model (or resume a run with --ckpt_path last); checkpoints and logs in its run folder.",
    "validate": "Evaluate a checkpoint on the validation split of the 60k training images.",
    "test": "Evaluate a checkpoint on the 10k test set and write a report into its run folder.",
    "predict": "Predict the test set, or your own images with --data.predict_dir, into a CSV.",
}
TRAINER_SUBCOMMANDS = tuple(STAGE_HELP)


def trainer_defaults() -> dict[str, Any]:
    """The Trainer's defaults (fresh callback objects for every CLI: k-fold runs many in one process)."""
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

    resumed = False  # set on the instance by the CLI when fit continues a run

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


class CLIParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors on one line instead of the whole usage of ``fit`` (100+ lines)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One line on stderr and exit status 2 (jsonargparse's behaviour otherwise)."""
        if not self.exit_on_error or FashionMNISTCLI.debug or os.environ.get(DEBUG_ENV):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"fmnist_lightning: error: {' '.join(message.split())} (options: {prog} --help)\n")
        self.exit(2)


@dataclass
class Tool:
    """A subcommand that is not a Trainer method: how to add its arguments and how to run it."""

    help: str
    add_arguments: Callable[[LightningArgumentParser], None]
    run: Callable[[Namespace], Any]


def _compare_arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=str, help="Run folders (or their report folders), two or more.")
    parser.add_argument("--output", type=str, default="comparison", help="Folder for the results (numbered if taken).")


def _compare(cfg: Namespace) -> Path:
    out = compare.compare_runs([Path(r) for r in cfg.runs], Path(cfg.output))
    print((out / "comparison.md").read_text())
    print(f"Written to {out}/")
    return out


def _export_arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument("--ckpt_path", type=str, required=True, help="A checkpoint written by fit.")
    parser.add_argument("--format", type=Literal["onnx", "torchscript"], default="onnx", help="Export format.")
    parser.add_argument(
        "--output", type=str | None, default=None, help="File to write (default: the checkpoint's name, new suffix)."
    )
    parser.add_argument(
        "--tta_flip", type=bool | None, default=None, help="Build in flip averaging (default: as the checkpoint)."
    )


def _export(cfg: Namespace) -> Path:
    from fmnist_lightning.export import export_checkpoint  # onnx is an optional extra: import on use

    path = export_checkpoint(cfg.ckpt_path, cfg.format, cfg.output, cfg.tta_flip)
    print(f"Exported ({cfg.format}, raw [0, 1] grey (B, 1, 28, 28) in, logits out): {path}")
    return path


def _study_common(parser: LightningArgumentParser) -> None:
    parser.add_argument("--num_folds", type=int | None, default=None, help="Score by K-fold CV (K >= 2).")
    parser.add_argument(
        "--seeds", type=int | None, default=None, help="Training seeds, counted up from seed_everything."
    )
    parser.add_argument(
        "--jobs",
        type=int | None,
        default=None,
        help="Worker processes on this machine, each with cores // jobs torch threads; default: one per core on "
        "a CPU (the fastest on 2 cores, measured), one with a GPU.",
    )
    parser.add_argument(
        "--storage",
        type=str | None,
        default=None,
        help="Optuna storage shared by all workers and machines: a database URL (postgresql://...) or a journal "
        "file; default: a journal file in the study folder.",
    )
    parser.add_argument("--heartbeat_interval", type=int, default=20, help="Seconds between a training's heartbeats.")
    parser.add_argument(
        "--grace_period", type=int, default=120, help="Seconds without a heartbeat before a training is redone."
    )


def _sweep_arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument("--sweep", type=str, required=True, help="The sweep file (configs/sweeps/*.yaml).")
    parser.add_argument(
        "--refit", action="store_true", help="Then train the best point (every ablation arm) and test it."
    )
    _study_common(parser)


def _run_kfold(fit_args: list[str], cfg: Namespace, command: str) -> Path:
    from fmnist_lightning.studies import run_kfold

    return run_kfold(
        fit_args,
        cfg.num_folds,
        cfg.seeds or 1,
        cfg.jobs,
        cfg.storage,
        cfg.heartbeat_interval,
        cfg.grace_period,
        command,
    )


def _run_sweep(fit_args: list[str], cfg: Namespace, command: str) -> Path:
    from fmnist_lightning.studies import run_sweep

    return run_sweep(
        fit_args,
        cfg.sweep,
        cfg.num_folds,
        cfg.seeds,
        cfg.jobs,
        cfg.storage,
        cfg.refit,
        cfg.heartbeat_interval,
        cfg.grace_period,
        command,
    )


#: Subcommands that take fit's whole command line (config and any override) plus options of their own.
STUDIES: dict[str, Tool] = {
    "kfold": Tool("Train every fold of a stratified k-fold split and tabulate them.", _study_common, _run_kfold),
    "sweep": Tool(
        "Grid, search or ablation sweep on Optuna: resumable, parallel, with statistics.", _sweep_arguments, _run_sweep
    ),
}
STUDY_OPTIONS = ("num_folds", "seeds", "jobs", "storage", "heartbeat_interval", "grace_period", "sweep", "refit")

TOOLS: dict[str, Tool] = {
    "compare": Tool("Compare tested runs: table, chart and McNemar tests.", _compare_arguments, _compare),
    "export": Tool("Export a checkpoint's network to ONNX or TorchScript.", _export_arguments, _export),
}


class FashionMNISTCLI(LightningCLI):
    """LightningCLI with the project's callbacks, run folders, checks and tool subcommands."""

    debug = False

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser, with ``--debug`` on the top-level one."""
        parser = super().init_parser(**kwargs)
        if not hasattr(self, "parser"):  # the first parser made is the top-level one
            parser.add_argument("--debug", action="store_true", help=f"Show tracebacks (also: {DEBUG_ENV}=1).")
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Trainer subcommands as LightningCLI adds them (with one-line descriptions), then the tools."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        action = parser.add_subcommands()
        for name, description in STAGE_HELP.items():
            sub_kwargs = {"description": description, **kwargs.get(name, {})}
            self._subcommand_parsers[name] = self._prepare_subcommand_parser(self.trainer_class, name, **sub_kwargs)
            action.add_subcommand(name, self._subcommand_parsers[name], help=description)
        for stage in ("validate", "test"):  # our summary replaces the 35-row results table
            self._subcommand_parsers[stage].set_defaults(verbose=False)
        for name, study in STUDIES.items():
            sub = self._prepare_subcommand_parser(self.trainer_class, "fit", description=study.help)
            study.add_arguments(sub)
            self._subcommand_parsers[name] = sub
            action.add_subcommand(name, sub, help=study.help)
        for name, tool in TOOLS.items():
            sub = CLIParser(description=tool.help, prog=f"{parser.prog} {name}")
            tool.add_arguments(sub)
            self._subcommand_parsers[name] = sub
            parser._subcommands_action.add_subcommand(name, sub, help=tool.help)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The default callbacks as configurable groups (``--checkpoint.*``, ``--early_stopping.*``...)."""
        # Trainer annotates limit_*_batches as Union[float, int, None] and jsonargparse tries a union's
        # types in that order, so `--trainer.limit_train_batches=1` (or `1` in a YAML file) became 1.0,
        # a whole epoch, where the Trainer's own Python API reads the int 1 as one batch. Trying int first
        # keeps both meanings: 1 is one batch, 1.0 or 0.25 a fraction.
        for stage in ("train", "val", "test", "predict"):
            action = parser._option_string_actions.get(f"--trainer.limit_{stage}_batches")
            if action is not None and hasattr(action, "_typehint"):
                action._typehint = int | float | None
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
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
        parser.add_lightning_class_args(ValidationSchedule, "validation_schedule")
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

    # --- parsing ------------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle the run folder and the checkpoint before anything is built."""
        super().parse_arguments(parser, args)
        FashionMNISTCLI.debug = bool(self.config.get("debug"))
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        self.checkpoint: dict[str, Any] | None = None
        self.resumes_run = False
        sub = self.config.get("subcommand")
        if sub in TRAINER_SUBCOMMANDS:
            self._settle_run(sub, self.config[sub])
        elif sub in STUDIES:
            self._settle_logger(self.config[sub])

    @staticmethod
    def _settle_logger(cfg: Namespace) -> Namespace | None:
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

    def _settle_run(self, sub: str, cfg: Namespace) -> None:
        init = self._settle_logger(cfg)
        check_plain_file_name(cfg.prediction_writer.filename, "--prediction_writer.filename")
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path in ("best", "last") and (sub != "fit" or ckpt_path == "last"):
            if init is None or "save_dir" not in init:
                raise ConfigError(f"--ckpt_path {ckpt_path} needs a TensorBoardLogger in the config to find the run.")
            cfg.ckpt_path = str(find_run_checkpoint(Path(init.save_dir) / init.name, ckpt_path))
        elif ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
            raise ConfigError(f"--ckpt_path {ckpt_path} is not supported by fit; use `last` or a checkpoint's path.")
        self.checkpoint = load_checkpoint(cfg.ckpt_path)
        self._check_architecture(cfg)
        self._check_normalization(cfg)
        run = run_dir_of_checkpoint(Path(cfg.ckpt_path))
        if run is not None and init is not None and "save_dir" in init:
            # Continue (fit) or evaluate (the rest) in the checkpoint's own run folder.
            init.save_dir, init.name, init.version = str(run.parent.parent), run.parent.name, run.name
            self.resumes_run = sub == "fit"

    def _check_architecture(self, cfg: Namespace) -> None:
        """Refuse a checkpoint whose network is not the config's, before it could be used silently."""
        saved = (self.checkpoint or {}).get("hyper_parameters", {}).get("model")
        wanted = cfg.model.get("model")
        if not isinstance(saved, dict) or wanted is None:
            return
        wanted = wanted.as_dict() if isinstance(wanted, Namespace) else wanted

        def describe(model: dict) -> str:
            args = json.loads(json.dumps(model.get("init_args") or {}, default=str))
            return (
                f"{model.get('class_path', '?').rsplit('.', 1)[-1]}({', '.join(f'{k}={v}' for k, v in args.items())})"
            )

        if describe(saved) != describe(wanted):
            raise CheckpointError(
                f"checkpoint {cfg.ckpt_path} holds a {describe(saved)}, but the config builds a {describe(wanted)}. "
                "Use the config the checkpoint was trained with (its run folder's config.yaml)."
            )

    def _check_normalization(self, cfg: Namespace) -> None:
        """Refuse a checkpoint trained on differently normalised inputs: its predictions would be wrong, silently."""
        saved = ((self.checkpoint or {}).get("datamodule_hyper_parameters") or {}).get("normalization")
        wanted = (cfg.get("data") or {}).get("normalization")
        if saved is None or wanted is None or saved == wanted:
            return
        raise CheckpointError(
            f"checkpoint {cfg.ckpt_path} was trained with --data.normalization {saved}, but the config gives "
            f"{wanted}. Use the config the checkpoint was trained with (its run folder's config.yaml), or "
            f"--data.normalization {saved}."
        )

    def _parse_ckpt_path(self) -> None:
        """Nothing: the config's model is used, and checked against the checkpoint in :meth:`_settle_run`.

        LightningCLI would merge the checkpoint's hyper-parameters into the config, silently replacing
        the configured network and options (``--model.tta_flip false`` would be ignored at test).
        """

    def _set_seed(self) -> None:
        if self.config.get("subcommand") in TRAINER_SUBCOMMANDS:
            super()._set_seed()

    # --- building -----------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Fall back from bf16 to 32-true on CPUs that would only emulate it (see :mod:`.precision`)."""
        sub = self.config.get("subcommand")
        if sub not in TRAINER_SUBCOMMANDS:
            return
        cfg = self.config[sub]
        if cfg.get("bf16_fallback", True):
            cfg.trainer.precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))

    def instantiate_classes(self) -> None:
        """Build model, data, callbacks and Trainer; a value they refuse is a config error."""
        if self.config.get("subcommand") not in TRAINER_SUBCOMMANDS:
            return
        try:
            super().instantiate_classes()
        except FashionMNISTError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"invalid configuration: {_first_line(err)}. Fix it in the config or on the command line."
            ) from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with atomic checkpoint writes unless the config names its own CheckpointIO."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.resumed = self.resumes_run
        return trainer

    # --- running ------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        """Run a tool, or a Trainer stage with its checks first and its run folder cleaned up if it fails."""
        if subcommand in TOOLS:
            self.result = TOOLS[subcommand].run(self.config[subcommand])
            return
        if subcommand in STUDIES:
            self.result = self._run_study(subcommand)
            return
        self._check_before_run(subcommand)
        run_dir = trainer_run_dir(self.trainer)
        created = [p for p in _parents_to_create(run_dir)] if run_dir else []
        before = snapshot(run_dir) if run_dir else set()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if run_dir is not None and self.trainer.is_global_zero:
                _clean_up_failed_run(run_dir, created, before)
            raise

    def _run_study(self, subcommand: str) -> Path:
        """Hand the study its fit command line: the resolved fit config as YAML, the study options apart."""
        cfg = self.config[subcommand].clone()
        options = Namespace({k: cfg.get(k) for k in STUDY_OPTIONS if k in cfg})
        for key in (*options.keys(), "config"):
            if key in cfg:
                del cfg[key]
        fit_yaml = self._subcommand_parsers["fit"].dump(cfg, skip_none=False)
        command = " ".join(["python -m fmnist_lightning", *self.argv])
        out = STUDIES[subcommand].run(["--config", fit_yaml], options, command)
        print((out / "results.md").read_text())
        print(f"Written to {out}/")
        return out

    def _check_before_run(self, subcommand: str) -> None:
        """What can be checked before the run folder exists: optimizer, scheduler, checkpoint, log folder."""
        if subcommand == "fit":
            self._check_optimizer()
        if self.checkpoint is not None:
            _check_state_dict(self.model, self.checkpoint, self._get(self.config, "ckpt_path"))
        run_dir = trainer_run_dir(self.trainer)
        if run_dir is not None:
            check_writable(run_dir, "log folder")
        self.datamodule.prepare_data()  # finds (or stages) the data files now, not inside the run

    def _check_optimizer(self) -> None:
        task = self.model
        if not isinstance(task, ClassificationTask):
            return
        try:
            optimizer = task.optimizer_factory(task.parameters())
            if task.scheduler_factory is not None:
                steps = {"total_steps": 1} if needs_total_steps(task.scheduler_factory) else {}
                task.scheduler_factory(optimizer, **steps)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(
                f"model.optimizer / model.lr_scheduler: {_first_line(err)}. Fix the value in the config or on the "
                "command line."
            ) from err

    # --- telling the user what happened -------------------------------------------------------
    def after_fit(self) -> None:
        """Where the run went, its best checkpoint, and what to run next."""
        run = trainer_run_dir(self.trainer)
        if not self.trainer.is_global_zero or run is None:
            return
        lines = [f"Run folder: {run}"]
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "")
        if best:
            lines.append(f"Best checkpoint: {best} (val/acc {float(ckpt.best_model_score):.4f})")
        if getattr(ckpt, "last_model_path", ""):
            lines.append(f"Last checkpoint: {ckpt.last_model_path} (epochs trained: {self.trainer.current_epoch})")
        if best:
            config = run / "config.yaml"
            lines.append(f"Test it:      python -m fmnist_lightning test --config {config} --ckpt_path {best}")
        if isinstance(self.trainer.logger, TensorBoardLogger):
            lines.append(f"Curves:       tensorboard --logdir {self.trainer.logger.save_dir}")
        print("\n".join(lines))

    def after_validate(self) -> None:
        """The validation metrics."""
        metrics = self.trainer.callback_metrics
        if self.trainer.is_global_zero and "val/acc" in metrics:
            print(f"Validation accuracy {float(metrics['val/acc']):.4f}, loss {float(metrics['val/loss']):.4f}")

    def after_test(self) -> None:
        """The test accuracy and macro-F1, and where the report is."""
        if not self.trainer.is_global_zero:
            return
        report = next((c for c in self.trainer.callbacks if isinstance(c, TestReport)), None)
        if report is not None and report.report_dir is not None:
            m = report.metrics
            print(
                f"Test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {m['num_test_images']:,} images"
                f"\nReport: {report.report_dir}"
            )
        elif "test/acc" in self.trainer.callback_metrics:
            metrics = self.trainer.callback_metrics
            print(f"Test accuracy {float(metrics['test/acc']):.4f}, macro-F1 {float(metrics['test/f1']):.4f}")

    def after_predict(self) -> None:
        """Where the predictions went."""
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionCSVWriter)), None)
        if self.trainer.is_global_zero and writer is not None and writer.path is not None:
            print(f"Predictions: {writer.path}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parents_to_create(run_dir: Path) -> list[Path]:
    """``run_dir`` and its ancestors that do not exist yet (what a run would create)."""
    missing = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _clean_up_failed_run(run_dir: Path, created: list[Path], before: set[Path]) -> None:
    """Leave no half-made run: remove what a failed command made, unless it saved a checkpoint to resume."""
    if created and run_dir in created:
        if not any(run_dir.rglob("*.ckpt")):
            for path in created:  # innermost first: the run folder, then parents made for it
                if path == run_dir:
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
        return
    remove_new(run_dir, before)


def _check_state_dict(task: LightningModule, checkpoint: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose weights do not fit the configured network (names or shapes)."""
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    if expected == saved:
        return
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shapes = [
        f"{k} {saved[k]} vs {expected[k]}" for k in sorted(expected.keys() & saved.keys()) if saved[k] != expected[k]
    ]
    details = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shapes differ: {', '.join(shapes[:3])}" if shapes else "",
        )
        if part
    )
    raise CheckpointError(
        f"checkpoint {path} does not fit the configured network ({details}). Use the config it was trained with "
        "(its run folder's config.yaml)."
    )


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


def _make_cli(cli_class: type[FashionMNISTCLI], args: Any) -> FashionMNISTCLI:
    return cli_class(
        ClassificationTask,
        FashionMNISTDataModule,
        save_config_callback=RunConfigSaver,
        parser_class=CLIParser,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=42,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "python -m fmnist_lightning", "description": __doc__.splitlines()[0]},
        args=args,
    )


def parse_fit_config(fit_args: list[str]) -> Namespace:
    """The resolved ``fit`` configuration of a command line, e.g. ``["--config", "configs/fast.yaml"]``.

    Nothing is instantiated, trained or written; jsonargparse's errors still exit as the CLI does.

    Returns:
        The ``fit`` subcommand's namespace (``cfg.trainer.logger.init_args.save_dir``, ``cfg.data``...).
    """
    return _make_cli(_ParseOnlyCLI, ["fit", *fit_args]).config.fit


def _quiet() -> None:
    """Silence what is not the user's business: Lightning's advert and a deprecation inside Lightning."""

    class _NoAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # kfold/sweep train each cell through LightningCLI(args=...) while sys.argv holds the study's command.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")


def main(args: list[str] | dict[str, Any] | None = None) -> Any:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks).

    Returns:
        The LightningCLI for ``fit``/``validate``/``test``/``predict``; a tool's result otherwise
        (``compare``: the folder it wrote).

    Bad input ends with one line on stderr and exit status 1 (2 for jsonargparse's own errors,
    such as an unknown key); ``--debug`` or ``FMNIST_LIGHTNING_DEBUG=1`` raises instead.
    """
    _quiet()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls/convs on GPUs that have them
    FashionMNISTCLI.debug = False
    debug = bool(os.environ.get(DEBUG_ENV))
    default_hook = threading.excepthook
    # TensorBoard writes from a thread: on a full disk it fails there too, after the main error is said.
    threading.excepthook = lambda a: None if isinstance(a.exc_value, OSError) and not debug else default_hook(a)
    try:
        cli = _make_cli(FashionMNISTCLI, args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit("fmnist_lightning: interrupted")
    except Exception as err:
        if FashionMNISTCLI.debug or os.environ.get(DEBUG_ENV):
            raise
        if isinstance(err, FashionMNISTError):
            sys.exit(f"fmnist_lightning: error: {err}")
        if isinstance(err, OSError) and err.strerror:  # a full disk, a folder that went read-only...
            where = f" ({err.filename})" if err.filename else ""
            sys.exit(
                f"fmnist_lightning: error: {err.strerror}{where}. Free some space or fix the folder, then run again "
                "(an interrupted fit resumes with --ckpt_path last)."
            )
        sys.exit(
            f"fmnist_lightning: error: {type(err).__name__}: {_first_line(err)} "
            f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
        )
    return getattr(cli, "result", cli)
