"""The command line: ``python -m fmnist_lightning SUBCOMMAND ...`` (or ``fmnist-lightning SUBCOMMAND ...``).

A thin face over the library: ``fit``, ``validate``, ``test`` and ``predict`` call
:mod:`fmnist_lightning.training`, ``kfold`` and ``sweep`` :mod:`fmnist_lightning.studies`, ``compare``,
``export`` and ``robustness`` their modules; this module parses the command line, prints what happened and turns
errors into one line.

A run lives in one folder, ``<save_dir>/<name>/version_N`` (the logger's name defaults to the config
file's name): ``fit --ckpt_path last`` (or a checkpoint of a run) resumes that run in place, and
``validate``/``test``/``predict`` with ``--ckpt_path best|last`` or a run's checkpoint log into that
run's folder. Bad input ends in one line on stderr and a non-zero exit, before any run folder is
made; ``--debug`` (or ``FMNIST_LIGHTNING_DEBUG=1``) shows the traceback instead.
"""

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ArgumentParser

from fmnist_lightning import compare, config, robustness, studies, training
from fmnist_lightning.config import DEBUG_ENV, PROG, ConfigParser, RunCLI, first_line
from fmnist_lightning.errors import ConfigError, FashionMNISTError
from fmnist_lightning.export import export_checkpoint, run_checkpoint
from fmnist_lightning.signals import Interrupted, stop_on_signals


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its one-line help and what runs it (with the arguments after its name)."""

    help: str
    run: Callable[[list[str], str], Any]


# --- the Trainer's jobs ----------------------------------------------------------------------


def _fit(argv: list[str], prog: str) -> training.RunResult:
    result = training.fit(argv, prog=prog)
    if not result.trainer.is_global_zero or result.run_dir is None:
        return result
    lines = [f"Run folder: {result.run_dir}"]
    if result.resumed:
        lines.append(f"Resumed from: {result.config.get('ckpt_path')}")
    if result.best_checkpoint is not None:
        lines.append(f"Best checkpoint: {result.best_checkpoint} (val/acc {result.best_score:.4f})")
    if result.last_checkpoint is not None:
        lines.append(f"Last checkpoint: {result.last_checkpoint} (epochs trained: {result.epochs})")
    if result.best_checkpoint is not None:
        config_file = result.run_dir / "config.yaml"
        lines.append(f"Test it:      {PROG} test --config {config_file} --ckpt_path {result.best_checkpoint}")
    save_dir = result.config["trainer"]["logger"].get("init_args", {}).get("save_dir")
    if save_dir:
        lines.append(f"Curves:       tensorboard --logdir {save_dir}")
    print("\n".join(lines))
    return result


def _validate(argv: list[str], prog: str) -> training.EvaluationResult:
    result = training.validate(argv, prog=prog)
    metrics = result.metrics
    if result.trainer.is_global_zero and "val/acc" in metrics:
        print(f"Checkpoint: {result.checkpoint}")
        print(f"Validation accuracy {metrics['val/acc']:.4f}, loss {metrics['val/loss']:.4f}")
    return result


def _test(argv: list[str], prog: str) -> training.EvaluationResult:
    result = training.test(argv, prog=prog)
    if result.trainer.is_global_zero and result.metrics.get("accuracy") is not None:
        m = result.metrics
        print(f"Checkpoint: {result.checkpoint}")
        line = f"Test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
        if result.report_dir is not None:
            line += f" on {m['num_test_images']:,} images\nReport: {result.report_dir}"
        print(line)
    return result


def _predict(argv: list[str], prog: str) -> Path | None:
    path = training.predict(argv, prog=prog)
    if path is not None:
        print(f"Predictions: {path}")
    return path


class RobustnessCLI(RunCLI):
    """The ``test`` configuration of a checkpoint, with the robustness job's options beside it."""

    def __init__(self, argv: list[str], prog: str) -> None:
        super().__init__(argv, stage="test", build=False, prog=prog)

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        """The run's arguments, then the job's (:class:`~fmnist_lightning.robustness.RobustnessOptions`)."""
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(robustness.RobustnessOptions, nested_key=None, instantiate=False)


ROBUSTNESS_OPTIONS = tuple(f.name for f in fields(robustness.RobustnessOptions))


def _robustness(argv: list[str], prog: str) -> robustness.RobustnessResult:
    parsed = RobustnessCLI(argv, prog)
    if not parsed.config.get("ckpt_path"):
        raise ConfigError("robustness needs --ckpt_path: best, last or a checkpoint written by fit.")
    options = robustness.RobustnessOptions(**{k: parsed.config.get(k) for k in ROBUSTNESS_OPTIONS})
    base = {k: v for k, v in parsed.dump().items() if k not in ROBUSTNESS_OPTIONS}
    result = robustness.evaluate_robustness(base, options=options, prog=prog)
    print(f"Checkpoint: {result.checkpoint}")
    print(result.summary_table)
    for note in result.notes:
        print(f"Skipped: {note}")
    print(f"Written to {result.report_dir}/ in {result.seconds:.1f} s")
    return result


