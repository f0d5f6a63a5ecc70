"""The robustness job: the corruptions, the calibration and OOD metrics against hand-computed values,
temperature scaling that never reads the test set, the ``robustness`` command end to end, and its refusals."""

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fmnist_lightning import robustness
from fmnist_lightning.calibration import (
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    read_temperature,
    reliability_bins,
    scaled_probs,
)
from fmnist_lightning.cli import main, run
from fmnist_lightning.corruptions import LEVELS, SEVERITIES, corrupt
from fmnist_lightning.errors import ConfigError, DataError
from fmnist_lightning.export import export_checkpoint, load_exported
from fmnist_lightning.inference import predict_images, resolve_temperature
from fmnist_lightning.ood import auroc, digits_images, energy_score, fpr_at_tpr, msp_score, ood_sets, torchvision_images

from .conftest import LINEAR, ROOT, fast_fit_args

NAMES = list(SEVERITIES)


@pytest.fixture(scope="module")
def test_images(arrays) -> torch.Tensor:
    return arrays["test_images"][:200]


# --- corruptions -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_corruption_is_the_same_every_time_and_keeps_shape_dtype_and_range(name, test_images):
    for severity in (1, 5):
        first = corrupt(test_images, name, severity)
        assert torch.equal(first, corrupt(test_images, name, severity))  # bitwise, from the seeded generator
        assert first.shape == test_images.shape
        assert first.dtype == torch.uint8
        assert not torch.equal(first, test_images)
    floats = test_images[:20].unsqueeze(1).float() / 255
    out = corrupt(floats, name, 3)
    assert out.shape == floats.shape
    assert out.dtype == torch.float32
    assert 0 <= float(out.min()) <= float(out.max()) <= 1
    # The float and uint8 paths are one corruption: the same images within a grey level.
    assert (out * 255 - corrupt(test_images[:20], name, 3).unsqueeze(1).float()).abs().max() <= 1.01


@pytest.mark.parametrize("name", NAMES)
def test_a_stronger_severity_changes_the_images_more(name, test_images):
    clean = test_images.float()
    damage = [float((corrupt(test_images, name, s).float() - clean).abs().mean()) for s in LEVELS]
    assert all(a < b for a, b in itertools.pairwise(damage)), damage


def test_another_seed_draws_other_images_and_the_training_path_never_imports_the_corruptions(test_images):
    assert not torch.equal(corrupt(test_images, "gaussian_noise", 2, seed=1), corrupt(test_images, "gaussian_noise", 2))
    for module in ("data", "augment", "task", "training", "config", "callbacks"):
        assert "corruptions" not in (ROOT / "fmnist_lightning" / f"{module}.py").read_text()


def test_unknown_corruption_and_severity_are_refused(test_images):
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        corrupt(test_images, "fog", 1)
    with pytest.raises(ConfigError, match="out of range"):
        corrupt(test_images, "jpeg", 6)


# --- metrics, by hand --------------------------------------------------------------------------

# Four images, two classes: confidences 0.95 (right), 0.85 (wrong), 0.75 (right), 0.65 (right).
PROBS = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.35, 0.65]])
TARGETS = torch.tensor([0, 1, 1, 1])


def test_ece_adaptive_ece_brier_and_nll_against_hand_computed_values():
    # 10 bins: each image alone in its bin, |acc - conf| = 0.05, 0.85, 0.25, 0.35.
    assert expected_calibration_error(PROBS, TARGETS, bins=10) == pytest.approx(1.5 / 4)
    # 2 bins: all four in (0.5, 1]: accuracy 0.75, mean confidence 0.8.
    assert expected_calibration_error(PROBS, TARGETS, bins=2) == pytest.approx(0.05)
    # Equal mass, 2 bins: {0.65, 0.75} (acc 1, conf 0.7) and {0.85, 0.95} (acc 0.5, conf 0.9).
    assert adaptive_calibration_error(PROBS, TARGETS, bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.4)
    assert adaptive_calibration_error(PROBS, TARGETS, bins=10) == pytest.approx(1.5 / 4)  # 4 images: 4 bins
    assert brier_score(PROBS, TARGETS) == pytest.approx((0.005 + 1.445 + 0.125 + 0.245) / 4)
    assert negative_log_likelihood(PROBS, TARGETS) == pytest.approx(
        -(math.log(0.95) + math.log(0.15) + math.log(0.75) + math.log(0.65)) / 4
    )
    bins = reliability_bins(PROBS, TARGETS, bins=2)
    assert bins["count"].tolist() == [0, 4]
    assert bins["accuracy"][1] == pytest.approx(0.75)
    assert math.isnan(float(bins["accuracy"][0]))


