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

Usage:
    python benchmarks/zoo.py --configs configs/*.yaml --seeds 1 2 3 --csv docs/results/zoo.csv
    python benchmarks/zoo.py --configs configs/tinyvgg.yaml --seeds 1 2 3 --precision bf16-mixed \\
        --csv docs/results/zoo.csv          # another precision: the table names it with the row
    python benchmarks/zoo.py --configs configs/tinyvgg_wide_study002.yaml --seeds 1 --max-epochs 3 \\
        --csv docs/results/zoo.csv          # shortened: the table marks the row with its overrides
"""

import argparse
import sys
from pathlib import Path

import results_tables
from results_tables import ZOO

from fmnist_lightning.errors import FashionMNISTError
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
    args = parser.parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"no such config: {', '.join(missing)}")
    for name in ("limit_batches", "max_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.csv is not None:
        try:
            ZOO.check_appendable(args.csv)
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
        plan = plan_configs(configs, args.seeds)
        try:
            run_plan(
                plan, StudyOptions(jobs=1, command=" ".join(["python benchmarks/zoo.py", *(argv or sys.argv[1:])]))
            )
        except StudyIncomplete as err:
            failed = str(err)
    except FashionMNISTError as err:
        sys.exit(f"zoo.py: {err}")
    print((plan.study_dir / "results.md").read_text())
    if args.csv is not None:
        collected = collect(open_study(plan, StudyOptions()), plan)
        done = {(r["config"], r["overrides"], r["seed"]) for r in ZOO.read(args.csv)}
        machine = results_tables.machine()
        for config, point in zip(args.configs, plan.points, strict=True):
            for record in collected.records(point):
                row = zoo_row(Path(config).as_posix(), " ".join(overrides), record)
                if (row["config"], row["overrides"], row["seed"]) not in done:
                    ZOO.append(args.csv, {**row, **machine})
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


if __name__ == "__main__":
    main()
