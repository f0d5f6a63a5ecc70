"""Results files under ``docs/results/``: the one writer and reader of their CSV layouts, and the
markdown tables the docs site shows (rendered at build time by ``docs/hooks.py``), made from them alone.

The layouts, one row per training run (or measurement), each row naming its machine (CPU model from
``/proc/cpuinfo``, usable cores, torch version, device) and date:

- ``zoo`` (written by ``zoo.py``): config, overrides, model, parameters, seed, test accuracy,
  macro-F1, epochs, seconds per training epoch, fit and test seconds, run folder. Its table gives
  mean ± std over the seeds of every config, and the p-value of a paired t-test (matched by seed,
  ``fmnist_lightning.stats.paired_ttest``) of the best row against each other row, Holm-adjusted
  over those comparisons; ``--pair A B`` adds the difference of two rows with its interval.
- ``time_to_accuracy`` (written by ``time_to_accuracy.py``): run (a config's name, or ``peer`` for
  study 001's own code), seed, test accuracy, the seconds the ratios use and what they time. Its
  tables give accuracy and time mean ± std per run, and the ratios of the time-to-accuracy
  targets (:data:`TARGETS`).
- ``epoch_speed`` (written by ``epoch_speed.py --csv``): model, precision, path (compute bound,
  a bare loop over this package's data, this package, the usual PIL pipeline), repeat, batches per
  epoch, images per second, epoch seconds, peak memory. Its table gives mean ± std over the repeats
  and the ratios to the bound and the usual pipeline.
- ``zoo_robustness`` and ``zoo_corruptions`` (written by ``zoo.py --robustness-csv`` and
  ``--corruptions-csv``): a run's robustness figures, and its accuracy per corruption and severity.
  Their tables give mean ± std over the seeds of each config with the paired t-test against the most
  robust, and the accuracy per corruption and config averaged over the severities and seeds.
- ``sweep_throughput`` (written by ``sweep_throughput.py --csv``): model, ``--jobs``, threads per
  worker, repeat, the k-fold study's size, images trained, wall seconds of the whole command. Its
  table gives images per second mean ± std over the repeats, the ratio to ``--jobs 1`` and the
  rounds each setting won.

Usage:
    python benchmarks/results_tables.py docs/results/zoo.csv
    python benchmarks/results_tables.py docs/results/zoo.csv --pair fashioncnn.yaml fashioncnn_study001.yaml
    python benchmarks/results_tables.py docs/results/time_to_accuracy.csv
    python benchmarks/results_tables.py docs/results/zoo_a.csv docs/results/zoo_b.csv --pair a.yaml b.yaml  # one table
    python benchmarks/results_tables.py --headline docs/results/zoo_a.csv a.yaml \
        --headline docs/results/time_to_accuracy.csv fast   # one row per run named, from any files

``--headline FILE NAME`` (repeated) makes one summary table of chosen runs across files and layouts
(zoo or time to accuracy): test accuracy mean ± std over the seeds, fit and test seconds, machine
and date, one row each.

The files are read and written by pandas and the tables made by ``fmnist_lightning.io.markdown_table``
(pandas' ``to_markdown``); what is here is what no library knows: the layouts, and which numbers each
table shows.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fmnist_lightning.io import atomic_write, markdown_table
from fmnist_lightning.stats import holm, paired_ttest, summarize

#: How the overrides that cut a run short begin (``zoo.py`` writes them), unlike ``--trainer.precision``.
SHORTENING_PREFIXES = ("--trainer.limit_", "--trainer.max_epochs")
MACHINE_COLUMNS: dict[str, type] = {"cpu": str, "cores": int, "torch": str, "device": str, "date": str}


@dataclass(frozen=True)
class Layout:
    """A results CSV: its columns and their types; the one place that writes and reads it.

    Attributes:
        name: The layout's name.
        columns: Column name -> ``str``, ``int`` or ``float``, in file order.
        optional: Columns that files written before them lack, with the value those rows have.
    """

    name: str
    columns: Mapping[str, type]
    optional: Mapping[str, object] = field(default_factory=dict)

    def append(self, path: str | Path, row: Mapping[str, object]) -> None:
        """Append one row, writing the header first if the file is new (the file is replaced whole).

        Raises:
            ValueError: If the row lacks a column or has one too many, or the file has another header.
        """
        self.extend(path, [row])

    def extend(self, path: str | Path, rows: Sequence[Mapping[str, object]]) -> None:
        """Append several rows in one replacement of the file (:meth:`append`'s checks, for each row)."""
        for row in rows:
            if set(row) != set(self.columns):
                missing, extra = sorted(set(self.columns) - set(row)), sorted(set(row) - set(self.columns))
                raise ValueError(f"a {self.name} row needs exactly its columns (missing {missing}, unexpected {extra})")
        path = Path(path)
        old = self._frame(path) if path.is_file() and path.stat().st_size else pd.DataFrame(columns=list(self.columns))
        frame = pd.concat([old, pd.DataFrame(list(rows), columns=list(self.columns))], ignore_index=True)
        with atomic_write(path, newline="") as f:
            frame.to_csv(f, index=False, float_format="%.6g")

    def check_appendable(self, path: str | Path) -> None:
        """Refuse, before anything is measured, a path this layout cannot append to.

        Raises:
            ValueError: If ``path`` is a folder, or a file of another layout (one line saying so).
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; name a file in it, e.g. {path / (self.name + '.csv')}")
        if path.is_file():
            self.read(path)

    def read(self, path: str | Path) -> list[dict[str, object]]:
        """Every row, typed (an empty ``float`` is NaN, an empty ``int`` None); [] for a missing file."""
        path = Path(path)
        if not path.is_file():
            return []
        frame = self._frame(path)
        return [{c: _parse(row[c], t) for c, t in self.columns.items()} for row in frame.to_dict("records")]

    def _frame(self, path: Path) -> pd.DataFrame:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        header = list(frame.columns)
        if header not in (list(self.columns), [c for c in self.columns if c not in self.optional]):
            raise ValueError(
                f"{path} is not a results file of the {self.name} layout (its header: {', '.join(header)})"
            )
        for column, value in self.optional.items():
            if column not in frame:
                frame.insert(list(self.columns).index(column), column, str(value))
        return frame


def _parse(text: str, kind: type) -> object:
    if text == "":
        return math.nan if kind is float else (None if kind is int else "")
    return kind(float(text)) if kind is int else kind(text)


ZOO = Layout(
    "zoo",
    {
        "config": str,
        "overrides": str,  # CLI overrides: what shortened the run, or its precision ("" for neither)
        "model": str,
        "parameters": int,
        "seed": int,
        "test_accuracy": float,
        "macro_f1": float,
        "epochs": int,
        "seconds_per_epoch": float,
        "fit_seconds": float,
        "test_seconds": float,
        "run_dir": str,
        **MACHINE_COLUMNS,
    },
)
TIME_TO_ACCURACY = Layout(
    "time_to_accuracy",
    {
        "run": str,  # a config's file name without .yaml, or "peer"
        "source": str,  # the config's path, or the peer's repository and commit
        "overrides": str,  # what shortened the run ("" for a full one)
        "seed": int,
        "test_accuracy": float,
        "seconds": float,  # what the ratios use: fit + test, or the peer's time to its best epoch
        "fit_seconds": float,
        "test_seconds": float,
        "whole_seconds": float,  # every process of the run, start to exit
        "best_epoch": int,  # 1-based; by validation accuracy for the package, by test accuracy for the peer
        "epochs": int,
        "timed": str,  # a recipe's process(es): "study" (one zoo.py process) or "fit, test" (two CLI processes)
        **MACHINE_COLUMNS,
    },
    optional={"timed": "fit, test"},
)
EPOCH_SPEED = Layout(
    "epoch_speed",
    {
        "model": str,
        "precision": str,
        "path": str,  # "bound", "loop", "package" or "usual" (epoch_speed.py's docstring)
        "repeat": int,  # 1-based: the paths run round-robin within a repeat
        "limit_batches": int,  # empty for whole epochs
        "workers": int,  # DataLoader workers of the usual pipeline
        "threads": int,  # torch threads (0: PyTorch's default)
        "train_img_s": float,
        "epoch_s": float,
        "peak_rss_mb": float,
        **MACHINE_COLUMNS,
    },
)
SWEEP_THROUGHPUT = Layout(
    "sweep_throughput",
    {
        "model": str,
        "jobs": int,  # worker processes of the k-fold command (1: one process using every core)
        "threads_per_worker": int,
        "repeat": int,  # 1-based: --jobs 1 and --jobs N run round-robin within a repeat
        "folds": int,
        "epochs": int,  # per training
        "limit_batches": int,  # empty for whole epochs
        "trainings": int,
        "train_images": int,  # of all the trainings together
        "wall_s": float,  # the whole command, start to exit
        "images_per_s": float,
        "fit_s_per_training": float,
        **MACHINE_COLUMNS,
    },
)
#: The robustness figures of a study record (``fmnist_lightning.studies.results.ROBUSTNESS_METRICS``) a
#: ``zoo_robustness`` row keeps.
ZOO_ROBUSTNESS_FIGURES = ("corruption_acc", "clean_ece", "clean_ece_scaled", "corrupted_ece", "clean_nll")
ZOO_ROBUSTNESS_FIGURES += ("ood_auroc_digits", "ood_auroc_noise")
ZOO_ROBUSTNESS = Layout(
    "zoo_robustness",
    {
        "config": str,
        "overrides": str,
        "model": str,
        "seed": int,
        "clean_accuracy": float,
        "corruption_images": int,  # corrupted test images per corruption and severity
        **dict.fromkeys(ZOO_ROBUSTNESS_FIGURES, float),
        "mce": float,  # against mce_reference's run of the same seed; 1 for the reference itself
        "relative_mce": float,
        "mce_reference": str,  # a config's file name
        "robustness_seconds": float,
        "report_dir": str,
        **MACHINE_COLUMNS,
    },
)
ZOO_CORRUPTIONS = Layout(
    "zoo_corruptions",
    {
        "config": str,
        "overrides": str,
        "model": str,
        "seed": int,
        "corruption": str,  # fmnist_lightning.corruptions' name; "clean" at severity 0
        "severity": int,
        "images": int,
        "accuracy": float,
        **MACHINE_COLUMNS,  # the run's own: its zoo_robustness row's
    },
)
LAYOUTS = (ZOO, TIME_TO_ACCURACY, EPOCH_SPEED, SWEEP_THROUGHPUT, ZOO_ROBUSTNESS, ZOO_CORRUPTIONS)
PEER = "peer"


def layout_of(path: str | Path) -> Layout:
    """The layout whose header the file has."""
    for layout in LAYOUTS:
        try:
            layout.read(path)
            return layout
        except ValueError:
            continue
    header = ", ".join(pd.read_csv(path, nrows=0).columns)
    raise ValueError(f"{path} is not a results file of this project (its header: {header})")


def machine() -> dict[str, object]:
    """This machine: CPU model, usable cores, torch version, the device a run uses, today's date."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    import torch

    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "device": device,
        "date": datetime.date.today().isoformat(),
    }