# --- studies ----------------------------------------------------------------------------------


class StudyCLI(RunCLI):
    """The ``fit`` configuration of a study's trainings, with the study's own options beside it."""

    def __init__(self, argv: list[str], prog: str, add: Callable[[ArgumentParser], None]) -> None:
        self._add_study_arguments = add
        super().__init__(argv, stage="fit", build=False, prog=prog)

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        """The run's arguments, then the study's."""
        super().add_arguments_to_parser(parser)
        self._add_study_arguments(parser)


def _study_arguments(parser: ArgumentParser) -> None:
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
    parser.add_argument("--heartbeat_interval", type=int, default=10, help="Seconds between a training's heartbeats.")
    parser.add_argument(
        "--grace_period", type=int, default=30, help="Seconds without a heartbeat before a training is redone."
    )
    parser.add_argument(
        "--progress_bar",
        action="store_true",
        help="A live progress bar over the cells (done of all, best val/acc, time left) instead of a line per cell.",
    )


def _sweep_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--sweep", type=str, required=True, help="The sweep file, or the name of a shipped one (configs/sweeps/*.yaml)."
    )
    parser.add_argument(
        "--refit", action="store_true", help="Then train the best point (every ablation arm) and test it."
    )
    _study_arguments(parser)


STUDY_OPTIONS = (
    "num_folds",
    "seeds",
    "jobs",
    "storage",
    "heartbeat_interval",
    "grace_period",
    "progress_bar",
    "sweep",
    "refit",
)


def _study(argv: list[str], prog: str, kind: str) -> Path:
    parsed = StudyCLI(argv, prog, _sweep_arguments if kind == "sweep" else _study_arguments)
    options = {k: parsed.config.get(k) for k in STUDY_OPTIONS if k in parsed.config}
    base = {k: v for k, v in parsed.dump().items() if k not in STUDY_OPTIONS}
    session = studies.StudyOptions(
        jobs=options["jobs"],
        storage=options["storage"],
        heartbeat_interval=options["heartbeat_interval"],
        grace_period=options["grace_period"],
        progress_bar=options["progress_bar"],
        command=" ".join([PROG, kind, *argv]),
    )
    if kind == "kfold":
        out = studies.run_kfold(
            base, options["num_folds"], 1 if options["seeds"] is None else options["seeds"], session
        )
    else:
        sweep = config.shipped_config(options["sweep"], "--sweep", "sweeps")  # a path, or a shipped sweep's name
        out = studies.run_sweep(base, sweep, options["num_folds"], options["seeds"], session, options["refit"])
    print((out / "results.md").read_text())
    print(f"Written to {out}/")
    return out


# --- tools ------------------------------------------------------------------------------------


def _tool_parser(prog: str, description: str) -> ConfigParser:
    return ConfigParser(prog=prog, description=description)


def _compare(argv: list[str], prog: str) -> Path:
    parser = _tool_parser(prog, SUBCOMMANDS["compare"].help)
    parser.add_argument("runs", nargs="+", type=str, help="Run folders (or their report folders), two or more.")
    parser.add_argument("--output", type=str, default="comparison", help="Folder for the results (numbered if taken).")
    cfg = parser.parse_args(argv)
    out = compare.compare_runs([Path(r) for r in cfg.runs], Path(cfg.output))
    print((out / "comparison.md").read_text())
    print(f"Written to {out}/")
    return out


def _export(argv: list[str], prog: str) -> Path:
    parser = _tool_parser(prog, SUBCOMMANDS["export"].help)
    parser.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="The run's config (a file, or a shipped config's name), to find --ckpt_path best or last as test does.",
    )
    parser.add_argument(
        "--ckpt_path",
        type=str,
        required=True,
        help="`best` or `last` (the latest run of --config's name) or a checkpoint written by fit.",
    )
    parser.add_argument("--format", type=Literal["onnx", "torchscript"], default="onnx", help="Export format.")
    parser.add_argument(
        "--output", type=str | None, default=None, help="File to write (default: the checkpoint's name, new suffix)."
    )
    parser.add_argument(
        "--tta_flip", type=bool | None, default=None, help="Build in flip averaging (default: as the checkpoint)."
    )
    parser.add_argument(
        "--temperature",
        type=str | None,
        default=None,
        help="Build in temperature scaling: a temperature.json of `robustness`, `auto` (the latest fitted for this "
        "checkpoint in its run folder) or a number; default none.",
    )
    cfg = parser.parse_args(argv)
    ckpt_path = run_checkpoint(cfg.ckpt_path, cfg.config, prog)
    path = export_checkpoint(ckpt_path, cfg.format, cfg.output, cfg.tta_flip, cfg.temperature)
    scaled = "" if cfg.temperature is None else ", divided by the fitted temperature"
    print(f"Exported ({cfg.format}, raw [0, 1] grey (B, 1, 28, 28) in, logits{scaled} out): {path}")
    return path


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(
        "Train a model (or resume a run with --ckpt_path last); checkpoints and logs in its run folder.", _fit
    ),
    "validate": Subcommand("Evaluate a checkpoint on the validation split of the 60k training images.", _validate),
    "test": Subcommand("Evaluate a checkpoint on the 10k test set and write a report into its run folder.", _test),
    "predict": Subcommand("Predict the test set, or your own images with --data.predict_dir, into a CSV.", _predict),
    "robustness": Subcommand(
        "A checkpoint under 12 corruptions x 5 severities, its calibration and OOD detection, into its run folder.",
        _robustness,
    ),
    "kfold": Subcommand(
        "Train every fold of a stratified k-fold split and tabulate them.", lambda a, p: _study(a, p, "kfold")
    ),
    "sweep": Subcommand(
        "Grid, search or ablation sweep on Optuna: resumable, parallel, with statistics.",
        lambda a, p: _study(a, p, "sweep"),
    ),
    "compare": Subcommand("Compare tested runs: table, chart and McNemar tests.", _compare),
    "export": Subcommand("Export a checkpoint's network to ONNX or TorchScript.", _export),
}  # fmt: skip


def top_parser() -> ConfigParser:
    """The top-level parser: ``--debug``, ``--version`` and the subcommands, each listed with its help."""
    parser = ConfigParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=f"Show tracebacks (also: {DEBUG_ENV}=1).")
    parser.add_argument("--version", action="version", version=f"fmnist_lightning {version('fmnist_lightning')}")
    subcommands = parser.add_subcommands(dest="subcommand")
    for name, sub in SUBCOMMANDS.items():
        # Each subcommand parses its own arguments (see run): listed here for --help and the choice.
        subcommands.add_subcommand(name, ArgumentParser(description=sub.help, add_help=False), help=sub.help)
    return parser


def run(args: Sequence[str] | None = None) -> Any:
    """Run one subcommand in this process; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks).

    Returns:
        What the subcommand's library function returned: ``fit`` a :class:`~fmnist_lightning.training.RunResult`,
        ``validate``/``test`` an :class:`~fmnist_lightning.training.EvaluationResult`, ``predict`` the CSV's
        path, ``robustness`` a :class:`~fmnist_lightning.robustness.RobustnessResult`, ``kfold``/``sweep``/``compare``
        the folder written, ``export`` the file written.

    Raises:
        SystemExit: For bad input: one line on stderr and exit status 1 (2 for the parser's own
            errors, such as an unknown key); with ``--debug`` or ``FMNIST_LIGHTNING_DEBUG=1`` the
            error is raised instead. For SIGTERM or SIGINT: one line saying what was kept and how
            to continue, and exit status 143 or 130 (``128 + signal``, as shells report it).
    """
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    position = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    if position == len(argv) or argv[position] not in SUBCOMMANDS:
        top_parser().parse_args(argv)  # help, version or a one-line error: exits
    top = top_parser().parse_args(argv[: position + 1])
    name, rest = argv[position], argv[position + 1 :]
    config.DEBUG = bool(top.debug)
    debug = config.debugging()
    default_hook = threading.excepthook
    # TensorBoard writes from a thread: on a full disk it fails there too, after the main error is said.
    threading.excepthook = lambda a: None if isinstance(a.exc_value, OSError) and not debug else default_hook(a)
    try:
        with stop_on_signals():
            return SUBCOMMANDS[name].run(rest, f"{PROG} {name}")
    except SystemExit:
        raise
    except Interrupted as err:  # SIGTERM (a scheduler's preemption) or Ctrl-C: say what was kept
        if debug:
            raise
        print(f"fmnist_lightning: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_status) from None
    except KeyboardInterrupt:
        sys.exit("fmnist_lightning: interrupted")
    except Exception as err:
        if debug:
            raise
        if isinstance(err, FashionMNISTError):
            sys.exit(f"fmnist_lightning: error: {err}")
        if isinstance(err, OSError) and err.strerror:  # a full disk, a folder that went read-only...
            where = f" ({err.filename})" if err.filename else ""
            sys.exit(
                f"fmnist_lightning: error: {err.strerror}{where}. Free some space or fix the folder, then run the same "
                "command again."
            )
        sys.exit(
            f"fmnist_lightning: error: {type(err).__name__}: {first_line(err)} "
            f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
        )
    finally:
        threading.excepthook = default_hook
        config.DEBUG = False


def main(args: Sequence[str] | None = None) -> int:
    """The console script and ``python -m fmnist_lightning``: run a subcommand, return exit status 0.

    Bad input ends with one line on stderr and a non-zero exit (see :func:`run`).
    """
    run(args)
    return 0


__all__ = ["SUBCOMMANDS", "main", "run"]
