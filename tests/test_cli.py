import csv
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_lightning import ClassificationTask
from fmnist_lightning.cli import main
from fmnist_lightning.precision import cpu_has_native_bf16, resolve_precision
from fmnist_lightning.runs import read_history

from .conftest import CONFIGS, fast_fit_args

ROOT = Path(__file__).parent.parent
SMALL_TINYVGG = ["--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--model.model.init_args.widths=[8, 16]"]


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_fit_test_predict_and_reload(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    cli = main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, logs)])
    run = logs / "tinyvgg" / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts
    assert any(name.startswith("best-") for name in ckpts)
    assert (run / "config.yaml").is_file()
    assert {"val/acc", "val/f1", "val/loss", "train/loss", "train/acc", "time/train_epoch_s"} <= scalar_tags(run)
    assert cli.datamodule.test_set is None  # fit never loaded the test images

    # test --ckpt_path best finds the run's best checkpoint and logs into the same run folder.
    tested = main(["test", *SMALL_TINYVGG, *fast_fit_args(data_dir, logs), "--ckpt_path=best"])
    assert Path(tested.trainer.ckpt_path).name.startswith("best-")
    assert {"test/acc", "test/f1", "test/loss"} <= scalar_tags(run)
    assert (run / "config.yaml").is_file()
    assert (run / "config_test.yaml").is_file()
    assert not (logs / "tinyvgg" / "version_1").exists()

    # The checkpoint alone rebuilds the network: same predictions as the trained module.
    best = Path(tested.trainer.ckpt_path)
    reloaded = ClassificationTask.load_from_checkpoint(best, map_location="cpu").eval()
    original = ClassificationTask.load_from_checkpoint(best, map_location="cpu", model=cli.model.model).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), original(x), atol=1e-6)
    assert type(reloaded.model).__name__ == "TinyVGG"

    predicted = main(["predict", *SMALL_TINYVGG, *fast_fit_args(data_dir, logs), "--ckpt_path=last"])
    assert predicted.trainer.ckpt_path.endswith("last.ckpt")
    with (run / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 256
    for row in rows[:20]:
        probs = [float(v) for k, v in row.items() if k.startswith("p_")]
        assert abs(sum(probs) - 1) < 1e-3
        assert int(row["pred"]) == max(range(10), key=probs.__getitem__)


def test_bf16_mixed_precision_fits_when_forced(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.precision=bf16-mixed", "--bf16_fallback=false"]
    cli = main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, tmp_path, *args)])
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_bf16_falls_back_to_fp32_only_on_cpus_without_native_bf16(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, tmp_path, "--trainer.precision=bf16-mixed")])
    assert cli.trainer.precision == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_and_runs(tmp_path, data_dir, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    small_batches = ["--data.batch_size=16", "--data.eval_batch_size=32"]
    cli = main(["fit", "--config", str(config), *fast_fit_args(data_dir, tmp_path, *small_batches)])
    assert 0 <= cli.trainer.callback_metrics["val/acc"] <= 1


def test_last_epoch_only_validation_follows_max_epochs(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_epochs=3", "--validation_schedule.last_epoch_only=true"]
    main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs", *args)])
    run = tmp_path / "logs" / "tinyvgg" / "version_0"
    validated = [not math.isnan(row.get("val/acc", math.nan)) for row in read_history(run)]
    assert validated == [False, False, True]
    assert [p.name[:12] for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch02"]


def test_limit_batches_of_one_is_one_batch_and_a_float_a_fraction(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0.1"]
    cli = main(["fit", "--config", str(ROOT / "configs" / "linear.yaml"), *fast_fit_args(data_dir, tmp_path, *extra)])
    assert (cli.trainer.num_training_batches, cli.trainer.global_step) == (1, 1)  # not a whole epoch of 1.0
    assert cli.trainer.num_val_batches == [int(0.1 * math.ceil(5000 / cli.datamodule.eval_batch_size))]


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fmnist_lightning.models.TinyVGG" in out
    assert "val_split: 5000" in out


def test_unknown_config_key_exits_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "tinyvgg.yaml"), "--data.no_such_key=1"])
    assert exit_.value.code != 0
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()


def test_impossible_value_exits_cleanly_and_writes_nothing(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs"), "--data.val_split=1.5"])
    assert "val_split" in str(exit_.value.code)
    assert not (tmp_path / "logs").exists()


def test_missing_data_exits_cleanly_and_keeps_earlier_runs(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    main(["fit", *SMALL_TINYVGG, *fast_fit_args(data_dir, logs)])
    before = sorted(p.relative_to(logs) for p in logs.rglob("*"))
    args = fast_fit_args(tmp_path / "empty", logs, f"--data.system_dir={tmp_path / 'nowhere'}", "--data.download=false")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *SMALL_TINYVGG, *args])
    assert "apt-get install dataset-fashion-mnist" in str(exit_.value.code)
    assert sorted(p.relative_to(logs) for p in logs.rglob("*")) == before


def test_ckpt_best_without_a_run_is_a_clear_error(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["test", *SMALL_TINYVGG, *fast_fit_args(data_dir, tmp_path / "logs"), "--ckpt_path=best"])
    assert "Run `fit`" in str(exit_.value.code)


def test_resolve_precision_touches_only_bf16_on_the_cpu():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    expected = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == expected
