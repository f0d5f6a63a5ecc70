"""Time to accuracy, side by side: this package's recipes against study 001's own training code.

The targets are ratios measured in one run on one machine (these 2-core CPUs differ by up to
2x from one machine to the next), one process at a time, nothing else running:

- study 001's code ("the peer") to its best test accuracy, against ``configs/fast.yaml``'s fit +
  test: at least 6x, with fast.yaml >= 93.0% test accuracy on every seed;
- ``configs/tinyvgg.yaml``'s fit + test against ``configs/fast94.yaml``'s: at least 3x, with
  fast94.yaml >= 94.0% mean test accuracy;
- the speedrun: ``configs/tinyvgg.yaml`` against ``configs/speedrun94.yaml``: at least 8x, with
  speedrun94.yaml >= 94.0% mean and no seed under 93.7%; ``configs/airbench_wide.yaml`` against
  ``configs/speedrun95.yaml``: at least 3x, with speedrun95.yaml >= 95.0% mean
  (``results_tables.TARGETS``).

For every seed, round-robin (so a drift of the machine's speed hits every run alike):

- each recipe (a config): ``python benchmarks/zoo.py --configs CFG --seeds S``, a one-run study
  (fit, then test of the best checkpoint, then the study's tables) in its own process, timed from
  start to exit; test accuracy, and the fit and test seconds inside that process, from its row;
- the peer (https://github.com/shinjitsue/fashion-mnist-cnn-pytorch, never committed here: give a
  checkout with ``--peer-dir``): its main recipe ``train(model_type="cnn", use_augmentation=True,
  use_dropout=True)`` (FashionCNN, Adam 1e-3, batch 64, 10 epochs, per-image PIL transforms through
  a DataLoader, the test set evaluated after every epoch) in a subprocess, in a temporary working
  directory where torchvision finds the Fashion-MNIST files (linked from the package's data), its
  seeds set by a small driver and its files unchanged. Its time is from process start to the
  printed end of the epoch at which its test accuracy peaked (each printed line timestamped as it
  arrives), which is when a user of that code has its best model; its whole run is timed too.

It prints accuracy and time mean ± std per run and the ratios (``results_tables.py`` makes the
same tables from the CSV).

Usage:
    git clone https://github.com/shinjitsue/fashion-mnist-cnn-pytorch ../fashion-mnist-cnn-pytorch
    pip install tqdm scikit-learn seaborn pandas   # what the peer's code imports
    python benchmarks/time_to_accuracy.py --peer-dir ../fashion-mnist-cnn-pytorch --seeds 1 2 3 \\
        --csv docs/results/time_to_accuracy.csv
    python benchmarks/time_to_accuracy.py --recipes configs/fast.yaml --seeds 1        # no peer
    python benchmarks/time_to_accuracy.py --peer-dir ../fashion-mnist-cnn-pytorch --seeds 1 \\
        --limit-batches 3 --max-epochs 1                                               # does it run?
    python benchmarks/time_to_accuracy.py --recipes configs/speedrun94.yaml configs/tinyvgg.yaml \\
        --seeds 1 2 3 4 5 --seeds-of configs/tinyvgg.yaml 2 --csv docs/results/speedrun94.csv  # reference: 2 seeds
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = ("configs/fast.yaml", "configs/fast94.yaml", "configs/tinyvgg.yaml")
PEER_URL = "https://github.com/shinjitsue/fashion-mnist-cnn-pytorch"
PEER = "peer"  # results_tables.PEER: the peer's child process imports only the standard library and the peer's
PEER_FILES = ("train.py", "model.py", "utils.py", "config.py")
#: What the peer's code and its driver import (module -> pip package).
PEER_IMPORTS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "seaborn": "seaborn",
    "pandas": "pandas",
}
#: Imports each module given, and prints those that fail.
IMPORT_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name)
"""
#: The line its train() prints at the end of every epoch (after evaluating on the test set and saving).
EPOCH_LINE = re.compile(r"^Epoch (\d+): Train Loss: [-+0-9.naifNI]+, Val Acc: ([0-9.]+)%")


def results_tables():  # imported on use: the peer's child process has only its own imports
    """The ``results_tables`` module beside this script."""
    import results_tables

    return results_tables


class RunFailed(RuntimeError):
    """A subprocess of the benchmark exited with an error; the message ends with its output's tail."""


# --- the peer, in its own process -----------------------------------------------------------------


