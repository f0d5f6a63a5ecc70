import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_lightning import ClassificationTask, training
from fmnist_lightning.cli import main, run
from fmnist_lightning.precision import cpu_has_native_bf16, resolve_precision
from fmnist_lightning.runs import read_history

from .conftest import CONFIGS, LINEAR, ROOT, TINYVGG, fast_fit_args


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_fit_test_predict_and_reload(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    fitted = run(["fit", *TINYVGG, *fast_fit_args(data_dir, logs)])
    run_dir = logs / "tinyvgg" / "version_0"
    assert fitted.run_dir == run_dir
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts
    assert any(name.startswith("best-") for name in ckpts)
    assert (run_dir / "config.yaml").is_file()
    assert {"val/acc", "val/f1", "val/loss", "train/loss", "train/acc", "time/train_epoch_s"} <= scalar_tags(run_dir)
    assert fitted.datamodule.test_set is None  # fit never loaded the test images
    assert f"Run folder: {run_dir}" in capsys.readouterr().out

    # test --ckpt_path best finds the run's best checkpoint and logs into the same run folder.
    tested = run(["test", *TINYVGG, *fast_fit_args(data_dir, logs), "--ckpt_path=best"])
    assert tested.checkpoint == fitted.best_checkpoint
    assert {"test/acc", "test/f1", "test/loss"} <= scalar_tags(run_dir)
    assert (run_dir / "config_test.yaml").is_file()
    assert not (logs / "tinyvgg" / "version_1").exists()
    assert f"Report: {tested.report_dir}" in capsys.readouterr().out

    # The checkpoint alone rebuilds the network: same predictions as the trained module.
    reloaded = ClassificationTask.load_from_checkpoint(tested.checkpoint, map_location="cpu").eval()
    original = fitted.task.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), original(x), atol=1e-6)
    assert type(reloaded.model).__name__ == "TinyVGG"

    predicted = run(["predict", *TINYVGG, *fast_fit_args(data_dir, logs), "--ckpt_path=last"])
    assert predicted == run_dir / "predictions.csv"
    with predicted.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 256
    for row in rows[:20]:
        probs = [float(v) for k, v in row.items() if k.startswith("p_")]
        assert abs(sum(probs) - 1) < 1e-3
        assert int(row["pred"]) == max(range(10), key=probs.__getitem__)


def test_the_library_takes_a_run_config_with_overrides(tinyvgg_run, tmp_path, monkeypatch):
    """A run's config.yaml and dotted overrides are a whole run for training.fit, as the studies use it."""
    monkeypatch.chdir(tmp_path)
    overrides = {"trainer.logger.init_args.save_dir": str(tmp_path / "logs"), "trainer.max_epochs": 2}
    overrides |= {"trainer.limit_train_batches": 3}
    result = training.fit(yaml.safe_load(tinyvgg_run.config.read_text()), overrides)
    assert result.run_dir == tmp_path / "logs" / "tinyvgg" / "version_0"
    assert result.epochs == 2
    assert [int(row["epoch"]) for row in result.history] == [0, 1]
    assert result.config["trainer"]["max_epochs"] == 2
    assert result.best_score == max(row["val/acc"] for row in result.history)


