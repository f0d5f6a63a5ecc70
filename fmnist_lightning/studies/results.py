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

import csv
import json
import math
import os
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

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
from fmnist_lightning.studies.engine import CELL_ATTR_PREFIX, RESULT_ATTR, Session
from fmnist_lightning.studies.spec import Cell, Point, StudyPlan, format_value, short_names
from fmnist_lightning.studies.storage import journal_path

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
    cells: dict[str, dict[str, Any]] = {}
    refits: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs, kind = t.user_attrs, t.user_attrs.get("kind")
        if t.state == TrialState.COMPLETE and kind == "cell":
            cells.setdefault(attrs["cell"], attrs[RESULT_ATTR])
        elif t.state == TrialState.COMPLETE and kind == "refit":
            refits.setdefault(attrs["point"], attrs[RESULT_ATTR])
        elif t.state == TrialState.COMPLETE and kind == "point":
            found = plan.search_point(0, t.params)
            if all(p.name != attrs["point"] for p in points):
                points.append(Point(attrs["point"], found.params, found.overrides))
            for key, value in attrs.items():
                if key.startswith(CELL_ATTR_PREFIX):
                    cells.setdefault(key.removeprefix(CELL_ATTR_PREFIX), value)
        elif t.state == TrialState.FAIL and "error" in attrs:
            errors[attrs.get("cell") or attrs.get("point") or f"trial {t.number}"] = attrs["error"]
    collected = Collected(plan, points, cells, refits)
    # An error counts while its cell (or search point) has not completed since, by a retry.
    done = set(cells) | {p.name for p in points if collected.is_complete(p)} | {f"refit/{p}" for p in refits}
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


def compare_to_reference(collected: Collected, point: Point, reference: Point) -> PairedComparison | None:
    """Validation accuracy of ``point`` minus the reference's, over matched folds and seeds.

    Without folds: a paired t-test over seeds. With K folds: the seeds of each fold are averaged
    (the folds stay the same for every seed, so seeds of one fold are not independent samples of
    the data) and the K fold differences get Nadeau and Bengio's corrected resampled t-test with
    ``n_test/n_train = 1/(K-1)``. None with fewer than two pairs.
    """
    mine = {(r["fold"], r["seed"]): r["val_acc"] for r in collected.records(point)}
    ref = {(r["fold"], r["seed"]): r["val_acc"] for r in collected.records(reference)}
    matched = sorted(set(mine) & set(ref), key=lambda k: (k[0] if k[0] is not None else -1, k[1]))
    plan = collected.plan
    if plan.num_folds is None:
        if len(matched) < 2:
            return None
        return paired_ttest([mine[k] for k in matched], [ref[k] for k in matched])
    folds = sorted({k[0] for k in matched})
    if len(folds) < 2:
        return None
    a = [statistics.fmean(mine[k] for k in matched if k[0] == f) for f in folds]
    b = [statistics.fmean(ref[k] for k in matched if k[0] == f) for f in folds]
    return corrected_resampled_ttest(a, b, plan.test_train_ratio or 0.0)


