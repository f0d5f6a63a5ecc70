"""The notebooks: committed without outputs, built on the package, and executed with assertions on what they make.

Each notebook runs as committed (its first code cell says ``SMALL = True``), cell after cell in one
namespace, from an empty working directory holding only a ``data`` link to the dataset, as a student
would run it from ``notebooks/``. The checks below then look at the objects and files it produced.
"""

import csv
import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pytest
import torch

from fmnist_lightning import CLASS_NAMES, read_history, read_predictions

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def cells(path: Path, kind: str = "code") -> list[str]:
    return ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    for cell in notebook["cells"]:
        assert not cell.get("outputs"), f"{path.name} is committed with outputs"
        if cell["cell_type"] == "code":
            assert cell["execution_count"] is None, f"{path.name} is committed with execution counts"
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_the_package_and_defines_no_models(path):
    source = "\n".join(cells(path))
    assert re.search(r"^from fmnist_lightning import", source, re.M)
    assert not re.search(r"^\s*class\s", source, re.M), "notebooks take their models from fmnist_lightning.models"
    assert "nn.Module" not in source
    assert "torch.nn" not in source
    # The test executes cells as plain Python: no IPython magics or shell escapes.
    assert not re.search(r"^\s*[%!]", source, re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_code_cell_holds_the_small_settings(path):
    namespace: dict = {}
    exec(cells(path)[0], namespace)
    assert namespace["SMALL"] is True, f"{path.name} must be committed with SMALL = True"


# ---------------------------------------------------------------- what each notebook must produce


def check_quickstart(ns: dict, folder: Path, arrays: dict[str, torch.Tensor]) -> None:
    dm, trainer = ns["dm"], ns["trainer"]
    assert trainer.state.finished
    assert trainer.current_epoch == ns["MAX_EPOCHS"]
    # The split: 500 validation images of each class.
    assert ns["train_counts"].sum() == 55_000
    assert ns["val_counts"].tolist() == [500] * len(CLASS_NAMES)
    # Samples: one row per class, in class order (the grid is one picture, its titles text on it).
    titles = [text.get_text() for text in ns["samples"].axes[0].texts]
    assert titles == [name for name in CLASS_NAMES for _ in range(ns["PER_CLASS"])]
    # The run folder and its curves: one history row per epoch.
    run = ns["run"]
    assert run.resolve().is_relative_to((folder / "lightning_logs" / "quickstart").resolve())
    history = read_history(run)
    assert [int(row["epoch"]) for row in history] == list(range(ns["MAX_EPOCHS"]))
    # A trained task: well above chance (0.1) on the whole validation split.
    metrics = ns["val_metrics"]
    assert metrics["accuracy"] > 0.4
    assert metrics["accuracy"] == pytest.approx(history[-1]["val/acc"], abs=1e-4)  # as logged by the Trainer
    confmat = metrics["confmat"]
    assert confmat.shape == (10, 10)
    assert int(confmat.sum()) == len(ns["val_labels"]) == len(dm.val_set) == 5000
    assert confmat.sum(dim=1).tolist() == [500] * len(CLASS_NAMES)
    assert int(confmat.trace()) / 5000 == pytest.approx(metrics["accuracy"], abs=1e-6)


def check_comparing_runs(ns: dict, folder: Path, arrays: dict[str, torch.Tensor]) -> None:
    names = ns["NAMES"]
    finished = ns["finished"]
    assert set(finished) == set(names)
    comparison = ns["comparison"]
    assert comparison.resolve().parent == folder.resolve()
    for file in ("comparison.md", "comparison.csv", "comparison.png", "mcnemar.csv"):
        assert (comparison / file).is_file(), file
    # The table: one row per run.
    with (comparison / "comparison.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(row["run"] for row in table) == sorted(str(run) for run in finished.values())
    # McNemar: one test per pair of runs, counts and p-values consistent with the predictions.
    mcnemar = ns["mcnemar"]
    assert len(mcnemar) == math.comb(len(names), 2) == 3
    pairs = {frozenset((row["run_a"], row["run_b"])) for row in mcnemar}
    assert pairs == {frozenset(map(str, pair)) for pair in itertools.combinations(finished.values(), 2)}
    predictions = ns["predictions"]
    by_run = {str(finished[name]): p for name, p in predictions.items()}
    for row in mcnemar:
        a, b = by_run[row["run_a"]], by_run[row["run_b"]]
        assert int(row["a_right_b_wrong"]) == sum(x and not y for x, y in zip(a.correct, b.correct, strict=True))
        assert int(row["a_wrong_b_right"]) == sum(y and not x for x, y in zip(a.correct, b.correct, strict=True))
        assert 0 <= float(row["p_value"]) <= 1
    first = mcnemar[0]
    assert (ns["only_a"], ns["only_b"]) == (int(first["a_right_b_wrong"]), int(first["a_wrong_b_right"]))
    # Every run tested on the same first 1,024 test images, its accuracy that of its predictions.
    for name, run in finished.items():
        p = predictions[name]
        assert p.index == list(range(1024))
        assert p.labels == arrays["test_labels"][:1024].tolist()
        accuracy = json.loads((run / "report" / "metrics.json").read_text())["accuracy"]
        assert sum(p.correct) / len(p.correct) == pytest.approx(accuracy, abs=1e-6)
    # The misclassified images are the best run's.
    best = predictions[ns["best_name"]]
    assert ns["metrics"][ns["best_name"]]["accuracy"] == max(m["accuracy"] for m in ns["metrics"].values())
    assert ns["wrong"] == [i for i, right in enumerate(best.correct) if not right]
    assert all(best.preds[i] != best.labels[i] for i in ns["wrong"])
    assert all(not any(p.correct[i] for p in predictions.values()) for i in ns["all_wrong"])


def check_own_images(ns: dict, folder: Path, arrays: dict[str, torch.Tensor]) -> None:
    checkpoint = Path(ns["CHECKPOINT"])
    assert checkpoint.is_file()
    assert checkpoint.resolve().is_relative_to((folder / "lightning_logs" / "own_images").resolve())
    composed = ns["composed"]
    assert len(composed) == ns["NUM_PHOTOS"] == 8
    # One row per image, in file order.
    result = ns["result"]
    assert result.files == sorted(str(file) for file in composed)
    assert result.probs.shape == (len(composed), len(CLASS_NAMES))
    assert all(label is None for label in result.labels)
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(len(composed)), atol=1e-5)
    # The top 3 of each: most probable first, the prediction on top, summing to at most 1.
    top3 = ns["top3"]
    assert len(top3) == len(composed)
    for best, pred in zip(top3, result.preds, strict=True):
        assert len(best) == 3
        assert best[0][0] == CLASS_NAMES[pred]
        assert best[0][1] >= best[1][1] >= best[2][1] >= 0
        assert math.fsum(p for _, p in best) <= 1 + 1e-6
    # The CSV holds the same, and the exported TorchScript model predicts the same.
    saved = read_predictions(folder / "my_photos_predictions.csv")
    assert saved.files == result.files
    assert torch.allclose(saved.probs, result.probs, atol=1e-6)
    assert ns["exported"].is_file()
    assert ns["exported"].parent == checkpoint.parent
    assert ns["difference"] < 1e-4


CHECKS: dict[str, Callable[[dict, Path, dict[str, torch.Tensor]], None]] = {
    "quickstart": check_quickstart,
    "comparing_runs": check_comparing_runs,
    "own_images": check_own_images,
}


def test_every_notebook_has_its_checks():
    assert {p.stem for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, data_dir, arrays):
    """Execute every code cell in order, in one fresh namespace, from an empty working directory."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data_dir)
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, source in enumerate(cells(path)):
            exec(compile(source, f"{path.name}[code cell {i}]", "exec"), namespace)
    finally:
        plt.close("all")
    CHECKS[path.stem](namespace, tmp_path, arrays)
