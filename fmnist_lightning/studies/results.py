"""A study's results: collected from its Optuna storage, written as tables and TensorBoard HParams.

Written in the study folder at the end of every command, from the storage alone (so every machine
sharing a study writes the same tables, and a re-run rewrites them to match the storage):

- ``cells.csv``: one row per training (point, fold, seed, validation accuracy and loss at the best
  checkpoint, last epoch's, epochs, images trained, seconds of its last ``fit`` (only the part after
  the restart, for a run continued after a killed worker: ``resumed``), worker, run folder);
- ``results.csv``: k-fold: one row per fold (and seed); a sweep: one row per point with mean and
  std over its cells, the best point marked, and for an ablation the difference to the reference
  with its 95% interval, p-value and Holm-adjusted p-value (and McNemar on the refits' test
  predictions, if refitted);
- ``results.md``: the same as markdown tables; a two-key grid also as a matrix (rows: first key,
  columns: second key), study 004's Table 2 layout;
- ``hparams/``: one TensorBoard HParams entry per point (``tensorboard --logdir <study>/hparams``).

``val acc`` of a cell is the validation accuracy of its best checkpoint (``ModelCheckpoint`` on
``val/acc``), ``val loss`` the validation loss at that epoch.
"""

import json
import math
import shutil
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from fmnist_lightning.io import atomic_write, markdown_table, write_text
from fmnist_lightning.stats import (
    PairedComparison,
    corrected_resampled_ttest,
    discordant_counts,
    holm,
    mcnemar_exact,
    mean_std,
    paired_ttest,
    summarize,
)
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, format_value, short_names

CELL_ATTR_PREFIX = "cell:"
CELL_COLUMNS = (
    "cell",
    "point",
    "fold",
    "seed",
    "val_acc",
    "val_loss",
    "best_epoch",
    "last_val_acc",
    "last_val_loss",
    "epochs",
    "train_images",
    "fit_seconds",
    "resumed",
    "worker",
    "run_dir",
)
TEST_COLUMNS = ("test_acc", "test_f1", "test_seconds", "seconds_per_epoch", "model", "parameters", "report_dir")


@dataclass
class Collected:
    """What a study's storage holds for its plan.

    Attributes:
        plan: The plan.
        points: The points (a search's: those whose trial completed, in trial order).
        cells: Cell key -> record, for every completed cell.
        refits: Point name -> refit record.
        errors: Cell key (or point) -> error message, for what failed and did not complete since.
    """

    plan: StudyPlan
    points: list[Point]
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    refits: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def expected(self) -> list[Cell]:
        """Every cell of the points."""
        return self.plan.cells(self.points)

    @property
    def missing(self) -> list[str]:
        """Keys of expected cells that did not complete."""
        return [c.key for c in self.expected if c.key not in self.cells]

    def records(self, point: Point) -> list[dict[str, Any]]:
        """Completed cell records of a point, in cell order."""
        return [self.cells[c.key] for c in self.plan.cells([point]) if c.key in self.cells]

    def is_complete(self, point: Point) -> bool:
        """Whether every cell of the point completed."""
        return len(self.records(point)) == len(self.plan.cells([point]))

    def best_point(self) -> Point | None:
        """The complete point with the highest mean validation accuracy (the first, on a tie)."""
        scores = {
            p.name: statistics.fmean(r["val_acc"] for r in self.records(p)) for p in self.points if self.is_complete(p)
        }
        return max((p for p in self.points if p.name in scores), key=lambda p: scores[p.name], default=None)


def collect(study: optuna.Study, plan: StudyPlan) -> Collected:
    """Read completed cells, search points and refits (the first completed trial of each key) from a study."""
    points = list(plan.points)
    collected = Collected(plan, points)
    errors: dict[str, str] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs, kind = t.user_attrs, t.user_attrs.get("kind")
        if t.state == TrialState.COMPLETE and kind == "cell":
            collected.cells.setdefault(attrs["cell"], attrs["result"])
        elif t.state == TrialState.COMPLETE and kind == "refit":
            collected.refits.setdefault(attrs["point"], attrs["result"])
        elif t.state == TrialState.COMPLETE and kind == "point":
            if all(p.name != attrs["point"] for p in points):
                points.append(Point(attrs["point"], plan.search_point(0, t.params).params))
            for key, value in attrs.items():
                if key.startswith(CELL_ATTR_PREFIX):
                    collected.cells.setdefault(key.removeprefix(CELL_ATTR_PREFIX), value)
        elif t.state == TrialState.FAIL and "error" in attrs:
            errors[attrs.get("cell") or attrs.get("point") or f"trial {t.number}"] = attrs["error"]
    # An error counts while its cell (or search point) has not completed since, by a retry.
    done = {*collected.cells, *(p.name for p in points if collected.is_complete(p))}
    done |= {f"refit/{p}" for p in collected.refits}
    collected.errors = {k: v for k, v in errors.items() if k not in done}
    return collected


