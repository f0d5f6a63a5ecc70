"""What a study trains: sweep files, their points and cells, checked against the CLI before anything runs.

A sweep file (YAML) names config keys with the CLI's dotted names, in one of three forms::

    grid:                                 # every combination, in the order written
      model.optimizer.init_args.lr: [5.0e-3, 1.0e-3, 5.0e-4, 1.0e-4]
      data.batch_size: [32, 64, 128]

    search:                               # distributions, sampled by Optuna
      model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.model.init_args.dropout: {type: float, low: 0.0, high: 0.5, step: 0.05}
      data.batch_size: {type: categorical, choices: [32, 64, 128]}
      model.model.init_args.widths: {type: categorical, choices: [[8, 12], [32, 64]]}
    n_trials: 20                          # required with search
    sampler: TPESampler                   # optional: any sampler of optuna.samplers, or
                                          # {name: RandomSampler, seed: 0, ...} with its arguments

    ablation:                             # a reference and named variants, each a dict of overrides
      reference: {}                       # the config as it is (or overrides of it)
      variants:
        no_augmentation: {data.augment: false}
        no_dropout: {model.model.init_args.dropout: 0.0}

and optionally ``num_folds: K`` (score every point by K-fold cross-validation instead of the fixed
validation split), ``seeds: N`` (training seeds ``s, s+1, ..., s+N-1`` from the config's
``seed_everything``) or ``seeds: [1, 2, 3]`` (the command line's ``--num_folds``/``--seeds`` win),
and ``scoring:``, overrides for the trainings that score points but not for the refit (study
004 scored with 10 epochs per fold and refitted with up to 50: ``scoring: {trainer.max_epochs: 10}``).
They come right after the config, so the command line's own overrides still win.

A **point** is one setting of the swept keys; a **cell** is one training: a point, a fold (or the
fixed split) and a seed. Every key and value is parsed by the CLI's own parser first
(:func:`fmnist_lightning.cli.parse_fit_config`), so a bad file fails before anything is trained or
written. Keys the study itself sets (seed, folds, logger) cannot be swept.
"""

import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from jsonargparse import Namespace
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from fmnist_lightning.errors import ConfigError

FORMS = ("grid", "search", "ablation")
FILE_KEYS = (*FORMS, "num_folds", "seeds", "n_trials", "sampler", "scoring")
DISTRIBUTIONS = ("float", "int", "categorical")
_DISTRIBUTION_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
#: Keys the study sets for every cell: sweeping them would break its bookkeeping.
RESERVED_KEYS = ("seed_everything", "data.num_folds", "data.fold", "trainer.logger", "config")
#: Keys left out of a study's identity: where things are on this machine and how it shows progress,
#: so the same command on another machine (other data folder, a GPU) joins the same study.
MACHINE_KEYS = (
    "config",
    "seed_everything",
    "ckpt_path",
    "trainer.logger",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.data_dir",
    "data.system_dir",
    "data.download",
    "data.num_workers",
    "data.data_on_device",
    "data.num_folds",
    "data.fold",
)
#: Samplers that must not drive a ``search:`` (a grid belongs in ``grid:``, where cells are queued).
_REFUSED_SAMPLERS = ("GridSampler", "BruteForceSampler", "PartialFixedSampler")


