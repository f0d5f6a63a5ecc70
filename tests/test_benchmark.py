import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import compact

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "epoch_speed.py"


def refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, script: str, *args: str) -> str:
    """Run a benchmark's ``main`` in this process with bad arguments: its one-line refusal (exit status 2)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main(list(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_epoch_speed_benchmark_measures_all_four_paths_into_a_results_file(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "speed.csv"
    args = ["--models", "LightweightCNN", "--precisions", "32-true", "--limit-batches", "2"]
    done = run_script(*args, "--workers", "0", "--data-dir", str(data_dir), "--csv", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results_tables

    rows = results_tables.EPOCH_SPEED.read(out)
    assert [r["path"] for r in rows] == ["bound", "loop", "package", "usual"]
    assert {(r["repeat"], r["limit_batches"], r["workers"]) for r in rows} == {(1, 2, 0)}
    for r in rows:
        assert min(r["train_img_s"], r["epoch_s"], r["peak_rss_mb"]) > 0
    printed = [compact(line) for line in done.stdout.splitlines() if line.startswith("| LightweightCNN")]
    assert len(printed) == 4
    assert printed[0].split("|")[3].strip() == "bound (2 batches)"  # a shortened epoch says so
    assert printed[0].split("|")[7].strip() == "1.00x"  # the bound against itself
    rendered = results_tables.render(out).splitlines()
    assert [compact(line) for line in rendered if line.startswith("| LightweightCNN")] == printed


def test_epoch_speed_refuses_another_results_file_before_measuring(tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo.csv"
    zoo.write_text("config,overrides,model\nlinear.yaml,,LinearClassifier\n")
    message = refused(monkeypatch, capsys, "epoch_speed", "--models", "LightweightCNN", "--csv", str(zoo))
    assert "is not a results file of the epoch_speed layout" in message
    assert zoo.read_text() == "config,overrides,model\nlinear.yaml,,LinearClassifier\n"


def test_epoch_speed_refuses_an_unknown_model_or_a_folder_for_its_file_in_one_line(tmp_path, monkeypatch, capsys):
    for args, message in [
        (["--models", "Nope"], "unknown model 'Nope'; choose one of"),
        (["--csv", str(tmp_path)], "is a folder; name a file in it"),
    ]:
        assert message in refused(monkeypatch, capsys, "epoch_speed", "--limit-batches", "1", *args)


SWEEP = BENCHMARKS / "sweep_throughput.py"


@pytest.mark.slow
def test_sweep_throughput_measures_both_settings_into_a_results_file(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "sweep.csv"
    args = ["--models", "LightweightCNN", "--jobs", "2", "--folds", "2", "--limit-batches", "1"]
    done = subprocess.run(
        [sys.executable, str(SWEEP), *args, "--data-dir", str(data_dir), "--csv", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results_tables

    rows = results_tables.SWEEP_THROUGHPUT.read(out)
    assert [(r["jobs"], r["threads_per_worker"], r["repeat"]) for r in rows] == [(1, rows[0]["cores"], 1), (2, 1, 1)]
    for r in rows:
        assert (r["folds"], r["epochs"], r["limit_batches"], r["trainings"]) == (2, 1, 1, 2)
        assert r["train_images"] == 2 * 128  # one batch (the data module's default 128) per training
        assert r["images_per_s"] == pytest.approx(r["train_images"] / r["wall_s"], rel=1e-4)
    printed = [compact(line) for line in done.stdout.splitlines() if line.startswith("| LightweightCNN")]
    assert [line.split("|")[2].strip() for line in printed] == ["2 folds x 1 epoch (1 batches)"] * 2
    assert printed[0].split("|")[9].strip() == "1.00x"  # --jobs 1 against itself
    assert printed[1].split("|")[10].strip() in ("0 of 1", "1 of 1")
    rendered = results_tables.render(out).splitlines()
    assert [compact(line) for line in rendered if line.startswith("| LightweightCNN")] == printed


def test_sweep_throughput_refuses_a_folder_or_another_results_file_before_measuring(tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo.csv"
    zoo.write_text("config,overrides,model\nlinear.yaml,,LinearClassifier\n")
    for target, message in [(zoo, "is not a results file of the sweep_throughput layout"), (tmp_path, "is a folder")]:
        assert message in refused(monkeypatch, capsys, "sweep_throughput", "--jobs", "2", "--csv", str(target))
    assert zoo.read_text() == "config,overrides,model\nlinear.yaml,,LinearClassifier\n"
