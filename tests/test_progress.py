"""What a person at the terminal sees: a header and one line per epoch, a study's cells counted with the time left."""

import re

import optuna

from fmnist_lightning.cli import main
from fmnist_lightning.studies.storage import JOURNAL_FILE, open_storage

from .conftest import LINEAR, fast_fit_args

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/3  train/loss \d\.\d{4}  train/acc \d\.\d{4}  val/loss \d\.\d{4}  val/acc \d\.\d{4}  "
    r"\d+\.\d s  lr \d\.\d\de-\d\d$"
)


def test_fit_prints_a_header_and_one_line_per_epoch(tmp_path, data_dir, capsys):
    assert main(["fit", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs", "--trainer.max_epochs=3")]) == 0
    err = capsys.readouterr().err.splitlines()
    header = [line for line in err if line.startswith("Training ")]
    assert header == [
        "Training LinearClassifier (7,850 parameters) on cpu, precision 32-true, 55,000 training / 5,000 "
        "validation images, 3 epochs, seed 42"
    ]
    epochs = [EPOCH_LINE.match(line) for line in err if line.startswith("epoch ")]
    assert all(epochs), [line for line in err if line.startswith("epoch ")]
    assert [int(m.group(1)) for m in epochs] == [1, 2, 3]
    assert not any("Trainable params" in line for line in err)  # Lightning's module table only when asked


def test_a_study_counts_its_cells_and_reports_every_epoch_to_optuna(tmp_path, data_dir, capsys):
    logs = tmp_path / "logs"
    args = ["kfold", *LINEAR, *fast_fit_args(data_dir, logs, "--trainer.max_epochs=2"), "--num_folds=2", "--jobs=1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[study\] cell 1 of 2 done, best val/acc so far 0\.\d{4}, about \d+ s left", err)
    assert re.search(r"\[study\] cell 2 of 2 done, best val/acc so far 0\.\d{4}\n", err)
    (journal,) = logs.rglob(JOURNAL_FILE)
    study = optuna.load_study(study_name=None, storage=open_storage(str(journal), journal.parent, 10, 30))
    for trial in study.trials:
        # The per-epoch validation accuracy as Optuna's intermediate values: optuna-dashboard's curves.
        assert sorted(trial.intermediate_values) == [0, 1]
        assert max(trial.intermediate_values.values()) == trial.value


def test_in_a_notebook_the_progress_bar_is_off_unless_asked_for(monkeypatch, data_dir, tmp_path):
    """A Jupyter kernel stores every redraw of a bar in the notebook; the epoch lines say the same."""
    import sys
    import types

    from fmnist_lightning import training

    args = [*LINEAR, f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert training.build(args).trainer.progress_bar_callback is not None  # a terminal: the bar
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # what a kernel has loaded
    assert training.build(args).trainer.progress_bar_callback is None
    asked = training.build([*args, "--trainer.enable_progress_bar=true"])
    assert asked.trainer.progress_bar_callback is not None


def test_a_search_with_a_pruner_stops_lagging_points_after_an_epoch(tmp_path, data_dir, capsys):
    # ThresholdPruner(lower=1.1): every val/acc is under it, so each point stops after its first epoch.
    sweep = tmp_path / "search.yaml"
    sweep.write_text(
        "search:\n  model.optimizer.init_args.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
        "n_trials: 2\nsampler: {name: RandomSampler, seed: 0}\npruner: {name: ThresholdPruner, lower: 1.1}\n"
    )
    logs = tmp_path / "logs"
    args = ["sweep", *LINEAR, *fast_fit_args(data_dir, logs, "--trainer.max_epochs=3"), f"--sweep={sweep}"]
    assert main([*args, "--jobs=1"]) == 0  # n_trials counts pruned points: the search ends
    err = capsys.readouterr().err
    assert len(re.findall(r"\[study\] t00\d-lr=[\d.]+/seed42: pruned by ThresholdPruner after epoch 1\n", err)) == 2
    (journal,) = logs.rglob(JOURNAL_FILE)
    study = optuna.load_study(study_name=None, storage=open_storage(str(journal), journal.parent, 10, 30))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert [sorted(t.intermediate_values) for t in study.trials] == [[0], [0]]
    for run in journal.parent.glob("*/seed42"):
        assert len((run / "history.csv").read_text().splitlines()) == 2  # a header and one epoch: stopped
    results = (journal.parent / "results.md").read_text()
    assert "Pruned by ThresholdPruner (stopped early, not in the table):" in results
    assert re.search(r"- t000-lr=[\d.]+: val/acc 0\.\d{4} after epoch 1 of t000-lr=[\d.]+/seed42\n", results)


def test_a_study_can_draw_one_live_bar_over_its_cells(tmp_path, data_dir, capsys):
    logs = tmp_path / "logs"
    args = ["kfold", *LINEAR, *fast_fit_args(data_dir, logs), "--num_folds=2", "--jobs=1", "--progress_bar"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"2/2 \[[\d:]+<[\d:]+, [^\]]*best val/acc 0\.\d{4}\]", err), err[-2000:]
    assert "cell 1 of 2 done" not in err  # the bar instead of the lines
    assert "Training LinearClassifier" not in err  # and instead of each training's own progress


def test_the_bar_is_lightnings_rich_one_where_rich_is_installed_else_tqdm(data_dir, tmp_path):
    import importlib.util

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from fmnist_lightning import training

    args = [*LINEAR, f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    rich = importlib.util.find_spec("rich") is not None
    bar = training.build(args).trainer.progress_bar_callback
    assert type(bar) is (RichProgressBar if rich else TQDMProgressBar)  # Lightning's own choice
    named = [*args, "--trainer.callbacks+=TQDMProgressBar"]  # a bar the config names is kept
    assert type(training.build(named).trainer.progress_bar_callback) is TQDMProgressBar