def ablation_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per arm (reference first): its scores and, for variants, the test against the reference."""
    plan = collected.plan
    reference = next(p for p in collected.points if p.name == plan.reference)
    rows = []
    for point in collected.points:
        row = point_row(collected, point, params=False)
        row["overrides"] = " ".join(point.overrides)
        if point is not reference:
            test = compare_to_reference(collected, point, reference)
            row.update(
                delta_acc=test.mean_diff if test else math.nan,
                delta_ci_low=test.ci_low if test else math.nan,
                delta_ci_high=test.ci_high if test else math.nan,
                p_value=test.p_value if test else math.nan,
                test=test.test if test else "",
            )
        rows.append(row)
    adjusted = holm([r["p_value"] for r in rows[1:]])
    for row, p in zip(rows[1:], adjusted, strict=True):
        row["p_holm"] = p
    _add_refit_tests(collected, rows, reference)
    return rows


def _add_refit_tests(collected: Collected, rows: list[dict[str, Any]], reference: Point) -> None:
    """McNemar on the test predictions of each arm's refit against the reference's, Holm-adjusted."""
    ref = collected.refits.get(reference.name)
    for row in rows:
        refit = collected.refits.get(row["point"])
        if refit is None:
            continue
        row["test_acc"] = refit["test_acc"]
        if ref is None or row["point"] == reference.name or refit["test_index_sha"] != ref["test_index_sha"]:
            continue
        mine = [c == "1" for c in refit["test_correct"]]
        theirs = [c == "1" for c in ref["test_correct"]]
        only_mine, only_ref = discordant_counts(mine, theirs)
        row.update(only_arm_right=only_mine, only_reference_right=only_ref)
        row["mcnemar_p"] = mcnemar_exact(only_mine, only_ref)
    tested = [r for r in rows if "mcnemar_p" in r]
    for row, p in zip(tested, holm([r["mcnemar_p"] for r in tested]), strict=True):
        row["mcnemar_p_holm"] = p


def sweep_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per point (grid order; a search sorted by accuracy), ``best`` marking the best point."""
    if collected.plan.kind == "ablation":
        rows = ablation_rows(collected)
    else:
        rows = [point_row(collected, p) for p in collected.points]
        if collected.plan.kind == "search":
            rows.sort(key=lambda r: -r["val_acc_mean"] if not math.isnan(r["val_acc_mean"]) else math.inf)
        for row in rows:
            refit = collected.refits.get(row["point"])
            if refit is not None:
                row.update(refit_val_acc=refit["val_acc"], test_acc=refit["test_acc"], test_f1=refit["test_f1"])
    best = collected.best_point()
    for row in rows:
        row["best"] = best is not None and row["point"] == best.name
    return rows


# ---------------------------------------------------------------------------------------------
# Files


