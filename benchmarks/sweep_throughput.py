"""Sweep throughput: one worker using every core against several workers sharing the cores.

For each model, the same small study (a k-fold run: K trainings of E epochs each) is run with
``--jobs 1`` (one process; torch uses all cores) and with ``--jobs N`` (N worker processes with
cores // N torch threads each), each in a fresh process and a fresh log folder. Throughput is the
training images of all its trainings divided by the wall time of the whole command (start-up,
data loading, validation and writing results included), which is what a person running a sweep
waits for. Repeats run round-robin (jobs 1, jobs N, jobs 1, ...), so a drift of the machine's
speed hits both alike.

``--csv`` appends one row per command, with the machine, to a results file
(``results_tables.SWEEP_THROUGHPUT``) as it goes; ``python benchmarks/results_tables.py FILE``
makes the table this script prints from it.

Usage:
    python benchmarks/sweep_throughput.py                                   # LightweightCNN, TinyVGG; 4 folds x 1 epoch
    python benchmarks/sweep_throughput.py --models TinyVGG --folds 4 --epochs 2 --repeats 2 --csv sweep.csv
    python benchmarks/sweep_throughput.py --limit-batches 3 --folds 2      # a quick check that it runs
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_tables
from results_tables import SWEEP_THROUGHPUT

ROOT = Path(__file__).parent.parent
CONFIGS = {"LightweightCNN": "configs/lightweight.yaml", "TinyVGG": "configs/tinyvgg.yaml"}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_once(model: str, jobs: int, args: argparse.Namespace, out: Path) -> dict:
    """One ``kfold`` command in its own process; its throughput from its ``cells.csv``."""
    logs = out / f"{model}-jobs{jobs}-{time.monotonic_ns()}"
    command = [
        sys.executable,
        "-m",
        "fmnist_lightning",
        "kfold",
        "--config",
        str(ROOT / CONFIGS[model]),
        "--num_folds",
        str(args.folds),
        "--jobs",
        str(jobs),
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--early_stopping.enabled=false",  # every training runs all its epochs
    ]
    if args.data_dir:
        command.append(f"--data.data_dir={args.data_dir}")
    if args.limit_batches:
        command += [
            f"--trainer.limit_train_batches={args.limit_batches}",
            f"--trainer.limit_val_batches={args.limit_batches}",
        ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{model} --jobs {jobs} failed:\n{done.stderr[-3000:]}")
    (cells_csv,) = logs.glob("*/kfold*/cells.csv")
    with cells_csv.open() as f:
        cells = list(csv.DictReader(f))
    images = sum(int(c["train_images"]) for c in cells)
    fit_seconds = sum(float(c["fit_seconds"]) for c in cells)
    shutil.rmtree(logs, ignore_errors=True)
    return {
        "model": model,
        "jobs": jobs,
        "threads_per_worker": cores() if jobs == 1 else max(1, cores() // jobs),
        "trainings": len(cells),
        "train_images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "fit_s_per_training": fit_seconds / len(cells),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--jobs", type=int, default=cores(), help="the parallel setting, against --jobs 1")
    parser.add_argument("--folds", type=int, default=4, help="trainings per study (k-fold)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per training")
    parser.add_argument("--limit-batches", type=int, default=None, help="train/val batches per epoch (quick checks)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="the package's data folder (default: the configs')")
    parser.add_argument("--csv", type=Path, default=None, help="append every measurement to this results file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.jobs < 2 or args.folds < 2 or args.epochs < 1:
        parser.error("--repeats must be >= 1, --jobs >= 2, --folds >= 2 and --epochs >= 1")
    if args.limit_batches is not None and args.limit_batches < 1:
        parser.error(f"--limit-batches must be at least 1, got {args.limit_batches}")
    if args.csv:
        try:  # before anything is measured
            SWEEP_THROUGHPUT.check_appendable(args.csv)
        except ValueError as err:
            parser.error(f"--csv {err}")

    machine = results_tables.machine()
    study = {"folds": args.folds, "epochs": args.epochs, "limit_batches": args.limit_batches}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-throughput-") as tmp:
        for model in args.models:
            for repeat in range(1, args.repeats + 1):
                for jobs in (1, args.jobs):
                    result = run_once(model, jobs, args, Path(tmp))
                    rows.append({**result, "repeat": repeat, **study, **machine})
                    if args.csv:  # as it goes: a long run stopped halfway keeps what it measured
                        SWEEP_THROUGHPUT.append(args.csv, rows[-1])
                    print(
                        f"{model} jobs {jobs}: {result['images_per_s']:.0f} images/s "
                        f"({result['train_images']:,} images in {result['wall_s']:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    print(results_tables.sweep_throughput_table(rows))


if __name__ == "__main__":
    main()
