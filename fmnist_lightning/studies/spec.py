"""What a study trains: sweep files, their points and cells, checked against the run parser before anything runs.

A sweep file (YAML) names config keys with the CLI's dotted names, in one of three forms::

    grid:                                 # every combination, in the order written
      model.optimizer.init_args.lr: [5.0e-3, 1.0e-3, 5.0e-4, 1.0e-4]
      data.batch_size: [32, 64, 128]

    search:                               # distributions, sampled by Optuna
      model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.model.init_args.dropout: {type: float, low: 0.0, high: 0.5, step: 0.05}
      data.batch_size: {type: categorical, choices: [32, 64, 128]}
    n_trials: 20                          # required with search
    sampler: TPESampler                   # optional: any sampler of optuna.samplers, or
                                          # {name: RandomSampler, seed: 0, ...} with its arguments
    pruner: MedianPruner                  # optional: any pruner of optuna.pruners, or
                                          # {name: MedianPruner, n_warmup_steps: 3, ...}: stops a
                                          # point's training early when its val/acc lags

    ablation:                             # a reference and named variants, each a dict of overrides
      reference: {}                       # the config as it is (or overrides of it)
      variants:
        no_augmentation: {data.augment: false}
        no_dropout: {model.model.init_args.dropout: 0.0}

and optionally ``num_folds: K`` (score every point by K-fold cross-validation instead of the fixed
validation split), ``seeds: N`` (training seeds ``s, s+1, ..., s+N-1`` from the config's
``seed_everything``) or ``seeds: [1, 2, 3]`` (the command line's ``--num_folds``/``--seeds`` win),
and ``scoring:``, overrides for the trainings that score points but not for the refit (study 004
scored with 10 epochs per fold and refitted with up to 50: ``scoring: {trainer.max_epochs: 10}``),
and ``robustness: true``: every training's best checkpoint is also evaluated on the corruption
benchmark, for calibration and for out-of-distribution inputs
(:func:`fmnist_lightning.robustness.evaluate_robustness`), and the tables compare the points on those
figures too, with the same paired tests.

A **point** is one setting of the swept keys; a **cell** is one training: a point, a fold (or the
fixed split) and a seed. Every key and value is parsed by the run parser
(:class:`~fmnist_lightning.config.RunCLI`) first, so a bad file fails before anything is trained or
written. Keys the study itself sets (seed, folds, logger) cannot be swept.
"""

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
import yaml
from jsonargparse import ArgumentError, Namespace
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from fmnist_lightning.config import RunCLI, check_numbers, first_line, nested
from fmnist_lightning.errors import ConfigError
from fmnist_lightning.training import Config

FORMS = ("grid", "search", "ablation")
FILE_KEYS = (*FORMS, "num_folds", "seeds", "n_trials", "sampler", "pruner", "scoring", "robustness")
#: The keys only a search: block takes.
SEARCH_KEYS = ("n_trials", "sampler", "pruner")
_DISTRIBUTION_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
#: Keys the study sets for every cell: sweeping them would break its bookkeeping.
RESERVED_KEYS = ("seed_everything", "data.num_folds", "data.fold", "trainer.logger", "config", "ckpt_path")
#: Keys left out of a study's identity: where things are on this machine and how it shows progress,
#: so the same command on another machine (other data folder, a GPU) joins the same study.
MACHINE_KEYS = (
    *RESERVED_KEYS,
    "trainer.accelerator",
    "trainer.devices",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.data_dir",
    "data.system_dir",
    "data.download",
    "data.num_workers",
    "data.data_on_device",
)
#: Samplers that must not drive a ``search:`` (a grid belongs in ``grid:``, where cells are queued).
_REFUSED_SAMPLERS = ("GridSampler", "BruteForceSampler", "PartialFixedSampler")


