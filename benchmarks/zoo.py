"""The model zoo: configs x seeds as one study (``studies.plan_configs``), a row per run in a results CSV.

Every config is trained with every seed and its best checkpoint tested, one training at a time
(``--jobs 1``: each run's seconds are its own), in the study folder
``<log-dir>/zoo/zoo-<hash>/<config>/seed<S>``. The study is Optuna's like any sweep: the same command
again trains only what is missing (after a crash or Ctrl-C) and a finished zoo trains nothing; its
``results.md`` holds the table with a paired t-test of each config against the best.

``--csv`` appends a row per run (config, overrides, model, parameters, seed, test accuracy, macro-F1,
epochs, median seconds per training epoch, fit and test seconds in the study's process, run folder,
machine) to a results file in ``results_tables.ZOO``'s layout, skipping runs it holds already;
``python benchmarks/results_tables.py FILE`` makes the table from it.

``--robustness`` also scores every tested checkpoint on the corruption benchmark, for calibration and
for out-of-distribution inputs (``fmnist_lightning.robustness``, the offline OOD sets), and
``--robustness-csv`` appends a row per run in ``results_tables.ZOO_ROBUSTNESS``'s layout: those figures
and the mCE and relative mCE against ``--mce-reference``'s run of the same seed (Hendrycks and
Dietterich's corruption error, with that config as the reference model); ``--corruptions-csv`` a row
per run, corruption and severity (``results_tables.ZOO_CORRUPTIONS``). Both skip the runs they hold,
so the same command with a file added fills it from the finished study without training again.

Usage:
    python benchmarks/zoo.py --configs configs/*.yaml --seeds 1 2 3 --csv docs/results/zoo.csv
    python benchmarks/zoo.py --configs configs/tinyvgg.yaml --seeds 1 2 3 --precision bf16-mixed \\
        --csv docs/results/zoo.csv          # another precision: the table names it with the row
    python benchmarks/zoo.py --configs configs/tinyvgg_wide_study002.yaml --seeds 1 --max-epochs 3 \\
        --csv docs/results/zoo.csv          # shortened: the table marks the row with its overrides
    python benchmarks/zoo.py --configs configs/linear.yaml configs/fast.yaml --seeds 1 2 3 --robustness \
        --robustness-csv docs/results/zoo_robustness.csv --mce-reference configs/linear.yaml \
        --corruptions-csv docs/results/zoo_corruptions.csv
"""

import argparse
import csv
import math
import sys
from pathlib import Path

import results_tables
from results_tables import MACHINE_COLUMNS, ZOO, ZOO_CORRUPTIONS, ZOO_ROBUSTNESS, ZOO_ROBUSTNESS_FIGURES

from fmnist_lightning.errors import FashionMNISTError
from fmnist_lightning.robustness import corruption_errors, read_corruption_results
from fmnist_lightning.studies import StudyIncomplete, StudyOptions, plan_configs, run_plan
from fmnist_lightning.studies.engine import open_study
from fmnist_lightning.studies.results import collect

LIMIT_PREFIX, EPOCHS_PREFIX = "--trainer.limit_", "--trainer.max_epochs"


