"""SIGTERM and SIGINT: exit status 128 + signal, one line saying what was kept, and a way on from it.

The signals are real (``os.kill`` of this process, or of a command's process), sent at a chosen
batch by a callback given on the command line, so every case is deterministic.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from fmnist_lightning.checkpoints import load_checkpoint
from fmnist_lightning.cli import main
from fmnist_lightning.config import PROG
from fmnist_lightning.runs import read_history
from fmnist_lightning.signals import stop_on_signals

from .conftest import LINEAR, TINYVGG, fast_fit_args
from .test_errors import tree

ENV = "FMNIST_TEST_SEND_SIGNAL"


class SendSignal(Callback):
    """Send ``signum`` to this process after batch ``batch`` of epoch ``epoch`` (any loop), once.

    Only while the environment variable ``FMNIST_TEST_SEND_SIGNAL`` is set, so that the same command
    can be run again to finish what was stopped.
    """

    def __init__(self, signum: int = 15, epoch: int = 0, batch: int = 1) -> None:
        self.signum, self.epoch, self.batch, self.sent = signum, epoch, batch, False

    def _maybe_send(self, trainer: Trainer, batch_idx: int) -> None:
        if os.environ.get(ENV) and not self.sent and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self._maybe_send(trainer, batch_idx)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx, dl=0) -> None:
        self._maybe_send(trainer, batch_idx)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx, dl=0):
        self._maybe_send(trainer, batch_idx)


def send(signum: int, epoch: int = 0, batch: int = 1) -> list[str]:
    return [
        "--trainer.callbacks+=tests.test_signals.SendSignal",
        f"--trainer.callbacks.signum={signum}",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.batch={batch}",
    ]


def stopped(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``args`` in this process with the signal armed: exit status and stderr."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    os.environ[ENV] = "1"
    try:
        with pytest.raises(SystemExit) as exit_:
            main(args)
    finally:
        del os.environ[ENV]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are put back
    return exit_.value.code, err.strip().splitlines()[-1]


def test_sigterm_during_fit_keeps_the_last_completed_epoch_and_says_how_to_continue(tmp_path, data_dir, capsys):
    logs = tmp_path / "logs"
    args = ["fit", *TINYVGG, *fast_fit_args(data_dir, logs, "--trainer.max_epochs=4"), *send(signal.SIGTERM, 2, 1)]
    code, line = stopped(args, capsys)
    run = logs / "tinyvgg" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert code == 143
    assert line.startswith("fmnist_lightning: stopped by SIGTERM: the run")
    assert f"--ckpt_path {last}" in line
    assert "(2 trained)" in line
    assert load_checkpoint(last)["epoch"] == 1  # epochs 0 and 1 complete; epoch 2 was cut short
    assert not list(run.rglob("*.tmp"))
    # The command it gives finishes the run in place: 4 epochs, no step redone or skipped.
    resume = line.split("`")[1].removeprefix(PROG).split()
    assert main(resume) == 0
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert load_checkpoint(last)["global_step"] == 4 * 3
    assert [int(r["epoch"]) for r in read_history(run)] == [0, 1, 2, 3]


def test_sigint_in_the_first_epoch_keeps_nothing_and_leaves_no_run_folder(tmp_path, data_dir, capsys):
    logs = tmp_path / "logs"
    code, line = stopped(["fit", *LINEAR, *fast_fit_args(data_dir, logs), *send(signal.SIGINT, 0, 1)], capsys)
    assert code == 130
    assert line == (
        "fmnist_lightning: stopped by SIGINT: no epoch had completed, so nothing was kept; run the same command again."
    )
    assert not (logs / "linear").exists()


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_sigterm_during_evaluation_writes_nothing(tmp_path, data_dir, capsys, linear_run, stage):
    logs = tmp_path / "logs"
    linear_run.copy(logs)
    before = tree(logs)
    args = [stage, *LINEAR, *fast_fit_args(data_dir, logs, "--ckpt_path=last"), *send(signal.SIGTERM, 0, 0)]
    code, line = stopped(args, capsys)
    assert code == 143
    assert line == "fmnist_lightning: stopped by SIGTERM: nothing was written; run the same command again."
    assert tree(logs) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_kfold_queues_the_cell_again_and_the_same_command_finishes(tmp_path, data_dir, capsys, signum):
    logs = tmp_path / "logs"
    args = ["kfold", *LINEAR, *fast_fit_args(data_dir, logs), "--num_folds=2", "--jobs=1", *send(signum, 0, 1)]
    code, line = stopped(args, capsys)
    assert code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}: the finished trainings are kept in" in line
    assert "run the same command to continue" in line
    assert main(args) == 0  # the same command, not armed: trains both folds
    (study,) = (logs / "linear").glob("kfold2*")
    assert (study / "results.csv").read_text().count("seed42") == 2  # fold 0 (the one stopped) and fold 1


@pytest.mark.slow
def test_sigterm_to_a_sweep_with_two_workers_stops_them_and_the_rerun_completes(tmp_path, data_dir):
    """A scheduler's SIGTERM reaches the command only: it stops its workers, which queue their cells again."""
    sweep = tmp_path / "grid.yaml"
    sweep.write_text("grid:\n  model.optimizer.init_args.lr: [0.01, 0.02]\n")
    cmd = [sys.executable, "-m", "fmnist_lightning", "sweep", *LINEAR, f"--sweep={sweep}", "--jobs=2"]
    cmd += fast_fit_args(data_dir, tmp_path / "logs", "--trainer.max_epochs=2", "--trainer.limit_train_batches=15")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    study = tmp_path / "logs" / "linear"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(study.rglob("last.ckpt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("fmnist_lightning: stopped by SIGTERM: the finished trainings")
    assert "Traceback" not in err
    rerun = [*cmd, "--jobs=1"]  # the same study (--jobs is not part of it), without starting workers again
    done = subprocess.run(rerun, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = next(study.rglob("results.csv")).read_text()
    assert results.count("\n") >= 3  # a header and both points


def test_the_signal_handlers_are_only_installed_in_the_main_thread():
    seen = []

    def body() -> None:
        with stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]
