"""``python -m fmnist_lightning compare RUN_DIR RUN_DIR ...``: tables, a chart and McNemar tests.

Each RUN_DIR is a run folder holding ``report/`` (written by ``test``; the newest ``report*`` is
used) or a report folder itself. All runs must have predicted the same test images.
"""

import csv
import itertools
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fmnist_lightning import stats
from fmnist_lightning.errors import ConfigError
from fmnist_lightning.io import atomic_path, atomic_write, markdown_table, unused_path, write_text
from fmnist_lightning.predictions import read_predictions

COLUMNS = (
    ("model", "model"),
    ("parameters", "params"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("train_seconds_per_epoch", "train s/epoch"),
    ("inference_images_per_s", "inference img/s"),
)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the p-value of ``b`` vs ``c`` discordant pairs under H0 (p = 1/2).

    Args:
        b: Test images the first model gets right and the second wrong.
        c: Test images the first model gets wrong and the second right.

    Returns:
        ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``, from
        :func:`fmnist_lightning.stats.mcnemar_exact` (scipy's exact binomial test).
    """
    return stats.mcnemar_exact(b, c)


def find_report(path: Path) -> Path:
    """The report folder of a run folder (the newest ``report*``), or ``path`` if it is one."""
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder: give run folders (or their report folders) to compare.")
    if (path / "metrics.json").is_file():
        return path
    reports = sorted(
        (p for p in path.glob("report*") if (p / "metrics.json").is_file()), key=lambda p: p.stat().st_mtime
    )
    if not reports:
        raise ConfigError(f"{path} holds no test report (report/metrics.json): run `test` on it first.")
    return reports[-1]


def load_metrics(report: Path) -> dict:
    """The report's ``metrics.json``, checked for what the comparison needs."""
    file = report / "metrics.json"
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); run `test` on that run again.") from err
    numbers = ("accuracy", "macro_f1")
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(k), int | float) for k in numbers):
        raise ConfigError(f"{file} lacks {' and '.join(numbers)}: not a test report; run `test` on that run again.")
    return metrics


def compare_runs(paths: list[Path], output: Path) -> Path:
    """Write the comparison table (markdown, CSV), a bar chart and pairwise McNemar tests.

    Args:
        paths: Run or report folders, at least two.
        output: Folder to create for the results (a numbered name if it exists).

    Returns:
        The folder written.

    Raises:
        ConfigError: If a run has no report, or the runs' predictions are not on the same test images.
    """
    if len(paths) < 2:
        raise ConfigError("compare needs at least two runs.")
    reports = [find_report(p) for p in paths]
    seen: dict[Path, Path] = {}
    for path, report in zip(paths, reports, strict=True):
        if report.resolve() in seen:
            raise ConfigError(f"{path} and {seen[report.resolve()]} are the same report: give each run once.")
        seen[report.resolve()] = path
    names = [str(p) for p in paths]
    metrics = [load_metrics(r) for r in reports]
    predictions = [read_predictions(r / "predictions.csv") for r in reports]
    reference = predictions[0]
    for name, other in zip(names[1:], predictions[1:], strict=True):
        if other.index != reference.index or other.labels != reference.labels:
            raise ConfigError(
                f"{name} and {names[0]} did not predict the same test images ({len(other.index)} vs "
                f"{len(reference.index)} rows, or different labels): compare runs tested on the full test set."
            )
    out = unused_path(output)
    out.mkdir(parents=True)

    rows = [{"run": name, **{key: m.get(key) for key, _ in COLUMNS}} for name, m in zip(names, metrics, strict=True)]
    _write_csv(out / "comparison.csv", [{"run": r["run"], **{t: r[k] for k, t in COLUMNS}} for r in rows])
    tests = []
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        a_only, b_only = stats.discordant_counts(predictions[i].correct, predictions[j].correct)
        tests.append({"run_a": a, "run_b": b, "a_right_b_wrong": a_only, "a_wrong_b_right": b_only})
        tests[-1]["p_value"] = mcnemar_exact(a_only, b_only)
    _write_csv(out / "mcnemar.csv", tests)
    write_text(out / "comparison.md", comparison_markdown(rows, tests))

    fig = Figure(figsize=(max(6, 1.6 * len(names)), 4.5), layout="constrained")
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [m["accuracy"] for m in metrics], width=0.4, label="accuracy")
    ax.bar([i + 0.2 for i in x], [m["macro_f1"] for m in metrics], width=0.4, label="macro-F1")
    low = min(min(m["accuracy"], m["macro_f1"]) for m in metrics)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(list(x), [f"{n}\n{m['model']}" for n, m in zip(names, metrics, strict=True)], fontsize=7)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    with atomic_path(out / "comparison.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return out


def comparison_markdown(rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> str:
    """``comparison.md``: the table of runs (``run`` and :data:`COLUMNS`' keys), then the McNemar tests."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:.1f}"
        return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)

    columns = {"run": "run", **dict(COLUMNS)}
    table = markdown_table(rows, columns, {key: fmt for key in columns})
    pairs = {"run_a": "run A", "run_b": "run B", "a_right_b_wrong": "A right, B wrong"}
    pairs |= {"a_wrong_b_right": "A wrong, B right", "p_value": "p-value"}
    mcnemar = markdown_table(tests, pairs, {"p_value": lambda p: f"{p:.3g}"})
    return f"{table}\n\nMcNemar exact test on the shared test predictions (two-sided):\n\n{mcnemar}\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
