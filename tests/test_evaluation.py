import csv
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fmnist_lightning import ConfigError
from fmnist_lightning.cli import run as main
from fmnist_lightning.compare import compare_runs, mcnemar_exact
from fmnist_lightning.data import CLASS_NAMES
from fmnist_lightning.evaluation import safe_tag


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 9, 2 * (1 + 10) / 2**10),  # P(X <= 1), X ~ Bin(10, 1/2) = 11/1024, doubled
        (0, 5, 2 / 2**5),
        (7, 7, 1.0),
        (0, 0, 1.0),
        (3, 12, 2 * (1 + 15 + 105 + 455) / 2**15),
    ],
)
def test_mcnemar_exact_matches_hand_computed_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


def test_safe_tag_removes_the_slash_of_t_shirt_top():
    assert safe_tag("T-shirt/top") == "T-shirt_top"
    assert [safe_tag(n) for n in CLASS_NAMES][-1] == "Ankle_boot"


@pytest.fixture
def tested_runs(tinyvgg_run, linear_run) -> list[Path]:
    """Two short real runs (TinyVGG and the linear baseline), each fitted then tested on the same 1,024 images."""
    return [tinyvgg_run.run_dir, linear_run.run_dir]


def test_report_files_are_written_and_consistent(tested_runs):
    report = tested_runs[0] / "report"
    for name in ("confusion_matrix", "roc", "misclassified", "samples", "training_curves"):
        assert (report / f"{name}.png").stat().st_size > 5_000, name
    metrics = json.loads((report / "metrics.json").read_text())
    with (report / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_test_images"] == 4 * 256
    labels, preds = [int(r["label"]) for r in rows], [int(r["pred"]) for r in rows]
    assert metrics["accuracy"] == pytest.approx(sum(y == p for y, p in zip(labels, preds, strict=False)) / len(rows))
    bag = CLASS_NAMES.index("Bag")
    recall = sum(p == bag for y, p in zip(labels, preds, strict=False) if y == bag) / labels.count(bag)
    assert metrics["per_class"]["Bag"]["recall"] == pytest.approx(recall)
    assert 0 <= metrics["expected_calibration_error"] <= 1
    assert metrics["parameters"] > 0
    assert metrics["checkpoint_mb"] > 0
    assert metrics["inference_images_per_s"] > 0
    assert metrics["latency_ms_batch1"] > 0
    assert metrics["train_seconds_per_epoch"] > 0
    assert metrics["peak_memory_mb"] > 0


def test_tensorboard_holds_confusion_matrix_images_and_per_class_scalars(tested_runs):
    acc = EventAccumulator(str(tested_runs[0]), size_guidance={"images": 0})
    acc.Reload()
    images, scalars = set(acc.Tags()["images"]), set(acc.Tags()["scalars"])
    assert {"val/confusion_matrix", "val/confusion_matrix_pct", "test/confusion_matrix", "test/roc"} <= images
    assert "test/misclassified" in images
    assert {
        "val_per_class/f1/T-shirt_top",
        "val_per_class/recall/Ankle_boot",
        "test_per_class/precision/Bag",
    } <= scalars
    assert {t for t in scalars if t.startswith("val/")} <= {"val/acc", "val/loss", "val/f1"}  # per class: own group
    png = acc.Images("test/confusion_matrix")[-1].encoded_image_string
    assert png.startswith(b"\x89PNG")
    assert len(png) > 5_000


def test_compare_gives_the_table_and_mcnemar_p_value(tested_runs, tmp_path):
    out = main(["compare", *(str(r) for r in tested_runs), "--output", str(tmp_path / "cmp")])
    table = (out / "comparison.md").read_text()
    assert "TinyVGG" in table
    assert "LinearClassifier" in table
    assert "McNemar" in table
    assert (out / "comparison.png").stat().st_size > 5_000
    with (out / "mcnemar.csv").open() as f:
        (test,) = list(csv.DictReader(f))
    assert float(test["p_value"]) == pytest.approx(
        mcnemar_exact(int(test["a_right_b_wrong"]), int(test["a_wrong_b_right"]))
    )
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["TinyVGG", "LinearClassifier"]


def test_compare_refuses_runs_on_different_test_images(tested_runs, tmp_path):
    other = tmp_path / "other_report"
    other.mkdir()
    report = tested_runs[1] / "report"
    (other / "metrics.json").write_text((report / "metrics.json").read_text())
    lines = (report / "predictions.csv").read_text().splitlines()
    (other / "predictions.csv").write_text("\n".join(lines[:-10]) + "\n")  # 10 images fewer
    with pytest.raises(ConfigError, match="same test images"):
        compare_runs([tested_runs[0], other], tmp_path / "cmp")
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(tested_runs[0]), str(other), "--output", str(tmp_path / "cmp2")])
    assert "same test images" in str(exit_.value.code)
    assert not (tmp_path / "cmp").exists()
    assert not (tmp_path / "cmp2").exists()


def test_compare_without_a_report_is_a_clear_error(tmp_path, tested_runs):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(tested_runs[0]), str(tmp_path), "--output", str(tmp_path / "cmp")])
    assert "run `test` on it first" in str(exit_.value.code)
