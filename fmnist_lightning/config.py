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

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from torch import nn

from fmnist_lightning import models
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
from fmnist_lightning.progress import EpochSummary
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

#: The package's networks, the choices ``--help`` shows for ``--model.model`` (any nn.Module class_path works).
MODEL_CHOICES = tuple(
    name
    for name in models.__all__
    if isinstance(getattr(models, name), type) and issubclass(getattr(models, name), nn.Module)
)
MODEL_HELP = (
    f"The network: one of {', '.join(MODEL_CHOICES)} (fmnist_lightning.models; ConvNet also by preset: "
    f"{', '.join(models.PRESETS)}), or the class_path of any importable nn.Module. "
    "`--model.model.help TinyVGG` lists a network's arguments."
)
OPTIMIZER_HELP = (
    "Builds the optimizer, a torch.optim class by name or class_path (default: Adam, lr 1e-3); also "
    "`--optimizer SGD --optimizer.lr 0.1`. `--model.optimizer.help SGD` lists its arguments."
)
SCHEDULER_HELP = (
    "Builds the learning-rate scheduler, a torch.optim.lr_scheduler class by name or class_path (default: "
    "none, a constant rate); also `--lr_scheduler StepLR --lr_scheduler.step_size 5`. "
    "`--model.lr_scheduler.help StepLR` lists its arguments."
)
#: The package's own help for options whose help would otherwise be another package's docstring.
OPTION_HELP = {
    "model.model": MODEL_HELP,
    "model.optimizer": OPTIMIZER_HELP,
    "model.lr_scheduler": SCHEDULER_HELP,
    "ckpt_path": CKPT_HELP,
    "trainer.limit_train_batches": "Training batches per epoch: an int counts batches, a float is a fraction.",
    "trainer.precision": "32-true, 16-mixed, bf16-mixed... (bf16 without CPU support: see --bf16_fallback).",
}
#: What ``--help`` says before the options (see :class:`RunHelpFormatter`).
HELP_DESCRIPTION = (
    "Each option is also a key of a --config YAML file (--print_config shows them all, set). A class "
    "option X takes a name or class_path, and --X.help NAME lists its arguments; --GROUP CONFIG reads a "
    "group (--trainer, --data...) from a file."
)
#: jsonargparse's help of each group's own config file option (``--trainer CONFIG``...).
GROUP_CONFIG_HELP = "Path to a configuration file."
#: Lightning's own groups, whose options --help names, showing only :data:`KEY_OPTIONS` in full.
COMPACT_GROUPS = ("trainer.", "checkpoint.", "early_stopping.", "lr_monitor.")
KEY_OPTIONS = frozenset(
    {
        "trainer.max_epochs",
        "trainer.accelerator",
        "trainer.devices",
        "trainer.precision",
        "trainer.fast_dev_run",
        "trainer.limit_train_batches",
        "trainer.logger",
        "trainer.callbacks",
        "checkpoint.monitor",
        "checkpoint.save_top_k",
        "early_stopping.enabled",
        "early_stopping.monitor",
        "early_stopping.patience",
    }
)
#: How long an option's help may be in ``--help`` (its first sentence, cut at a word).
HELP_CHARS = 80


#: Set by the command line's ``--debug`` for the command it runs.
DEBUG = False
#: The seeds numpy (and so ``seed_everything``) accepts: 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1


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
        # Lightning's table of every module (with a FLOPs column of zeros on a CPU): the epoch summary's
        # header names the network and its parameters instead; --trainer.enable_model_summary true shows it.
        "enable_model_summary": False,
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


