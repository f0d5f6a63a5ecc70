"""Studies: sweep files, k-fold, grid/search/ablation sweeps on Optuna's loop, kill -9 and resume, parallel
workers on a journal file and on a real PostgreSQL server, and the statistics in the tables."""

import contextlib
import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from itertools import product
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.predictions import read_predictions
from fmnist_lightning.stats import corrected_resampled_ttest, discordant_counts, mcnemar_exact, paired_ttest, summarize
from fmnist_lightning.studies import (
    StudyIncomplete,
    StudyOptions,
    StudyPlan,
    engine,
    plan_sweep,
    read_table,
    run_kfold,
    run_sweep,
    storage,
)
from fmnist_lightning.studies.results import Collected, compare_to_reference
from fmnist_lightning.studies.spec import Point, format_value

from .conftest import LINEAR, ROOT, fast_fit_args


def sweep_file(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def study_args(data_dir: Path, logs: Path, *extra: str) -> list[str]:
    """The base fit command line of every study here: the linear baseline, a few batches."""
    return [*LINEAR, *fast_fit_args(data_dir, logs, *extra)]


def load(out: Path, url: str | optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study of a study folder, from its journal (or ``url``, or a storage opened before)."""
    storage_ = url or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))
    )
    return optuna.load_study(study_name=f"{out.parent.name}/{out.name}", storage=storage_)


def completed(study: optuna.Study) -> dict[str, list[dict]]:
    """Cell key -> the records of its COMPLETE trials (each the one record that the cell is done)."""
    done: dict[str, list[dict]] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        if "result" in t.user_attrs:
            done.setdefault(t.user_attrs["cell"], []).append(t.user_attrs["result"])
    return done


def checkpoints(study_dir: Path) -> dict[str, tuple[int, int]]:
    """Every checkpoint file under a study with its size and modification time (what a training writes)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in study_dir.rglob("*.ckpt")}


# ---------------------------------------------------------------------------------------------
# Sweep files


def test_grid_expands_to_every_combination_fold_and_seed(tmp_path, data_dir):
    # 5e-3 without a dot is a string to YAML: the parser makes it the float 0.005.
    sweep = sweep_file(
        tmp_path,
        "num_folds: 3\nseeds: 2\ngrid:\n"
        "  model.optimizer.init_args.lr: [1.0e-2, 5e-3]\n"
        "  data.batch_size: [32, 64, 128]\n",
    )
    args = study_args(data_dir, tmp_path / "logs")
    plan = plan_sweep(args, sweep)
    lr, bs = "model.optimizer.init_args.lr", "data.batch_size"
    assert [p.params for p in plan.points] == [{lr: a, bs: b} for a, b in product([0.01, 0.005], [32, 64, 128])]
    assert plan.points[1].name == "lr=0.01_batch_size=64"
    cells = plan.cells()
    assert len(cells) == 6 * 3 * 2
    assert len({c.key for c in cells}) == len(cells)
    assert {(c.point.name, c.fold, c.seed) for c in cells} == set(
        product([p.name for p in plan.points], [0, 1, 2], [42, 43])
    )
    assert [c.seed for c in cells] == [42] * 18 + [43] * 18  # every point on the first seed first
    overrides = plan.cell_overrides(cells[1])
    assert (overrides[lr], overrides[bs], overrides["data.fold"], overrides["seed_everything"]) == (0.01, 32, 1, 42)
    assert plan.run_dir(cells[1]) == plan.study_dir / "lr=0.01_batch_size=32" / "fold1_seed42"
    # The folder is named by what is trained: machine paths do not change it, the config does.
    other = plan_sweep([*args, "--data.data_dir=/elsewhere", "--trainer.max_epochs=2"], sweep)
    assert other.identity["config"]["trainer"]["max_epochs"] == 2
    assert "data_dir" not in other.identity["config"]["data"]
    assert other.folder != plan.folder
    assert plan_sweep([*args, "--data.data_dir=/elsewhere"], sweep).folder == plan.folder
    assert not (tmp_path / "logs").exists()


BAD_SWEEPS = {
    "unknown key": ("grid:\n  data.batch_sise: [32]\n", "batch_sise"),
    "empty grid": ("grid: {}\n", "empty"),
    "empty value list": ("grid:\n  data.batch_size: []\n", "non-empty list"),
    "value of the wrong type": ("grid:\n  data.batch_size: [32, abc]\n", "data.batch_size, value 'abc'"),
    "unknown distribution": (
        "search:\n  model.optimizer.init_args.lr: {type: gaussian, low: 0.0, high: 1.0}\nn_trials: 2\n",
        "unknown distribution type 'gaussian'",
    ),
    "float bounds for an int key": (
        "search:\n  data.batch_size: {type: float, low: 16.5, high: 64.0}\nn_trials: 2\n",
        "data.batch_size",
    ),
    "search without n_trials": (
        "search:\n  model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2}\n",
        "n_trials",
    ),
    "unknown sampler": (
        "search:\n  model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2}\n"
        "n_trials: 2\nsampler: Foo\n",
        "unknown sampler 'Foo'",
    ),
    "unknown pruner": (
        "search:\n  model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2}\nn_trials: 2\npruner: Foo\n",
        "unknown pruner 'Foo'; optuna.pruners has HyperbandPruner, MedianPruner",
    ),
    "pruner arguments it refuses": (
        "search:\n  model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2}\n"
        "n_trials: 2\npruner: {name: MedianPruner, n_warmup_step: 2}\n",
        "pruner MedianPruner refuses its arguments",
    ),
    "a pruner in a grid": ("grid:\n  data.batch_size: [32]\npruner: MedianPruner\n", "pruner only apply to a search"),
    "a key the study sets": ("grid:\n  seed_everything: [1, 2]\n", "--seeds"),
    "two forms": ("grid: {data.batch_size: [32]}\nablation: {variants: {a: {}}}\n", "exactly one"),
    "bad YAML": ("grid: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping"),
    "bad ablation value": ("ablation:\n  variants:\n    big: {data.batch_size: huge}\n", "ablation arm big"),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweep_file_fails_before_anything_is_written(tmp_path, data_dir, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    text, message = BAD_SWEEPS[case]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run_sweep(study_args(data_dir, tmp_path / "logs"), sweep_file(tmp_path, text))
    assert not (tmp_path / "logs").exists()


def test_missing_sweep_file_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="cannot be read"):
        run_sweep(study_args(data_dir, tmp_path / "logs"), tmp_path / "nowhere.yaml")
    assert not (tmp_path / "logs").exists()


def test_every_shipped_sweep_file_plans_against_its_config():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        command = path.read_text().split("python -m fmnist_lightning sweep", 1)[1].splitlines()[0].split()
        config = command[command.index("--config") + 1]
        assert command[command.index("--sweep") + 1] == f"configs/sweeps/{path.name}"
        plan = plan_sweep(["--config", str(ROOT / config)], path)
        if plan.kind == "search":  # its points come from the sampler, trial by trial
            assert plan.n_trials > 0, path.name
            assert plan.space, path.name
        else:
            assert plan.cells(), path.name
        for point in plan.points:  # plain data: the results tables write every arm's overrides as JSON
            assert all(isinstance(format_value(v), str) for v in point.params.values()), (path.name, point.name)


def test_ablation_arms_that_set_classes_keep_them_as_plain_data(tmp_path):
    sweep = tmp_path / "arms.yaml"
    sweep.write_text(
        "seeds: 1\nablation:\n  variants:\n"
        "    sgd: {model.optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}}\n"
        "    ema:\n      trainer.callbacks:\n"
        "        - {class_path: lightning.pytorch.callbacks.EMAWeightAveraging, init_args: {decay: 0.9}}\n"
    )
    plan = plan_sweep(["--config", str(ROOT / "configs" / "linear.yaml")], sweep)
    params = {p.name: p.params for p in plan.points}
    assert params["sgd"] == {"model.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}}
    [callback] = params["ema"]["trainer.callbacks"]
    assert callback == {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}}
    assert "EMAWeightAveraging" in format_value(params["ema"]["trainer.callbacks"])


# ---------------------------------------------------------------------------------------------
# k-fold, in this process


def test_kfold_trains_every_fold_in_its_own_run_and_tabulates_them(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_kfold(study_args(data_dir, tmp_path / "logs"), num_folds=3, options=StudyOptions(jobs=1))
    assert out.parent == tmp_path / "logs" / "linear"
    assert out.name.startswith("kfold3-")
    rows = read_table(out / "results.csv")
    assert [(r["fold"], r["seed"]) for r in rows] == [(0, 42), (1, 42), (2, 42)]
    study = load(out)
    records = [completed(study)[f"fold{f}_seed42"][0] for f in range(3)]
    assert [r["val_acc"] for r in rows] == pytest.approx([r["val_acc"] for r in records], abs=1e-6)
    # A fresh fit per fold: its own run folder, checkpoint and config naming its fold.
    assert len({r["best_checkpoint"] for r in records}) == 3
    for fold in range(3):
        config = yaml.safe_load((out / f"fold{fold}_seed42" / "config.yaml").read_text())
        assert (config["data"]["num_folds"], config["data"]["fold"]) == (3, fold)
    table = (out / "results.md").read_text()
    assert f"**{summarize([r['val_acc'] for r in records])}**" in table
    assert f"**{summarize([r['val_loss'] for r in records])}**" in table
    assert study.metric_names == ["val/acc"]

    # A finished study trains nothing; a cell queued twice (two commands at once) is pruned, not trained.
    before = checkpoints(out)
    study.enqueue_trial(study.get_trials()[0].params, user_attrs=study.get_trials()[0].user_attrs)
    run_kfold(study_args(data_dir, tmp_path / "logs"), num_folds=3, options=StudyOptions(jobs=1))
    assert checkpoints(out) == before
    assert load(out).get_trials()[-1].state == TrialState.PRUNED
    assert all(len(r) == 1 for r in completed(load(out)).values())


def test_a_failing_cell_is_reported_and_the_others_still_train(tmp_path, data_dir, monkeypatch):
    # A Trainer that would train nothing is refused by fit, not by the plan's check (which builds
    # the data and the network, not the Trainer): a cell that fails when it runs.
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(tmp_path, "grid:\n  trainer.max_epochs: [0, 1]\n")
    args = ["--config", str(ROOT / "configs" / "lightweight.yaml"), *fast_fit_args(data_dir, tmp_path / "logs")]
    with pytest.raises(StudyIncomplete, match="max_epochs=0/seed42"):
        run_sweep(args, sweep, options=StudyOptions(jobs=1))
    out = plan_sweep(args, sweep).study_dir
    assert sorted(completed(load(out))) == ["max_epochs=1/seed42"]
    table = (out / "results.md").read_text()
    assert "Trainings: 1 of 2 complete." in table
    assert "- max_epochs=0/seed42:" in table  # the failure and its reason are in the table
    assert "trains nothing" in table


def test_a_point_whose_network_cannot_be_built_is_refused_before_anything_is_written(tmp_path, data_dir):
    sweep = sweep_file(tmp_path, "grid:\n  model.model.init_args.widths: [[8, 16], [8]]\n")
    args = ["--config", str(ROOT / "configs" / "lightweight.yaml"), *fast_fit_args(data_dir, tmp_path / "logs")]
    with pytest.raises(ConfigError, match="grid point widths=8: widths, kernel_sizes and pools need one entry"):
        run_sweep(args, sweep, options=StudyOptions(jobs=1))
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------
# Heartbeats: Optuna's journal storage has none; ours fills the gap


def test_optunas_private_heartbeat_interface_is_still_there():
    """HeartbeatJournalStorage relies on optuna.storages._heartbeat.BaseHeartbeat and its stale-trial hook."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    assert "_get_stale_trial_ids" in BaseHeartbeat.__abstractmethods__
    journal = storage.open_storage(None, Path(tempfile.mkdtemp()), heartbeat_interval=1, grace_period=2)
    assert is_heartbeat_enabled(journal)


def test_a_trial_whose_heartbeat_stops_is_failed_and_queued_again_by_optimize(tmp_path):
    # What a worker killed on another machine leaves behind: a RUNNING trial whose heartbeats stop.
    journal = storage.open_storage(None, tmp_path, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=journal, study_name="s", direction="maximize")
    study.enqueue_trial({}, user_attrs={"cell": "a/seed1"})
    trial = study.ask()
    journal.record_heartbeat(trial._trial_id)
    seen = []
    study.optimize(lambda t: seen.append(dict(t.user_attrs)) or 0.0, n_trials=1)  # alive: a new trial instead
    assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(2.5)
    study.optimize(lambda t: seen.append(dict(t.user_attrs)) or 1.0, n_trials=1)  # stale: failed and retried
    assert [t.state for t in study.get_trials()][:1] == [TrialState.FAIL]
    assert seen[-1]["cell"] == "a/seed1"  # the same cell, queued again and run
    assert storage.journal_path(None, tmp_path).is_absolute()


@pytest.mark.parametrize("kind", ["journal", "database"])
def test_a_trial_taken_but_never_started_is_queued_again(tmp_path, kind):
    # A worker killed between optimize() taking a trial and the objective starting leaves it RUNNING
    # with no heartbeat at all; on a database Optuna never sees it stale, and every command would wait.
    url = None if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage.open_storage(url, tmp_path, 1, 2), study_name="s", direction="maximize")
    study.enqueue_trial({}, user_attrs={"cell": "a/seed1"})
    assert study.ask().number == 0  # taken (RUNNING), never started
    engine._fail_unstarted(study, grace_period=2)
    assert study.get_trials()[0].state == TrialState.RUNNING  # just taken: its objective may be starting now
    time.sleep(2.5)
    engine._fail_unstarted(study, grace_period=2)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert study.get_trials()[1].user_attrs["cell"] == "a/seed1"
    engine._fail_unstarted(study, grace_period=2)  # and only once
    assert len(study.get_trials()) == 2


def test_cv_comparison_averages_seeds_within_folds_then_corrects_for_overlap():
    plan = StudyPlan("ablation", "a", {}, "logs", "x", num_folds=3, seeds=[1, 2], reference="reference")
    ref, var = Point("reference"), Point("v")
    acc = {  # (arm, fold, seed) -> val acc
        **{("reference", f, s): 0.90 for f in range(3) for s in (1, 2)},
        **{("v", 0, 1): 0.91, ("v", 0, 2): 0.91, ("v", 1, 1): 0.91, ("v", 1, 2): 0.93},
        **{("v", 2, 1): 0.92, ("v", 2, 2): 0.94},
    }
    cells = {
        f"{arm}/fold{f}_seed{s}": {"fold": f, "seed": s, "val_acc": a, "val_loss": 0.3}
        for (arm, f, s), a in acc.items()
    }
    test = compare_to_reference(Collected(plan, [ref, var], cells), var, ref)
    # fold means of the variant 0.91, 0.92, 0.93 against 0.90: K = 3 pairs, n_test/n_train = 1/2
    expected = corrected_resampled_ttest([0.91, 0.92, 0.93], [0.90, 0.90, 0.90], 1 / 2)
    assert test.test == "corrected resampled t"
    assert test.n == 3
    assert test.p_value == pytest.approx(expected.p_value)
    assert test.p_value == pytest.approx(1 - math.sqrt(4.8 / 6.8))  # by hand, see test_stats.py


def test_jobs_default_to_one_worker_per_core_on_a_cpu():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("with a GPU one worker is the default")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert engine.default_jobs() == max(1, min(engine.cpu_count(), memory // engine.WORKER_MEMORY_BYTES))


# ---------------------------------------------------------------------------------------------
# Several worker processes, kills and re-runs (real trainings: slow)


def launch(tmp_path: Path, argv: list[str], log_name: str) -> subprocess.Popen:
    """A sweep command in its own process (so it can be killed with SIGKILL)."""
    log = (tmp_path / log_name).open("w")
    return subprocess.Popen([sys.executable, "-m", "fmnist_lightning", *argv], cwd=tmp_path, stdout=log, stderr=log)


def wait_for(condition, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a sweep process ended (exit code {[p.poll() for p in procs]}) before {what}")
        time.sleep(0.05)


def child_processes(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux's /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


BEATS = ["--heartbeat_interval", "1", "--grace_period", "3"]


@pytest.mark.slow
def test_sweep_killed_with_sigkill_completes_only_the_missing_cells(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(tmp_path, "num_folds: 2\ngrid:\n  model.optimizer.init_args.lr: [1.0e-3, 1.0e-2]\n")
    logs = tmp_path / "logs"
    args = study_args(data_dir, logs, "--trainer.max_epochs=4", "--trainer.limit_train_batches=10")
    plan = plan_sweep(args, sweep)
    # Two worker processes, so that killing the command must end them too.
    proc = launch(tmp_path, ["sweep", "--sweep", str(sweep), "--jobs", "2", *BEATS, *args], "killed.log")

    def done() -> int:
        return len(completed(load(plan.study_dir))) if (plan.study_dir / "optuna.journal").is_file() else 0

    def unfinished() -> set[Path]:  # run folders with a last.ckpt whose cell is not done
        runs = {p.parent.parent for p in logs.rglob("last.ckpt")}
        return runs - {Path(r["run_dir"]) for rs in completed(load(plan.study_dir)).values() for r in rs}

    # Kill it mid-training: one cell done, another one an epoch into a cell started after that.
    wait_for(lambda: done() >= 1, 120, "a cell done", [proc])
    started = {p.parent for p in logs.rglob("config.yaml")}
    wait_for(lambda: unfinished() - started, 120, "a new cell one epoch in", [proc])
    workers = child_processes(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert workers
    wait_for(lambda: not any(alive(w) for w in workers), 15, "the orphaned workers to exit")
    interrupted = unfinished()
    assert 1 <= len(interrupted) <= 2
    done_before = {str(p): p.read_bytes() for r in completed(load(plan.study_dir)).values() for p in
                   Path(r[0]["run_dir"]).glob("checkpoints/*.ckpt")}  # fmt: skip

    out = run_sweep(args, sweep, options=StudyOptions(jobs=1, heartbeat_interval=1, grace_period=3))
    cells = completed(load(out))
    assert sorted(cells) == sorted(c.key for c in plan.cells())
    assert all(len(r) == 1 for r in cells.values()), cells  # no cell trained to the end twice
    for path, content in done_before.items():  # finished cells were kept as they were
        assert Path(path).read_bytes() == content
    for folder in interrupted:  # the killed trainings went on from their last epoch, in their own folders
        (record,) = [r[0] for r in cells.values() if Path(r[0]["run_dir"]) == folder]
        assert record["resumed"] is True
        assert record["epochs"] == 4
    assert len(read_table(out / "cells.csv")) == 4

    before = checkpoints(out)
    run_sweep(args, sweep, options=StudyOptions(jobs=1))  # a finished sweep: nothing to train
    assert checkpoints(out) == before


@pytest.mark.slow
def test_two_workers_split_the_grid_and_train_no_cell_twice(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(tmp_path, "seeds: 2\ngrid:\n  model.optimizer.init_args.lr: [1.0e-3, 1.0e-2]\n")
    out = run_sweep(study_args(data_dir, tmp_path / "logs"), sweep, options=StudyOptions(jobs=2))
    rows = read_table(out / "cells.csv")
    assert len(rows) == 4
    assert len({r["cell"] for r in rows}) == 4
    assert len({r["worker"] for r in rows}) == 2  # both workers trained
    assert all(len(r) == 1 for r in completed(load(out)).values())
    assert len(list(out.rglob("config.yaml"))) == 4  # no training started twice either
    results = read_table(out / "results.csv")
    assert [r["n"] for r in results] == [2, 2]
    assert sum(r["best"] for r in results) == 1
    assert not (out / "hparams").exists()  # no experiment summary of its own to take over TensorBoard's HParams


@pytest.mark.slow
def test_search_samples_exactly_n_trials_points_with_parallel_workers(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(
        tmp_path,
        "search:\n"
        "  model.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n"
        "  data.batch_size: {type: categorical, choices: [32, 64]}\n"
        "n_trials: 3\n"
        "sampler: {name: RandomSampler, seed: 0}\n",
    )
    out = run_sweep(study_args(data_dir, tmp_path / "logs"), sweep, num_folds=2, options=StudyOptions(jobs=2))
    rows = read_table(out / "results.csv")
    assert len(rows) == 3
    assert all(1e-4 <= r["model.optimizer.init_args.lr"] <= 1e-1 for r in rows)
    assert {r["data.batch_size"] for r in rows} <= {32, 64}
    assert [r["val_acc_mean"] for r in rows] == sorted((r["val_acc_mean"] for r in rows), reverse=True)
    assert len(read_table(out / "cells.csv")) == 6
    points = [t for t in load(out).get_trials() if t.user_attrs.get("kind") == "point"]
    assert all(len(t.intermediate_values) == 2 for t in points)  # each fold reported, for pruners and the dashboard


@pytest.mark.slow
def test_ablation_table_tests_each_variant_against_the_reference(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(
        tmp_path,
        "seeds: 2\nablation:\n  reference: {}\n  variants:\n    lr_high: {model.optimizer.init_args.lr: 0.05}\n",
    )
    out = run_sweep(study_args(data_dir, tmp_path / "logs"), sweep, options=StudyOptions(jobs=1), refit=True)
    cells = {(r["point"], r["seed"]): r["val_acc"] for r in read_table(out / "cells.csv")}
    reference, variant = read_table(out / "results.csv")
    assert (reference["point"], variant["point"]) == ("reference", "lr_high")
    ref, var = [cells["reference", s] for s in (42, 43)], [cells["lr_high", s] for s in (42, 43)]
    expected = paired_ttest(var, ref)
    assert variant["delta"] == pytest.approx(statistics.fmean(var) - statistics.fmean(ref), abs=1e-5)
    assert variant["p_value"] == pytest.approx(expected.p_value, rel=1e-4)
    assert variant["p_holm"] == pytest.approx(expected.p_value, rel=1e-4)  # one variant: Holm changes nothing
    assert variant["delta_ci_low"] == pytest.approx(expected.ci_low, abs=1e-5)
    # The refits (first seed, the config's split) were tested: McNemar on their test predictions.
    refits = {r["point"]: r for rs in completed(load(out)).values() for r in rs if r["cell"].startswith("refit/")}
    predictions = {k: read_predictions(Path(v["report_dir"]) / "predictions.csv") for k, v in refits.items()}
    b, c = discordant_counts(predictions["lr_high"].correct, predictions["reference"].correct)
    assert (variant["only_arm_right"], variant["only_reference_right"]) == (b, c)
    assert variant["mcnemar_p"] == pytest.approx(mcnemar_exact(b, c), rel=1e-4)
    assert "McNemar" in (out / "results.md").read_text()


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a real server, started here, shared by two sweep commands


def _postgres_bin() -> Path | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):  # Debian's layout
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return Path(initdb).parent if initdb and pg_ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_port():
    """A PostgreSQL server on a free localhost port, in a temporary folder, for this module's tests."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    run_as: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))  # not under pytest's tmp: only root may enter that
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"

    def pg(*argv: str) -> None:
        subprocess.run([*run_as, *argv], check=True, capture_output=True, text=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o", options, "-w", "start")
    try:
        yield port
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_port):
    """A fresh database on the test server, as an Optuna storage URL."""
    import psycopg2

    name = f"sweep_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(host="127.0.0.1", port=postgres_port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"postgresql+psycopg2://postgres@127.0.0.1:{postgres_port}/{name}"


@pytest.mark.slow
def test_postgres_two_commands_share_a_sweep_survive_a_kill_and_rerun_trains_nothing(
    tmp_path, data_dir, monkeypatch, request, postgres_url
):
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(tmp_path, "seeds: 3\ngrid:\n  model.optimizer.init_args.lr: [1.0e-3, 1.0e-2]\n")
    logs = tmp_path / "logs"
    args = study_args(data_dir, logs)
    plan = plan_sweep(args, sweep)
    # A short grace period: the second command redoes the killed one's cell once its heartbeats stop.
    argv = ["sweep", "--sweep", str(sweep), "--jobs", "1", "--storage", postgres_url, *BEATS, *args]
    first, second = launch(tmp_path, argv, "first.log"), launch(tmp_path, argv, "second.log")
    # One storage (one connection pool) for all the polling below: a storage per poll held a
    # connection each until collected, and on a slow machine they filled the server's 100 slots.
    polled = optuna.storages.RDBStorage(postgres_url)
    request.addfinalizer(polled.engine.dispose)
    for proc in (first, second):  # a failed assertion leaves no command behind holding connections
        request.addfinalizer(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))

    def done_by(proc: subprocess.Popen) -> int:
        with contextlib.suppress(Exception):  # the study may not exist yet
            records = [r for rs in completed(load(plan.study_dir, polled)).values() for r in rs]
            return sum(r["worker"].endswith(f":{proc.pid}") for r in records)
        return 0

    wait_for(lambda: done_by(first) >= 1, 180, "a cell finished by the first command", [first, second])
    first.send_signal(signal.SIGKILL)  # the second command must finish the sweep alone
    first.wait()
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]

    cells = completed(load(plan.study_dir, postgres_url))
    assert sorted(cells) == sorted(c.key for c in plan.cells())
    assert all(len(r) == 1 for r in cells.values()), cells
    assert done_by(first) >= 1
    assert done_by(second) >= 1  # the work was shared
    assert not (plan.study_dir / "optuna.journal").exists()  # the database held the study

    before = checkpoints(plan.study_dir)
    run_sweep(args, sweep, options=StudyOptions(jobs=1, storage=postgres_url))
    assert checkpoints(plan.study_dir) == before
    assert json.loads(json.dumps(read_table(plan.study_dir / "cells.csv")[0]["cell"]))


def test_more_jobs_than_the_machine_holds_are_capped_with_a_line(tmp_path, data_dir, capsys):
    from fmnist_lightning.cli import main
    from fmnist_lightning.studies.engine import cpu_count, max_jobs

    limit, why = max_jobs()
    assert 1 <= limit <= cpu_count()
    assert "core" in why
    sweep = tmp_path / "one.yaml"
    sweep.write_text("grid:\n  model.optimizer.init_args.lr: [0.01]\n")
    assert main(["sweep", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs"), f"--sweep={sweep}", "--jobs=64"]) == 0
    assert f"[study] --jobs 64 capped to {limit} ({why})" in capsys.readouterr().err


def test_a_lock_left_by_a_process_killed_while_writing_is_broken_at_once(tmp_path, data_dir, capsys):
    """A study killed while it held the journal's lock: the same command removes the lock and finishes."""
    from optuna.storages.journal import JournalFileSymlinkLock

    from fmnist_lightning.cli import main
    from fmnist_lightning.studies.storage import LOCK_SUFFIX, STALE_LOCK_SECONDS

    args = ["kfold", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs"), "--num_folds=2", "--jobs=1"]
    assert main(args) == 0
    (journal,) = (tmp_path / "logs").rglob("optuna.journal")
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()  # what a killed writer leaves: Optuna's own lock, never released
    lock_file = Path(f"{journal}{LOCK_SUFFIX}")
    assert lock_file.is_symlink()
    os.utime(lock_file, (time.time() - STALE_LOCK_SECONDS - 5,) * 2, follow_symlinks=False)
    capsys.readouterr()
    start = time.monotonic()
    assert main(args) == 0  # writes to the journal (opens the study, reads and records) without waiting
    assert time.monotonic() - start < 25  # Optuna alone would wait 30 s for its grace period
    assert f"[study] removed the lock {lock_file}, left" in capsys.readouterr().err
    assert not lock_file.exists()


@pytest.mark.slow
def test_postgres_the_readme_driverless_url_opens_the_study(tmp_path, postgres_url):
    """``postgresql://`` as in the README: SQLAlchemy 2.1 would want psycopg 3; psycopg2 is what is installed."""
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    opened = storage.open_storage(bare, tmp_path, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=opened, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_test_predictions_are_kept_in_a_trial_compactly_and_read_back_exactly():
    from fmnist_lightning.studies.results import pack_correct, unpack_correct

    rng = torch.Generator().manual_seed(0)
    correct = (torch.rand(10_000, generator=rng) < 0.93).tolist()
    packed = pack_correct(correct)
    assert len(packed) < 1_000  # not 10,000 characters on optuna-dashboard's trial page
    assert unpack_correct(packed) == correct
    assert unpack_correct(pack_correct([True, False, True])) == [True, False, True]  # bits not a multiple of 8
    assert unpack_correct("0110") == [False, True, True, False]  # as studies stored it before


@pytest.mark.slow
def test_an_ablation_scores_its_arms_on_robustness_calibration_and_ood(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("sklearn")  # the digits OOD set (the robustness extra)
    monkeypatch.chdir(tmp_path)
    sweep = sweep_file(
        tmp_path,
        "ablation:\n  variants:\n    smoothing: {model.label_smoothing: 0.2}\nseeds: 2\nrobustness: true\n",
    )
    out = run_sweep(study_args(data_dir, tmp_path / "logs"), sweep, options=StudyOptions(jobs=1))
    cells = read_table(out / "cells.csv")
    assert len(cells) == 4
    assert all(0 < c["corruption_acc"] < 1 and 0 < c["ood_auroc_digits"] <= 1 for c in cells)
    assert all(Path(c["run_dir"], "robustness", "corruptions.csv").is_file() for c in cells)
    (arm,) = [r for r in read_table(out / "results.csv") if r["point"] == "smoothing"]
    smoothing = [c["clean_ece"] for c in cells if c["point"] == "smoothing"]
    reference = [c["clean_ece"] for c in cells if c["point"] == "reference"]
    assert arm["clean_ece_delta"] == pytest.approx(statistics.fmean(smoothing) - statistics.fmean(reference), abs=1e-6)
    assert arm["clean_ece_p"] == pytest.approx(paired_ttest(smoothing, reference).p_value, rel=1e-3)
    table = (out / "results.md").read_text()
    assert "Robustness, calibration and out-of-distribution inputs" in table
    assert re.search(r"\| smoothing +\| 0\.\d{4} ± 0\.\d{4} \(Δ [+-]0\.\d{4}, p [\d.e-]+\)", table)