@dataclass(frozen=True)
class Point:
    """One setting of the swept keys.

    Attributes:
        name: Folder-safe name, unique within the study (empty for k-fold's single point).
        params: Swept key -> value, as the CLI parsed it (what tables and TensorBoard show).
        overrides: The CLI overrides that make this point, ``--key=value``.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One training: a point, a fold (None: the config's fixed validation split) and a seed.

    ``refit`` cells train a point on the full training split and test it.
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
        kind: ``kfold``, ``grid``, ``search`` or ``ablation``.
        name: Base name of the study folder (the sweep file's stem, or ``kfold5``).
        fit_args: The base ``fit`` command line (``--config ...`` and overrides).
        save_dir: The logger's ``save_dir``.
        logger_name: The logger's ``name``: the study folder is ``<save_dir>/<logger_name>/<folder>``.
        num_folds: K of K-fold cross-validation, or None for the config's validation split.
        seeds: Training seeds; every point is trained once per seed (and fold).
        keys: Swept keys, in file order (``[arm]`` for an ablation).
        points: The points of a grid, an ablation (reference first) or k-fold; empty for a search.
        space: A search's distributions: key -> validated specification (see the module doc).
        n_trials: A search's number of points.
        sampler: A search's sampler: ``{"name": ..., **arguments}``.
        reference: An ablation's reference arm name.
        scoring: Overrides of the scoring trainings only (not the refit), ``--key=value``.
        sweep_text: The sweep file's text, kept in the study for the record.
        identity: What the study folder's hash covers (base config without machine keys, and the plan).
    """

    kind: str
    name: str
    fit_args: list[str]
    save_dir: str
    logger_name: str
    num_folds: int | None
    seeds: list[int]
    keys: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_trials: int | None = None
    sampler: dict[str, Any] | None = None
    reference: str | None = None
    scoring: tuple[str, ...] = ()
    sweep_text: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Eight hex digits identifying what is trained: the same command gives the same study folder."""
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def folder(self) -> str:
        """The study folder's name, e.g. ``study004_grid-1a2b3c4d``."""
        return f"{self.name}-{self.digest}"

    @property
    def study_dir(self) -> Path:
        """``<save_dir>/<logger_name>/<folder>``."""
        return Path(self.save_dir) / self.logger_name / self.folder

    @property
    def test_train_ratio(self) -> float | None:
        """Validation over training images of one fold, ``1/(K-1)``; None without folds."""
        return None if self.num_folds is None else 1 / (self.num_folds - 1)

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
        """Optuna distributions of a point's parameters (categorical for grid and ablation)."""
        if self.kind == "search":
            return {key: _distribution(spec) for key, spec in self.space.items()}
        if self.kind == "ablation":
            return {"arm": CategoricalDistribution([p.name for p in self.points])}
        return {
            key: CategoricalDistribution(_unique([_optuna_value(p.params[key]) for p in self.points]))
            for key in self.keys
        }

    def optuna_params(self, point: Point) -> dict[str, Any]:
        """A point's parameters as Optuna stores them (see :meth:`distributions`)."""
        if self.kind == "ablation":
            return {"arm": point.name}
        return {key: _optuna_value(point.params[key]) for key in self.keys}

    def search_point(self, number: int, params: Mapping[str, Any]) -> Point:
        """The point of a search trial from Optuna's parameter values; named ``t007-<values>``."""
        values: dict[str, Any] = {}
        for key, spec in self.space.items():
            value = params[key]
            if spec["type"] == "categorical":  # Optuna stores lists as JSON text; give back the value
                value = next(c for c in spec["choices"] if _optuna_value(c) == value)
            values[key] = value
        name = f"t{number:03d}-{_slug(values)}"[:120]
        return Point(name, values, tuple(_override(k, v) for k, v in values.items()))

    def best_point(self, scores: Mapping[str, float]) -> Point | None:
        """The point (of the plan, or any given by name in ``scores``) with the highest score."""
        return max((p for p in self.points if p.name in scores), key=lambda p: scores[p.name], default=None)


# ---------------------------------------------------------------------------------------------
# Building plans


def plan_kfold(fit_args: Sequence[str], num_folds: int | None, seeds: int | Sequence[int] = 1) -> StudyPlan:
    """The plan of a k-fold run: one point (the config as it is), every fold, every seed.

    Args:
        fit_args: The ``fit`` command line, e.g. ``["--config", "configs/lightweight.yaml"]``.
        num_folds: K (>= 2); None takes ``data.num_folds`` from the config.
        seeds: Number of seeds from the config's ``seed_everything``, or the seeds themselves.

    Raises:
        ConfigError: If K or the seeds are impossible, or the logger is not a TensorBoardLogger.
    """
    cfg = parse_fit_config(list(fit_args))
    num_folds = num_folds if num_folds is not None else cfg.data.get("num_folds")
    if num_folds is None:
        raise ConfigError("kfold needs --num_folds K (K >= 2).")
    plan = _base_plan("kfold", f"kfold{_check_folds(num_folds)}", fit_args, cfg, num_folds, seeds)
    plan.points = [Point("")]
    plan.identity["plan"] = {"kind": "kfold"}
    return plan