# ---------------------------------------------------------------------------------------------
# Rows


def point_row(collected: Collected, point: Point, params: bool = True) -> dict[str, Any]:
    """Mean and std of a point's cells: ``n``, ``val_acc_mean``, ``val_acc_std``, ``val_loss_*``."""
    records = collected.records(point)
    row: dict[str, Any] = {"point": point.name, **(point.params if params else {}), "n": len(records)}
    for metric in ("val_acc", "val_loss"):
        summary = summarize([r[metric] for r in records]) if records else None
        row[f"{metric}_mean"] = summary.mean if summary else math.nan
        row[f"{metric}_std"] = summary.std if summary else math.nan
    return row


def compare_to_reference(
    collected: Collected, point: Point, reference: Point, metric: str = "val_acc"
) -> PairedComparison | None:
    """``metric`` (validation accuracy) of ``point`` minus the reference's, over matched folds and seeds.

    Without folds: a paired t-test over seeds. With K folds: the seeds of each fold are averaged
    (the folds stay the same for every seed, so seeds of one fold are not independent samples of
    the data) and the K fold differences get Nadeau and Bengio's corrected resampled t-test with
    ``n_test/n_train = 1/(K-1)``. None with fewer than two pairs.
    """
    mine = {(r["fold"], r["seed"]): r[metric] for r in collected.records(point)}
    ref = {(r["fold"], r["seed"]): r[metric] for r in collected.records(reference)}
    matched = sorted(set(mine) & set(ref), key=lambda k: (k[0] if k[0] is not None else -1, k[1]))
    folds = collected.plan.num_folds
    if folds is None:
        return paired_ttest([mine[k] for k in matched], [ref[k] for k in matched]) if len(matched) >= 2 else None
    fold_ids = sorted({k[0] for k in matched})
    if len(fold_ids) < 2:
        return None
    a = [statistics.fmean(mine[k] for k in matched if k[0] == f) for f in fold_ids]
    b = [statistics.fmean(ref[k] for k in matched if k[0] == f) for f in fold_ids]
    return corrected_resampled_ttest(a, b, 1 / (folds - 1))