# --- formatting ---------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def percent(values: Sequence[float], digits: int = 2) -> str:
    """``93.22 ± 0.04%`` of accuracies in [0, 1]; the mean alone for one value."""
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.{digits}f}%" if math.isnan(std) else f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}%"


def number(values: Sequence[float], digits: int = 0) -> str:
    """``318 ± 41``; the mean alone for one value, empty for none."""
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def p_value(p: float) -> str:
    """Two significant digits (``0.0031``, ``1.2e-06``); empty for NaN."""
    return "" if math.isnan(p) else f"{p:.2g}"


def machines_line(rows: Sequence[Mapping[str, object]]) -> str:
    """Which machine the rows were measured on (a warning when they come from several)."""
    seen = dict.fromkeys(f"{r['cpu']}, {r['cores']} cores, torch {r['torch']}, {r['device']}" for r in rows)
    dates = sorted({str(r["date"]) for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    if len(seen) == 1:
        return f"Machine: {next(iter(seen))}; measured {when}."
    return f"Machines (several: compare rows of one machine only): {'; '.join(seen)}; measured {when}."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    columns = {str(i): title for i, title in enumerate(header)}
    return markdown_table([dict(zip(columns, row, strict=True)) for row in rows], columns, align=align).splitlines()


# --- the zoo --------------------------------------------------------------------------------------


def _group(rows: Sequence[Mapping[str, object]], *keys: str) -> dict[tuple, list[Mapping[str, object]]]:
    groups: dict[tuple, list[Mapping[str, object]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _by_seed(rows: Sequence[Mapping[str, object]], field: str = "test_accuracy") -> dict[int, float]:
    return {int(r["seed"]): float(r[field]) for r in rows}


def shortened(overrides: str) -> bool:
    """Whether a run's overrides cut it short (fewer batches or epochs), unlike ``--trainer.precision``."""
    return any(o.startswith(SHORTENING_PREFIXES) for o in overrides.split())


def _config_label(config: str, overrides: str) -> str:
    name = Path(config).name
    if not overrides:
        return f"`{name}`"
    return f"`{name}` ({'shortened: ' if shortened(overrides) else ''}`{overrides}`)"


def _row_matches(key: tuple, wanted: str) -> bool:
    """Whether a row is ``wanted``: a config's name, then its overrides if it has any (a precision)."""
    config, overrides = key
    name, _, wanted_overrides = wanted.partition(" ")
    return (
        not shortened(overrides)
        and wanted_overrides.strip() == overrides
        and name in (config, Path(config).name, Path(config).stem)
    )


def paired_by_seed(a: Mapping[int, float], b: Mapping[int, float]):
    """``fmnist_lightning.stats.paired_ttest`` of ``a - b`` over the seeds both have; None under 2 seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    return paired_ttest([a[s] for s in seeds], [b[s] for s in seeds])


def zoo_table(rows: Sequence[Mapping[str, object]], pairs: Sequence[tuple[str, str]] = ()) -> str:
    """The model zoo as markdown: one row per config (and overrides), mean ± std over its seeds.

    The best full-length row (highest mean test accuracy) is in bold; ``p vs best`` is the two-sided p-value of a
    paired t-test of its accuracies against the row's, matched by seed, then Holm-adjusted over all
    those comparisons (in brackets). ``pairs`` (config names, e.g. ``("fashioncnn.yaml",
    "fashioncnn_study001.yaml")``) add a table of ``A - B`` with its 95% interval and p-value.

    Raises:
        ValueError: If a config of ``pairs`` has no full-length row.
    """
    if not rows:
        return "(no results)"
    groups = _group(rows, "config", "overrides")
    means = {k: statistics.mean(float(r["test_accuracy"]) for r in g) for k, g in groups.items()}
    full = [k for k in groups if not shortened(k[1])] or list(groups)  # a shortened row is never "the best"
    best = max(full, key=means.__getitem__)
    tests = {k: paired_by_seed(_by_seed(groups[best]), _by_seed(g)) for k, g in groups.items() if k != best}
    keys = [k for k, t in tests.items() if t is not None]
    adjusted = dict(zip(keys, holm([tests[k].p_value for k in keys]), strict=True))
    lines = []
    for key, group in groups.items():
        epochs = sorted({int(r["epochs"]) for r in group})
        accuracy = percent([float(r["test_accuracy"]) for r in group])
        test = tests.get(key)
        lines.append(
            [
                f"`{group[0]['model']}`",
                f"{int(group[0]['parameters']):,}",
                _config_label(*key),
                str(len(group)),
                f"**{accuracy}**" if key == best else accuracy,
                number([float(r["macro_f1"]) for r in group], 4),
                str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                number([float(r["seconds_per_epoch"]) for r in group], 1),
                "best" if key == best else (f"{p_value(test.p_value)} ({p_value(adjusted[key])})" if test else ""),
            ]
        )
    header = ["model", "parameters", "config", "seeds", "test accuracy", "macro-F1", "epochs"]
    header += ["s / training epoch", "p vs best (Holm)"]
    out = _table(header, lines, "lrlrrrrrr")
    if pairs:
        out += ["", *pairs_table(groups, pairs)]
    out += ["", machines_line(rows)]
    return "\n".join(out)


def pairs_table(groups: Mapping[tuple, Sequence[Mapping[str, object]]], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``A - B`` in test accuracy (points), its 95% interval and the paired t-test's p-value, per pair."""
    lines = []
    for a, b in pairs:
        found = []
        for wanted in (a, b):
            key = next((k for k in groups if _row_matches(k, wanted)), None)
            if key is None:
                raise ValueError(f"--pair: no full-length row of config {wanted!r}")
            found.append(key)
        test = paired_by_seed(_by_seed(groups[found[0]]), _by_seed(groups[found[1]]))
        if test is None:
            lines.append([f"`{a}`", f"`{b}`", "fewer than 2 shared seeds", "", "", ""])
            continue
        lines.append(
            [
                f"`{a}`",
                f"`{b}`",
                str(test.n),
                f"{100 * test.mean_diff:+.2f}",
                f"[{100 * test.ci_low:+.2f}, {100 * test.ci_high:+.2f}]",
                p_value(test.p_value),
            ]
        )
    header = ["A", "B", "shared seeds", "A - B (points)", "95% interval", "p (paired t)"]
    return _table(header, lines, "llrrrr")


def zoo_robustness_table(rows: Sequence[Mapping[str, object]]) -> str:
    """The zoo on the corruption benchmark as markdown: one row per config, mean ± std over its seeds.

    The most robust row (highest mean corruption accuracy) is in bold; ``p vs most robust`` is the
    paired t-test (matched by seed) of its corruption accuracies against the row's, Holm-adjusted.
    """
    if not rows:
        return "(no results)"
    groups = _group(rows, "config", "overrides")
    means = {k: statistics.mean(float(r["corruption_acc"]) for r in g) for k, g in groups.items()}
    best = max(means, key=means.__getitem__)
    field = "corruption_acc"
    tests = {k: paired_by_seed(_by_seed(groups[best], field), _by_seed(g, field)) for k, g in groups.items()}
    del tests[best]
    keys = [k for k, t in tests.items() if t is not None]
    adjusted = dict(zip(keys, holm([tests[k].p_value for k in keys]), strict=True))
    lines = []
    for key, group in sorted(groups.items(), key=lambda kv: -means[kv[0]]):

        def figures(name: str, digits: int = 3, group: Sequence[Mapping[str, object]] = group) -> str:
            return number([float(r[name]) for r in group], digits)

        corrupted = percent([float(r["corruption_acc"]) for r in group], 1)
        test = tests.get(key)
        lines.append(
            [
                f"`{group[0]['model']}`",
                _config_label(*key),
                str(len(group)),
                percent([float(r["clean_accuracy"]) for r in group], 2),
                f"**{corrupted}**" if key == best else corrupted,
                figures("mce", 2),
                figures("relative_mce", 2),
                figures("clean_ece"),
                figures("clean_ece_scaled"),
                figures("corrupted_ece"),
                figures("ood_auroc_digits"),
                figures("ood_auroc_noise"),
                "best" if key == best else (f"{p_value(test.p_value)} ({p_value(adjusted[key])})" if test else ""),
            ]
        )
    header = ["model", "config", "seeds", "clean acc", "corruption acc", "mCE", "rel. mCE", "ECE", "ECE (T)"]
    header += ["ECE corrupted", "OOD AUROC digits", "OOD AUROC noise", "p vs most robust (Holm)"]
    references = sorted({str(r["mce_reference"]) for r in rows})
    images = sorted({int(r["corruption_images"]) for r in rows})
    out = _table(header, lines, "llrrrrrrrrrrr")
    out += [
        "",
        f"Corruption acc: mean test accuracy over 12 corruptions x 5 severities ({'/'.join(map(str, images))} "
        f"corrupted test images each); mCE and relative mCE: Hendrycks and Dietterich's corruption error against "
        f"{', '.join(f'`{r}`' for r in references)} of the same seed (1 for it); ECE before and after temperature "
        "scaling fitted on the validation split, and on the corrupted images; OOD AUROC of the maximum softmax "
        "probability, test images against scikit-learn's digits and uniform noise.",
        "",
        machines_line(rows),
    ]
    return "\n".join(out)


# --- time to accuracy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A time-to-accuracy target: ``slow`` takes at least ``min_ratio`` times as long as ``fast``,
    and ``fast`` reaches ``min_accuracy`` on every seed (``every_seed``) or on average.

    Attributes:
        slow: The slower run (a config's name or ``peer``).
        fast: The faster run.
        min_ratio: The speed-up to reach.
        min_accuracy: ``fast``'s test accuracy to reach, in [0, 1].
        every_seed: Whether every seed must reach it (else the mean).
        lowest: With the mean, no seed of ``fast`` under this accuracy (None: no such floor).
    """

    slow: str
    fast: str
    min_ratio: float
    min_accuracy: float
    every_seed: bool
    lowest: float | None = None


#: The peer's time to its best test accuracy against fast.yaml's fit + test; tinyvgg.yaml against fast94.yaml;
#: the speedrun: tinyvgg.yaml against speedrun94.yaml (94.0% mean, no seed under 93.7%), airbench_wide.yaml
#: against speedrun95.yaml (95.0% mean).
TARGETS = (
    Target(PEER, "fast", 6.0, 0.930, every_seed=True),
    Target("tinyvgg", "fast94", 3.0, 0.940, every_seed=False),
    Target("tinyvgg", "speedrun94", 8.0, 0.940, every_seed=False, lowest=0.937),
    Target("airbench_wide", "speedrun95", 3.0, 0.950, every_seed=False),
)


def _what_is_timed(run: str, group: Sequence[Mapping[str, object]]) -> str:
    if run == PEER:
        epochs = ", ".join(str(r["best_epoch"]) for r in group)
        of = sorted({int(r["epochs"]) for r in group})
        return (
            f"start to the end of its best test epoch (epoch {epochs} of {'/'.join(map(str, of))}); whole run "
            f"{number([float(r['whole_seconds']) for r in group])} s"
        )
    fit, test = ([float(r[k]) for r in group] for k in ("fit_seconds", "test_seconds"))
    if {r["timed"] for r in group} == {"study"}:
        times = f"fit {number(fit)}, test {number(test)} in it"
        return f"a one-run study (fit, test, tables) in its own process, start to exit ({times})"
    return f"fit + test, start to exit (fit {number(fit)}, test {number(test)})"


def ratio_rows(rows: Sequence[Mapping[str, object]], targets: Sequence[Target] = TARGETS) -> list[dict[str, object]]:
    """Each target whose two runs are in ``rows``: the ratio of mean times, per-seed ratios, and whether it is met."""
    groups = {k[0]: g for k, g in _group(rows, "run").items()}
    out = []
    for t in targets:
        if t.slow not in groups or t.fast not in groups:
            continue
        slow, fast = _by_seed(groups[t.slow], "seconds"), _by_seed(groups[t.fast], "seconds")
        accuracies = [float(r["test_accuracy"]) for r in groups[t.fast]]
        ratio = statistics.mean(slow.values()) / statistics.mean(fast.values())
        reached = min(accuracies) if t.every_seed else statistics.mean(accuracies)
        floor_met = t.lowest is None or min(accuracies) >= t.lowest
        out.append(
            {
                "target": t,
                "ratio": ratio,
                "per_seed": {s: slow[s] / fast[s] for s in sorted(set(slow) & set(fast))},
                "accuracy": reached,
                "share": sum(a >= t.min_accuracy for a in accuracies) / len(accuracies),
                "met": ratio >= t.min_ratio and reached >= t.min_accuracy and floor_met,
            }
        )
    return out


def time_to_accuracy_tables(rows: Sequence[Mapping[str, object]]) -> str:
    """Accuracy and time (mean ± std over seeds) per run, then the ratios of :data:`TARGETS`, as markdown."""
    if not rows:
        return "(no results)"
    groups = {k[0]: g for k, g in _group(rows, "run").items()}
    lines = []
    for run, group in groups.items():
        accuracies = [float(r["test_accuracy"]) for r in group]
        mean = summarize(accuracies)
        interval = "" if math.isnan(mean.ci_low) else f"[{100 * mean.ci_low:.2f}, {100 * mean.ci_high:.2f}]"
        lines.append(
            [
                "study 001's code (peer)" if run == PEER else f"`{run}`",
                str(len(group)),
                percent(accuracies),
                interval,
                ", ".join(f"{100 * a:.2f}" for a in accuracies),
                number([float(r["seconds"]) for r in group]),
                _what_is_timed(run, group),
            ]
        )
    header = ["run", "seeds", "test accuracy", "95% interval of the mean", "per seed (%)", "time (s)", "what is timed"]
    out = _table(header, lines, "lrrrrrl")
    ratios = []
    for r in ratio_rows(rows):
        t = r["target"]
        slow = "peer's time to its best" if t.slow == PEER else f"`{t.slow}` fit + test"
        condition = f"`{t.fast}` >= {100 * t.min_accuracy:.1f}% " + ("on every seed" if t.every_seed else "mean")
        condition += f", none under {100 * t.lowest:.1f}%" if t.lowest is not None else ""
        ratios.append(
            [
                f"{slow} / `{t.fast}` fit + test",
                f"{r['ratio']:.2f}x",
                ", ".join(f"{v:.2f}x" for v in r["per_seed"].values()),
                f">= {t.min_ratio:g}x",
                f"{condition} ({'lowest' if t.every_seed else 'mean'}: {100 * r['accuracy']:.2f}%)",
                f"{100 * r['share']:.0f}%",
                "yes" if r["met"] else "no",
            ]
        )
    if ratios:
        header = ["ratio (of mean times)", "value", "per seed", "target", "accuracy condition", "seeds at it", "met"]
        out += ["", *_table(header, ratios, "lrrllrl")]
    cut = sorted({str(r["overrides"]) for r in rows if r["overrides"]})  # this layout's overrides only shorten
    if cut:
        out += ["", f"Shortened runs ({'; '.join(cut)}): a check that it runs, not a measurement."]
    out += ["", machines_line(rows)]
    return "\n".join(out)


# --- epoch speed ----------------------------------------------------------------------------------


def epoch_speed_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Epoch speed as markdown: mean ± std over the repeats per model, precision and path, with the ratios.

    ``epoch / bound`` is the row's mean epoch time over the compute bound's (same model, precision and
    batches); ``usual / this`` the usual pipeline's over the row's. A path cut to ``--limit-batches`` says so.
    """
    groups = _group(rows, "model", "precision", "limit_batches", "path")

    def mean_epoch(model: object, precision: object, limit: object, path: object) -> float:
        return _mean_std([float(r["epoch_s"]) for r in groups.get((model, precision, limit, path), [])])[0]

    table_rows = []
    for (model, precision, limit, path), group in groups.items():
        epoch, bound, usual = (mean_epoch(model, precision, limit, p) for p in (path, "bound", "usual"))
        table_rows.append(
            [
                str(model),
                str(precision),
                str(path) if limit is None else f"{path} ({limit} batches)",
                str(len(group)),
                number([float(r["train_img_s"]) for r in group]),
                number([float(r["epoch_s"]) for r in group], 1),
                "" if math.isnan(bound) else f"{epoch / bound:.2f}x",
                "" if math.isnan(usual) else f"{usual / epoch:.2f}x",
                f"{max(float(r['peak_rss_mb']) for r in group):.0f}",
            ]
        )
    header = ["model", "precision", "path", "runs", "train img/s", "epoch s", "epoch / bound", "usual / this"]
    out = _table([*header, "peak RSS MB"], table_rows, "lllrrrrrr")
    return "\n".join([*out, "", machines_line(rows)])


# --- sweep throughput ----------------------------------------------------------------------------


def sweep_throughput_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Sweep throughput as markdown: images/s and wall time (mean ± std over repeats) per model and ``--jobs``.

    ``vs --jobs 1`` is the row's mean images/s over the same model's and study's ``--jobs 1``;
    ``rounds won`` counts the repeats in which the row trained more images per second than
    ``--jobs 1`` did in the same repeat. A study cut to ``--limit-batches`` says so.
    """
    groups = _group(rows, "model", "folds", "epochs", "limit_batches", "jobs")
    table_rows = []
    for (model, folds, epochs, limit, jobs), group in groups.items():
        single = {int(r["repeat"]): float(r["images_per_s"]) for r in groups.get((model, folds, epochs, limit, 1), [])}
        rates = [float(r["images_per_s"]) for r in group]
        study = f"{folds} folds x {epochs} epoch{'s' if epochs != 1 else ''}"
        shared = [r for r in group if int(r["repeat"]) in single]
        won = sum(float(r["images_per_s"]) > single[int(r["repeat"])] for r in shared)
        table_rows.append(
            [
                str(model),
                study if limit is None else f"{study} ({limit} batches)",
                str(jobs),
                str(group[0]["threads_per_worker"]),
                str(len(group)),
                f"{int(group[0]['train_images']):,}",
                number(rates),
                number([float(r["wall_s"]) for r in group], 1),
                f"{statistics.mean(rates) / statistics.mean(single.values()):.2f}x" if single else "",
                "" if jobs == 1 or not shared else f"{won} of {len(shared)}",
            ]
        )
    header = ["model", "study", "`--jobs`", "torch threads / worker", "runs", "images trained", "images/s"]
    out = _table([*header, "wall s", "vs `--jobs 1`", "rounds won"], table_rows, "llrrrrrrrr")
    return "\n".join([*out, "", machines_line(rows)])


def render(paths: str | Path | Sequence[str | Path], pairs: Sequence[tuple[str, str]] = ()) -> str:
    """The markdown of one results file, or of several of one layout as one table, whichever the layout.

    Raises:
        ValueError: If the files have different layouts, two zoo files hold the same config, overrides
            and seed, or ``pairs`` are given for a layout other than the zoo's.
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    layouts = {layout.name: layout for layout in map(layout_of, paths)}
    if len(layouts) > 1:
        raise ValueError(f"one table needs files of one layout; these have {', '.join(sorted(layouts))}")
    [layout] = layouts.values()
    rows = [row for path in paths for row in layout.read(path)]
    if layout is ZOO:
        runs = Counter((r["config"], r["overrides"], r["seed"]) for r in rows)
        twice = sorted(run for run, n in runs.items() if n > 1)
        if twice:
            config, overrides, seed = twice[0]
            run = " ".join(x for x in (Path(config).name, overrides, f"seed {seed}") if x)
            raise ValueError(f"{run} is in more than one of the files; a run belongs in one results file")
        return zoo_table(rows, pairs)
    if pairs:
        raise ValueError("--pair is for zoo results")
    if layout is EPOCH_SPEED:
        return epoch_speed_table(rows)
    if layout is SWEEP_THROUGHPUT:
        return sweep_throughput_table(rows)
    if layout is ZOO_ROBUSTNESS:
        return zoo_robustness_table(rows)
    if layout is ZOO_CORRUPTIONS:
        return zoo_corruptions_table(rows)
    return time_to_accuracy_tables(rows)


def zoo_corruptions_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Accuracy per corruption (rows) and config (columns), in %, mean over the severities and seeds."""
    if not rows:
        return "(no results)"
    corrupted = [r for r in rows if int(r["severity"]) > 0]
    configs = list(_group(corrupted, "config", "overrides"))
    corruptions = list(dict.fromkeys(str(r["corruption"]) for r in corrupted))
    cells = _group(corrupted, "corruption", "config", "overrides")

    def mean(corruption: str, key: tuple) -> str:
        return f"{100 * statistics.mean(float(r['accuracy']) for r in cells[(corruption, *key)]):.1f}"

    lines = [[c.replace("_", " "), *(mean(c, k) for k in configs)] for c in corruptions]
    seeds = sorted({int(r["seed"]) for r in corrupted})
    severities = sorted({int(r["severity"]) for r in corrupted})
    header = ["corruption", *(_config_label(*k).replace("`", "") for k in configs)]
    out = _table(header, lines, "l" + "r" * len(configs))
    note = f"Mean over severities {severities[0]}-{severities[-1]} and seeds {', '.join(map(str, seeds))}."
    return "\n".join([*out, "", note, "", machines_line(rows)])


# --- headline rows across files --------------------------------------------------------------------


def _headline_group(path: Path, name: str) -> list[Mapping[str, object]]:
    """The rows of ``path`` that are the run ``name``: a zoo file's config (then its overrides, if it
    has any), or a time-to-accuracy file's run (a config's name with or without ``.yaml``)."""
    layout = layout_of(path)
    rows = layout.read(path)
    if layout is ZOO:
        groups = [g for key, g in _group(rows, "config", "overrides").items() if _row_matches(key, name)]
    elif layout is TIME_TO_ACCURACY:
        groups = [g for (run,), g in _group(rows, "run").items() if run in (name, Path(name).stem)]
    else:
        raise ValueError(f"--headline takes zoo or time_to_accuracy files; {path.name} is {layout.name}")
    if len(groups) != 1:
        raise ValueError(f"{path.name} has no full-length run {name!r}")
    return groups[0]


def headline_table(selection: Sequence[tuple[str | Path, str]]) -> str:
    """One row per ``(file, run name)``: test accuracy over the seeds, fit and test seconds, machine, date."""
    lines = []
    for path, name in selection:
        group = _headline_group(Path(path), name)
        fit = [float(r["fit_seconds"]) for r in group]
        minutes = f" ({statistics.mean(fit) / 60:.1f} min)" if statistics.mean(fit) >= 120 else ""
        first = group[0]
        dates = sorted({str(r["date"]) for r in group})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        device = "" if first["device"] == "cpu" else f", {first['device']}"
        lines.append(
            [
                _config_label(str(first.get("config") or first["source"]), str(first["overrides"])),
                percent([float(r["test_accuracy"]) for r in group]),
                str(len(group)),
                f"{number(fit)} s{minutes}",
                f"{number([float(r['test_seconds']) for r in group])} s",
                f"{first['cpu']}, {first['cores']} cores{device}; {when}",
            ]
        )
    header = ["config", "test accuracy", "seeds", "fit", "test", "machine; date"]
    return "\n".join(_table(header, lines, "lrrrrl"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "results", type=Path, nargs="*", help="A results CSV (docs/results/*.csv), or several of one layout: one table."
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="Compare two configs of a zoo file: a name, then its overrides if the row has any "
        "('a.yaml --trainer.precision=bf16-mixed').",
    )
    parser.add_argument(
        "--headline",
        nargs=2,
        action="append",
        default=[],
        metavar=("FILE", "NAME"),
        help="Instead of whole files: one summary row of the run NAME of FILE (a zoo or time-to-accuracy file), "
        "repeated for more rows.",
    )
    args = parser.parse_args(argv)
    if bool(args.results) == bool(args.headline):
        parser.error("give results files or --headline FILE NAME rows: one of the two")
    if args.headline and args.pair:
        parser.error("--pair is for whole zoo files, not --headline rows")
    missing = [str(path) for path in [*args.results, *(Path(f) for f, _ in args.headline)] if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        if args.headline:
            print(headline_table([(Path(f), name) for f, name in args.headline]))
            return
        print(render(args.results, [tuple(p) for p in args.pair]))
    except ValueError as err:
        parser.exit(1, f"results_tables.py: error: {err}\n")


if __name__ == "__main__":
    main()