def plan_sweep(
    fit_args: Sequence[str],
    sweep_file: str | Path,
    num_folds: int | None = None,
    seeds: int | Sequence[int] | None = None,
) -> StudyPlan:
    """Read and check a sweep file against the config; nothing is trained or written.

    Args:
        fit_args: The base ``fit`` command line.
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
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror or err}).") from err
    try:
        content = yaml.safe_load(text)
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
    if kind != "search" and ("n_trials" in content or "sampler" in content):
        raise ConfigError(f"{where}: n_trials and sampler only apply to a search: block.")

    cfg = parse_fit_config(list(fit_args))
    folds = num_folds if num_folds is not None else content.get("num_folds")
    if folds is None:
        folds = cfg.data.get("num_folds")
    plan = _base_plan(kind, path.stem, fit_args, cfg, folds, seeds if seeds is not None else content.get("seeds", 1))
    plan.sweep_text = text
    if folds is not None:
        _check_folds(folds)
    scoring = content.get("scoring") or {}
    if not isinstance(scoring, dict):
        raise ConfigError(f"{where}: scoring: must map config keys to values, got {scoring!r}.")
    plan.scoring = tuple(_override(_check_key(k, where), v) for k, v in scoring.items())
    if plan.scoring:
        _parse_overrides(with_scoring(plan.fit_args, plan.scoring), [], f"{where}: scoring")
    body = content[kind]
    if kind == "grid":
        _plan_grid(plan, body, where)
    elif kind == "ablation":
        _plan_ablation(plan, body, where)
    else:
        _plan_search(plan, body, content, where)
    plan.identity["plan"] = {
        "kind": kind,
        "points": [[p.name, p.overrides] for p in plan.points],
        "space": plan.space,
        "n_trials": plan.n_trials,
        "sampler": plan.sampler,
        "scoring": plan.scoring,
    }
    return plan


def _base_plan(
    kind: str, name: str, fit_args: Sequence[str], cfg: Namespace, num_folds: int | None, seeds: Any
) -> StudyPlan:
    logger = cfg.trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    class_path = logger.get("class_path", "") if isinstance(logger, Namespace) else ""
    if init is None or not class_path.endswith("TensorBoardLogger") or not init.get("save_dir"):
        raise ConfigError(
            "studies write every training as a run folder of a TensorBoardLogger: the config needs "
            "trainer.logger with class_path lightning.pytorch.loggers.TensorBoardLogger and a save_dir."
        )
    seed_list = _check_seeds(seeds, cfg.get("seed_everything"))
    base = cfg.clone().as_dict()
    for key in MACHINE_KEYS:
        _drop(base, key)
    plan = StudyPlan(
        kind=kind,
        name=name,
        fit_args=list(fit_args),
        save_dir=str(init.save_dir),
        logger_name=str(init.get("name") or "default"),
        num_folds=num_folds,
        seeds=seed_list,
    )
    plan.identity = {"config": base, "num_folds": num_folds, "seeds": seed_list}
    return plan


def parse_fit_config(fit_args: list[str]) -> Namespace:
    """:func:`fmnist_lightning.cli.parse_fit_config`, imported when first used (the CLI may import this package)."""
    from fmnist_lightning.cli import parse_fit_config as parse

    return parse(fit_args)


def with_scoring(fit_args: Sequence[str], scoring: Sequence[str]) -> list[str]:
    """``fit_args`` with the scoring overrides right after the last ``--config`` (the command line wins)."""
    end = 0
    for i, arg in enumerate(fit_args):
        if arg == "--config":
            end = i + 2
        elif arg.startswith("--config="):
            end = i + 1
    return [*fit_args[:end], *scoring, *fit_args[end:]]


def _check_folds(num_folds: Any) -> int:
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    return num_folds


def _check_seeds(seeds: Any, base_seed: Any) -> list[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {seeds!r}.")
    if isinstance(seeds, int):
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


def _parse_overrides(fit_args: Sequence[str], overrides: Sequence[str], what: str) -> Namespace:
    """Parse the config with ``overrides`` as the CLI would; a refusal becomes a ConfigError about ``what``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_fit_config([*fit_args, *overrides])
    except SystemExit as exit_:
        lines = [line.strip() for line in err.getvalue().splitlines() if line.strip()]
        start = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("error:")), None)
        message = " ".join(lines[start:]).removeprefix("error:").strip() if start is not None else str(exit_.code)
        raise ConfigError(f"{what}: {message}") from None


