"""A study's results, from its Optuna storage alone: tables and statistics.

Written into the study folder at the end of every command (every machine sharing a study writes the
same tables; a re-run rewrites them): ``cells.csv`` (a row per training: point, fold, seed, the
validation accuracy and loss of its best checkpoint (by ``val/acc``) and of its last epoch, epochs,
images, seconds, worker, run folder; and its test scores where it was tested), ``results.csv`` and
``results.md`` (k-fold: a row per fold; a sweep: a row per point, mean ± std over its cells, the best
marked; an ablation or a zoo: each arm against the reference (a zoo: the best) with the difference,
its 95% interval, the p-value and Holm's adjustment, and McNemar on refits' test predictions; a
two-key grid also as study 004's matrix). Nothing for TensorBoard: a summary of the points there
would take over the HParams tab of the whole log folder (see :func:`_remove_old_hparams`); each
training of the study is a run with its own HParams row, as any run is.
"""

import base64
import json
import math
import shutil
import statistics
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
CELL_COLUMNS = ("cell", "point", "fold", "seed", "val_acc", "val_loss", "best_epoch", "last_val_acc", "last_val_loss")
CELL_COLUMNS += ("epochs", "train_images", "fit_seconds", "resumed", "worker", "run_dir")
TEST_COLUMNS = ("test_acc", "test_f1", "test_seconds", "seconds_per_epoch", "model", "parameters", "report_dir")
#: What a point's row summarises (mean and std over its cells), where its cells have it.
METRICS = ("val_acc", "val_loss", "test_acc", "test_f1", "epochs", "seconds_per_epoch", "fit_seconds")
#: What a study with ``robustness: true`` keeps of each training's robustness report (record key -> the
#: report's summary key, :func:`fmnist_lightning.robustness.evaluate_robustness`), and compares.
ROBUSTNESS_METRICS = {
    "corruption_acc": "mean_corruption_accuracy",
    "clean_ece": "clean_ece",
    "clean_ece_scaled": "clean_ece_scaled",
    "corrupted_ece": "corrupted_ece",
    "clean_nll": "clean_nll",
    "ood_auroc_digits": "ood_auroc_msp_digits",
    "ood_auroc_noise": "ood_auroc_msp_uniform_noise",
}


@dataclass
class Collected:
    """What a study's storage holds for its plan.

    The points (a search's, as they completed), cell and refit records by key and point name, the
    errors of what failed and has not completed since, and the search points the pruner stopped
    (name -> their last intermediate value).
    """

    plan: StudyPlan
    points: list[Point]
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    refits: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    pruned: dict[str, str] = field(default_factory=dict)

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

    def best_point(self, metric: str = "val_acc") -> Point | None:
        """The complete point with the highest mean ``metric`` (the first, on a tie)."""
        complete = [p for p in self.points if len(self.records(p)) == len(self.plan.cells([p]))]
        scores = {p.name: statistics.fmean(r[metric] for r in self.records(p)) for p in complete}
        return max(complete, key=lambda p: scores[p.name], default=None)


