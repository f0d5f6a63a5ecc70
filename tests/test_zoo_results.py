"""benchmarks/zoo.py at tiny size (a study of configs x seeds), resuming, and the zoo table made from its CSV."""

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_lightning.stats import holm, paired_ttest

from .conftest import compact

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "zoo.py"


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False, cwd=ROOT)


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("results_tables")


def zoo_row(config: str, seed: int, accuracy: float, overrides: str = "", **extra) -> dict:
    row = {
        "config": f"configs/{config}",
        "overrides": overrides,
        "model": "TinyVGG",
        "parameters": 298410,
        "seed": seed,
        "test_accuracy": accuracy,
        "macro_f1": accuracy - 0.0002,
        "epochs": 20,
        "seconds_per_epoch": 50.0 + seed,
        "fit_seconds": 1100.0,
        "test_seconds": 25.0,
        "run_dir": f"lightning_logs/zoo/{config}_s{seed}/version_0",
        "cpu": "Test CPU",
        "cores": 2,
        "torch": "2.4.1",
        "device": "cpu",
        "date": "2026-01-02",
    }
    return {**row, **extra}


@pytest.mark.slow
def test_one_config_one_seed_then_nothing_more(tmp_path, data_dir, tables):
    csv, logs = tmp_path / "zoo.csv", tmp_path / "logs"
    args = ["--configs", "configs/linear.yaml", "--seeds", "1", "--limit-batches", "2", "--max-epochs", "1"]
    args += ["--csv", str(csv), "--log-dir", str(logs), "--data-dir", str(data_dir)]
    done = run(SCRIPT, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = tables.ZOO.read(csv)
    limits = "--trainer.limit_train_batches=2 --trainer.limit_val_batches=2 --trainer.limit_test_batches=2"
    assert row["config"] == "configs/linear.yaml"
    assert row["overrides"] == f"{limits} --trainer.max_epochs=1"
    assert (row["model"], row["parameters"], row["seed"], row["epochs"]) == ("LinearClassifier", 7850, 1, 1)
    assert 0 <= row["test_accuracy"] <= 1
    assert 0 <= row["macro_f1"] <= 1
    assert min(row["seconds_per_epoch"], row["fit_seconds"], row["test_seconds"]) > 0
    run_dir = Path(row["run_dir"])
    assert run_dir.parent.parent.parent == logs / "zoo"  # <log-dir>/zoo/zoo-<hash>/linear/seed1
    assert run_dir.relative_to(run_dir.parent.parent).as_posix() == "linear/seed1"
    assert (run_dir / "report" / "predictions.csv").is_file()
    assert row["cores"] >= 1
    assert row["cpu"]
    assert row["torch"]
    assert row["date"]
    # The study's own table (printed), and the zoo table made from the results file.
    study = next(compact(ln) for ln in done.stdout.splitlines() if ln.startswith("| linear"))
    assert study.startswith("| linear | LinearClassifier | 7,850 |")
    assert study.endswith("| 1 |")  # one seed
    assert f"| **{row['test_accuracy']:.4f}** |" in study
    table = next(compact(ln) for ln in tables.render(csv).splitlines() if "`linear.yaml`" in ln)
    assert table.startswith("| `LinearClassifier` | 7,850 | `linear.yaml` (shortened: `--trainer.limit_train_batches=2")
    assert table.endswith("| best |")
    assert f"| **{100 * row['test_accuracy']:.2f}%** |" in table
    # A finished zoo trains nothing, and the results file gets no second row of the same run.
    checkpoints = {p: p.stat().st_mtime_ns for p in logs.rglob("*.ckpt")}
    again = run(SCRIPT, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in logs.rglob("*.ckpt")} == checkpoints
    assert len(tables.ZOO.read(csv)) == 1


@pytest.mark.slow
def test_a_finished_robustness_zoo_fills_a_corruptions_file_added_later_without_training(tmp_path, data_dir, tables):
    pytest.importorskip("sklearn")  # the digits OOD set (the robustness extra)
    robust, corruptions, logs = tmp_path / "robust.csv", tmp_path / "corruptions.csv", tmp_path / "logs"
    args = ["--configs", "configs/linear.yaml", "--seeds", "1", "--limit-batches", "2", "--max-epochs", "1"]
    args += ["--log-dir", str(logs), "--data-dir", str(data_dir), "--robustness", "--robustness-csv", str(robust)]
    done = run(SCRIPT, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = tables.ZOO_ROBUSTNESS.read(robust)
    checkpoints = {p: p.stat().st_mtime_ns for p in logs.rglob("*.ckpt")}
    again = run(SCRIPT, *args, "--corruptions-csv", str(corruptions))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in logs.rglob("*.ckpt")} == checkpoints  # nothing trained again
    rows = tables.ZOO_CORRUPTIONS.read(corruptions)
    with (Path(row["report_dir"]) / "corruptions.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [(r["corruption"], r["severity"], r["accuracy"]) for r in rows] == [
        (w["corruption"], int(w["severity"]), pytest.approx(float(w["accuracy"]))) for w in written
    ]
    assert len(rows) == 1 + 12 * 5
    assert {(r["config"], r["seed"], r["overrides"]) for r in rows} == {(row["config"], 1, row["overrides"])}
    assert {(r["cpu"], r["date"]) for r in rows} == {(row["cpu"], row["date"])}  # the run's machine
    assert run(SCRIPT, *args, "--corruptions-csv", str(corruptions)).returncode == 0
    assert len(tables.ZOO_CORRUPTIONS.read(corruptions)) == len(rows)  # a run's rows are written once


def test_refuses_a_results_file_of_another_layout(tmp_path, monkeypatch, capsys):
    csv = tmp_path / "other.csv"
    csv.write_text("run,seed\nfast,1\n")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module("zoo").main(["--configs", "configs/linear.yaml", "--csv", str(csv)])
    assert exit_.value.code == 2
    assert "is not a results file of the zoo layout" in capsys.readouterr().err
    assert csv.read_text() == "run,seed\nfast,1\n"


def test_zoo_table_mean_std_paired_tests_and_pairs(tmp_path, tables, capsys):
    accuracies = {
        "tinyvgg.yaml": [0.9444, 0.9431, 0.9452],
        "fashioncnn.yaml": [0.9359, 0.9372, 0.9348],
        "fashioncnn_study001.yaml": [0.9012, 0.9030, 0.8990],
        "resnet_se.yaml": [0.9326],
    }
    csv = tmp_path / "zoo.csv"
    for config, values in accuracies.items():
        for seed, accuracy in enumerate(values, 1):
            tables.ZOO.append(csv, zoo_row(config, seed, accuracy))
    tables.ZOO.append(csv, zoo_row("tinyvgg_wide_study002.yaml", 1, 0.8781, "--trainer.max_epochs=3", epochs=3))
    tables.main([str(csv), "--pair", "fashioncnn.yaml", "fashioncnn_study001"])  # in-process: no start-up cost
    lines = [compact(ln) for ln in capsys.readouterr().out.splitlines()]
    rows = {ln.split(" | ")[2]: ln for ln in lines if ln.startswith("| `TinyVGG`")}
    assert "| 3 | **94.42 ± 0.11%** | 0.9440 ± 0.0011 | 20 | 52.0 ± 1.0 | best |" in rows["`tinyvgg.yaml`"]
    best = accuracies["tinyvgg.yaml"]
    p = [paired_ttest(best, accuracies[c]).p_value for c in ("fashioncnn.yaml", "fashioncnn_study001.yaml")]
    adjusted = holm(p)
    assert rows["`fashioncnn.yaml`"].endswith(f"| {p[0]:.2g} ({adjusted[0]:.2g}) |")
    assert rows["`fashioncnn_study001.yaml`"].endswith(f"| {p[1]:.2g} ({adjusted[1]:.2g}) |")
    assert "| 1 | 93.26% | 0.9324 | 20 | 51.0 |  |" in rows["`resnet_se.yaml`"]  # one seed: no std, no test
    assert "| 1 | 87.81% |" in rows["`tinyvgg_wide_study002.yaml` (shortened: `--trainer.max_epochs=3`)"]
    pair = next(ln for ln in lines if ln.startswith("| `fashioncnn.yaml` | `fashioncnn_study001` |"))
    diff = paired_ttest(accuracies["fashioncnn.yaml"], accuracies["fashioncnn_study001.yaml"])
    assert pair == (
        f"| `fashioncnn.yaml` | `fashioncnn_study001` | 3 | +3.49 | [{100 * diff.ci_low:+.2f}, "
        f"{100 * diff.ci_high:+.2f}] | {diff.p_value:.2g} |"
    )
    assert lines[-1] == "Machine: Test CPU, 2 cores, torch 2.4.1, cpu; measured 2026-01-02."


def test_zoo_table_names_every_machine_and_refuses_unknown_pairs(tmp_path, tables, capsys):
    csv = tmp_path / "zoo.csv"
    tables.ZOO.append(csv, zoo_row("tinyvgg.yaml", 1, 0.94))
    tables.ZOO.append(csv, zoo_row("tinyvgg.yaml", 2, 0.94, cpu="Other CPU", date="2026-02-03"))
    text = tables.render(csv)
    assert text.splitlines()[-1] == (
        "Machines (several: compare rows of one machine only): Test CPU, 2 cores, torch 2.4.1, cpu; "
        "Other CPU, 2 cores, torch 2.4.1, cpu; measured 2026-01-02 to 2026-02-03."
    )
    with pytest.raises(SystemExit) as exit_:
        tables.main([str(csv), "--pair", "tinyvgg.yaml", "mlp.yaml"])
    assert exit_.value.code == 1
    assert "no full-length row of config 'mlp.yaml'" in capsys.readouterr().err


def test_a_precision_override_is_a_full_length_row_that_pairs_by_name(tmp_path, tables, capsys):
    csv, bf16 = tmp_path / "zoo.csv", "--trainer.precision=bf16-mixed"
    for seed, (fp32, half) in enumerate([(0.9426, 0.9421), (0.9456, 0.9440), (0.9414, 0.9419)], 1):
        tables.ZOO.append(csv, zoo_row("tinyvgg.yaml", seed, fp32))
        tables.ZOO.append(csv, zoo_row("tinyvgg.yaml", seed, half, bf16))
    tables.ZOO.append(csv, zoo_row("tinyvgg.yaml", 1, 0.99, "--trainer.max_epochs=1"))  # shortened: never best
    tables.main([str(csv), "--pair", f"tinyvgg.yaml {bf16}", "tinyvgg.yaml"])
    lines = [compact(ln) for ln in capsys.readouterr().out.splitlines()]
    assert any(
        ln.startswith(f"| `TinyVGG` | 298,410 | `tinyvgg.yaml` (`{bf16}`) | 3 | 94.27 ± 0.12% |") for ln in lines
    )
    assert any("(shortened: `--trainer.max_epochs=1`) | 1 | 99.00% |" in ln for ln in lines)
    assert any(ln.startswith("| `TinyVGG` | 298,410 | `tinyvgg.yaml` | 3 | **94.32 ± 0.22%** |") for ln in lines)
    assert any(ln.startswith(f"| `tinyvgg.yaml {bf16}` | `tinyvgg.yaml` | 3 | -0.05 |") for ln in lines)
    with pytest.raises(SystemExit):
        tables.main([str(csv), "--pair", "tinyvgg.yaml --trainer.max_epochs=1", "tinyvgg.yaml"])
    assert "no full-length row of config 'tinyvgg.yaml --trainer.max_epochs=1'" in capsys.readouterr().err


def test_several_zoo_files_make_one_table_and_a_run_in_two_files_is_refused(tmp_path, tables, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for seed, (wide, vgg) in enumerate([(0.9490, 0.9440), (0.9480, 0.9444), (0.9495, 0.9428)], 1):
        tables.ZOO.append(a, zoo_row("airbench_wide.yaml", seed, wide, model="AirbenchNet"))
        tables.ZOO.append(b, zoo_row("tinyvgg.yaml", seed, vgg))
    tables.main([str(a), str(b), "--pair", "airbench_wide.yaml", "tinyvgg.yaml"])
    lines = [compact(ln) for ln in capsys.readouterr().out.splitlines()]
    best = "| `AirbenchNet` | 298,410 | `airbench_wide.yaml` | 3 | **94.88 ± 0.08%** |"
    assert any(ln.startswith(best) for ln in lines)
    diff = paired_ttest([0.9490, 0.9480, 0.9495], [0.9440, 0.9444, 0.9428])
    assert f"| `airbench_wide.yaml` | `tinyvgg.yaml` | 3 | +0.51 | [{100 * diff.ci_low:+.2f}, " in "\n".join(lines)
    for files, message in [
        ([a, a], "airbench_wide.yaml seed 1 is in more than one of the files"),
        ([a, ROOT / "docs" / "results" / "epoch_speed.csv"], "one table needs files of one layout"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            tables.main([str(f) for f in files])
        assert exit_.value.code == 1
        assert message in capsys.readouterr().err


def _corruptions(folder: Path, model: str, accuracy: dict[tuple[str, int], float]) -> Path:
    """A tiny corruptions.csv as the robustness job writes it (its columns; the figures given)."""
    from fmnist_lightning.robustness import CORRUPTION_COLUMNS

    folder.mkdir(parents=True)
    lines = [",".join(CORRUPTION_COLUMNS)]
    for (corruption, severity), acc in accuracy.items():
        images = 10000 if corruption == "clean" else 2000
        values = {"model": model, "checkpoint": "x.ckpt", "corruption": corruption, "severity": severity}
        values |= {"images": images, "seed": 0, "accuracy": acc, "error": 1 - acc}
        lines.append(",".join(str(values.get(c, 0.1)) for c in CORRUPTION_COLUMNS))
    (folder / "corruptions.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_robustness_rows_carry_the_mce_against_the_reference_by_hand(tmp_path, monkeypatch, tables):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    zoo = importlib.import_module("zoo")
    mine = {("clean", 0): 0.9, ("noise", 1): 0.8, ("noise", 2): 0.6, ("blur", 1): 0.85, ("blur", 2): 0.7}
    theirs = {("clean", 0): 0.8, ("noise", 1): 0.6, ("noise", 2): 0.4, ("blur", 1): 0.7, ("blur", 2): 0.5}
    figures = dict.fromkeys(tables.ZOO_ROBUSTNESS_FIGURES, 0.5)
    record = {"model": "MLP", "seed": 1, "robustness_seconds": 12.0, **figures}
    reference = {
        **record,
        "model": "LinearClassifier",
        "robustness_dir": str(_corruptions(tmp_path / "r", "L", theirs)),
    }
    record["robustness_dir"] = str(_corruptions(tmp_path / "m", "MLP", mine))
    row = zoo.robustness_row("configs/mlp.yaml", "", record, reference)
    # CE_noise = (0.2 + 0.4) / (0.4 + 0.6) = 0.6, CE_blur = (0.15 + 0.3) / (0.3 + 0.5) = 0.5625: mCE 0.58125.
    assert row["mce"] == pytest.approx(0.58125)
    # Relative: noise (0.1 + 0.3) / (0.2 + 0.4) = 0.6667, blur (0.05 + 0.2) / (0.1 + 0.3) = 0.625.
    assert row["relative_mce"] == pytest.approx((2 / 3 + 0.625) / 2)
    assert row["clean_accuracy"] == pytest.approx(0.9)
    assert row["corruption_images"] == 2000
    assert zoo.robustness_row("configs/linear.yaml", "", reference, reference)["mce"] == pytest.approx(1.0)


def test_zoo_robustness_table_ranks_by_corruption_accuracy_with_paired_tests(tmp_path, tables, capsys):
    csv = tmp_path / "zoo_robustness.csv"
    machine = {"cpu": "Test CPU", "cores": 2, "torch": "2.4.1", "device": "cpu", "date": "2026-01-02"}
    for seed in (1, 2, 3):
        for config, model, acc in (("linear.yaml", "LinearClassifier", 0.50), ("mlp.yaml", "MLP", 0.60)):
            row = {"config": f"configs/{config}", "overrides": "", "model": model, "seed": seed}
            row |= {
                "clean_accuracy": 0.85,
                "corruption_images": 2000,
                **dict.fromkeys(tables.ZOO_ROBUSTNESS_FIGURES, 0.1),
            }
            row |= {"corruption_acc": acc + 0.01 * seed * (model == "MLP"), "mce": 1.0 if model != "MLP" else 0.8}
            row |= {"relative_mce": 1.0, "mce_reference": "linear.yaml", "robustness_seconds": 10.0, "report_dir": "x"}
            tables.ZOO_ROBUSTNESS.append(csv, {**row, **machine})
    tables.main([str(csv)])
    lines = [compact(ln) for ln in capsys.readouterr().out.splitlines()]
    mlp = next(ln for ln in lines if ln.startswith("| `MLP` |"))
    linear = next(ln for ln in lines if ln.startswith("| `LinearClassifier` |"))
    assert lines.index(mlp) < lines.index(linear)  # the most robust first
    assert "| **62.0 ± 1.0%** | 0.80 ± 0.00 |" in mlp
    assert linear.endswith(f"| {tables.p_value(paired_ttest([0.61, 0.62, 0.63], [0.5] * 3).p_value)} "
                           f"({tables.p_value(paired_ttest([0.61, 0.62, 0.63], [0.5] * 3).p_value)}) |")  # fmt: skip
    assert any("against `linear.yaml` of the same seed" in ln for ln in lines)


def test_corruption_rows_are_a_runs_file_and_the_table_averages_severities_and_seeds(tmp_path, monkeypatch, tables):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    zoo = importlib.import_module("zoo")
    csv = tmp_path / "zoo_corruptions.csv"
    machine = {"cpu": "Test CPU", "cores": 2, "torch": "2.4.1", "device": "cpu", "date": "2026-01-02"}
    for seed, shift in ((1, 0.0), (2, 0.1)):
        for config, model, base in (("linear.yaml", "LinearClassifier", 0.5), ("mlp.yaml", "MLP", 0.7)):
            accuracy = {("clean", 0): 0.9, ("gaussian_noise", 1): base + shift, ("gaussian_noise", 2): base - 0.2}
            accuracy |= {("rotation", 1): 0.4, ("rotation", 2): 0.2}
            folder = _corruptions(tmp_path / f"{model}{seed}", model, accuracy)
            rows = zoo.corruption_rows(f"configs/{config}", "", seed, {"model": model, "robustness_dir": str(folder)})
            assert [(r["corruption"], r["severity"], r["images"]) for r in rows][:2] == [
                ("clean", 0, 10000),
                ("gaussian_noise", 1, 2000),
            ]
            for row in rows:
                tables.ZOO_CORRUPTIONS.append(csv, {**row, **machine})
    assert tables.layout_of(csv) is tables.ZOO_CORRUPTIONS
    lines = [compact(ln) for ln in tables.render(csv).splitlines()]
    assert lines[0] == "| corruption | linear.yaml | mlp.yaml |"
    # noise: linear (0.5 + 0.3 + 0.6 + 0.3) / 4 = 42.5%, MLP (0.7 + 0.5 + 0.8 + 0.5) / 4 = 62.5%; clean rows left out
    assert lines[2:4] == ["| gaussian noise | 42.5 | 62.5 |", "| rotation | 30.0 | 30.0 |"]
    assert "Mean over severities 1-2 and seeds 1, 2." in lines
    assert lines[-1] == "Machine: Test CPU, 2 cores, torch 2.4.1, cpu; measured 2026-01-02."