def test_bf16_mixed_precision_fits_when_forced(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.precision=bf16-mixed", "--bf16_fallback=false", "--trainer.limit_train_batches=1"]
    result = training.fit([*TINYVGG, *fast_fit_args(data_dir, tmp_path, *args)])
    assert result.trainer.precision == "bf16-mixed"
    assert torch.isfinite(result.trainer.callback_metrics["val/loss"])


def test_bf16_falls_back_to_fp32_only_on_cpus_without_native_bf16(tmp_path, data_dir):
    built = training.build([*TINYVGG, *fast_fit_args(data_dir, tmp_path, "--trainer.precision=bf16-mixed")])
    assert built.trainer.precision == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_and_builds(tmp_path, data_dir, config):
    """Parsed, its classes built and its network run on a batch: what a fit does before it trains."""
    built = training.build(["--config", str(config), *fast_fit_args(data_dir, tmp_path)])
    assert isinstance(built.model, ClassificationTask)
    with torch.no_grad():
        assert built.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_trains(tmp_path, data_dir, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    small = ["--data.batch_size=16", "--data.eval_batch_size=32", "--trainer.limit_train_batches=1"]
    result = training.fit(
        ["--config", str(config), *fast_fit_args(data_dir, tmp_path, *small, "--trainer.limit_val_batches=1")]
    )
    assert 0 <= result.best_score <= 1


def test_last_epoch_only_validation_follows_max_epochs(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_epochs=3", "--validation_schedule.last_epoch_only=true", "--trainer.limit_train_batches=1"]
    result = training.fit([*TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs", *args)])
    validated = [not math.isnan(row.get("val/acc", math.nan)) for row in read_history(result.run_dir)]
    assert validated == [False, False, True]
    assert [p.name[:12] for p in (result.run_dir / "checkpoints").glob("best-*.ckpt")] == ["best-epoch02"]


def test_limit_batches_of_one_is_one_batch_and_a_float_a_fraction(tmp_path, data_dir):
    extra = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0.1"]
    built = training.build([*LINEAR, *fast_fit_args(data_dir, tmp_path, *extra)])
    assert built.config.trainer.limit_train_batches == 1  # one batch, not a whole epoch of 1.0
    assert isinstance(built.config.trainer.limit_train_batches, int)
    assert built.trainer.limit_train_batches == 1
    assert isinstance(built.trainer.limit_train_batches, int)
    assert built.trainer.limit_val_batches == pytest.approx(0.1)


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fmnist_lightning.models.TinyVGG" in out
    assert "val_split: 5000" in out


def test_help_lists_every_subcommand_and_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "kfold", "sweep", "compare", "export"):
        assert name in out
    with pytest.raises(SystemExit) as exit_:
        run(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fmnist_lightning ")


def test_console_script_and_module_exit_0_on_success(tinyvgg_run, tmp_path, monkeypatch):
    """``sys.exit(main())`` is how both run: a successful command must exit 0 and print nothing odd."""
    monkeypatch.chdir(tmp_path)
    copy = tinyvgg_run.copy(tmp_path / "logs")
    assert main(["validate", *tinyvgg_run.args, f"--ckpt_path={copy.last}"]) == 0
    # python -m fmnist_lightning runs as a real process in test_errors.py; here the console script.
    script = shutil.which("fmnist-lightning") or str(Path(sys.executable).parent / "fmnist-lightning")
    assert Path(script).is_file(), "the console script is installed with the package (pip install -e .)"
    for command in [[script, "--version"]]:
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("fmnist_lightning "), done.stdout
        assert "object at 0x" not in done.stderr


def test_unknown_config_key_exits_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--data.no_such_key=1"])
    assert exit_.value.code != 0
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


def test_impossible_value_exits_cleanly_and_writes_nothing(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs"), "--data.val_split=1.5"])
    assert "val_split" in str(exit_.value.code)
    assert not (tmp_path / "logs").exists()


def test_missing_data_exits_cleanly_and_keeps_earlier_runs(tinyvgg_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    tinyvgg_run.copy(logs)
    before = sorted(p.relative_to(logs) for p in logs.rglob("*"))
    args = fast_fit_args(tmp_path / "empty", logs, f"--data.system_dir={tmp_path / 'nowhere'}", "--data.download=false")
    with pytest.raises(SystemExit) as exit_:
        run(["fit", *TINYVGG, *args])
    assert "apt-get install dataset-fashion-mnist" in str(exit_.value.code)
    assert sorted(p.relative_to(logs) for p in logs.rglob("*")) == before


def test_ckpt_best_without_a_run_is_a_clear_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run(["test", *TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs"), "--ckpt_path=best"])
    assert "Run `fit`" in str(exit_.value.code)


def test_resolve_precision_touches_only_bf16_on_the_cpu():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    expected = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == expected


@pytest.mark.parametrize("subcommand", ["fit", "test", "sweep"])
def test_help_is_short_lists_the_package_models_and_says_what_ckpt_path_means(subcommand, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_:
        run([subcommand, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 300
    assert "TinyVGG" in out
    assert "--model.model.help TinyVGG" in out
    assert "Conv2d" not in out  # no nn.Module subclasses of torch, torchvision, torchmetrics
    assert "torchmetrics" not in out
    assert "known subclasses" not in out
    ckpt_help = out.split("--ckpt_path CKPT_PATH", 1)[1].split("\n  -", 1)[0]
    assert "`best`, `last`" in ckpt_help
    assert "hpc" not in ckpt_help
    assert "registry" not in ckpt_help
    assert "--trainer.max_epochs MAX_EPOCHS" in out  # Lightning's options are all there, some by name
    assert "--trainer.gradient_clip_val" in out


def test_any_nn_module_class_path_still_works_and_model_help_shows_a_network(capsys):
    from fmnist_lightning.config import parse

    cfg = parse([*LINEAR, "--model.model=torch.nn.Flatten"])
    assert cfg.model.model.class_path == "torch.nn.Flatten"
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--model.model.help", "TinyVGG"])
    assert exit_.value.code == 0
    assert "--model.model.widths" in capsys.readouterr().out


def test_shortcut_args_spell_the_task_options():
    from fmnist_lightning.config import shortcut_args

    args = ["--optimizer=SGD", "--optimizer.lr", "0.1", "--lr_scheduler", "StepLR", "--optimizers", "--data.x=1"]
    assert shortcut_args(args) == [
        "--model.optimizer=SGD",
        "--model.optimizer.lr",
        "0.1",
        "--model.lr_scheduler",
        "StepLR",
        "--optimizers",  # not a shortcut: left to the parser to refuse
        "--data.x=1",
    ]


def test_optimizer_and_lr_scheduler_shortcuts_set_the_task_options(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    args = [*LINEAR, "--optimizer", "SGD", "--optimizer.lr", "0.05", "--lr_scheduler=StepLR"]
    fitted = run(["fit", *args, "--lr_scheduler.step_size", "5", *fast_fit_args(data_dir, logs)])
    saved = yaml.safe_load((fitted.run_dir / "config.yaml").read_text())["model"]
    assert saved["optimizer"]["class_path"] == "torch.optim.SGD"
    assert saved["optimizer"]["init_args"]["lr"] == 0.05
    assert saved["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.StepLR"
    assert saved["lr_scheduler"]["init_args"]["step_size"] == 5
    assert isinstance(fitted.trainer.optimizers[0], torch.optim.SGD)


def test_a_shipped_config_is_found_by_name_and_an_unknown_name_lists_them(tmp_path, monkeypatch, capsys):
    from fmnist_lightning.config import parse, shipped_config, shipped_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert set(shipped_configs()) == {p.stem for p in CONFIGS}
    assert set(shipped_configs("sweeps")) == {p.stem for p in (ROOT / "configs" / "sweeps").glob("*.yaml")}
    cfg = parse(["--config", "tinyvgg"])
    assert cfg.model.model.class_path == "fmnist_lightning.models.TinyVGG"
    assert shipped_config("fast_search", "--sweep", "sweeps") == str(ROOT / "configs" / "sweeps" / "fast_search.yaml")
    (tmp_path / "tinyvgg").write_text("trainer: {max_epochs: 3}\n")  # a file of that name here comes first
    assert shipped_config("tinyvgg") == "tinyvgg"
    assert cfg.trainer.logger.init_args.name == "tinyvgg"  # named after the config, as with its path
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config=no_such_config"])
    message = str(exit_.value.code)
    assert len(message.splitlines()) == 1
    assert "no_such_config" in message
    assert "tinyvgg" in message
    assert "linear" in message


def test_the_wheel_lists_every_package_and_ships_the_configs():
    """pyproject.toml lists the packages (configs/ is mapped into the wheel): a new one must be listed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fmnist_lightning").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"fmnist_lightning.configs", "fmnist_lightning.configs.sweeps"}
    assert setuptools["package-dir"] == {"fmnist_lightning.configs": "configs"}
    assert setuptools["package-data"]["fmnist_lightning.configs.sweeps"] == ["*.yaml"]