def write_results(study: optuna.Study, session: Session) -> Path:
    """Write ``cells.csv``, ``results.csv``, ``results.md`` and ``hparams/`` into the study folder.

    Returns:
        The path of ``results.md``.
    """
    plan = session.plan
    collected = collect(study, plan)
    out = plan.study_dir
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "cells.csv", [_cell_row(collected, c) for c in collected.expected if c.key in collected.cells])
    if plan.kind == "kfold":
        rows = [_cell_row(collected, c) for c in collected.expected if c.key in collected.cells]
        _write_csv(
            out / "results.csv",
            rows,
            columns=("fold", "seed", "val_loss", "val_acc", "best_epoch", "epochs", "run_dir"),
        )
        body = _kfold_markdown(collected)
    else:
        rows = sweep_rows(collected)
        _write_csv(out / "results.csv", rows)
        body = _sweep_markdown(collected, rows)
        _write_hparams(out, collected, rows)
    text = "\n".join([*_header(collected, session), "", body, *_footer(collected, session)]) + "\n"
    _atomic_write(out / "results.md", text)
    return out / "results.md"


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Read ``results.csv`` or ``cells.csv`` back: numbers as numbers, ``True``/``False`` as booleans."""

    def value(text: str) -> Any:
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with Path(path).open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r)) if rows else ["point"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_csv_value(r.get(c)) for c in columns] for r in rows])
    os.replace(tmp, path)


def _cell_row(collected: Collected, cell: Cell) -> dict[str, Any]:
    record = collected.cells[cell.key]
    return {**{c: record.get(c) for c in CELL_COLUMNS}, **cell.point.params}


def _write_hparams(out: Path, collected: Collected, rows: Sequence[dict[str, Any]]) -> None:
    """One TensorBoard HParams entry per point, written aside and swapped in (re-runs replace it)."""
    from torch.utils.tensorboard import SummaryWriter

    tmp = out / f".hparams-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(tmp))
    by_name = {p.name: p for p in collected.points}
    for row in rows:
        point = by_name[row["point"]]
        params = {"arm": point.name} if collected.plan.kind == "ablation" else dict(point.params)
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in params.items()}
        metrics = {
            f"hparams/{k}": float(row[k])
            for k in ("val_acc_mean", "val_acc_std", "val_loss_mean", "val_loss_std", "test_acc")
            if k in row and not math.isnan(float(row[k]))
        }
        if metrics:
            writer.add_hparams(hparams, metrics, run_name=point.name)
    writer.close()
    final, old = out / "hparams", out / f".hparams-old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _p(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.4f}"


def _scoring(plan: StudyPlan) -> str:
    seeds = ", ".join(map(str, plan.seeds))
    split = "the config's validation split" if plan.num_folds is None else f"{plan.num_folds}-fold cross-validation"
    extra = f" with {' '.join(plan.scoring)}" if plan.scoring else ""
    return f"on {split}{extra}, training seed{'s' if len(plan.seeds) > 1 else ''} {seeds}"


def _header(collected: Collected, session: Session) -> list[str]:
    plan = collected.plan
    what = {"kfold": "k-fold cross-validation", "grid": "grid sweep", "search": "search", "ablation": "ablation"}
    lines = [f"# {what[plan.kind]}: {plan.folder}", ""]
    if session.command:
        lines += ["```bash", session.command, "```", ""]
    subject = "Folds trained" if plan.kind == "kfold" else "Each point is scored"
    lines.append(
        f"{subject} {_scoring(plan)}. val acc: validation accuracy of the best checkpoint of each training "
        "(by val/acc); val loss: validation loss at that epoch; mean ± std over the trainings."
    )
    return lines


def _footer(collected: Collected, session: Session) -> list[str]:
    plan = collected.plan
    done, expected = len(collected.cells), len(collected.expected)
    lines = ["", f"Trainings: {min(done, expected)} of {expected} complete."]
    if collected.errors:
        lines.append("Failed (run the same command again to retry):")
        lines += [f"- {key}: {message.splitlines()[0] if message else ''}" for key, message in collected.errors.items()]
    journal = journal_path(session.storage, plan.study_dir)
    where = str(journal) if journal is not None else _masked(session.storage or "")
    lines.append(f"Optuna study `{session.study_name}` in {where} (`optuna-dashboard {where}` shows it).")
    return lines


def _masked(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy knows: show it as given
        return url


def _kfold_markdown(collected: Collected) -> str:
    rows = []
    records = [collected.cells[c.key] for c in collected.expected if c.key in collected.cells]
    for r in records:
        run = Path(r["run_dir"]).name
        rows.append(
            [
                str(r["fold"]),
                str(r["seed"]),
                f"{r['val_loss']:.4f}",
                f"{r['val_acc']:.4f}",
                str(r["best_epoch"]),
                str(r["epochs"]),
                run,
            ]
        )
    if records:
        loss = summarize([r["val_loss"] for r in records])
        acc = summarize([r["val_acc"] for r in records])
        rows.append(["**mean ± std**", "", f"**{loss}**", f"**{acc}**", "", "", ""])
    return "\n".join(_table(["fold", "seed", "val loss", "val acc", "best epoch", "epochs", "run"], rows))


def _point_cells(row: dict[str, Any]) -> tuple[str, str]:
    loss = mean_std(row["val_loss_mean"], row["val_loss_std"])
    acc = mean_std(row["val_acc_mean"], row["val_acc_std"])
    return (f"**{loss}**", f"**{acc}**") if row["best"] else (loss, acc)


def _sweep_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    plan = collected.plan
    if plan.kind == "ablation":
        return _ablation_markdown(collected, rows)
    names = short_names(plan.keys)
    table = []
    for row in rows:
        loss, acc = _point_cells(row)
        table.append(
            [*(format_value(row[k]) for k in plan.keys), loss, acc, str(row["n"]), "best" if row["best"] else ""]
        )
    header = [names[k] for k in plan.keys]
    if plan.kind == "search":
        header, table = (
            ["trial", *header],
            [[r["point"].split("-", 1)[0], *t] for r, t in zip(rows, table, strict=True)],
        )
    lines = _table([*header, "val loss", "val acc", "n", ""], table)
    if plan.kind == "grid" and len(plan.keys) == 2:
        lines += ["", f"val acc by {names[plan.keys[0]]} (rows) and {names[plan.keys[1]]} (columns):", ""]
        lines += _matrix(plan, rows)
    refits = [r for r in rows if "test_acc" in r]
    if refits:
        lines += ["", "Refit of the best point on the config's train/validation split, tested on the test set:", ""]
        lines += _table(
            ["point", "val acc (refit)", "test acc", "test macro-F1", "run"],
            [
                [
                    r["point"],
                    f"{r['refit_val_acc']:.4f}",
                    f"{r['test_acc']:.4f}",
                    f"{r['test_f1']:.4f}",
                    collected.refits[r["point"]]["run_dir"],
                ]
                for r in refits
            ],
        )
    return "\n".join(lines)


def _matrix(plan: StudyPlan, rows: list[dict[str, Any]]) -> list[str]:
    first, second = plan.keys
    values = {k: list(dict.fromkeys(json.dumps(p.params[k]) for p in plan.points)) for k in plan.keys}
    cell = {(json.dumps(r[first]), json.dumps(r[second])): r for r in rows}
    body = []
    for a in values[first]:
        line = [format_value(json.loads(a))]
        for b in values[second]:
            row = cell.get((a, b))
            line.append(_point_cells(row)[1] if row else "")
        body.append(line)
    names = short_names(plan.keys)
    return _table([f"{names[first]} \\ {names[second]}", *(format_value(json.loads(b)) for b in values[second])], body)


def _ablation_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    plan = collected.plan
    table = []
    for row in rows:
        loss, acc = _point_cells(row)
        if row["point"] == plan.reference:
            table.append([row["point"], row["overrides"] or "(config as is)", acc, loss, "", "", "", "", str(row["n"])])
            continue
        ci = "n/a" if math.isnan(row["delta_ci_low"]) else f"[{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}]"
        table.append(
            [
                row["point"],
                row["overrides"],
                acc,
                loss,
                _signed(row["delta_acc"]),
                ci,
                _p(row["p_value"]),
                _p(row["p_holm"]),
                str(row["n"]),
            ]
        )
    lines = _table(["arm", "overrides", "val acc", "val loss", "Δ val acc", "95% CI of Δ", "p", "p (Holm)", "n"], table)
    tests = sorted({r["test"] for r in rows[1:] if r.get("test")})
    method = (
        "paired t-test over seeds"
        if plan.num_folds is None
        else f"Nadeau and Bengio's corrected resampled t-test over the {plan.num_folds} folds "
        f"(seeds averaged within a fold; variance x (1/K + 1/(K-1)))"
    )
    lines += [
        "",
        f"Δ: arm minus reference on matched {'seeds' if plan.num_folds is None else 'folds and seeds'}; p: two-sided, "
        f"{method}{'' if tests else ' (needs at least two pairs)'}; p (Holm): Holm's step-down correction across "
        f"the {len(rows) - 1} variant(s).",
    ]
    refits = [r for r in rows if "test_acc" in r]
    if refits:
        reference = collected.refits.get(plan.reference or "")
        lines += [
            "",
            f"Refits (seed {plan.seeds[0]}, the config's train/validation split), tested on the test set:",
            "",
        ]
        body = []
        for r in refits:
            delta = r["test_acc"] - reference["test_acc"] if reference else math.nan
            body.append(
                [
                    r["point"],
                    f"{r['test_acc']:.4f}",
                    "" if r["point"] == plan.reference else _signed(delta),
                    str(r.get("only_arm_right", "")),
                    str(r.get("only_reference_right", "")),
                    _p(r["mcnemar_p"]) if "mcnemar_p" in r else "",
                    _p(r["mcnemar_p_holm"]) if "mcnemar_p_holm" in r else "",
                ]
            )
        lines += _table(
            ["arm", "test acc", "Δ test acc", "only arm right", "only reference right", "McNemar p", "p (Holm)"], body
        )
    return "\n".join(lines)