def test_ood_scores_auroc_and_fpr95_against_hand_computed_values():
    ins, outs = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.75, 0.5, 0.3])
    assert auroc(ins, outs) == pytest.approx(10 / 12)  # 10 of the 12 (in, out) pairs ranked right
    assert fpr_at_tpr(ins, outs) == pytest.approx(1 / 3)  # accepting all four garments lets 0.75 in
    assert auroc(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])) == pytest.approx(3.5 / 4)  # a tie counts a half
    assert fpr_at_tpr(torch.tensor([1.0, 0.9]), torch.tensor([0.5, 0.1])) == 0.0
    # Energy scores are not in [0, 1]: ranked, never squashed into ties by torchmetrics' sigmoid.
    assert auroc(torch.tensor([40.0]), torch.tensor([30.0, 35.0])) == 1.0
    assert fpr_at_tpr(torch.tensor([40.0, 38.0]), torch.tensor([39.0, 35.0])) == 0.5
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    assert energy_score(logits).tolist() == pytest.approx([math.log(2), math.log(math.exp(10) + 1)])
    assert msp_score(logits).tolist() == pytest.approx([0.5, math.exp(10) / (math.exp(10) + 1)])


def test_temperature_scaling_finds_the_temperature_that_made_the_outputs_overconfident():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g) * 2
    targets = torch.multinomial(logits.softmax(dim=1), 1, generator=g).squeeze(1)  # calibrated at T = 1
    fit = fit_temperature(logits * 3, targets)  # three times too confident
    assert fit.temperature == pytest.approx(3, rel=0.1)
    assert fit.nll_after < fit.nll_before
    assert fit.images == 4000
    assert float((scaled_probs(logits * 3, fit.temperature).argmax(1) == logits.argmax(1)).float().mean()) == 1.0


# --- the other images --------------------------------------------------------------------------


def test_ood_sets_skip_what_cannot_be_had_and_refuse_an_empty_folder(tmp_path):
    digits = digits_images()
    assert digits.shape == (1797, 28, 28)
    assert digits.dtype == torch.uint8
    assert int(digits.max()) == 255
    with pytest.raises(DataError, match="downloads are off"):
        torchvision_images("mnist", tmp_path / "data", download=False)
    sets, notes = ood_sets(("mnist", "digits", "uniform_noise"), tmp_path / "data", download=False)
    assert [s.name for s in sets] == ["digits", "uniform_noise"]
    assert len(notes) == 1
    assert "mnist" in notes[0]
    assert not (tmp_path / "data").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        ood_sets(("folder",), tmp_path, folder=tmp_path / "empty")


def test_digits_without_scikit_learn_is_one_clear_line_and_a_skipped_set(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match=r"needs scikit-learn: pip install 'fmnist_lightning\[robustness\]'"):
        digits_images()
    sets, notes = ood_sets(("digits", "uniform_noise"), tmp_path, download=False)
    assert [s.name for s in sets] == ["uniform_noise"]
    assert notes[0].startswith("digits: the digits OOD set needs scikit-learn")


# --- the command -------------------------------------------------------------------------------


def _photos(folder: Path) -> Path:
    """Three small images that are not garments."""
    folder.mkdir()
    for i, colour in enumerate((0, 128, 255)):
        image = Image.new("L", (40, 30), colour)
        image.paste(255 - colour, (10, 10, 20 + 5 * i, 20))
        image.save(folder / f"thing{i}.png")
    return folder


