"""A run's life: resume in place (after kill -9 too), last.ckpt every epoch, atomic checkpoints on a
full disk, HParams with real metrics, and DDP fit + test on 2 CPU processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_lightning import training
from fmnist_lightning.checkpoints import load_checkpoint
from fmnist_lightning.cli import run
from fmnist_lightning.predictions import read_predictions
from fmnist_lightning.runs import claim_run_dir, read_history

from .conftest import LINEAR, TINYVGG, fast_fit_args, small_disk


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def epoch_of(ckpt: Path) -> int:
    return int(load_checkpoint(ckpt)["epoch"])


def test_last_ckpt_is_the_last_epoch_even_without_improvement(tmp_path, data_dir, monkeypatch):
    """A learning rate of 0 never improves val/acc after epoch 0: best stays at 0, last moves on."""
    monkeypatch.chdir(tmp_path)
    args = fast_fit_args(data_dir, tmp_path, "--trainer.max_epochs=3", "--model.optimizer.init_args.lr=0")
    result = training.fit([*LINEAR, *args, "--model.lr_scheduler=null"])
    ckpts = result.run_dir / "checkpoints"
    assert epoch_of(ckpts / "last.ckpt") == 2
    (best,) = ckpts.glob("best-*.ckpt")
    assert epoch_of(best) == 0
    assert (result.best_checkpoint, result.last_checkpoint) == (best, ckpts / "last.ckpt")
    history = read_history(result.run_dir)
    assert [int(r["epoch"]) for r in history] == [0, 1, 2]


def test_resume_last_continues_the_same_run_in_place(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = [*LINEAR, *fast_fit_args(data_dir, tmp_path), "--model.lr_scheduler=null"]
    first = run(["fit", *base, "--trainer.max_epochs=2"])
    run_dir = first.run_dir
    resumed = run(["fit", *base, "--trainer.max_epochs=4", "--ckpt_path=last"])
    assert resumed.run_dir == run_dir
    assert resumed.resumed
    assert not first.resumed
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert resumed.epochs == 4
    assert resumed.trainer.global_step == 4 * 3  # 3 batches an epoch: nothing redone, nothing skipped
    assert resumed.best_score >= first.best_score  # best state carried on
    assert [int(r["epoch"]) for r in read_history(run_dir)] == [0, 1, 2, 3]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "config_resume.yaml").is_file()
    steps = [s for s, _ in scalars(run_dir)["val/acc"]]
    assert len(steps) == 4
    assert steps == sorted(steps)  # one TensorBoard run, continuing
    out = capsys.readouterr().out
    assert f"Run folder: {run_dir}" in out
    assert "Test it:" in out


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_completed_epoch(tmp_path, data_dir):
    """kill -9 in the middle of an epoch, then `fit --ckpt_path last` with the same command."""
    cmd = [sys.executable, "-m", "fmnist_lightning", "fit", *TINYVGG]
    cmd += fast_fit_args(data_dir, tmp_path / "logs", "--trainer.max_epochs=4", "--trainer.limit_train_batches=15")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file() and epoch_of(last) >= 1:  # epochs 0 and 1 done, epoch 2 under way
                break
            time.sleep(0.2)
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = epoch_of(last)
    assert killed_at in (1, 2)
    assert not list(last.parent.glob(".*.tmp"))  # a kill mid-write leaves no temporary behind either
    done = subprocess.run([*cmd, "--ckpt_path=last"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    run = last.parent.parent
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert epoch_of(last) == 3
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 4 * 15
    assert [int(r["epoch"]) for r in read_history(run)] == [0, 1, 2, 3]


def test_hparams_view_gets_the_best_validation_metrics_and_the_test_accuracy(linear_run):
    run = linear_run.run_dir
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"hp/best_val_acc", "hp/best_val_loss", "hp/test_acc"} <= tags
    assert "hp_metric" not in tags
    best = max(v for _, v in scalars(run)["val/acc"])
    assert scalars(run)["hp/best_val_acc"][-1][1] == pytest.approx(best)
    test_acc = json.loads((linear_run.report / "metrics.json").read_text())["accuracy"]
    assert scalars(run)["hp/test_acc"][-1][1] == pytest.approx(test_acc)
    # The HParams plugin's session summary lists the run's hyper-parameters and the three metrics.
    plugin = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugin)
    experiment = plugin["_hparams_/experiment"].decode(errors="ignore")
    for text in ("hp/best_val_acc", "hp/test_acc", "optimizer", "batch_size"):
        assert text in experiment
    assert "_instantiator" not in experiment


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_whole(tmp_path, data_dir):
    """Resume into a nearly full tmpfs: writing the next checkpoint fails; last.ckpt stays loadable."""
    with small_disk(tmp_path / "disk", "3m") as disk:
        cmd = [sys.executable, "-m", "fmnist_lightning", "fit", *LINEAR]
        # No confusion-matrix images: the event files stay small, so the checkpoint is what overflows.
        cmd += fast_fit_args(
            data_dir, disk / "logs", "--model.lr_scheduler=null", "--epoch_metrics.confusion_matrix=false"
        )
        first = subprocess.run([*cmd, "--trainer.max_epochs=1"], cwd=tmp_path, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr[-2000:]
        last = disk / "logs" / "linear" / "version_0" / "checkpoints" / "last.ckpt"
        before = last.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 40_000))  # room for logs, not for a 100 kB checkpoint
        done = subprocess.run(
            [*cmd, "--trainer.max_epochs=2", "--ckpt_path=last"], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert "could not write checkpoint" in done.stderr
        assert "No space left on device" in done.stderr
        assert last.read_bytes() == before
        assert epoch_of(last) == 0
        assert not list(last.parent.glob(".*.tmp"))
        assert "resume with `fit --ckpt_path last`" in done.stderr
        # A new run on the same full disk fails at its first checkpoint: no resume to advise, no run left.
        fresh = subprocess.run([*cmd, "--trainer.max_epochs=1"], cwd=tmp_path, capture_output=True, text=True)
        assert fresh.returncode != 0
        assert "Free some space or fix the folder, then run the same command again" in fresh.stderr
        assert "--ckpt_path last" not in fresh.stderr
        assert sorted(p.name for p in last.parent.parent.parent.iterdir()) == ["version_0"]


@pytest.mark.slow
def test_ddp_fit_and_test_on_two_cpu_processes_match_one_process(tmp_path, data_dir):
    """DDP fit without per-rank logging warnings; a DDP test's report equals a one-process test's."""
    base = [sys.executable, "-m", "fmnist_lightning"]
    common = [*LINEAR, f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    common += ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    fit = subprocess.run(
        [*base, "fit", *common, *ddp, "--trainer.max_epochs=1", "--trainer.limit_train_batches=5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "sync_dist=True" not in fit.stderr
    assert "DistributedSampler" not in fit.stderr
    run = tmp_path / "logs" / "linear" / "version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    for extra in (ddp, ["--trainer.devices=1"]):
        done = subprocess.run(
            [*base, "test", *common, *extra, f"--ckpt_path={best}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "sync_dist=True" not in done.stderr
    two, one = (json.loads((run / name / "metrics.json").read_text()) for name in ("report", "report_1"))
    assert two["num_test_images"] == one["num_test_images"] == 10_000
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=0)
    assert two["macro_f1"] == pytest.approx(one["macro_f1"], abs=1e-7)
    p2, p1 = (
        read_predictions(run / "report" / "predictions.csv"),
        read_predictions(run / "report_1" / "predictions.csv"),
    )
    assert p2.index == p1.index == list(range(10_000))  # every test image exactly once, in order
    assert p2.preds == p1.preds
    assert torch.allclose(p2.probs, p1.probs, atol=1e-5)
    with (run / "report" / "predictions.csv").open() as f:
        assert sum(1 for _ in csv.reader(f)) == 10_001


def test_racing_claims_get_distinct_run_folders(tmp_path):
    """Eight claims at once (threads, each a mkdir race) get eight folders, numbered without gaps."""
    root = tmp_path / "logs" / "tinyvgg"
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: claim_run_dir(root), range(8)))
    folders = sorted(run for run, _ in claims)
    assert sorted(p.name for p in folders) == sorted(f"version_{i}" for i in range(8))
    made_parents = [created for _, created in claims if len(created) > 1]
    assert all(c[0].parent == root for c in made_parents)


@pytest.mark.slow
def test_three_fits_started_at_once_take_three_versions(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "fmnist_lightning", "fit", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs")]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    runs = sorted((tmp_path / "logs" / "linear").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)


class PoisonWeights(Callback):
    """Set the network's weights to NaN before batch ``batch`` of epoch ``epoch``: a diverged training."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def poison(epoch: int, batch: int) -> list[str]:
    return [
        "--trainer.callbacks+=tests.test_runs.PoisonWeights",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.batch={batch}",
    ]


def test_a_diverged_training_stops_naming_epoch_and_step_and_saves_nothing_of_it(tmp_path, data_dir):
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *LINEAR, *fast_fit_args(data_dir, logs, "--trainer.max_epochs=3"), *poison(1, 2)])
    message = str(exit_.value.code)
    assert message.startswith("fmnist_lightning: error: the training loss became NaN or infinite at epoch 1, batch 2")
    assert "(step 5)" in message  # 3 batches in epoch 0, then batch 2 of epoch 1
    assert "keeps its checkpoints of the 1 epoch(s) before" in message
    checkpoints = logs / "linear" / "version_0" / "checkpoints"
    assert sorted(p.name.split("-val")[0] for p in checkpoints.iterdir()) == ["best-epoch00", "last.ckpt"]
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_training_diverged_in_its_first_epoch_leaves_no_run_folder(tmp_path, data_dir):
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *LINEAR, *fast_fit_args(data_dir, logs), *poison(0, 0)])
    assert "at epoch 0, batch 0 (step 0)" in str(exit_.value.code)
    assert "no epoch had completed, so nothing was kept" in str(exit_.value.code)
    assert not (logs / "linear").exists()