def run_overrides(limit_batches: int | None, max_epochs: int | None, precision: str | None) -> list[str]:
    """CLI overrides of every run: ``limit_*_batches`` for every stage, the number of epochs, the precision."""
    args = [f"{LIMIT_PREFIX}{s}_batches={limit_batches}" for s in ("train", "val", "test")] if limit_batches else []
    args += [f"{EPOCHS_PREFIX}={max_epochs}"] if max_epochs else []
    return args + ([f"--trainer.precision={precision}"] if precision else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="Config files (configs/*.yaml).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds, each run by every config.")
    parser.add_argument("--csv", type=Path, default=None, help="The results file to append to (docs/results/...).")
    parser.add_argument("--data-dir", default="data", help="The package's data folder (--data.data_dir).")
    parser.add_argument("--log-dir", default="lightning_logs", help="The study goes to <log-dir>/zoo/zoo-<hash>.")
    parser.add_argument("--limit-batches", type=int, default=None, help="Shortened runs: N batches per stage.")
    parser.add_argument("--max-epochs", type=int, default=None, help="Shortened runs: N epochs.")
    parser.add_argument("--precision", default=None, help="--trainer.precision for every run (bf16-mixed...).")
    parser.add_argument(
        "--robustness", action="store_true", help="Score every run on corruptions, calibration and OOD inputs too."
    )
    parser.add_argument("--robustness-csv", type=Path, default=None, help="Append those figures here (--robustness).")
    parser.add_argument(
        "--corruptions-csv",
        type=Path,
        default=None,
        help="Append each run's accuracy per corruption and severity here (--robustness).",
    )
    parser.add_argument(
        "--mce-reference", default=None, help="The config whose runs are the mCE's reference (default: the first)."
    )
    args = parser.parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"no such config: {', '.join(missing)}")
    for name in ("limit_batches", "max_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.robustness_csv or args.corruptions_csv or args.mce_reference) and not args.robustness:
        parser.error("--robustness-csv, --corruptions-csv and --mce-reference need --robustness")
    args.mce_reference = args.mce_reference or args.configs[0]
    if args.mce_reference not in args.configs:
        parser.error(f"--mce-reference {args.mce_reference} is not one of --configs")
    files = ((ZOO, args.csv), (ZOO_ROBUSTNESS, args.robustness_csv), (ZOO_CORRUPTIONS, args.corruptions_csv))
    for layout, path in files:
        try:
            if path is not None:
                layout.check_appendable(path)
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    overrides = run_overrides(args.limit_batches, args.max_epochs, args.precision)
    where = [f"--data.data_dir={args.data_dir}", f"--trainer.logger.init_args.save_dir={args.log_dir}"]
    configs = [["--config", Path(c).as_posix(), *where, *overrides] for c in args.configs]
    failed = ""
    try:
        plan = plan_configs(configs, args.seeds, robustness=args.robustness)
        try:
            run_plan(
                plan, StudyOptions(jobs=1, command=" ".join(["python benchmarks/zoo.py", *(argv or sys.argv[1:])]))
            )
        except StudyIncomplete as err:
            failed = str(err)
    except FashionMNISTError as err:
        sys.exit(f"zoo.py: {err}")
    print((plan.study_dir / "results.md").read_text())
    collected = collect(open_study(plan, StudyOptions()), plan)
    runs = {Path(c).as_posix(): collected.records(point) for c, point in zip(args.configs, plan.points, strict=True)}
    machine = results_tables.machine()
    if args.csv is not None:
        done = {(r["config"], r["overrides"], r["seed"]) for r in ZOO.read(args.csv)}
        for config, records in runs.items():
            for record in records:
                row = zoo_row(config, " ".join(overrides), record)
                if (row["config"], row["overrides"], row["seed"]) not in done:
                    ZOO.append(args.csv, {**row, **machine})
    if args.robustness_csv is not None:
        done = {(r["config"], r["overrides"], r["seed"]) for r in ZOO_ROBUSTNESS.read(args.robustness_csv)}
        reference = {int(r["seed"]): r for r in runs[Path(args.mce_reference).as_posix()]}
        for config, records in runs.items():
            for record in records:
                row = robustness_row(config, " ".join(overrides), record, reference.get(int(record["seed"])))
                row["mce_reference"] = Path(args.mce_reference).name
                if (row["config"], row["overrides"], row["seed"]) not in done:
                    ZOO_ROBUSTNESS.append(args.robustness_csv, {**row, **machine})
    if args.corruptions_csv is not None:
        # A run's rows carry the machine and date it ran on: its robustness row's, where that file has one.
        ran_on = {
            (r["config"], r["overrides"], r["seed"]): {k: r[k] for k in MACHINE_COLUMNS}
            for r in (ZOO_ROBUSTNESS.read(args.robustness_csv) if args.robustness_csv else [])
        }
        done = {(r["config"], r["overrides"], r["seed"]) for r in ZOO_CORRUPTIONS.read(args.corruptions_csv)}
        for config, records in runs.items():
            for record in records:
                key = (config, " ".join(overrides), int(record["seed"]))
                if key not in done:  # a run's 61 rows in one write of the file, not 61
                    rows = [{**row, **ran_on.get(key, machine)} for row in corruption_rows(*key, record)]
                    ZOO_CORRUPTIONS.extend(args.corruptions_csv, rows)
    if failed:
        sys.exit(f"zoo.py: {failed}")
    return plan.study_dir


def zoo_row(config: str, overrides: str, record: dict) -> dict:
    """A study record as a row of the zoo layout (machine columns apart)."""
    return {
        "config": config,
        "overrides": overrides,
        "model": record["model"],
        "parameters": int(record["parameters"]),
        "seed": int(record["seed"]),
        "test_accuracy": float(record["test_acc"]),
        "macro_f1": float(record["test_f1"]),
        "epochs": int(record["epochs"]),
        "seconds_per_epoch": float(record["seconds_per_epoch"] or "nan"),
        "fit_seconds": float(record["fit_seconds"]),
        "test_seconds": float(record["test_seconds"]),
        "run_dir": record["run_dir"],
    }


def corruption_rows(config: str, overrides: str, seed: int, record: dict) -> list[dict]:
    """A study record's accuracy per corruption and severity (its ``corruptions.csv``), as zoo_corruptions rows."""
    path = Path(record["robustness_dir"]) / "corruptions.csv"
    read_corruption_results(path)  # refuses a missing, partial or out-of-range file in one line
    base = {"config": config, "overrides": overrides, "model": record["model"], "seed": seed}
    with path.open(newline="") as f:
        return [
            {**base, "corruption": r["corruption"], "severity": int(r["severity"]), "images": int(r["images"])}
            | {"accuracy": float(r["accuracy"])}
            for r in csv.DictReader(f)
        ]


def robustness_row(config: str, overrides: str, record: dict, reference: dict | None) -> dict:
    """A study record's robustness figures, with its mCE against the reference config's run of its seed."""
    mine = read_corruption_results(Path(record["robustness_dir"]) / "corruptions.csv")
    errors = {"mce": None, "relative_mce": None}
    if reference is not None:
        theirs = read_corruption_results(Path(reference["robustness_dir"]) / "corruptions.csv")
        corruptions = sorted({c for c, s in mine["accuracy"] if s > 0})
        severities = sorted({s for c, s in mine["accuracy"] if s > 0})
        errors = corruption_errors(mine["accuracy"], theirs["accuracy"], corruptions, severities)
    return {
        "config": config,
        "overrides": overrides,
        "model": record["model"],
        "seed": int(record["seed"]),
        "clean_accuracy": mine["accuracy"][("clean", 0)],
        "corruption_images": mine["images"],
        **{key: math.nan if record.get(key) is None else float(record[key]) for key in ZOO_ROBUSTNESS_FIGURES},
        "mce": math.nan if errors["mce"] is None else errors["mce"],
        "relative_mce": math.nan if errors["relative_mce"] is None else errors["relative_mce"],
        "mce_reference": "",
        "robustness_seconds": float(record["robustness_seconds"]),
        "report_dir": record["robustness_dir"],
    }


if __name__ == "__main__":
    main()