@pytest.fixture(scope="module")
def robust_run(linear_run, data_dir, tmp_path_factory):
    """A copy of the linear run with one robustness report, made by the command on 300 test images."""
    root = tmp_path_factory.mktemp("robust")
    copy = linear_run.copy(root / "logs")
    photos = _photos(root / "photos")
    args = [*LINEAR, *fast_fit_args(data_dir, root / "logs"), f"--ckpt_path={copy.best}"]
    extra = ["--num_images=300", "--ood_download=false", f"--ood_dir={photos}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = run(["robustness", *args, *extra])
    return copy, args, result


def test_robustness_command_writes_its_report_into_the_run_folder(robust_run, capsys):
    copy, _, result = robust_run
    report = result.report_dir
    assert report == copy.run_dir / "robustness"
    names = {p.name for p in report.iterdir()}
    assert {
        "corruptions.csv",
        "calibration.csv",
        "ood.csv",
        "temperature.json",
        "metrics.json",
        "config.yaml",
        "robustness.md",
        "corruption_heatmap.png",
        "corruption_examples.png",
        "reliability.png",
        "ood_scores.png",
    } <= names
    assert not [p for p in copy.run_dir.iterdir() if p.name.startswith(".")]  # no hidden half-report left
    rows = robustness.read_corruption_results(report / "corruptions.csv")
    assert rows["images"] == 300
    assert rows["model"] == "LinearClassifier"
    assert len(rows["accuracy"]) == 1 + 12 * 5
    assert rows["accuracy"][("clean", 0)] == pytest.approx(result.summary["clean_accuracy"])
    assert result.summary["mce"] is None
    assert {r["dataset"] for r in result.ood} == {"digits", "uniform_noise", "folder"}
    assert any("mnist" in note for note in result.notes)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["summary"]["test_images"] == 300
    for row in result.calibration:
        assert 0 <= row["ece"] <= 1
        assert row["nll"] > 0
    assert "Robustness of LinearClassifier" in (report / "robustness.md").read_text()
    record = read_temperature(report / "temperature.json")
    assert record["checkpoint"] == str(copy.best)
    assert record["val_nll_after"] <= record["val_nll_before"]
    # TensorBoard: the figures and headline numbers are in the run's events.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in copy.run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["images"]) | set(accumulator.Tags()["scalars"])
    assert {"robustness/corruption_heatmap", "robustness/reliability", "robustness/clean_accuracy"} <= tags


def test_a_reference_gives_the_mce_and_the_same_model_scores_one(robust_run, capsys):
    copy, args, first = robust_run
    reference = first.report_dir / "corruptions.csv"
    extra = ["--num_images=300", "--ood_sets=[uniform_noise]", "--corruptions=[jpeg, rotation]", "--severities=[1, 5]"]
    result = run(["robustness", *args, *extra, f"--reference={reference}"])
    assert result.report_dir == copy.run_dir / "robustness_1"
    assert result.summary["mce"] == pytest.approx(1.0)
    assert result.summary["reference_model"] == "LinearClassifier"
    out = capsys.readouterr().out
    assert "mCE (reference: LinearClassifier" in out
    assert f"Written to {result.report_dir}/" in out
    # The corruptions are deterministic: the same accuracies as in the first report.
    for row in result.corruptions:
        assert row["accuracy"] == first_accuracy(first, row["corruption"], row["severity"])
    # The clean images may be more than the corrupted ones; a reference on other corrupted images is refused.
    fewer = run(["robustness", *args, *extra, "--corruption_images=100"])
    assert (fewer.summary["test_images"], fewer.summary["corrupted_images"]) == (300, 100)
    assert {r["images"] for r in fewer.corruptions if r["corruption"] != "clean"} == {100}
    with pytest.raises(SystemExit, match="was evaluated on 300 corrupted test images"):
        run(["robustness", *args, *extra, "--corruption_images=100", f"--reference={reference}"])


def first_accuracy(result, corruption, severity):
    return next(r["accuracy"] for r in result.corruptions if (r["corruption"], r["severity"]) == (corruption, severity))


def test_temperature_is_fitted_on_the_validation_split_alone(robust_run):
    """The same temperature when the test set is garbage that fails on any use."""
    _, args, result = robust_run

    class Poison:
        def __getattr__(self, name):
            raise AssertionError(f"the temperature fit touched the test set ({name})")

        def __len__(self):
            raise AssertionError("the temperature fit touched the test set (len)")

    def no_test_loader():
        raise AssertionError("the temperature fit asked for the test dataloader")

    loaded = robustness.load_run(args)
    loaded.datamodule.test_set = Poison()
    loaded.datamodule.test_dataloader = no_test_loader
    fit = robustness.fit_validation_temperature(loaded)
    assert fit.temperature == result.summary["temperature"]
    assert fit.images == 512  # limit_val_batches=2 of 256


def test_predict_images_and_export_apply_the_fitted_temperature(robust_run, tmp_path):
    copy, _, result = robust_run
    t = result.summary["temperature"]
    assert resolve_temperature("auto", copy.best) == t
    assert resolve_temperature(result.report_dir / "temperature.json", copy.best) == t
    photos = _photos(tmp_path / "photos")
    plain = predict_images(copy.best, photos)
    scaled = predict_images(copy.best, photos, temperature="auto")
    assert scaled.preds == plain.preds
    assert torch.allclose(scaled.probs, scaled_probs(plain.probs.log(), t), atol=1e-6)
    exported = load_exported(export_checkpoint(copy.best, "torchscript", tmp_path / "t.pt", temperature="auto"))
    baseline = load_exported(export_checkpoint(copy.best, "torchscript", tmp_path / "plain.pt"))
    images = torch.rand(4, 1, 28, 28)
    assert torch.allclose(exported(images), baseline(images) / t, atol=1e-5)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**read_temperature(result.report_dir / "temperature.json"), "checkpoint_sha256": "0"}))
    with pytest.raises(ConfigError, match="another checkpoint"):
        resolve_temperature(other, copy.best)
    with pytest.raises(ConfigError, match="positive"):
        resolve_temperature(-1.0, copy.best)