def collect(study: optuna.Study, plan: StudyPlan) -> Collected:
    """Read completed cells, search points and refits (the first completed trial of each key) from a study."""
    collected, errors = Collected(plan, list(plan.points)), {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs, kind = t.user_attrs, t.user_attrs.get("kind")
        if t.state == TrialState.COMPLETE and kind == "cell":
            collected.cells.setdefault(attrs["cell"], attrs["result"])
        elif t.state == TrialState.COMPLETE and kind == "refit":
            collected.refits.setdefault(attrs["point"], attrs["result"])
        elif t.state == TrialState.COMPLETE and kind == "point":
            if all(p.name != attrs["point"] for p in collected.points):
                collected.points.append(Point(attrs["point"], plan.search_point(0, t.params).params))
            for key, value in attrs.items():
                if key.startswith(CELL_ATTR_PREFIX):
                    collected.cells.setdefault(key.removeprefix(CELL_ATTR_PREFIX), value)
        elif t.state == TrialState.PRUNED and kind == "point":  # stopped early by the search's pruner
            step = max(t.intermediate_values, default=None)
            value = f"val/acc {t.intermediate_values[step]:.4f} " if step is not None else ""
            collected.pruned[attrs["point"]] = value + attrs.get("pruned", f"at step {step}")
        elif t.state == TrialState.FAIL and "error" in attrs:
            errors[attrs.get("cell") or attrs.get("point") or f"trial {t.number}"] = attrs["error"]
    # An error counts while its cell (or search point) has not completed since, by a retry.
    done = {*collected.cells, *(f"refit/{p}" for p in collected.refits), *(p.name for p in collected.points)}
    collected.errors = {k: v for k, v in errors.items() if k not in done or k in collected.missing}
    return collected


def compare_to_reference(
    collected: Collected, point: Point, reference: Point, metric: str = "val_acc"
) -> PairedComparison | None:
    """``metric`` of ``point`` minus the reference's, over matched folds and seeds; None under two pairs.

    Without folds: a paired t-test over seeds. With K folds: the seeds of each fold are averaged
    (the folds stay the same for every seed, so seeds of one fold are not independent samples of
    the data) and the K fold differences get Nadeau and Bengio's corrected resampled t-test with
    ``n_test/n_train = 1/(K-1)``.
    """
    mine, ref = ({(r["fold"], r["seed"]): r[metric] for r in collected.records(p)} for p in (point, reference))
    matched = sorted(set(mine) & set(ref), key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    folds = collected.plan.num_folds
    if folds is None:
        return paired_ttest([mine[k] for k in matched], [ref[k] for k in matched]) if len(matched) > 1 else None
    ids = sorted({k[0] for k in matched})
    a, b = ([statistics.fmean(d[k] for k in matched if k[0] == f) for f in ids] for d in (mine, ref))
    return corrected_resampled_ttest(a, b, 1 / (folds - 1)) if len(ids) > 1 else None


def point_rows(collected: Collected) -> list[dict[str, Any]]:
    """One row per point: its parameters, ``n`` and mean/std of :data:`METRICS`; ``best`` marks the best.

    An ablation or a zoo compares every arm with its reference (a zoo's: the best by test accuracy):
    ``delta``, its 95% interval, ``p_value`` and ``p_holm`` (across the arms), and, for refits tested
    on the same images, McNemar's exact test on their test predictions (also Holm-adjusted).
    """
    plan = collected.plan
    rows = []
    for point in collected.points:
        records = collected.records(point)
        row: dict[str, Any] = {"point": point.name, "n": len(records)}
        if plan.kind == "ablation":
            row["overrides"] = " ".join(f"{k}={format_value(v)}" for k, v in point.params.items())
        else:
            row |= point.params
        row |= {k: records[0][k] for k in ("model", "parameters") if records and k in records[0]}
        for metric in (*METRICS, *(ROBUSTNESS_METRICS if plan.robustness else ())):
            values = [float(r[metric]) for r in records if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        if point.name in collected.refits:
            refit = collected.refits[point.name]
            row |= {"refit_val_acc": refit["val_acc"], "test_acc": refit["test_acc"], "test_f1": refit["test_f1"]}
        rows.append(row)
    metric = "test_acc" if plan.test else "val_acc"
    best = collected.best_point(metric)
    for row in rows:
        row["best"] = best is not None and row["point"] == best.name
    if plan.kind == "search":
        rows.sort(key=lambda r: -r["val_acc_mean"] if not math.isnan(r["val_acc_mean"]) else math.inf)
    reference = best if plan.test else next((p for p in collected.points if p.name == plan.reference), None)
    if plan.kind in ("ablation", "configs") and reference is not None:
        _against(collected, rows, reference, metric)
        if plan.robustness:
            _robustness_against(collected, rows, reference)
    return rows


def _robustness_against(collected: Collected, rows: list[dict[str, Any]], reference: Point) -> None:
    """Each robustness figure of each arm against the reference's: ``<metric>_delta`` and ``<metric>_p``."""
    points = {p.name: p for p in collected.points}
    for row in rows:
        if row["point"] == reference.name:
            continue
        for metric in ROBUSTNESS_METRICS:
            test = compare_to_reference(collected, points[row["point"]], reference, metric)
            row[f"{metric}_delta"] = test.mean_diff if test else math.nan
            row[f"{metric}_p"] = test.p_value if test else math.nan


def _robustness_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    """The robustness figures of every point, mean ± std over its trainings, and Δ and p against the reference."""
    names = {
        "corruption_acc": "corruption acc",
        "clean_ece": "ECE",
        "clean_ece_scaled": "ECE (T-scaled)",
        "corrupted_ece": "ECE corrupted",
        "clean_nll": "NLL",
        "ood_auroc_digits": "OOD AUROC digits",
        "ood_auroc_noise": "OOD AUROC noise",
    }
    table = []
    for row in rows:
        entry = {"point": row["point"]}
        for metric, name in names.items():
            entry[name] = _both(row, metric)
            if f"{metric}_delta" in row and not math.isnan(row[f"{metric}_delta"]):
                entry[name] += f" (Δ {_signed(row[f'{metric}_delta'])}, p {_p(row[f'{metric}_p'])})"
        table.append(entry)
    return "\n".join(
        [
            "Robustness, calibration and out-of-distribution inputs of each training's best checkpoint, on the test "
            "set (`robustness` with the offline OOD sets): corruption acc: mean accuracy over 12 corruptions x 5 "
            "severities; ECE before and after temperature scaling fitted on the validation split; OOD AUROC of the "
            "maximum softmax probability, test images against digits and uniform noise. Δ and p: against the "
            "reference, the same paired test as above.",
            "",
            markdown_table(table),
        ]
    )


def _against(collected: Collected, rows: list[dict[str, Any]], reference: Point, metric: str) -> None:
    points = {p.name: p for p in collected.points}
    arms = [r for r in rows if r["point"] != reference.name]
    for row in arms:
        test = compare_to_reference(collected, points[row["point"]], reference, metric)
        row |= {"delta": math.nan, "delta_ci_low": math.nan, "delta_ci_high": math.nan, "p_value": math.nan}
        if test is not None:
            row |= {"delta": test.mean_diff, "delta_ci_low": test.ci_low, "delta_ci_high": test.ci_high}
            row |= {"p_value": test.p_value, "test": test.test}
    for row, p in zip(arms, holm([r["p_value"] for r in arms]), strict=True):
        row["p_holm"] = p
    ref = collected.refits.get(reference.name)
    tested = [r for r in arms if r["point"] in collected.refits and ref is not None]
    tested = [r for r in tested if collected.refits[r["point"]]["test_index_sha"] == ref["test_index_sha"]]
    for row in tested:  # McNemar on the test predictions of each arm's refit against the reference's
        mine, theirs = (unpack_correct(r["test_correct"]) for r in (collected.refits[row["point"]], ref))
        row["only_arm_right"], row["only_reference_right"] = discordant_counts(mine, theirs)
        row["mcnemar_p"] = mcnemar_exact(row["only_arm_right"], row["only_reference_right"])
    for row, p in zip(tested, holm([r["mcnemar_p"] for r in tested]), strict=True):
        row["mcnemar_p_holm"] = p


def pack_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness in a short text for a trial's attributes: ``z<n>:`` + base64 of zlib of the bits.

    10,000 test images take about 1 KB instead of a 10,000-character string of 0s and 1s (which
    flooded optuna-dashboard's trial page).
    """
    bits = np.packbits(np.asarray(correct, dtype=bool)).tobytes()
    return f"z{len(correct)}:" + base64.b64encode(zlib.compress(bits, 9)).decode("ascii")


def unpack_correct(text: str) -> list[bool]:
    """:func:`pack_correct` undone (a plain string of 0s and 1s, as older studies stored it, too)."""
    if not text.startswith("z"):
        return [c == "1" for c in text]
    count, data = text[1:].split(":", 1)
    bits = np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=np.uint8)
    return np.unpackbits(bits, count=int(count)).astype(bool).tolist()


# ---------------------------------------------------------------------------------------------
# Files


def write_results(study: optuna.Study, plan: StudyPlan, storage: str, command: str = "") -> Collected:
    """Write ``cells.csv``, ``results.csv`` and ``results.md`` into the study folder.

    Args:
        study: The study.
        plan: Its plan.
        storage: Where the study is stored, as ``results.md`` names it (a journal file, a masked URL).
        command: The command line, shown at the top of ``results.md``.
    """
    collected, out = collect(study, plan), plan.study_dir
    _remove_old_hparams(out, collected)
    cells = [{**collected.cells[c.key], **c.point.params} for c in collected.expected if c.key in collected.cells]
    swept = plan.keys if plan.kind in ("grid", "search") else ()
    robust = tuple(ROBUSTNESS_METRICS) if plan.robustness else ()
    _write_csv(out / "cells.csv", cells, [*CELL_COLUMNS, *(TEST_COLUMNS if plan.test else ()), *robust, *swept])
    if plan.kind == "kfold":
        _write_csv(
            out / "results.csv", cells, ["fold", "seed", "val_loss", "val_acc", "best_epoch", "epochs", "run_dir"]
        )
        body = _kfold_markdown(cells)
    else:
        rows = point_rows(collected)
        _write_csv(out / "results.csv", rows)
        body = _sweep_markdown(collected, rows)
        if plan.robustness and rows:
            body += "\n\n" + _robustness_markdown(collected, rows)
    split = "the config's validation split" if plan.num_folds is None else f"{plan.num_folds}-fold cross-validation"
    scoring = f" with {', '.join(f'{k}={format_value(v)}' for k, v in plan.scoring.items())}" if plan.scoring else ""
    seeds = f"training seed{'s' * (len(plan.seeds) > 1)} {', '.join(map(str, plan.seeds))}"
    done = len(collected.expected) - len(collected.missing)
    lines = [f"# {plan.kind}: {plan.folder}", "", *(["```bash", command, "```", ""] if command else [])]
    lines += [
        f"Trained on {split}{scoring}, {seeds}. val acc: validation accuracy of the best checkpoint of each "
        "training (by val/acc); val loss: validation loss at that epoch; mean ± std over the trainings.",
        "",
        body,
        "",
        f"Trainings: {done} of {len(collected.expected)} complete.",
    ]
    if collected.pruned:
        lines.append(
            f"Pruned by {plan.pruner['name'] if plan.pruner else 'the pruner'} (stopped early, not in the table):"
        )
        lines += [f"- {point}: {at}" for point, at in collected.pruned.items()]
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
    columns = list(columns or dict.fromkeys(k for r in rows for k in r)) or ["point"]
    cells = [[json.dumps(v) if isinstance(v, list | dict) else v for v in (r.get(c) for c in columns)] for r in rows]
    with atomic_write(path, newline="") as f:
        pd.DataFrame(cells, columns=columns).to_csv(f, index=False, float_format="%.6g")


def _remove_old_hparams(out: Path, collected: Collected) -> None:
    """Remove the ``hparams/`` folder earlier versions wrote into the study folder.

    It held a TensorBoard experiment summary of the points' means, and TensorBoard uses one
    experiment summary for a whole log folder: ``tensorboard --logdir lightning_logs`` then showed
    the sweep's columns alone and every other run's row empty. The means are in ``results.md`` and
    ``results.csv``; each training of the study has its own HParams row, as any run has. A point
    named ``hparams`` has its trainings in that folder: it is kept then.
    """
    if all(point.name != "hparams" for point in (*collected.plan.points, *collected.points)):
        shutil.rmtree(out / "hparams", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Markdown


def _p(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _signed(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.4f}"


def _both(row: dict[str, Any], metric: str, digits: int = 4, bold: bool = False) -> str:
    text = mean_std(row[f"{metric}_mean"], row[f"{metric}_std"], digits)
    return f"**{text}**" if bold and row["best"] else text  # the best point is the best by accuracy


def _kfold_markdown(cells: Sequence[dict[str, Any]]) -> str:
    rows = [{**r, "run": Path(r["run_dir"]).name} for r in cells]
    if cells:
        rows.append(
            {"fold": "**mean ± std**"} | {k: f"**{summarize([r[k] for r in cells])}**" for k in ("val_loss", "val_acc")}
        )
    number = {k: (lambda v: v if isinstance(v, str) else f"{v:.4f}") for k in ("val_loss", "val_acc")}
    columns = {"fold": "fold", "seed": "seed", "val_loss": "val loss", "val_acc": "val acc"}
    return markdown_table(rows, {**columns, "best_epoch": "best epoch", "epochs": "epochs", "run": "run"}, number)


def _sweep_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    plan = collected.plan
    if plan.kind in ("ablation", "configs"):
        return _arms_markdown(collected, rows)
    names = short_names(plan.keys)
    table = []
    for row in rows:
        entry = {"trial": row["point"].split("-", 1)[0]} if plan.kind == "search" else {}
        entry |= {names[k]: format_value(row[k]) for k in plan.keys}
        entry |= {"val loss": _both(row, "val_loss"), "val acc": _both(row, "val_acc", bold=True), "n": row["n"]}
        table.append(entry | {"": "best" * row["best"]})
    lines = [markdown_table(table)]
    if plan.kind == "grid" and len(plan.keys) == 2:
        first, second = plan.keys
        lines += ["", f"val acc by {names[first]} (rows) and {names[second]} (columns):", ""]
        by = {(json.dumps(r[first]), json.dumps(r[second])): _both(r, "val_acc", bold=True) for r in rows}
        firsts, seconds = (list(dict.fromkeys(json.dumps(p.params[k]) for p in plan.points)) for k in plan.keys)
        corner = f"{names[first]} \\ {names[second]}"
        matrix = [{corner: format_value(json.loads(a))} | {format_value(json.loads(b)): by.get((a, b), "")
                  for b in seconds} for a in firsts]  # fmt: skip
        lines.append(markdown_table(matrix))
    refits = [{**r, "run": collected.refits[r["point"]]["run_dir"]} for r in rows if "test_acc" in r]
    if refits:
        lines += ["", "Refit of the best point on the config's train/validation split, tested on the test set:", ""]
        columns = {"point": "point", "refit_val_acc": "val acc (refit)", "test_acc": "test acc"}
        four = {k: (lambda v: f"{v:.4f}") for k in ("refit_val_acc", "test_acc", "test_f1")}
        lines.append(markdown_table(refits, {**columns, "test_f1": "test macro-F1", "run": "run"}, four))
    return "\n".join(lines)


def _arms_markdown(collected: Collected, rows: list[dict[str, Any]]) -> str:
    """An ablation's arms against its reference, or a zoo's configurations against the best."""
    plan = collected.plan
    zoo = plan.kind == "configs"
    reference = next((r["point"] for r in rows if r["best"]), "") if zoo else plan.reference
    table = []
    for row in rows:
        if zoo:
            entry = {
                "config": row["point"],
                "model": row.get("model", ""),
                "parameters": f"{row.get('parameters', 0):,}",
            }
            entry |= {"val acc": _both(row, "val_acc"), "test acc": _both(row, "test_acc", bold=True)}
            entry |= {"test macro-F1": _both(row, "test_f1"), "epochs": _both(row, "epochs", 0)}
            entry |= {"s / epoch": _both(row, "seconds_per_epoch", 1)}
        else:
            entry = {"arm": row["point"], "overrides": row["overrides"] or "(config as is)"}
            entry |= {"val acc": _both(row, "val_acc", bold=True), "val loss": _both(row, "val_loss")}
        arm = row["point"] != reference
        ci = (
            "n/a"
            if not arm or math.isnan(row["delta_ci_low"])
            else f"[{row['delta_ci_low']:+.4f}, {row['delta_ci_high']:+.4f}]"
        )
        entry |= {"Δ": _signed(row["delta"]) if arm else "", "95% CI of Δ": ci if arm else ""}
        entry |= {"p": _p(row["p_value"]) if arm else "", "p (Holm)": _p(row["p_holm"]) if arm else "", "n": row["n"]}
        table.append(entry)
    metric = "test acc" if zoo else "val acc"
    method = (
        "paired t-test over seeds"
        if plan.num_folds is None
        else f"Nadeau and Bengio's corrected resampled t-test over the {plan.num_folds} folds (seeds averaged "
        "within a fold; variance x (1/K + 1/(K-1)))"
    )
    against = "the best configuration (by mean test acc)" if zoo else "the reference"
    matched = "seeds" if plan.num_folds is None else "folds and seeds"
    lines = [
        markdown_table(table),
        "",
        f"Δ: {metric} of the row minus {against} on matched {matched}; "
        f"p: two-sided, {method}; p (Holm): Holm's step-down correction across the {len(rows) - 1} comparison(s).",
    ]
    refits = [r for r in rows if "test_acc" in r and r["point"] in collected.refits]
    if refits and not zoo:
        ref = collected.refits.get(reference or "")
        lines += [
            "",
            f"Refits (seed {plan.seeds[0]}, the config's train/validation split), tested on the test set:",
            "",
        ]
        body = [
            {
                "arm": r["point"],
                "test acc": f"{r['test_acc']:.4f}",
                "Δ test acc": "" if r["point"] == reference or not ref else _signed(r["test_acc"] - ref["test_acc"]),
                "only arm right": r.get("only_arm_right", ""),
                "only reference right": r.get("only_reference_right", ""),
                "McNemar p": _p(r["mcnemar_p"]) if "mcnemar_p" in r else "",
                "p (Holm)": _p(r["mcnemar_p_holm"]) if "mcnemar_p_holm" in r else "",
            }
            for r in refits
        ]
        lines.append(markdown_table(body))
    return "\n".join(lines)