class RunHelpFormatter(DefaultHelpFormatter):
    """``--help`` a person reads (under 300 lines): a one-line usage, each option once, briefly.

    jsonargparse's own help lists every option twice (usage, then options), each with the whole first
    paragraph of its docstring, its type and, for class types, every subclass imported in the process:
    over 1,600 lines for ``fit``, 600 of them ``nn.Module`` subclasses of torch, torchvision and
    torchmetrics. Here each option is a plain ``argparse.Action`` built from its public attributes,
    with its first sentence and default, or the package's own text (:data:`OPTION_HELP`: the
    package's networks as the choices of ``--model.model``, what ``--ckpt_path best|last`` means).
    Lightning's own groups (:data:`COMPACT_GROUPS`: the Trainer, ModelCheckpoint, EarlyStopping,
    LearningRateMonitor), documented by Lightning, show their most used options in full
    (:data:`KEY_OPTIONS`) and the rest by name. Parsing is unchanged: every option and any importable
    class_path still work, and ``--model.model.help TinyVGG`` shows a class's arguments.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 6, width: int | None = None
    ) -> None:
        # Each help starts on the line below its option, indented a little: a help takes one full
        # line, where argparse's column 24 wrapped it into two or three.
        super().__init__(prog, indent_increment, max_help_position, width)
        self.names_only: list[str] = []  # the options of a compact group, listed at the section's end

    def add_usage(self, usage: str | None, actions: Any, groups: Any, prefix: str | None = None) -> None:
        """One line: ``usage: PROG [options]`` (the options follow, each once)."""
        super().add_usage(usage or "%(prog)s [options]", [], [], prefix)

    def add_argument(self, action: argparse.Action) -> None:
        """Add ``action`` as a plain action with a short help, or by name only (see the class docstring).

        Left out, as the description says once for all: the ``--X.help CLASS`` option of each
        class-typed option but ``--model.model.help``, each group's ``--GROUP CONFIG`` (a file for the
        group), and the links between options (the class names the data module hands to the
        callbacks), which are not options.
        """
        first = str(next(iter(action.option_strings), ""))
        if (
            action.help == argparse.SUPPRESS
            or not first.startswith("-")  # a link
            or (action.dest.endswith(".help") and action.dest != "model.model.help")
            or (action.dest != "config" and action.help == GROUP_CONFIG_HELP)
        ):
            return
        if action.dest.startswith(COMPACT_GROUPS) and action.dest not in KEY_OPTIONS:
            self.names_only.append(first)
            return
        if action.dest == "model.model.help":
            text = "Show the arguments of a network and exit, e.g. `--model.model.help TinyVGG`."
        else:
            text = OPTION_HELP.get(action.dest) or short_help(action.help)
        default = action.default
        shown = isinstance(default, bool | int | float | str) and action.nargs != 0
        plain = argparse.Action(
            action.option_strings,
            action.dest,
            nargs=action.nargs,
            default=default if shown else argparse.SUPPRESS,
            choices=action.choices,
            required=action.required,
            help=text.replace("%", "%%"),
            metavar=action.metavar,
        )
        super().add_argument(plain)

    def end_section(self) -> None:
        """End a group, naming the options of a compact group that were not shown in full."""
        if self.names_only:
            self.add_text(f"Also: {', '.join(self.names_only)} (see Lightning's documentation of the class).")
            self.names_only = []
        super().end_section()


def short_help(text: str | None) -> str:
    """The first sentence of an option's help, at most :data:`HELP_CHARS` long (cut at a word)."""
    text = " ".join((text or "").split())
    if text.startswith("%"):  # jsonargparse's own templates (--print_config...)
        return text
    sentence = re.split(r"(?<=[a-z0-9)`'\"][.;])\s", text, maxsplit=1)[0].rstrip(";")
    if len(sentence) > HELP_CHARS:
        sentence = sentence[:HELP_CHARS].rsplit(" ", 1)[0] + "..."
    return sentence


class ConfigParser(LightningArgumentParser):
    """jsonargparse's parser, with its errors on one line instead of the whole usage (100+ lines).

    Attributes:
        given: What is being parsed (a command line, or a configuration object), set by
            :class:`RunCLI` so that an error can name the option at fault (see :func:`explain`).
    """

    given: Any = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One line on stderr and exit status 2 (jsonargparse's behaviour otherwise)."""
        if not self.exit_on_error or debugging():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"fmnist_lightning: error: {explain(message, self.given)} (options: {prog} --help)\n")
        self.exit(2)