class FirstBatches:
    """A DataLoader cut to its first ``limit`` batches (a shortened run); ``dataset`` is the loader's."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit, self.dataset = loader, limit, loader.dataset

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.limit:
                return
            yield batch

    def __len__(self) -> int:
        return min(self.limit, len(self.loader))


def peer_child(peer_dir: str, seed: int, limit_batches: int | None, max_epochs: int | None) -> None:
    """The driver: seed, then run the peer's own ``train`` as its ``__main__`` does (cwd: the run's folder)."""
    sys.path.insert(0, peer_dir)
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    import train as peer  # the peer's train.py

    if max_epochs:
        peer.NUM_EPOCHS = max_epochs  # train() reads its module's NUM_EPOCHS (imported from config.py)
    if limit_batches:
        get_loaders = peer.get_data_loaders
        peer.get_data_loaders = lambda *a, **k: tuple(FirstBatches(dl, limit_batches) for dl in get_loaders(*a, **k))
    peer.train(model_type="cnn", use_augmentation=True, use_dropout=True)


# --- the peer, seen from the benchmark --------------------------------------------------------------


def check_peer(peer_dir: Path, python: str) -> str:
    """Refuse a folder that is not the peer's checkout, or a Python that lacks its imports; its commit.

    Raises:
        SystemExit: With what to run to fix it.
    """
    missing_files = [f for f in PEER_FILES if not (peer_dir / f).is_file()]
    if missing_files:
        sys.exit(
            f"time_to_accuracy.py: {peer_dir} is not a checkout of study 001's code (no {', '.join(missing_files)}). "
            f"Get it with: git clone {PEER_URL}"
        )
    try:
        done = subprocess.run([python, "-c", IMPORT_PROBE, *PEER_IMPORTS], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        sys.exit(f"time_to_accuracy.py: cannot run --peer-python {python}: {err}")
    missing = done.stdout.split()
    if missing:
        packages = " ".join(PEER_IMPORTS[m] for m in missing)
        sys.exit(
            f"time_to_accuracy.py: study 001's code imports {', '.join(PEER_IMPORTS)}; missing here: "
            f"{', '.join(missing)}. Install with: {python} -m pip install {packages}"
        )
    try:
        head = subprocess.run(
            ["git", "-C", str(peer_dir), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        commit = head.stdout.strip() if head.returncode == 0 else ""
    except OSError:  # no git
        commit = ""
    return f"{PEER_URL.removeprefix('https://github.com/')}@{commit or 'unknown commit'}"


def find_data(data_dir: str) -> Path:
    """The folder of the four decompressed IDX files (the package's data, staged if needed).

    Raises:
        SystemExit: If the data cannot be found, with the package's message saying how to get it.
    """
    from fmnist_lightning.data import locate_fashion_mnist
    from fmnist_lightning.errors import FashionMNISTError

    try:
        return locate_fashion_mnist(data_dir)
    except FashionMNISTError as err:
        sys.exit(f"time_to_accuracy.py: {err}")


def stage_peer_data(raw: Path, work: Path) -> None:
    """Link the four IDX files where the peer's torchvision looks for them: ``<work>/data/FashionMNIST/raw``."""
    target = work / "data" / "FashionMNIST" / "raw"
    target.mkdir(parents=True)
    for file in sorted(raw.iterdir()):
        if file.name.endswith("-ubyte"):
            (target / file.name).symlink_to(file.resolve())


def run_peer(args: argparse.Namespace, seed: int, source: str, raw: Path) -> dict:
    """One seed of the peer in a fresh working folder; its row of the results."""
    work = Path(tempfile.mkdtemp(prefix="peer_"))
    try:
        stage_peer_data(raw, work)
        command = [args.peer_python, str(Path(__file__).resolve()), "--peer-child", "--seed", str(seed)]
        command += ["--peer-dir", str(args.peer_dir.resolve())]
        if args.limit_batches:
            command += ["--limit-batches", str(args.limit_batches)]
        if args.max_epochs:
            command += ["--max-epochs", str(args.max_epochs)]
        # Unbuffered, so every line arrives when printed; no display, so plt.show() returns at once;
        # no __pycache__ written into the peer's checkout.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
        epochs: list[tuple[int, float, float]] = []  # (epoch, test accuracy %, seconds since start)
        with (work / "stderr.txt").open("w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            lines = []
            for line in proc.stdout:
                now = time.perf_counter() - start
                lines.append(line)
                if match := EPOCH_LINE.match(line):
                    epochs.append((int(match[1]), float(match[2]), now))
            returncode = proc.wait()
            whole = time.perf_counter() - start
        if returncode or not epochs:
            tail = "".join(lines[-20:]) + (work / "stderr.txt").read_text()[-3000:]
            why = f"exit {returncode}" if returncode else "no 'Epoch N: Train Loss: ..., Val Acc: ...%' line"
            raise RunFailed(f"the peer (seed {seed}) failed ({why}): {' '.join(command)}\n{tail}")
        best = max(epochs, key=lambda e: e[1])  # the first epoch at the peak, as its train() keeps it
        return {
            "run": PEER,
            "source": source,
            "seed": seed,
            "test_accuracy": best[1] / 100,
            "seconds": best[2],
            "fit_seconds": float("nan"),
            "test_seconds": float("nan"),
            "whole_seconds": whole,
            "best_epoch": best[0],
            "epochs": len(epochs),
            "timed": "",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the package's recipes ---------------------------------------------------------------------------


def run_recipe(args: argparse.Namespace, config: str, seed: int) -> dict:
    """One seed of a config: a one-run study by ``zoo.py`` in its own process; its row of the results."""
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "zoo.csv"
        command = [sys.executable, str(Path(__file__).with_name("zoo.py")), "--configs", config, "--seeds", str(seed)]
        command += ["--csv", str(csv), "--data-dir", str(args.data_dir), "--log-dir", str(args.log_dir)]
        command += [a for flag in ("limit_batches", "max_epochs") if getattr(args, flag) for a in (
            f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode:
            tail = (done.stdout[-1500:] + "\n" + done.stderr[-3000:]).strip()
            raise RunFailed(f"{config} (seed {seed}) failed (exit {done.returncode}): {' '.join(command)}\n{tail}")
        [row] = results_tables().ZOO.read(csv)
    from fmnist_lightning.runs import read_history  # the package's one reader of history.csv

    val = [r.get("val/acc", math.nan) for r in read_history(row["run_dir"])]
    validated = [i for i, v in enumerate(val) if not math.isnan(v)]  # a recipe may validate only some epochs
    return {
        "run": Path(config).stem,
        "source": config,
        "seed": seed,
        "test_accuracy": row["test_accuracy"],
        "seconds": seconds,
        "fit_seconds": row["fit_seconds"],
        "test_seconds": row["test_seconds"],
        "whole_seconds": seconds,
        "best_epoch": 1 + max(validated, key=lambda i: (val[i], -i)) if validated else None,
        "epochs": row["epochs"],
        "timed": "study",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds, each run by every recipe.")
    parser.add_argument(
        "--seeds-of",
        nargs=2,
        action="append",
        default=[],
        metavar=("CONFIG", "N"),
        help="Run CONFIG (one of --recipes, or 'peer') with the first N of --seeds only (a slow reference).",
    )
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=None,
        help="Config files (default: configs/fast.yaml, configs/fast94.yaml if it exists, configs/tinyvgg.yaml); "
        "none: the peer alone.",
    )
    parser.add_argument("--peer-dir", type=Path, default=None, help=f"A checkout of {PEER_URL} (else no peer).")
    parser.add_argument(
        "--peer-python", default=sys.executable, help="The Python that runs the peer (default: this one)."
    )
    parser.add_argument("--data-dir", default="data", help="The package's data folder (--data.data_dir).")
    parser.add_argument(
        "--log-dir",
        default="lightning_logs/time_to_accuracy",
        help="Where the recipes' studies go (zoo.py's --log-dir).",
    )
    parser.add_argument("--limit-batches", type=int, default=None, help="Shortened runs: N batches per stage.")
    parser.add_argument("--max-epochs", type=int, default=None, help="Shortened runs: N epochs (peer included).")
    parser.add_argument(
        "--csv", type=Path, default=None, help="Write every run's row to this new CSV (docs/results/...)."
    )
    parser.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.recipes is None:
        args.recipes = [c for c in DEFAULT_RECIPES if c != "configs/fast94.yaml" or (ROOT / c).is_file()]
    for name in ("limit_batches", "max_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.peer_child:
        if not args.recipes and args.peer_dir is None:
            parser.error("nothing to run: give --recipes, --peer-dir or both")
        missing = [c for c in args.recipes if not Path(c).is_file()]
        if missing:
            parser.error(f"no such config: {', '.join(missing)}")
        runs = {*args.recipes, *(["peer"] if args.peer_dir is not None else [])}
        args.counts = {}
        for run, count in args.seeds_of:
            if run not in runs or not count.isdigit() or not 1 <= int(count) <= len(args.seeds):
                known = ", ".join(sorted(runs))
                parser.error(f"--seeds-of {run} {count}: give one of {known} and a count from 1 to {len(args.seeds)}")
            args.counts[run] = int(count)
        if args.csv is not None and args.csv.exists():
            parser.error(f"{args.csv} exists: a results file holds one run of the benchmark; choose a new name")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peer_child:
        peer_child(str(args.peer_dir), args.seed, args.limit_batches, args.max_epochs)
        return
    source, raw = "", None
    if args.peer_dir is not None:
        source, raw = check_peer(args.peer_dir, args.peer_python), find_data(args.data_dir)
    else:
        print(f"No --peer-dir: the peer is not run (get it with: git clone {PEER_URL}).", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(
            f"Warning: the machine is busy (load average {load:.1f}): times will be longer and noisier.",
            file=sys.stderr,
        )
    shortened = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("limit_batches", "max_epochs") and v
    )
    tables = results_tables()
    machine = tables.machine()
    rows = []
    for i, seed in enumerate(args.seeds):
        jobs = ([("peer", None)] if args.peer_dir is not None else []) + [("recipe", c) for c in args.recipes]
        for kind, config in jobs:
            if i >= args.counts.get(config or "peer", len(args.seeds)):
                continue
            try:
                row = run_peer(args, seed, source, raw) if kind == "peer" else run_recipe(args, config, seed)
            except RunFailed as err:
                sys.exit(f"time_to_accuracy.py: {err}")
            row = {**row, "overrides": shortened, **machine}
            rows.append(row)
            if args.csv is not None:
                tables.TIME_TO_ACCURACY.append(args.csv, row)
            print(
                f"{row['run']} seed {seed}: {100 * row['test_accuracy']:.2f}% in {row['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print(tables.time_to_accuracy_tables(rows))


if __name__ == "__main__":
    main()
