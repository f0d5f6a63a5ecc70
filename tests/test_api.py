"""The public API at the top of the package: every name in ``__all__``, and the docstring's example, run as written."""

import inspect
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch
import pytest
import torch
from PIL import Image

import fmnist_lightning as fl

# The example's Trainer, made tiny: a few batches of one epoch on the CPU, 2 batches (512 images) predicted.
TINY = {
    "max_epochs": 1,
    "limit_train_batches": 10,
    "limit_val_batches": 2,
    "limit_predict_batches": 2,
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def docstring_example() -> str:
    """The code block of the package docstring (the indented lines after the line ending in ``::``)."""
    lines = fl.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def test_every_public_name_imports_and_is_documented():
    namespace: dict = {}
    exec("from fmnist_lightning import *", namespace)
    assert {k for k in namespace if k != "__builtins__"} == set(fl.__all__)
    assert len(set(fl.__all__)) == len(fl.__all__)
    for name in fl.__all__:
        obj = getattr(fl, name)
        assert obj is not None
        assert name in fl.__doc__, f"{name} is exported but not listed in the package docstring"
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isfunction(obj):
            hints = inspect.get_annotations(obj)
            assert "return" in hints, f"{name} has no return annotation"
            params = [p for p in inspect.signature(obj).parameters.values() if p.kind not in (p.VAR_POSITIONAL,)]
            assert all(p.name in hints for p in params), f"{name} has unannotated parameters"


def test_public_names_are_the_package_objects():
    from fmnist_lightning import (
        cli,
        compare,
        data,
        export,
        images,
        inference,
        predictions,
        report,
        runs,
        task,
        training,
    )

    assert fl.ClassificationTask is task.ClassificationTask
    assert fl.FashionMNISTDataModule is data.FashionMNISTDataModule
    assert fl.CLASS_NAMES == data.CLASS_NAMES
    assert len(fl.CLASS_NAMES) == 10
    assert fl.main is cli.main
    assert fl.compare_runs is compare.compare_runs
    assert fl.mcnemar_exact is compare.mcnemar_exact
    assert fl.summary_metrics is report.summary_metrics
    assert fl.read_history is runs.read_history
    assert (fl.read_predictions, fl.write_predictions) == (predictions.read_predictions, predictions.write_predictions)
    assert (fl.predict_images, fl.read_image, fl.compose_photo) == (
        inference.predict_images,
        images.read_image,
        images.compose_photo,
    )
    assert (fl.fit, fl.validate, fl.test, fl.predict) == (
        training.fit,
        training.validate,
        training.test,
        training.predict,
    )
    assert (fl.export_checkpoint, fl.load_exported) == (export.export_checkpoint, export.load_exported)
    assert set(fl.models.__all__) >= {"TinyVGG", "LinearClassifier", "build"}
    assert isinstance(fl.build("LightweightCNN"), torch.nn.Module)
    for error in (fl.DataError, fl.ConfigError, fl.CheckpointError):
        assert issubclass(error, fl.FashionMNISTError)


def test_import_works_without_the_onnx_extra(tmp_path):
    """onnx, onnxruntime and onnxscript are an optional extra: the package imports without them,
    and ONNX export then says what to install."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("onnx", "onnxruntime", "onnxscript"):
            sys.modules[name] = None  # `import onnx` now raises ImportError
        import fmnist_lightning as fl
        assert all(hasattr(fl, name) for name in fl.__all__)
        try:
            fl.export_checkpoint("missing.ckpt", "onnx")
        except fl.ConfigError as err:
            print(err)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert "pip install 'fmnist_lightning[export]'" in result.stdout


def test_docstring_example_trains_evaluates_plots_and_predicts(tmp_path, monkeypatch, data_dir, arrays, capsys):
    """The package docstring's example, as written, with a Trainer cut to a few batches."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data_dir)
    photos = tmp_path / "my_photos"
    photos.mkdir()
    garments = arrays["test_images"][:5].numpy()
    for i, garment in enumerate(garments):
        fl.compose_photo(garment, canvas=(300, 260), scale=7, at=(20 + 10 * i, 10)).save(photos / f"photo{i}.png")
    Image.new("RGB", (40, 40), "white").save(photos / "blank.jpg")  # nothing on it: predicted all the same
    real_trainer = lightning.pytorch.Trainer
    lightning.seed_everything(0)  # test accuracy 0.37 to 0.53 over seeds 0-5 (chance: 0.1)
    monkeypatch.setattr(lightning.pytorch, "Trainer", lambda **kwargs: real_trainer(**{**kwargs, **TINY}))

    namespace: dict = {}
    exec(compile(docstring_example(), "fmnist_lightning.__doc__", "exec"), namespace)

    # Trained, with one epoch in the run's history and its curves drawn.
    trainer = namespace["trainer"]
    run = Path(trainer.log_dir)
    assert run.resolve().is_relative_to(tmp_path.resolve())
    history = fl.read_history(run)
    assert len(history) == 1
    assert 0.2 < history[0]["val/acc"] <= 1  # above chance (0.1) after 10 batches
    for figure in ("curves.png", "confusion.png"):
        with Image.open(tmp_path / figure) as image:
            assert image.width > 500
    # Evaluated on the first 512 test images, in order.
    probs, labels, metrics = namespace["probs"], namespace["labels"], namespace["metrics"]
    assert probs.shape == (512, 10)
    assert torch.equal(labels, arrays["test_labels"][:512])
    assert torch.allclose(probs.sum(dim=1), torch.ones(512), atol=1e-5)
    assert int(metrics["confmat"].sum()) == 512
    assert metrics["accuracy"] == pytest.approx((probs.argmax(dim=1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["accuracy"] > 0.2
    # Predicted every photo, with its top 3.
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("my_photos")]
    assert [line.split(" ", 1)[0] for line in printed] == [f"my_photos/{p.name}" for p in sorted(photos.iterdir())]
    for batch in namespace["photos"]:
        for top3 in fl.top_k(batch["probs"], fl.CLASS_NAMES):
            assert len(top3) == 3
            assert all(name in fl.CLASS_NAMES for name, _ in top3)
            assert top3[0][1] >= top3[1][1] >= top3[2][1]
            assert math.fsum(p for _, p in top3) <= 1 + 1e-6