def explain(message: str, given: Any = None) -> str:
    """A parser error in one line, naming the option and the cause where jsonargparse buries them.

    jsonargparse reports an empty config file as "Unexpected config", ``nan`` for a float as a
    600-character dump of the union types it tried, and a class that cannot be imported as a list
    of subtypes with the cause inside; ``given`` (what was parsed) names the culprit.
    """
    for file in config_files(given):
        if _yaml_of(file, missing=False) is None:
            return f"config file {file} is empty: write the run's options in it (see configs/*.yaml), or leave it out"
    for key, value, where in given_values(given):
        if non_finite_text(value) and str(value) in message:
            return f"--{key}{where}: {value} is not a finite number; give a finite value"
    cause = re.search(r"Problem with given class_path '([^']+)':\s*(\S[^\n]*)", message)
    key = re.search(r'Parser key "([^"]+)"', message)
    if cause and key:
        return f"--{key.group(1)}: cannot use {cause.group(1)}: {cause.group(2).strip()}"
    return " ".join(message.split())


def non_finite_text(value: Any) -> bool:
    """Whether ``value`` is text that reads as NaN or an infinity (``nan``, ``-inf``, ``1e999``, ``.nan``...)."""
    if not isinstance(value, str):
        return False
    text = value.strip().lower()
    if text in (".nan", ".inf", "+.inf", "-.inf"):  # YAML's spellings
        return True
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def config_files(given: Any) -> list[str]:
    """The ``--config`` files of a command line (none for a configuration object)."""
    if not isinstance(given, list | tuple):
        return []
    files = []
    for i, arg in enumerate(given):
        if arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(given):
            files.append(given[i + 1])
    return [f for f in files if Path(f).is_file()]  # --config also takes inline YAML


def _yaml_of(file: str, missing: Any = None) -> Any:
    """A config file's YAML (``missing`` if it cannot be read or parsed)."""
    try:
        return yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return missing