def ablation_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per arm (reference first): its scores and, for variants, the test against the reference."""
    reference = next(p for p in collected.points if p.name == collected.plan.reference)
    rows = []
    for point in collected.points:
        row = point_row(collected, point, params=False)
        row["overrides"] = " ".join(f"{k}={format_value(v)}" for k, v in point.params.items())
        if point is not reference:
            test = compare_to_reference(collected, point, reference)
            row |= {
                "delta_acc": test.mean_diff if test else math.nan,
                "delta_ci_low": test.ci_low if test else math.nan,
                "delta_ci_high": test.ci_high if test else math.nan,
                "p_value": test.p_value if test else math.nan,
                "test": test.test if test else "",
            }
        rows.append(row)
    for row, p in zip(rows[1:], holm([r["p_value"] for r in rows[1:]]), strict=True):
        row["p_holm"] = p
    ref = collected.refits.get(reference.name)
    for row in rows:  # McNemar on the test predictions of each arm's refit against the reference's
        refit = collected.refits.get(row["point"])
        if refit is None:
            continue
        row["test_acc"] = refit["test_acc"]
        if ref is not None and row["point"] != reference.name and refit["test_index_sha"] == ref["test_index_sha"]:
            mine, theirs = ([c == "1" for c in r["test_correct"]] for r in (refit, ref))
            row["only_arm_right"], row["only_reference_right"] = discordant_counts(mine, theirs)
            row["mcnemar_p"] = mcnemar_exact(row["only_arm_right"], row["only_reference_right"])
    tested = [r for r in rows if "mcnemar_p" in r]
    for row, p in zip(tested, holm([r["mcnemar_p"] for r in tested]), strict=True):
        row["mcnemar_p_holm"] = p
    return rows


def zoo_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per configuration: test accuracy and the rest (mean ± std over seeds), paired t-test against the best.

    The best configuration is the one with the highest mean test accuracy; ``p_value`` is a paired
    t-test of its test accuracies against the row's, matched by seed, ``p_holm`` Holm-adjusted across
    the rows (a model zoo compares finished models; the validation accuracy stays beside it).
    """
    rows = []
    for point in collected.points:
        records = collected.records(point)
        row = point_row(collected, point, params=False) | {"model": records[0]["model"] if records else ""}
        row["parameters"] = records[0]["parameters"] if records else math.nan
        for metric in ("test_acc", "test_f1", "epochs", "seconds_per_epoch", "fit_seconds", "test_seconds"):
            values = [float(r[metric]) for r in records if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        rows.append(row)
    complete = [r for r in rows if r["n"]]
    best = max(complete, key=lambda r: r["test_acc_mean"], default=None)
    by_name = {p.name: p for p in collected.points}
    for row in rows:
        test = (
            None
            if best is None or row is best
            else compare_to_reference(collected, by_name[row["point"]], by_name[best["point"]], "test_acc")
        )
        row["best"], row["p_value"] = row is best, test.p_value if test else math.nan
    others = [r for r in rows if not math.isnan(r["p_value"])]
    for row, p in zip(others, holm([r["p_value"] for r in others]), strict=True):
        row["p_holm"] = p
    return rows


def sweep_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per point (grid order; a search sorted by accuracy), ``best`` marking the best point."""
    if collected.plan.kind == "configs":
        return zoo_rows(collected)
    if collected.plan.kind == "ablation":
        rows = ablation_rows(collected)
    else:
        rows = [point_row(collected, p) for p in collected.points]
        if collected.plan.kind == "search":
            rows.sort(key=lambda r: -r["val_acc_mean"] if not math.isnan(r["val_acc_mean"]) else math.inf)
        for row in rows:
            refit = collected.refits.get(row["point"])
            if refit is not None:
                row |= {"refit_val_acc": refit["val_acc"], "test_acc": refit["test_acc"], "test_f1": refit["test_f1"]}
    best = collected.best_point()
    for row in rows:
        row["best"] = best is not None and row["point"] == best.name
    return rows


# ---------------------------------------------------------------------------------------------
# Files


def write_results(study: optuna.Study, plan: StudyPlan, storage: str, command: str = "") -> Collected:
    """Write ``cells.csv``, ``results.csv``, ``results.md`` and ``hparams/`` into the study folder.

    Args:
        study: The study.
        plan: Its plan.
        storage: Where the study is stored, as the results should name it (a journal file or a masked URL).
        command: The command line, shown at the top of ``results.md``.

    Returns:
        What was collected from the study.
    """
    collected = collect(study, plan)
    out = plan.study_dir
    cells = [{**collected.cells[c.key], **c.point.params} for c in collected.expected if c.key in collected.cells]
    columns = [
        *CELL_COLUMNS,
        *(TEST_COLUMNS if plan.test else ()),
        *(plan.keys if plan.kind in ("grid", "search") else ()),
    ]
    _write_csv(out / "cells.csv", cells, columns)
    if plan.kind == "kfold":
        columns = ["fold", "seed", "val_loss", "val_acc", "best_epoch", "epochs", "run_dir"]
        _write_csv(out / "results.csv", cells, columns)
        body = _kfold_markdown(cells)
    else:
        rows = sweep_rows(collected)
        _write_csv(out / "results.csv", rows)
        body = _sweep_markdown(collected, rows)
        _write_hparams(out, collected, rows)
    what = {"kfold": "k-fold cross-validation", "grid": "grid sweep", "search": "search", "ablation": "ablation"}
    what["configs"] = "model zoo (every training tested)"
    split = "the config's validation split" if plan.num_folds is None else f"{plan.num_folds}-fold cross-validation"
    scoring = f" with {', '.join(f'{k}={format_value(v)}' for k, v in plan.scoring.items())}" if plan.scoring else ""
    seeds = f"training seed{'s' if len(plan.seeds) > 1 else ''} {', '.join(map(str, plan.seeds))}"
    subject = "Folds trained" if plan.kind == "kfold" else "Each point is scored"
    lines = [f"# {what[plan.kind]}: {plan.folder}", ""]
    lines += ["```bash", command, "```", ""] if command else []
    lines += [
        f"{subject} on {split}{scoring}, {seeds}. val acc: validation accuracy of the best checkpoint of each "
        "training (by val/acc); val loss: validation loss at that epoch; mean ± std over the trainings.",
        "",
        body,
        "",
        f"Trainings: {len(collected.expected) - len(collected.missing)} of {len(collected.expected)} complete.",
    ]
    if collected.errors:
        lines.append("Failed (run the same command again to retry):")
        lines += [f"- {key}: {(message.splitlines() or [''])[0]}" for key, message in collected.errors.items()]
    lines.append(f"Optuna study `{study.study_name}` in {storage} (`optuna-dashboard {storage}` shows it).")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    return collected


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Read ``results.csv`` or ``cells.csv`` back: numbers as numbers, booleans as booleans, empty cells NaN."""
    return pd.read_csv(path).to_dict("records")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r)) or ["point"]

    def cell(value: Any) -> Any:
        return json.dumps(value) if isinstance(value, list | dict) else value

    frame = pd.DataFrame([[cell(r.get(c)) for c in columns] for r in rows], columns=columns)
    with atomic_write(path, newline="") as f:
        frame.to_csv(f, index=False, float_format="%.6g")