def _parsed_value(cfg: Namespace, key: str, given: Any) -> Any:
    """The value as the CLI parsed it (so ``5e-3``, a string to YAML, becomes 0.005); ``given`` for objects."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return given
    if isinstance(value, Namespace):
        return given
    return list(value) if isinstance(value, tuple) else value


def _plan_grid(plan: StudyPlan, grid: Any, where: str) -> None:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: grid: must map config keys to lists of values, and is empty or not a mapping.")
    values: dict[str, list[Any]] = {}
    for key, given in grid.items():
        _check_key(key, where)
        if not isinstance(given, list) or not given:
            raise ConfigError(f"{where}: grid key {key} needs a non-empty list of values, got {given!r}.")
        parsed = []
        for value in given:
            cfg = _parse_overrides(
                with_scoring(plan.fit_args, plan.scoring),
                [_override(key, value)],
                f"{where}: grid key {key}, value {value!r}",
            )
            parsed.append(_parsed_value(cfg, key, value))
        if len(_unique([_optuna_value(v) for v in parsed])) != len(parsed):
            raise ConfigError(f"{where}: grid key {key} lists a value twice: {given!r}.")
        values[key] = parsed
    plan.keys = list(values)
    combos = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    names = _unique_names([_slug(c) for c in combos])
    plan.points = [
        Point(n, c, tuple(_override(k, v) for k, v in c.items())) for n, c in zip(names, combos, strict=True)
    ]


def _plan_ablation(plan: StudyPlan, ablation: Any, where: str) -> None:
    if not isinstance(ablation, dict) or set(ablation) - {"reference", "variants"} or "variants" not in ablation:
        raise ConfigError(
            f"{where}: ablation: needs `variants:` (name -> overrides) and optionally `reference:` (overrides); "
            f"got {ablation!r}."
        )
    reference = ablation.get("reference") or {}
    variants = ablation["variants"]
    if not isinstance(reference, dict):
        raise ConfigError(f"{where}: ablation reference must be a mapping of overrides, got {reference!r}.")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: ablation variants must be a non-empty mapping of name -> overrides.")
    arms = {"reference": reference, **variants}
    if "reference" in variants:
        raise ConfigError(f"{where}: 'reference' is the reference arm's name; rename that variant.")
    points = []
    for name, overrides in arms.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
            raise ConfigError(
                f"{where}: ablation arm name {name!r} must be a plain folder name (letters, digits, ._=+-)."
            )
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: ablation arm {name} must map config keys to values, got {overrides!r}.")
        args = [_override(_check_key(k, where), v) for k, v in overrides.items()]
        cfg = _parse_overrides(plan.fit_args, args, f"{where}: ablation arm {name}")
        params = {k: _parsed_value(cfg, k, v) for k, v in overrides.items()}
        points.append(Point(name, params, tuple(args)))
    plan.points, plan.keys, plan.reference = points, ["arm"], "reference"


def _plan_search(plan: StudyPlan, space: Any, content: Mapping[str, Any], where: str) -> None:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: search: must map config keys to distributions, and is empty or not a mapping.")
    n_trials = content.get("n_trials")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"{where}: a search needs n_trials, a positive integer; got {n_trials!r}.")
    for key, spec in space.items():
        _check_key(key, where)
        plan.space[key] = _check_distribution(plan, key, spec, f"{where}: search key {key}")
    plan.keys, plan.n_trials = list(space), n_trials
    plan.sampler = _check_sampler(content.get("sampler"), where)


def _check_distribution(plan: StudyPlan, key: str, spec: Any, what: str) -> dict[str, Any]:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(
            f"{what}: needs a distribution such as {{type: float, low: 1.0e-4, high: 1.0e-2}}, got {spec!r}."
        )
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{what}: unknown distribution type {kind!r}; known: {', '.join(DISTRIBUTIONS)}.")
    extra = sorted(set(spec) - _DISTRIBUTION_FIELDS[kind])
    if extra:
        raise ConfigError(f"{what}: {kind} distributions take {sorted(_DISTRIBUTION_FIELDS[kind])}, not {extra}.")
    checked = dict(spec)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{what}: categorical needs a non-empty list of choices, got {choices!r}.")
        if len(_unique([_optuna_value(c) for c in choices])) != len(choices):
            raise ConfigError(f"{what}: categorical lists a choice twice: {choices!r}.")
        checked["choices"] = [
            _parsed_value(_parse_overrides(plan.fit_args, [_override(key, c)], f"{what}, choice {c!r}"), key, c)
            for c in choices
        ]
    else:
        number = int if kind == "int" else (int, float)
        low, high = spec.get("low"), spec.get("high")
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, number):
                raise ConfigError(f"{what}: {kind} needs a numeric {name}, got {value!r}.")
            _parse_overrides(plan.fit_args, [_override(key, value)], f"{what}, {name} {value!r}")
        try:
            _distribution(checked)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{what}: {err}") from None
    return checked


def _check_sampler(sampler: Any, where: str) -> dict[str, Any]:
    if sampler is None:
        return {"name": "TPESampler"}
    spec = {"name": sampler} if isinstance(sampler, str) else dict(sampler) if isinstance(sampler, dict) else None
    if spec is None or not isinstance(spec.get("name"), str):
        raise ConfigError(
            f"{where}: sampler must be a name (TPESampler) or {{name: ..., arguments...}}, got {sampler!r}."
        )
    name = spec["name"]
    cls = getattr(optuna.samplers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, optuna.samplers.BaseSampler):
        known = sorted(n for n in dir(optuna.samplers) if n.endswith("Sampler") and n not in _REFUSED_SAMPLERS)
        raise ConfigError(f"{where}: unknown sampler {name!r}; optuna.samplers has {', '.join(known)}.")
    if name in _REFUSED_SAMPLERS:
        raise ConfigError(f"{where}: {name} cannot drive a search; write the values as a grid: block instead.")
    try:
        make_sampler(spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: sampler {name} refuses its arguments: {err}") from None
    return spec


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


def _override(key: str, value: Any) -> str:
    """``--key=value`` with the value as the CLI reads it (JSON for numbers, booleans, lists)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def _optuna_value(value: Any) -> Any:
    """Optuna's categorical choices are None, bool, int, float or str: lists and mappings become JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _unique(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(v == u and type(v) is type(u) for u in out):
            out.append(v)
    return out


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


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _distribution(spec: Mapping[str, Any]) -> BaseDistribution:
    if spec["type"] == "categorical":
        return CategoricalDistribution([_optuna_value(c) for c in spec["choices"]])
    if spec["type"] == "int":
        return IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=spec.get("step", 1))
    return FloatDistribution(
        float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)), step=spec.get("step")
    )


def _drop(tree: dict[str, Any], dotted: str) -> None:
    """Delete ``a.b.c`` from nested dicts, if there."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def describe(plan: StudyPlan) -> dict[str, Any]:
    """A JSON-safe summary of the plan, stored in the study for the record (and optuna-dashboard)."""
    return copy.deepcopy(
        {
            "kind": plan.kind,
            "fit_args": plan.fit_args,
            "num_folds": plan.num_folds,
            "seeds": plan.seeds,
            "keys": plan.keys,
            "n_trials": plan.n_trials,
            "sampler": plan.sampler,
            "digest": plan.digest,
        }
    )