@dataclass(frozen=True)
class Point:
    """One setting of the swept keys.

    Attributes:
        name: Folder-safe name, unique within the study (empty for k-fold's single point).
        params: Dotted key -> value, as the parser read it: what the point overrides, what tables show.
        base: A whole configuration of its own, instead of the plan's (a zoo's points are configs).
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None


@dataclass(frozen=True)
class Cell:
    """One training: a point, a fold (None: the config's fixed validation split) and a seed.

    ``refit`` cells train a point on the config's own split and test it.
    """

    point: Point
    fold: int | None
    seed: int
    refit: bool = False

    @property
    def key(self) -> str:
        """Unique key of the cell in its study, e.g. ``lr=0.001_batch_size=64/fold2_seed42``."""
        prefix = "refit/" if self.refit else ""
        return f"{prefix}{self.point.name}/{self.run_name}" if self.point.name else f"{prefix}{self.run_name}"

    @property
    def run_name(self) -> str:
        """The run folder's name: ``fold2_seed42``, or ``seed42`` on the fixed split."""
        return f"seed{self.seed}" if self.fold is None else f"fold{self.fold}_seed{self.seed}"


@dataclass
class StudyPlan:
    """Everything a study will train, validated; plain data, so worker processes can receive it.

    Attributes:
        kind: ``kfold``, ``grid``, ``search``, ``ablation`` or ``configs`` (a zoo of whole configurations).
        name: Base name of the study folder (the sweep file's stem, or ``kfold5``).
        base: The base run configuration, resolved (what a run's ``config.yaml`` holds).
        save_dir: The logger's ``save_dir``.
        logger_name: The logger's ``name``: the study folder is ``<save_dir>/<logger_name>/<folder>``.
        num_folds: K of K-fold cross-validation, or None for the config's validation split.
        seeds: Training seeds; every point is trained once per seed (and fold).
        keys: Swept keys, in file order (``[arm]`` for an ablation).
        points: The points of a grid, an ablation (reference first) or k-fold; empty for a search.
        space: A search's distributions: key -> validated specification (see the module doc).
        n_trials: A search's number of points.
        sampler: A search's sampler: ``{"name": ..., **arguments}``.
        pruner: A search's pruner, the same way; None: no pruning. Every cell reports its val/acc
            after each epoch (the point's step ``cell index x max_epochs + epoch``).
        reference: An ablation's reference arm name.
        scoring: Overrides of the scoring trainings only (not the refit), dotted key -> value.
        sweep_text: The sweep file's text, kept in the study for the record.
        test: Test every cell's best checkpoint too (a zoo's cells), not only the refits.
        robustness: Evaluate every cell's best checkpoint's robustness, calibration and OOD detection too.
    """

    kind: str
    name: str
    base: dict[str, Any]
    save_dir: str
    logger_name: str
    num_folds: int | None
    seeds: list[int]
    keys: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_trials: int | None = None
    sampler: dict[str, Any] | None = None
    pruner: dict[str, Any] | None = None
    reference: str | None = None
    scoring: dict[str, Any] = field(default_factory=dict)
    sweep_text: str = ""
    test: bool = False
    robustness: bool = False

    @property
    def identity(self) -> dict[str, Any]:
        """What the study folder's hash covers: the base config without machine keys, and the plan."""
        points = [[p.name, p.params, without_machine_keys(p.base)] for p in self.points]
        plan = [self.kind, points, self.space, self.n_trials, self.sampler, self.scoring, self.test]
        if self.pruner:  # only where set: the folders of studies without one keep their names
            plan.append(self.pruner)
        if self.robustness:
            plan.append("robustness")
        config = without_machine_keys(self.base)
        return {"config": config, "num_folds": self.num_folds, "seeds": self.seeds, "plan": plan}

    @property
    def folder(self) -> str:
        """The study folder's name, e.g. ``study004_grid-1a2b3c4d``: the same command, the same folder."""
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    @property
    def study_dir(self) -> Path:
        """``<save_dir>/<logger_name>/<folder>``."""
        return Path(self.save_dir) / self.logger_name / self.folder

    def folds(self) -> list[int | None]:
        """The folds each point is trained on (``[None]``: the fixed split)."""
        return [None] if self.num_folds is None else list(range(self.num_folds))

    def cells(self, points: Sequence[Point] | None = None) -> list[Cell]:
        """Every cell of ``points`` (default: the plan's), seed-major, then point, then fold.

        Seed-major so that a sweep stopped half-way already has every point scored on the first seeds.
        """
        points = self.points if points is None else points
        return [Cell(p, f, s) for s in self.seeds for p in points for f in self.folds()]

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of a point's parameters (categorical but for a search)."""
        if self.kind == "search":
            return {key: _distribution(spec) for key, spec in self.space.items()}
        if self.kind in ("ablation", "configs"):
            return {self.keys[0]: CategoricalDistribution([p.name for p in self.points])}
        return {
            key: CategoricalDistribution(list(dict.fromkeys(optuna_value(p.params[key]) for p in self.points)))
            for key in self.keys
        }

    def optuna_params(self, point: Point) -> dict[str, Any]:
        """A point's parameters as Optuna stores them (see :meth:`distributions`)."""
        if self.kind in ("ablation", "configs"):
            return {self.keys[0]: point.name}
        return {key: optuna_value(point.params[key]) for key in self.keys}

    def search_point(self, number: int, params: Mapping[str, Any]) -> Point:
        """The point of a search trial from Optuna's parameter values; named ``t007-<values>``."""
        values = {}
        for key, spec in self.space.items():
            value = params[key]
            if spec["type"] == "categorical":  # Optuna stores lists as JSON text; give back the value
                value = next(c for c in spec["choices"] if optuna_value(c) == value)
            values[key] = value
        return Point(f"t{number:03d}-{_slug(values)}"[:120], values)

    def run_dir(self, cell: Cell) -> Path:
        """A cell's run folder: ``<study folder>[/refit]/<point>/<fold>_<seed>``."""
        return self.study_dir / ("refit" if cell.refit else "") / cell.point.name / cell.run_name

    def cell_overrides(self, cell: Cell) -> dict[str, Any]:
        """What a cell sets over the base config: scoring (not for a refit), the point, seed, fold and run folder."""
        run_dir = self.run_dir(cell)
        folds = {"data.num_folds": None, "data.fold": None}
        if cell.fold is not None:
            folds = {"data.num_folds": self.num_folds, "data.fold": cell.fold}
        return {
            **({} if cell.refit else self.scoring),
            **cell.point.params,
            **folds,
            "seed_everything": cell.seed,
            "trainer.logger.init_args.save_dir": self.save_dir,
            "trainer.logger.init_args.name": run_dir.parent.relative_to(self.save_dir).as_posix(),
            "trainer.logger.init_args.version": run_dir.name,
        }


def without_machine_keys(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of a configuration without :data:`MACHINE_KEYS` (what names a study)."""
    config = copy.deepcopy(config)
    for key in MACHINE_KEYS if config else ():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


# ---------------------------------------------------------------------------------------------
# Building plans


class _Checker:
    """Parses overrides over a base config with one run parser (building one costs a fraction of a second)."""

    def __init__(self, config: Config) -> None:
        try:
            self.run = RunCLI(config, build=False, exit_on_error=False)
        except ArgumentError as err:
            raise ConfigError(f"the study's config: {' '.join(str(err).split())}") from None
        self.base = self.run.dump()

    def parse(self, overrides: Mapping[str, Any], what: str) -> Namespace:
        """The config with ``overrides`` merged, as the parser read it; a refusal is a ConfigError about ``what``."""
        try:
            cfg = self.run.parser.parse_object(nested(overrides), self.run.config)
        except ArgumentError as err:
            raise ConfigError(f"{what}: {' '.join(str(err).split())}") from None
        try:
            check_numbers(cfg)  # a sweep file's .nan or .inf, refused like one on the command line
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None
        return cfg

    def instantiate(self, cfg: Namespace, what: str) -> None:
        """Build the data module and the task (its network) of ``cfg``; a refusal is a ConfigError about ``what``."""
        try:
            # jsonargparse's instantiate_classes (its name in the releases the floors allow): builds the
            # model, data, callbacks and logger, none of which touches the disk; the Trainer is not built.
            self.run.parser.instantiate_classes(cfg)
        except (ConfigError, ValueError, TypeError, RuntimeError) as err:
            raise ConfigError(f"{what}: {first_line(err)}") from None


def check_plan(plan: StudyPlan) -> None:
    """Build every point's data module and network as its trainings will, before anything is queued.

    The parser accepts each value on its own; the classes check what depends on the rest (folds
    against the data, paddings against the image size, widths against the network...), about 0.2 s
    a point on 2 cores. Each point is built on the first fold, the first point on the last fold too:
    only the fold's index differs between folds. A search's points are drawn later; its bounds were
    parsed with the file.

    Raises:
        ConfigError: Naming the point (and fold) and what its class refused.
    """
    checkers: dict[int, _Checker] = {}
    folds = plan.folds()
    for i, point in enumerate(plan.points):
        base = point.base or plan.base
        checker = checkers.get(id(base)) or checkers.setdefault(id(base), _Checker(base))
        for fold in dict.fromkeys([folds[0], folds[-1]] if i == 0 else [folds[0]]):
            cell = Cell(point, fold, plan.seeds[0])
            what = f"{plan.kind} point {point.name or '(the config)'}" + (f", fold {fold}" if fold is not None else "")
            checker.instantiate(checker.parse(plan.cell_overrides(cell), what), what)


def plan_kfold(config: Config, num_folds: int | None, seeds: int | Sequence[int] = 1) -> StudyPlan:
    """The plan of a k-fold run: one point (the config as it is), every fold, every seed.

    Args:
        config: The run configuration: a command line, e.g. ``["--config", "configs/lightweight.yaml"]``,
            or a whole configuration (dict or namespace).
        num_folds: K (>= 2); None takes ``data.num_folds`` from the config.
        seeds: Number of seeds from the config's ``seed_everything``, or the seeds themselves.

    Raises:
        ConfigError: If K or the seeds are impossible, or the logger is not a TensorBoardLogger.
    """
    checker = _Checker(config)
    num_folds = num_folds if num_folds is not None else checker.base["data"].get("num_folds")
    if num_folds is None:
        raise ConfigError("kfold needs --num_folds K (K >= 2).")
    plan = _base_plan("kfold", f"kfold{_check_folds(num_folds)}", checker, num_folds, seeds)
    plan.points = [Point("")]
    return plan


def plan_configs(
    configs: Sequence[Config],
    seeds: int | Sequence[int] = 1,
    overrides: Mapping[str, Any] | None = None,
    robustness: bool = False,
) -> StudyPlan:
    """A model zoo: whole configurations as the points, each trained with every seed and tested.

    The study folder is ``<save_dir>/zoo/zoo-<hash>`` (the first config's ``save_dir``), a point per
    config named after its run name (the config file's), compared on test accuracy in its tables.

    Args:
        configs: The configurations, each a command line (``["--config", "configs/fast.yaml"]``) or a
            whole configuration.
        seeds: Number of seeds counted up from the first config's ``seed_everything``, or the seeds.
        overrides: Dotted keys set in every configuration (``{"trainer.precision": "bf16-mixed"}``).
        robustness: Score every tested checkpoint on the corruption benchmark, calibration and OOD inputs
            too (a sweep file's ``robustness: true``).

    Raises:
        ConfigError: If a configuration or an override is refused, or the seeds are impossible.
    """
    if not configs:
        raise ConfigError("a zoo needs at least one configuration.")
    checkers = [_Checker(config) for config in configs]
    plan = _base_plan("configs", "zoo", checkers[0], None, seeds)
    names: list[str] = []
    for i, checker in enumerate(checkers):
        cfg = checker.parse(dict(overrides or {}), f"configuration {i + 1}")
        base = yaml.safe_load(checker.run.parser.dump(cfg, skip_none=False))
        name = _slug({"": base["trainer"]["logger"]["init_args"].get("name") or f"config{i + 1}"}).lstrip("=")
        names.append(name if name not in names else f"{name}_{names.count(name) + 1}")
        plan.points.append(Point(names[-1], {}, base))
    plan.logger_name, plan.keys, plan.test, plan.robustness = "zoo", ["config"], True, robustness
    return plan


def plan_sweep(
    config: Config,
    sweep_file: str | Path,
    num_folds: int | None = None,
    seeds: int | Sequence[int] | None = None,
) -> StudyPlan:
    """Read and check a sweep file against the config; nothing is trained or written.

    Args:
        config: The base run configuration (a command line, or a dict or namespace).
        sweep_file: The sweep YAML (see the module doc).
        num_folds: K-fold CV for every point; None: the file's ``num_folds``, else the fixed split.
        seeds: Number of seeds (or the seeds); None: the file's ``seeds``, else 1.

    Raises:
        ConfigError: For a missing or malformed file, an unknown key, a value the key does not
            accept, an empty grid, an unknown distribution or sampler.
    """
    path = Path(sweep_file)
    where = f"sweep file {path}"
    try:
        text = path.read_text()
        content = yaml.safe_load(text)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err}).") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{where} must be a mapping with one of {', '.join(FORMS)}; got {type(content).__name__}.")
    unknown = sorted(set(content) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; allowed: {', '.join(FILE_KEYS)}.")
    forms = [f for f in FORMS if f in content]
    if len(forms) != 1:
        raise ConfigError(f"{where} needs exactly one of {', '.join(FORMS)}; found {forms or 'none'}.")
    kind = forms[0]
    if kind != "search" and any(k in content for k in SEARCH_KEYS):
        raise ConfigError(
            f"{where}: {', '.join(k for k in SEARCH_KEYS if k in content)} only apply to a search: block."
        )

    checker = _Checker(config)
    folds = next((f for f in (num_folds, content.get("num_folds"), checker.base["data"].get("num_folds")) if f), None)
    plan = _base_plan(kind, path.stem, checker, folds, seeds if seeds is not None else content.get("seeds", 1))
    plan.sweep_text = text
    if folds is not None:
        _check_folds(folds)
    scoring = content.get("scoring") or {}
    if not isinstance(scoring, dict):
        raise ConfigError(f"{where}: scoring: must map config keys to values, got {scoring!r}.")
    for key in scoring:
        _check_key(key, where)
    plan.scoring = _parsed(checker.parse(scoring, f"{where}: scoring"), scoring)
    plan.robustness = content.get("robustness", False)
    if not isinstance(plan.robustness, bool):
        raise ConfigError(f"{where}: robustness: must be true or false, got {plan.robustness!r}.")
    body = content[kind]
    if kind == "grid":
        _plan_grid(plan, checker, body, where)
    elif kind == "ablation":
        _plan_ablation(plan, checker, body, where)
    else:
        _plan_search(plan, checker, body, content, where)
    return plan


def _base_plan(kind: str, name: str, checker: _Checker, num_folds: int | None, seeds: Any) -> StudyPlan:
    logger = checker.base["trainer"].get("logger")
    init = logger.get("init_args") if isinstance(logger, dict) else None
    if init is None or not str(logger.get("class_path", "")).endswith("TensorBoardLogger") or not init.get("save_dir"):
        raise ConfigError(
            "studies write every training as a run folder of a TensorBoardLogger: the config needs "
            "trainer.logger with class_path lightning.pytorch.loggers.TensorBoardLogger and a save_dir."
        )
    seed_list = _check_seeds(seeds, checker.base.get("seed_everything"))
    name_ = str(init.get("name") or "default")
    return StudyPlan(kind, name, checker.base, str(init["save_dir"]), name_, num_folds, seed_list)


def _check_folds(num_folds: Any) -> int:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    return num_folds


def _check_seeds(seeds: Any, base_seed: Any) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {seeds}.")
        if isinstance(base_seed, bool) or not isinstance(base_seed, int):
            raise ConfigError(
                f"seeds N counts up from the config's seed_everything, which is {base_seed!r}: set an integer "
                "seed_everything or give the seeds as a list."
            )
        return [base_seed + i for i in range(seeds)]
    if isinstance(seeds, Sequence) and not isinstance(seeds, str) and seeds:
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct integers, got {list(seeds)!r}.")
        return list(seeds)
    raise ConfigError(f"seeds must be a count or a non-empty list of integers, got {seeds!r}.")


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be dotted config names such as data.batch_size, got {key!r}.")
    for reserved in RESERVED_KEYS:
        if key == reserved or key.startswith(reserved + "."):
            raise ConfigError(
                f"{where}: {key} is set by the study itself for every training (use --seeds for seeds, "
                "--num_folds for folds); it cannot be swept."
            )
    return key


def _parsed(cfg: Namespace, given: Mapping[str, Any]) -> dict[str, Any]:
    """The given keys' values as the parser read them (``5e-3``, a string to YAML, becomes 0.005).

    Classes (``class_path`` and ``init_args``), alone or in a list, are kept as given: plain data.
    """
    out = {}
    for key, value in given.items():
        parsed = cfg.get(key, value)
        classes = isinstance(parsed, Namespace) or (
            isinstance(parsed, list | tuple) and any(isinstance(v, Namespace) for v in parsed)
        )
        out[key] = value if classes else list(parsed) if isinstance(parsed, tuple) else parsed
    return out


def _plan_grid(plan: StudyPlan, checker: _Checker, grid: Any, where: str) -> None:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: grid: must map config keys to lists of values, and is empty or not a mapping.")
    values: dict[str, list[Any]] = {}
    for key, given in grid.items():
        _check_key(key, where)
        if not isinstance(given, list) or not given:
            raise ConfigError(f"{where}: grid key {key} needs a non-empty list of values, got {given!r}.")
        what = f"{where}: grid key {key}, value"
        values[key] = [_parsed(checker.parse({**plan.scoring, key: v}, f"{what} {v!r}"), {key: v})[key] for v in given]
        if len({json.dumps(optuna_value(v)) for v in values[key]}) != len(given):
            raise ConfigError(f"{where}: grid key {key} lists a value twice: {given!r}.")
    plan.keys = list(values)
    combos = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    names = [_slug(c) for c in combos]
    names = [n if names[:i].count(n) == 0 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)]
    plan.points = [Point(n, c) for n, c in zip(names, combos, strict=True)]


def _plan_ablation(plan: StudyPlan, checker: _Checker, ablation: Any, where: str) -> None:
    if not isinstance(ablation, dict) or set(ablation) - {"reference", "variants"} or "variants" not in ablation:
        raise ConfigError(
            f"{where}: ablation: needs `variants:` (name -> overrides) and optionally `reference:` (overrides); "
            f"got {ablation!r}."
        )
    reference, variants = ablation.get("reference") or {}, ablation["variants"]
    if not isinstance(reference, dict):
        raise ConfigError(f"{where}: ablation reference must be a mapping of overrides, got {reference!r}.")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: ablation variants must be a non-empty mapping of name -> overrides.")
    if "reference" in variants:
        raise ConfigError(f"{where}: 'reference' is the reference arm's name; rename that variant.")
    for name, overrides in {"reference": reference, **variants}.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
            raise ConfigError(
                f"{where}: ablation arm name {name!r} must be a plain folder name (letters, digits, ._=+-)."
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: ablation arm {name} must map config keys to values, got {overrides!r}.")
        for key in overrides:
            _check_key(key, where)
        cfg = checker.parse({**plan.scoring, **overrides}, f"{where}: ablation arm {name}")
        plan.points.append(Point(name, _parsed(cfg, overrides)))
    plan.keys, plan.reference = ["arm"], "reference"


def _plan_search(plan: StudyPlan, checker: _Checker, space: Any, content: Mapping[str, Any], where: str) -> None:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: search: must map config keys to distributions, and is empty or not a mapping.")
    n_trials = content.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"{where}: a search needs n_trials, a positive integer; got {n_trials!r}.")
    for key, spec in space.items():
        _check_key(key, where)
        plan.space[key] = _check_distribution(key, spec, f"{where}: search key {key}", checker.parse)
    plan.keys, plan.n_trials = list(space), n_trials
    plan.sampler = _check_sampler(content.get("sampler"), where)
    plan.pruner = None if content.get("pruner") is None else _check_pruner(content["pruner"], where)


def _check_distribution(key: str, spec: Any, what: str, parse: Callable[..., Namespace]) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("type") not in _DISTRIBUTION_FIELDS:
        if isinstance(spec, dict) and "type" in spec:
            raise ConfigError(f"{what}: unknown distribution type {spec['type']!r}; known: float, int, categorical.")
        raise ConfigError(
            f"{what}: needs a distribution such as {{type: float, low: 1.0e-4, high: 1.0e-2}}, got {spec!r}."
        )
    kind = spec["type"]
    extra = sorted(set(spec) - _DISTRIBUTION_FIELDS[kind])
    if extra:
        raise ConfigError(f"{what}: {kind} distributions take {sorted(_DISTRIBUTION_FIELDS[kind])}, not {extra}.")
    checked = dict(spec)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{what}: categorical needs a non-empty list of choices, got {choices!r}.")
        if len({json.dumps(optuna_value(c)) for c in choices}) != len(choices):
            raise ConfigError(f"{what}: categorical lists a choice twice: {choices!r}.")
        checked["choices"] = [_parsed(parse({key: c}, f"{what}, choice {c!r}"), {key: c})[key] for c in choices]
        return checked
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
            raise ConfigError(f"{what}: {kind} needs a numeric {bound}, got {value!r}.")
        parse({key: value}, f"{what}, {bound} {value!r}")
    try:
        _distribution(checked)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{what}: {err}") from None
    return checked


def _optuna_spec(value: Any, where: str, what: str) -> dict[str, Any]:
    """A sampler or pruner as the file gives it: a class name, or ``{name: ..., arguments...}``."""
    spec = {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, dict) else None
    if spec is None or not isinstance(spec.get("name"), str):
        example = "TPESampler" if what == "sampler" else "MedianPruner"
        raise ConfigError(f"{where}: {what} must be a name ({example}) or {{name: ..., arguments...}}, got {value!r}.")
    return spec


def _check_class(
    spec: dict[str, Any],
    where: str,
    module: ModuleType,
    base: type,
    make: Callable[..., Any],
    refused: Sequence[str] = (),
) -> None:
    """A sampler or pruner named in a sweep file: a class of Optuna's module for it, built with its arguments."""
    what = base.__name__.removeprefix("Base").lower()
    cls = getattr(module, spec["name"], None)
    if not isinstance(cls, type) or not issubclass(cls, base) or cls is base:
        suffix = base.__name__.removeprefix("Base")
        known = sorted(n for n in dir(module) if n.endswith(suffix) and n not in (*refused, base.__name__))
        raise ConfigError(f"{where}: unknown {what} {spec['name']!r}; {module.__name__} has {', '.join(known)}.")
    if spec["name"] in refused:
        raise ConfigError(f"{where}: {spec['name']} cannot drive a search; write the values as a grid: block instead.")
    try:
        make(spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {what} {spec['name']} refuses its arguments: {err}") from None


def _check_sampler(sampler: Any, where: str) -> dict[str, Any]:
    spec = _optuna_spec("TPESampler" if sampler is None else sampler, where, "sampler")
    _check_class(spec, where, optuna.samplers, optuna.samplers.BaseSampler, make_sampler, _REFUSED_SAMPLERS)
    return spec


def _check_pruner(pruner: Any, where: str) -> dict[str, Any]:
    spec = _optuna_spec(pruner, where, "pruner")
    _check_class(spec, where, optuna.pruners, optuna.pruners.BasePruner, make_pruner)
    return spec


def make_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner | None:
    """Build a search's pruner (None: Optuna's default, which never prunes a trial that does not ask)."""
    if spec is None:
        return None
    return getattr(optuna.pruners, spec["name"])(**{k: v for k, v in spec.items() if k != "name"})


def make_sampler(spec: Mapping[str, Any], worker: int = 0) -> optuna.samplers.BaseSampler:
    """Build a search's sampler for one worker.

    TPE gets ``constant_liar`` (parallel workers then avoid each other's running points); a seed is
    offset by the worker's index, or every worker would draw the same points.
    """
    args = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "TPESampler":
        args.setdefault("constant_liar", True)
    if args.get("seed") is not None:
        args["seed"] = int(args["seed"]) + worker
    return getattr(optuna.samplers, spec["name"])(**args)


# ---------------------------------------------------------------------------------------------
# Values, names and distributions


def optuna_value(value: Any) -> Any:
    """Optuna's categorical choices are None, bool, int, float or str: lists and mappings become JSON."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key (``lr``), or the whole key where two keys share their last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def format_value(value: Any) -> str:
    """A value as tables and folder names show it: ``0.0005``, ``[8, 16]``, ``true``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return format(value, "g") if math.isfinite(value) else str(value)
    return value if isinstance(value, str) else json.dumps(value)


def _slug(params: Mapping[str, Any]) -> str:
    if not params:
        return "default"
    names = short_names(list(params))

    def text_of(value: Any) -> str:  # [8, 16] -> 8-16 in a folder name
        return "-".join(map(text_of, value)) if isinstance(value, list) else format_value(value)

    text = "_".join(f"{names[k]}={text_of(v)}" for k, v in params.items())
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "point"


def _distribution(spec: Mapping[str, Any]) -> BaseDistribution:
    if spec["type"] == "categorical":
        return CategoricalDistribution([optuna_value(c) for c in spec["choices"]])
    if spec["type"] == "int":
        return IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=spec.get("step", 1))
    return FloatDistribution(
        float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)), step=spec.get("step")
    )