def given_values(given: Any) -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, value, where)`` of every value given to parse: command line, its config files, a dict.

    ``where`` is empty for the command line and a dict, `` (in FILE)`` for a config file.
    """
    if isinstance(given, Mapping | Namespace):
        yield from ((key, value, "") for key, value in leaves(given))
        return
    if not isinstance(given, list | tuple):
        return
    for file in config_files(given):
        yield from ((key, value, f" (in {file})") for key, value in leaves(_yaml_of(file)))
    for i, arg in enumerate(given):
        if not arg.startswith("--") or arg.startswith("--config"):
            continue
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(given) and not given[i + 1].startswith("--"):
            key, value = arg[2:], given[i + 1]
        else:
            continue
        yield key.rstrip("+"), value, ""


def leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a configuration (namespaces, dicts, lists; ``[i]`` for items)."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not str(k).startswith("__"):  # jsonargparse's own entries (__path__...)
                yield from leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from leaves(item, f"{key}[{i}]")
    else:
        yield key, value


def check_numbers(cfg: Namespace) -> None:
    """Refuse NaN and infinite numbers anywhere in a parsed configuration, and a seed numpy would refuse.

    YAML reads ``.nan``, ``.inf`` and ``1e999`` as floats, which every type check lets through: a NaN
    learning rate trains a network to NaN, a NaN ``label_smoothing`` passes ``0 <= x < 1`` checks
    written the other way round. Here they are refused by name, wherever the number came from.

    Raises:
        ConfigError: Naming the option.
    """
    for key, value in leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{key}: {value} is not a finite number; give a finite value.")
    seed = cfg.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"--seed_everything {seed} is out of range: give a seed from 0 to {MAX_SEED}, or true for a random one."
        )


#: The configs shipped with the package (``configs/`` of the source tree, package data of a wheel).
CONFIG_DIRS = (Path(__file__).parent / "configs", Path(__file__).parent.parent / "configs")


def shipped_configs(kind: str = "") -> dict[str, Path]:
    """The shipped configs by name (``tinyvgg`` -> ``.../configs/tinyvgg.yaml``); ``kind="sweeps"`` the sweep files.

    A wheel holds them as package data in ``fmnist_lightning/configs/``; a source checkout (an
    editable install) has them in ``configs/`` beside the package. The first that exists is used.
    """
    folder = next((d / kind for d in CONFIG_DIRS if (d / kind).is_dir()), None)
    return {} if folder is None else {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def shipped_config(name: str, option: str = "--config", kind: str = "") -> str:
    """``name`` itself if it is a path (or inline YAML), else the shipped config of that name.

    So ``--config tinyvgg`` works from any folder and from an installed wheel, where
    ``configs/tinyvgg.yaml`` is not at hand; an existing file or folder of that name comes first.

    Raises:
        ConfigError: For a bare name that is neither a file nor a shipped config, listing the names.
    """
    if Path(name).exists() or not re.fullmatch(r"[\w.-]+", name) or name.endswith((".yaml", ".yml", ".json")):
        return name
    configs = shipped_configs(kind)
    if name in configs:
        return str(configs[name])
    raise ConfigError(
        f"{option} {name}: no such file, nor a shipped config of that name; the shipped ones are "
        f"{', '.join(configs) or 'missing from this installation'}."
    )


def shipped_config_args(args: Sequence[str]) -> list[str]:
    """A command line with each ``--config NAME`` of a shipped config spelled as its path (:func:`shipped_config`)."""
    out = [str(a) for a in args]
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + shipped_config(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = shipped_config(out[i + 1])
    return out


#: LightningCLI's ``--optimizer``/``--lr_scheduler`` options, as the task's options they stand for.
SHORTCUTS = {"optimizer": "model.optimizer", "lr_scheduler": "model.lr_scheduler"}


def shortcut_args(args: Sequence[str]) -> list[str]:
    """A command line with LightningCLI's shortcuts spelled as the task's options.

    ``--optimizer SGD --optimizer.lr 0.1`` becomes ``--model.optimizer SGD --model.optimizer.lr 0.1``
    (``--lr_scheduler...`` likewise): the task takes its optimizer and scheduler as callables
    (``--model.optimizer``), so LightningCLI's own options for them do not exist here, but the
    spelling its users know still works, and the saved config holds the one true key.
    """
    out = []
    for arg in args:
        arg = str(arg)
        for short, full in SHORTCUTS.items():
            if arg == f"--{short}" or arg.startswith((f"--{short}.", f"--{short}=")):
                arg = f"--{full}{arg[len(short) + 2 :]}"
                break
        out.append(arg)
    return out


def nested(overrides: Mapping[str, Any]) -> Namespace:
    """Dotted keys (``model.optimizer.init_args.lr``) as the nested namespace a parser merges.

    The values are copied: the parser turns the mappings it merges (a ``class_path`` and its
    ``init_args``) into namespaces in place, which would change the caller's overrides.
    """
    out = Namespace()
    for key, value in copy.deepcopy(dict(overrides)).items():
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
        description = HELP_DESCRIPTION
        HELD_INFO.hold()  # "Seed set to 42", "GPU available"...: said once the run starts, not before its error
        try:
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
                    "formatter_class": RunHelpFormatter,
                },
                args=args,  # type: ignore[arg-type]
                run=False,
            )
        except BaseException:
            HELD_INFO.drop()
            raise
        if not build:
            HELD_INFO.drop()  # nothing runs on this parse: its seed line would be the only noise

    # --- the parser ---------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The package's callbacks as configurable groups, links, and the run's own options."""
        add_run_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (a command line or an object), merge the overrides, then settle the run."""
        is_object = isinstance(args, Mapping | Namespace)
        parser.given = args if is_object else list(args)  # for the parser's errors (see explain)
        # A copy: jsonargparse turns a dict's nested class dicts (callbacks...) into namespaces in place,
        # which would change a study's plan (its folder's hash) after its first training.
        if not is_object:
            args = shortcut_args(shipped_config_args(args))
            parser.given = args
        config = parser.parse_object(copy.deepcopy(args)) if is_object else parser.parse_args(args)
        if self.overrides:
            parser.given = self.overrides
            # The base positionally: it is `cfg_base` in jsonargparse 4.40, `namespace` in later releases.
            config = parser.parse_object(nested(self.overrides), config)
        parser.given = None
        check_numbers(config)
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
        except (ValueError, TypeError, ImportError) as err:
            raise ConfigError(instantiation_message(err)) from err

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
        trainer.callbacks.insert(0, ReleaseHeldInfo())  # first: the held lines come before the model summary
        return trainer

    def dump(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what ``config.yaml`` holds)."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))


def instantiation_message(err: BaseException) -> str:
    """One line for a class that could not be built: the root cause, not jsonargparse's wrapping of it.

    jsonargparse wraps a failing class in "Does not validate against any of the Union subtypes" and
    "Problem with given class_path ...", with the cause (``RichProgressBar`` needs ``rich``...) only
    in the chain of exceptions; the cause is what the user can act on.
    """
    chain = [err]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    found = re.search(r"class_path '([^']+)'", " ".join(str(e) for e in chain))
    cause = first_line(root)
    if isinstance(root, ImportError):  # a class whose package is missing (RichProgressBar without rich...)
        stop = "" if cause.endswith(".") else "."
        hint = (
            "" if "install" in cause.lower() else " Install the missing package, or take the class out of the config."
        )
        return f"cannot build {found.group(1) if found else 'a configured class'}: {cause}{stop}{hint}"
    what = f"{found.group(1)}: " if found and root is not err else ""
    return f"invalid configuration: {what}{cause}. Fix it in the config or on the command line."


class HeldLightningInfo(logging.Filter):
    """Lightning's INFO lines, held from the start of a run's build until its Trainer starts.

    Building a run prints "Seed set to 42", "GPU available: ...", "TPU available: ..." (Lightning's
    rank-zero logger, at INFO); a value refused after that (a learning rate the optimizer refuses,
    missing data) would follow them, and a refused command must say one line only. So the lines
    wait: :class:`ReleaseHeldInfo` prints them when the Trainer starts its job, and a failure drops
    them. Warnings and errors are never held.
    """

    LOGGERS = (
        "lightning.fabric.utilities.seed",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
    )

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep an INFO (or DEBUG) record back while holding; let everything else through."""
        if self.holding and record.levelno < logging.WARNING:
            self.held.append(record)
            return False
        return True

    def hold(self) -> None:
        """Start holding (anything still held from an earlier, failed build is dropped)."""
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)
        self.held, self.holding = [], True

    def release(self) -> None:
        """Stop holding and print what was held, in order, through the loggers it came from."""
        held, self.held, self.holding = self.held, [], False
        for record in held:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        """Stop holding and forget what was held."""
        self.held, self.holding = [], False


#: The one hold of the process: runs are built one after another.
HELD_INFO = HeldLightningInfo()


class ReleaseHeldInfo(Callback):
    """Lightning's held INFO lines when the Trainer starts its job: printed under ``--debug``, else dropped.

    The epoch lines' header (:class:`~fmnist_lightning.progress.EpochSummary`) says the device,
    the precision and the seed in one line; Lightning's own lines are there when asked for.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The run starts: print what building it said (``--debug``) or forget it."""
        if debugging():
            HELD_INFO.release()
        else:
            HELD_INFO.drop()

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """The job failed before it started: its error is the one line to print."""
        HELD_INFO.drop()


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
    parser.add_lightning_class_args(EpochSummary, "epoch_summary")
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
