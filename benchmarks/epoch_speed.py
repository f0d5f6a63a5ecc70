"""Epoch speed, side by side: compute bound vs this package vs the usual PyTorch pipeline.

For each model and precision, four measurements on the same machine, model, batch size and
augmentation (random crop with padding 2, horizontal flip, rotation up to 10 degrees, normalise):

1. ``bound``: forward + backward + optimizer step on one in-memory synthetic batch in a bare loop,
   channels-last (the best this hardware gives for the model and precision); per-epoch time is
   the training images divided by its throughput, plus the validation pass at the same rate of
   inference.
2. ``loop``: the package's data path (its data module's batches and on-device transform) and the
   same network and optimizer in a bare PyTorch loop, no Lightning: against ``package``, what
   Lightning's loop and the task's logging and metrics cost; timed as ``package`` (setup included).
3. ``package``: ``Trainer.fit`` for one epoch (train + validation) with the package's default data
   path, its wall time measured around ``fit`` (data loading and setup included).
4. ``usual``: torchvision's ``FashionMNIST`` with per-image PIL transforms through a
   ``DataLoader`` and a plain PyTorch loop (train + validation), NCHW as such code is written.

Each measurement runs in its own process, which reports its peak resident memory. ``--csv`` appends
one row per measurement, with the machine, to a results file (``results_tables.EPOCH_SPEED``);
``python benchmarks/results_tables.py FILE`` makes the table this script prints from it.

Usage:
    python benchmarks/epoch_speed.py --models TinyVGG FashionCNN --precisions 32-true --repeats 2 --csv speed.csv
    python benchmarks/epoch_speed.py --precisions bf16-mixed --limit-batches 20   # CPUs without native bf16
    python benchmarks/epoch_speed.py --models TinyVGG --limit-batches 20   # a quick look
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import results_tables
import torch
from results_tables import EPOCH_SPEED

BATCH_SIZE, EVAL_BATCH_SIZE, PADDING, ROTATION = 128, 256, 2, 10.0
VAL_SPLIT, SEED = 5000, 42
PATHS = ("bound", "loop", "package", "usual")
PRECISIONS = ("32-true", "bf16-mixed")  # what autocast() below knows


def build_model(name: str) -> torch.nn.Module:
    from fmnist_lightning import models

    return models.build(name)


def make_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (the bound and the package; configs/fast.yaml sets ``fused: true``)."""
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_bound(model_name: str, precision: str, limit: int | None) -> dict:
    torch.manual_seed(SEED)
    model = build_model(model_name).to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters())
    x = torch.randn(BATCH_SIZE, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH_SIZE,))
    # The images one epoch (or its --limit-batches slice) trains and validates on, all of them run:
    # the CPU's speed drifts over minutes, so a short sample would compare different moments of the
    # machine rather than the two loops.
    n_train = limit * BATCH_SIZE if limit else 60_000 - VAL_SPLIT
    n_val = min(limit * EVAL_BATCH_SIZE, VAL_SPLIT) if limit else VAL_SPLIT
    steps, eval_steps = math.ceil(n_train / BATCH_SIZE), math.ceil(n_val / EVAL_BATCH_SIZE)

    def step() -> None:
        with autocast(precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_ips = steps * BATCH_SIZE / (time.perf_counter() - start)
    model.eval()
    xe = torch.randn(EVAL_BATCH_SIZE, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision):
        model(xe)
        start = time.perf_counter()
        for _ in range(eval_steps):
            model(xe)
        eval_ips = eval_steps * EVAL_BATCH_SIZE / (time.perf_counter() - start)
    epoch_s = n_train / train_ips + n_val / eval_ips
    return {"train_img_s": train_ips, "epoch_s": epoch_s}


def package_data(data_dir: str):
    """The package's data module with the benchmark's split, batch sizes and augmentation (seeded)."""
    from lightning.pytorch import seed_everything

    from fmnist_lightning import FashionMNISTDataModule

    seed_everything(SEED)
    return FashionMNISTDataModule(
        data_dir=data_dir,
        val_split=VAL_SPLIT,
        batch_size=BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        crop_padding=PADDING,
        hflip_prob=0.5,
        rotation_degrees=ROTATION,
    )


def one_epoch(model, opt, train_batches, val_batches, precision: str, limit: int | None) -> float:
    """One training pass and one validation pass over ready ``(x, y)`` batches (``limit`` batches each
    if given), as a bare PyTorch loop; returns the training images a second."""
    model.train()
    n_train, train_start = 0, time.perf_counter()
    for i, (x, y) in enumerate(train_batches):
        if limit and i == limit:
            break
        with autocast(precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_train += len(y)
    train_ips = n_train / (time.perf_counter() - train_start)
    model.eval()
    with torch.inference_mode(), autocast(precision):
        for i, (x, _) in enumerate(val_batches):
            if limit and i == limit:
                break
            model(x)
    return train_ips


def run_loop(model_name: str, precision: str, limit: int | None, data_dir: str) -> dict:
    dm = package_data(data_dir)
    model = build_model(model_name)
    opt = make_optimizer(model.parameters())
    init = getattr(model, "init_from_batch", None)  # AirbenchNet's whitening stem, as the task sets it

    def train_batches():
        for i, (images, labels) in enumerate(dm.train_dataloader()):
            x = dm.transform(images, train=True)
            if i == 0 and init is not None:
                init(x)
            yield x, labels

    def val_batches():
        for images, labels in dm.val_dataloader():
            yield dm.transform(images, train=False), labels

    start = time.perf_counter()
    dm.setup("fit")
    train_ips = one_epoch(model, opt, train_batches(), val_batches(), precision, limit)
    return {"train_img_s": train_ips, "epoch_s": time.perf_counter() - start}


def run_package(model_name: str, precision: str, limit: int | None, data_dir: str) -> dict:
    from lightning.pytorch import Trainer

    from fmnist_lightning import ClassificationTask
    from fmnist_lightning.callbacks import EpochTimer

    dm = package_data(data_dir)
    task = ClassificationTask(build_model(model_name), optimizer=make_optimizer)
    trainer = Trainer(
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=limit,
        limit_val_batches=limit,
        callbacks=[EpochTimer()],
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    epoch_s = time.perf_counter() - start
    n_train = limit * BATCH_SIZE if limit else len(dm.train_set)
    return {"train_img_s": n_train / float(trainer.callback_metrics["time/train_epoch_s"]), "epoch_s": epoch_s}


def run_usual(model_name: str, precision: str, limit: int | None, data_dir: str, workers: int) -> dict:
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms
    from torchvision.datasets import FashionMNIST

    from fmnist_lightning.data import DATASET_MEAN, DATASET_STD, FashionMNISTDataModule, load_fashion_mnist

    torch.manual_seed(SEED)
    load_fashion_mnist(data_dir, download=False)  # the same files, staged for torchvision
    train_tf = transforms.Compose(
        [
            transforms.RandomCrop(28, padding=PADDING),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(ROTATION),
            transforms.ToTensor(),
            transforms.Normalize((DATASET_MEAN,), (DATASET_STD,)),
        ]
    )
    eval_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((DATASET_MEAN,), (DATASET_STD,))])
    full_train = FashionMNIST(data_dir, train=True, transform=train_tf)
    full_eval = FashionMNIST(data_dir, train=True, transform=eval_tf)
    train_idx, val_idx = FashionMNISTDataModule(val_split=VAL_SPLIT, seed=SEED).split_indices(full_train.targets)
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    train_loader = DataLoader(Subset(full_train, train_idx.tolist()), batch_size=BATCH_SIZE, shuffle=True, **kw)
    val_loader = DataLoader(Subset(full_eval, val_idx.tolist()), batch_size=EVAL_BATCH_SIZE, **kw)
    model = build_model(model_name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # not fused: what a usual script writes
    start = time.perf_counter()
    train_ips = one_epoch(model, opt, train_loader, val_loader, precision, limit)
    return {"train_img_s": train_ips, "epoch_s": time.perf_counter() - start}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path == "bound":
        result = run_bound(args.model, args.precision, args.limit_batches)
    elif args.path == "loop":
        result = run_loop(args.model, args.precision, args.limit_batches, args.data_dir)
    elif args.path == "package":
        result = run_package(args.model, args.precision, args.limit_batches, args.data_dir)
    else:
        result = run_usual(args.model, args.precision, args.limit_batches, args.data_dir, args.workers)
    result.update(path=args.path, model=args.model, precision=args.precision, peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["TinyVGG", "FashionCNN"])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--limit-batches", type=int, default=None, help="stop each epoch after N batches")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the usual pipeline")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--repeats", type=int, default=1, help="measure every path this many times, round-robin")
    parser.add_argument("--csv", type=Path, default=None, help="append every measurement to this results file")
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.path:
        child(args)
        return
    for name in args.models:  # refuse before measuring anything, not in a child's traceback
        try:
            build_model(name)
        except ValueError as err:
            parser.error(str(err))
    if args.csv:
        try:
            EPOCH_SPEED.check_appendable(args.csv)
        except ValueError as err:
            parser.error(f"--csv {err}")
    machine = results_tables.machine()
    settings = {"limit_batches": args.limit_batches, "workers": args.workers, "threads": args.threads}
    rows = []
    for model in args.models:
        for precision in args.precisions:
            # Round-robin over the paths, so each repeat sees the machine in the same state.
            for repeat in range(1, args.repeats + 1):
                for path in args.paths:
                    result = run_child(args, path, model, precision)
                    rows.append({**result, "repeat": repeat, **settings, **machine})
                    print(json.dumps(result), file=sys.stderr, flush=True)
                    if args.csv:  # as it goes: a long run stopped halfway keeps what it measured
                        EPOCH_SPEED.append(args.csv, rows[-1])
    print(results_tables.epoch_speed_table(rows))


def run_child(args: argparse.Namespace, path: str, model: str, precision: str) -> dict:
    """Run one measurement in a fresh process and return its result."""
    cmd = [sys.executable, __file__, "--path", path, "--model", model, "--precision", precision]
    cmd += ["--workers", str(args.workers), "--threads", str(args.threads), "--data-dir", args.data_dir]
    if args.limit_batches:
        cmd += ["--limit-batches", str(args.limit_batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{path}/{model}/{precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


if __name__ == "__main__":
    main()