def test_the_predict_subcommand_applies_the_fitted_temperature(robust_run):
    from fmnist_lightning import training
    from fmnist_lightning.predictions import read_predictions

    _, args, result = robust_run
    t = result.summary["temperature"]
    plain = read_predictions(training.predict(args))
    scaled = read_predictions(training.predict([*args, "--prediction_writer.temperature=auto"]))
    assert scaled.preds == plain.preds
    assert torch.allclose(scaled.probs, scaled_probs(plain.probs.clamp_min(1e-12).log(), t), atol=1e-4)


# --- refusals: one line, a non-zero exit, nothing written --------------------------------------


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    code = exit_.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code != 0
    assert "\n" not in message.strip()
    assert "Traceback" not in message
    return message


def test_bad_input_is_one_line_and_leaves_no_report(robust_run, tmp_path, capsys):
    copy, args, _ = robust_run
    before = sorted(p.name for p in copy.run_dir.iterdir())
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,acc\njpeg,0.5\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([*args[:-1], f"--ckpt_path={tmp_path / 'missing.ckpt'}"], "does not exist"),
        ([*args, "--corruptions=[fog]"], "unknown corruption 'fog'"),
        ([*args, "--severities=[0]"], "out of range"),
        ([*args, f"--reference={wrong}"], "lacks the column"),
        ([*args, f"--reference={tmp_path / 'nowhere.csv'}"], "does not exist"),
        ([*args, f"--ood_dir={empty}", "--ood_download=false"], "holds no files"),
        ([*args, "--no_such_option=1"], "no_such_option"),
    ]
    for argv, words in cases:
        capsys.readouterr()  # each case's own stderr
        assert words in _refused(["robustness", *argv], capsys), argv
    assert sorted(p.name for p in copy.run_dir.iterdir()) == before


def test_robustness_without_a_checkpoint_says_so(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _refused(["robustness", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs")], capsys)
    assert "robustness needs --ckpt_path" in message
    assert not (tmp_path / "logs").exists()