def _write_hparams(out: Path, collected: Collected, rows: Sequence[dict[str, Any]]) -> None:
    """One TensorBoard HParams entry per point, written aside and swapped in (re-runs replace it)."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard's writer: only when a study ends

    tmp = out / f".hparams-{uuid.uuid4().hex[:8]}"
    writer = SummaryWriter(log_dir=str(tmp))
    by_name = {p.name: p for p in collected.points}
    for row in rows:
        point = by_name[row["point"]]
        params = {"arm": point.name} if collected.plan.kind == "ablation" else dict(point.params)
        hparams = {k: v if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in params.items()}
        metrics = {
            f"hparams/{k}": float(row[k])
            for k in ("val_acc_mean", "val_acc_std", "val_loss_mean", "val_loss_std", "test_acc")
            if k in row and not math.isnan(float(row[k]))
        }
        if metrics:
            writer.add_hparams(hparams, metrics, run_name=point.name)
    writer.close()
    final, old = out / "hparams", out / f".hparams-old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Markdown


def _p(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _signed(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.4f}"


def _kfold_markdown(cells: Sequence[dict[str, Any]]) -> str:
    rows = [{**r, "run": Path(r["run_dir"]).name} for r in cells]
    if cells:
        loss, acc = (summarize([r[k] for r in cells]) for k in ("val_loss", "val_acc"))
        rows.append({"fold": "**mean ± std**", "val_loss": f"**{loss}**", "val_acc": f"**{acc}**"})
    number = {k: (lambda v: v if isinstance(v, str) else f"{v:.4f}") for k in ("val_loss", "val_acc")}
    columns = {"fold": "fold", "seed": "seed", "val_loss": "val loss", "val_acc": "val acc"}
    return markdown_table(rows, {**columns, "best_epoch": "best epoch", "epochs": "epochs", "run": "run"}, number)


def _scores(row: dict[str, Any]) -> tuple[str, str]:
    loss = mean_std(row["val_loss_mean"], row["val_loss_std"])
    acc = mean_std(row["val_acc_mean"], row["val_acc_std"])
    return loss, f"**{acc}**" if row["best"] else acc  # the best point is the best by accuracy


def _sweep_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    plan = collected.plan
    if plan.kind == "ablation":
        return _ablation_markdown(collected, rows)
    if plan.kind == "configs":
        return _zoo_markdown(rows)
    names = short_names(plan.keys)
    table = []
    for row in rows:
        loss, acc = _scores(row)
        params = {names[k]: format_value(row[k]) for k in plan.keys}
        trial = {"trial": row["point"].split("-", 1)[0]} if plan.kind == "search" else {}
        table.append({**trial, **params, "val loss": loss, "val acc": acc, "n": row["n"], "": "best" * row["best"]})
    lines = [markdown_table(table)]
    if plan.kind == "grid" and len(plan.keys) == 2:
        first, second = plan.keys
        lines += ["", f"val acc by {names[first]} (rows) and {names[second]} (columns):", ""]
        by = {(json.dumps(r[first]), json.dumps(r[second])): _scores(r)[1] for r in rows}
        firsts, seconds = (list(dict.fromkeys(json.dumps(p.params[k]) for p in plan.points)) for k in plan.keys)
        matrix = [
            {f"{names[first]} \\ {names[second]}": format_value(json.loads(a))}
            | {format_value(json.loads(b)): by.get((a, b), "") for b in seconds}
            for a in firsts
        ]
        lines.append(markdown_table(matrix))
    refits = [r for r in rows if "test_acc" in r]
    if refits:
        lines += ["", "Refit of the best point on the config's train/validation split, tested on the test set:", ""]
        refit_rows = [{**r, "run": collected.refits[r["point"]]["run_dir"]} for r in refits]
        columns = {"point": "point", "refit_val_acc": "val acc (refit)", "test_acc": "test acc"}
        four = {k: (lambda v: f"{v:.4f}") for k in ("refit_val_acc", "test_acc", "test_f1")}
        lines.append(markdown_table(refit_rows, {**columns, "test_f1": "test macro-F1", "run": "run"}, four))
    return "\n".join(lines)


def _ablation_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    plan = collected.plan
    table = []
    for row in rows:
        loss, acc = _scores(row)
        entry = {"arm": row["point"], "overrides": row["overrides"] or "(config as is)", "val acc": acc}
        entry |= {"val loss": loss}
        if row["point"] != plan.reference:
            ci = (
                "n/a"
                if math.isnan(row["delta_ci_low"])
                else f"[{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}]"
            )
            entry |= {"Δ val acc": _signed(row["delta_acc"]), "95% CI of Δ": ci}
            entry |= {"p": _p(row["p_value"]), "p (Holm)": _p(row["p_holm"])}
        table.append({**entry, "n": row["n"]})
    columns = ["arm", "overrides", "val acc", "val loss", "Δ val acc", "95% CI of Δ", "p", "p (Holm)", "n"]
    method = (
        "paired t-test over seeds"
        if plan.num_folds is None
        else f"Nadeau and Bengio's corrected resampled t-test over the {plan.num_folds} folds "
        f"(seeds averaged within a fold; variance x (1/K + 1/(K-1)))"
    )
    tests = any(r.get("test") for r in rows[1:])
    lines = [
        markdown_table(table, dict(zip(columns, columns, strict=True))),
        "",
        f"Δ: arm minus reference on matched {'seeds' if plan.num_folds is None else 'folds and seeds'}; p: two-sided, "
        f"{method}{'' if tests else ' (needs at least two pairs)'}; p (Holm): Holm's step-down correction across "
        f"the {len(rows) - 1} variant(s).",
    ]
    refits = [r for r in rows if "test_acc" in r]
    if refits:
        ref = collected.refits.get(plan.reference or "")
        lines += [
            "",
            f"Refits (seed {plan.seeds[0]}, the config's train/validation split), tested on the test set:",
            "",
        ]
        body = [
            {
                "arm": r["point"],
                "test acc": f"{r['test_acc']:.4f}",
                "Δ test acc": ""
                if r["point"] == plan.reference or ref is None
                else _signed(r["test_acc"] - ref["test_acc"]),
                "only arm right": r.get("only_arm_right", ""),
                "only reference right": r.get("only_reference_right", ""),
                "McNemar p": _p(r["mcnemar_p"]) if "mcnemar_p" in r else "",
                "p (Holm)": _p(r["mcnemar_p_holm"]) if "mcnemar_p_holm" in r else "",
            }
            for r in refits
        ]
        lines.append(markdown_table(body))
    return "\n".join(lines)


def _zoo_markdown(rows: list[dict[str, Any]]) -> str:
    def both(row: dict[str, Any], metric: str, scale: float = 1.0, digits: int = 4) -> str:
        return mean_std(scale * row[f"{metric}_mean"], scale * row[f"{metric}_std"], digits)

    table = [
        {
            "config": row["point"],
            "model": row["model"],
            "parameters": f"{int(row['parameters']):,}" if row["n"] else "",
            "n": row["n"],
            "val acc": mean_std(row["val_acc_mean"], row["val_acc_std"]),
            "test acc": f"**{both(row, 'test_acc')}**" if row["best"] else both(row, "test_acc"),
            "test macro-F1": both(row, "test_f1"),
            "epochs": both(row, "epochs", digits=0),
            "s / epoch": both(row, "seconds_per_epoch", digits=1),
            "p vs best (Holm)": "best" if row["best"] else f"{_p(row['p_value'])} ({_p(row.get('p_holm'))})",
        }
        for row in rows
    ]
    note = (
        "test acc: test accuracy of each training's best checkpoint (by val/acc); p: two-sided paired t-test of the "
        "best configuration's test accuracies against the row's, matched by seed; Holm-adjusted across the rows."
    )
    return "\n".join([markdown_table(table), "", note])
