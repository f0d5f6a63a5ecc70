"""Zoo results: fit and test configs over seeds, one run at a time, a row per run appended to a results CSV.

For every seed, then every config: ``python -m fmnist_lightning fit --config CFG --seed_everything S``
and ``test`` with the same config, seed and run name and ``--ckpt_path best``, each a subprocess
(``fit_test.py``), the run in ``<log-dir>/<config>_s<seed>/version_N``. Its row (config, overrides,
model, parameters, seed, test accuracy, macro-F1, epochs, median seconds per training epoch, fit
and test seconds, run folder, machine) is appended to ``--csv`` as soon as it is tested, in the
layout of ``results_tables.py``, which makes the README's table from the file.

Resumable: a (config, overrides, seed) already in the CSV is skipped, so the same command run again
continues where it stopped (a run interrupted midway is redone from its start). A config that fails
is reported and the others go on; the exit status is then 1.

Usage:
    python benchmarks/zoo_results.py --configs configs/*.yaml --seeds 1 2 3 --csv docs/results/zoo.csv
    python benchmarks/zoo_results.py --configs configs/resnet_se.yaml --seeds 1 --csv docs/results/zoo.csv
    python benchmarks/zoo_results.py --configs configs/tinyvgg.yaml --seeds 1 2 3 --precision bf16-mixed \\
        --csv docs/results/zoo.csv          # another precision: the table names it with the row
    python benchmarks/zoo_results.py --configs configs/tinyvgg_wide_study002.yaml --seeds 1 --max-epochs 3 \\
        --csv docs/results/zoo.csv          # shortened: the table marks the row with its overrides
    python benchmarks/results_tables.py docs/results/zoo.csv --pair fashioncnn.yaml fashioncnn_study001.yaml
"""

import argparse
import sys
from pathlib import Path

import fit_test
import results_tables
from results_tables import ZOO


def zoo_row(run: fit_test.PackageRun, overrides: str) -> dict:
    """A run's row of the zoo layout (machine columns apart)."""
    m = run.metrics
    return {
        "config": run.config,
        "overrides": overrides,
        "model": m["model"],
        "parameters": int(m["parameters"]),
        "seed": run.seed,
        "test_accuracy": float(m["accuracy"]),
        "macro_f1": float(m["macro_f1"]),
        "epochs": int(m["epochs_trained"]),
        "seconds_per_epoch": run.seconds_per_epoch,
        "fit_seconds": run.fit_seconds,
        "test_seconds": run.test_seconds,
        "run_dir": str(run.run_dir),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="Config files (configs/*.yaml).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds, each run by every config.")
    parser.add_argument("--csv", type=Path, required=True, help="The results file to append to (docs/results/...).")
    parser.add_argument("--data-dir", default="data", help="The package's data folder (--data.data_dir).")
    parser.add_argument("--log-dir", default="lightning_logs/zoo", help="Where the runs go (<config>_s<seed>).")
    parser.add_argument("--limit-batches", type=int, default=None, help="Shortened runs: N batches per stage.")
    parser.add_argument("--max-epochs", type=int, default=None, help="Shortened runs: N epochs.")
    parser.add_argument(
        "--precision",
        default=None,
        help="--trainer.precision for every run (bf16-mixed...); a row's overrides name it.",
    )
    args = parser.parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        parser.error(f"no such config: {', '.join(missing)}")
    for name in ("limit_batches", "max_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.done = {(r["config"], r["overrides"], r["seed"]) for r in ZOO.read(args.csv)}
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_overrides = fit_test.limit_overrides(args.limit_batches, args.max_epochs)
    if args.precision:
        run_overrides.append(f"--trainer.precision={args.precision}")
    overrides = " ".join(run_overrides)
    machine = None
    failed = []
    for seed in args.seeds:
        for config in args.configs:
            config = Path(config).as_posix()
            if (config, overrides, seed) in args.done:
                print(f"skip {config} seed {seed}: in {args.csv}", file=sys.stderr)
                continue
            print(f"run {config} seed {seed}", file=sys.stderr, flush=True)
            try:
                run = fit_test.fit_and_test(
                    config, seed, f"{Path(config).stem}_s{seed}", args.log_dir, args.data_dir, run_overrides
                )
            except fit_test.RunFailed as err:
                print(f"zoo_results.py: {err}", file=sys.stderr)
                failed.append(f"{config} seed {seed}")
                continue
            machine = machine or results_tables.machine()
            ZOO.append(args.csv, {**zoo_row(run, overrides), **machine})
            args.done.add((config, overrides, seed))
    if args.csv.is_file():
        print(results_tables.render(args.csv))
    if failed:
        sys.exit(f"zoo_results.py: failed: {', '.join(failed)} (the rest is in {args.csv})")


if __name__ == "__main__":
    main()
