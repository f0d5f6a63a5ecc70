"""Export to ONNX and TorchScript: the exported models reproduce PyTorch on the real test set.

Tolerance: exported logits within 1e-4 (absolute) of PyTorch's on all 10,000 test images, and the
same accuracy (measured: 2.4e-6 for ONNX via onnxruntime, 0 for TorchScript, for TinyVGG on CPU).
"""

import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from fmnist_lightning.data import NORMALIZATIONS
from fmnist_lightning.errors import CheckpointError, ConfigError
from fmnist_lightning.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    TOLERANCE,
    export_checkpoint,
    export_task,
    load_exported,
)
from fmnist_lightning.inference import load_task
from fmnist_lightning.models import AirbenchNet, TinyVGG
from fmnist_lightning.task import ClassificationTask


@pytest.fixture
def checkpoint(tinyvgg_run) -> Path:
    """A TinyVGG (8-16, flip TTA as tinyvgg.yaml) fitted for 30 batches by the CLI (about 70% accurate)."""
    return tinyvgg_run.last


@pytest.fixture(scope="module")
def test_images(arrays: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All 10,000 test images as the exported models take them: float (N, 1, 28, 28) in [0, 1], and labels."""
    return arrays["test_images"].unsqueeze(1).float() / 255, arrays["test_labels"]


def pytorch_logits(task: ClassificationTask, normalization: str, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """What the task predicts with: logits, or with TTA the log of its averaged probabilities."""
    mean, std = NORMALIZATIONS[normalization]
    x = (images - mean) / std
    with torch.no_grad():
        if tta:
            return task.predict_proba(x).clamp_min(1e-12).log()
        return task(x)


def in_chunks(run, images: torch.Tensor, size: int = 1000) -> torch.Tensor:
    return torch.cat([run(images[i : i + size]) for i in range(0, len(images), size)])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("tta", [None, False], ids=["tta-as-trained", "no-tta"])
def test_exported_model_reproduces_pytorch_on_the_test_set(checkpoint, test_images, tmp_path, fmt, tta):
    images, labels = test_images
    out = export_checkpoint(checkpoint, fmt, tmp_path / f"model.{fmt}", tta_flip=tta)
    assert out == tmp_path / f"model.{fmt}"
    task, normalization = load_task(checkpoint)
    assert task.tta_flip  # tinyvgg.yaml predicts with flip TTA; None keeps it, False leaves it out
    expected = pytorch_logits(task, normalization, images, tta=task.tta_flip if tta is None else tta)
    exported = in_chunks(load_exported(out), images)
    assert exported.shape == (10_000, 10)
    assert (exported - expected).abs().max() < TOLERANCE
    accuracy = (exported.argmax(dim=1) == labels).float().mean()
    assert accuracy == (expected.argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.5  # a trained model, not noise
    # Any batch size (the batch axis is dynamic), one image included.
    run = load_exported(out)
    for batch in (1, 7, 333):
        assert torch.allclose(run(images[:batch]), expected[:batch], atol=TOLERANCE)


def test_onnx_file_is_valid_with_named_dynamic_axes(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == INPUT_NAME
    assert outp.name == OUTPUT_NAME
    assert isinstance(inp.shape[0], str)  # symbolic batch size
    assert inp.shape[1:] == [1, 28, 28]
    assert outp.shape[1:] == [10]


def test_default_output_is_beside_the_checkpoint_and_nothing_is_overwritten(checkpoint, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(checkpoint.read_bytes())
    first = export_checkpoint(ckpt, "torchscript")
    assert first == tmp_path / "run.pt"
    before = first.read_bytes()
    second = export_checkpoint(ckpt, "torchscript")
    assert second == tmp_path / "run_1.pt"
    assert first.read_bytes() == before
    (tmp_path / "taken.onnx").write_text("someone else's file")
    third = export_checkpoint(ckpt, "onnx", tmp_path / "taken.onnx")
    assert third == tmp_path / "taken_1.onnx"
    assert (tmp_path / "taken.onnx").read_text() == "someone else's file"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_export_task_built_in_python(test_images, tmp_path):
    # A task from Python (no checkpoint): the normalisation is given, not read from a checkpoint.
    task = ClassificationTask(TinyVGG(widths=(8, 16)), tta_flip=False).eval()
    images, _ = test_images
    out = export_task(task, "onnx", tmp_path / "python.onnx", normalization="symmetric")
    expected = pytorch_logits(task, "symmetric", images[:500], tta=False)
    assert (load_exported(out)(images[:500]) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_airbench_net_with_its_whitening_stem_exports(test_images, tmp_path, fmt):
    # configs/fast.yaml's network: a frozen data-set stem, GELU, global max-pool, scaled logits, flip TTA,
    # and the translated views of tta_shift (the speedrun recipes').
    images, _ = test_images
    model = AirbenchNet(widths=(8, 16, 16))
    model.init_from_batch((images[:256] - 0.5) / 0.5)
    task = ClassificationTask(model, tta_flip=True, tta_shift=1).eval()
    out = export_task(task, fmt, tmp_path / f"airbench.{fmt}", normalization="symmetric")
    expected = pytorch_logits(task, "symmetric", images[:500], tta=True)
    assert (load_exported(out)(images[:500]) - expected).abs().max() < TOLERANCE


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.ckpt", "onnx", tmp_path / "m.onnx")
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        export_checkpoint(tmp_path / "bad.ckpt", "torchscript", tmp_path / "m.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        export_checkpoint(tmp_path / "plain.ckpt", "torchscript", tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "plain.ckpt"]


def test_checkpoint_without_the_data_normalisation_is_refused(checkpoint, tmp_path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state["datamodule_hyper_parameters"]
    torch.save(state, tmp_path / "no_data.ckpt")
    with pytest.raises(CheckpointError, match="normalisation"):
        export_checkpoint(tmp_path / "no_data.ckpt", "onnx", tmp_path / "m.onnx")


def test_unknown_format_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="unknown export format 'tflite': choose one of onnx, torchscript"):
        export_checkpoint(checkpoint, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ConfigError, match="unknown normalization"):
        export_task(ClassificationTask(TinyVGG(widths=(8, 16))), "onnx", tmp_path / "m.onnx", normalization="imagenet")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_onnx_packages_missing_is_a_clear_error(checkpoint, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=rf"{missing} is not installed.*pip install 'fmnist_lightning\[export\]'"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
    # TorchScript needs none of them.
    assert export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt").is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_format_is_written_once_through_the_atomic_write(checkpoint, tmp_path, monkeypatch, fmt):
    """Made and checked in memory, then written by io.atomic_write: a failed write leaves no temporary file."""
    import fmnist_lightning.export as export

    written = []
    real = export.atomic_write

    def spy(path, *args, **kwargs):
        written.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(export, "atomic_write", spy)
    out = export_checkpoint(checkpoint, fmt, tmp_path / "m.bin")
    assert written == [out] == [tmp_path / "m.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]


def test_output_that_is_not_a_file_name_is_refused_before_anything_is_read(tmp_path):
    # The checkpoint is not even looked at: the output is refused first, and nothing is numbered around it.
    for output, words in [
        (tmp_path, "is a folder, not a file"),
        (f"{tmp_path / 'new'}/", "names a folder"),
        ("/dev/null", "not a regular file"),
    ]:
        with pytest.raises(ConfigError, match=words):
            export_checkpoint(tmp_path / "none.ckpt", "torchscript", output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["best", "last"])
def test_export_finds_best_and_last_of_the_configs_latest_run_as_test_does(linear_run, tmp_path, monkeypatch, which):
    from fmnist_lightning.cli import run

    from .conftest import LINEAR

    monkeypatch.chdir(tmp_path)
    copy = linear_run.copy(tmp_path / "lightning_logs")  # the config's default log folder, from here
    out = tmp_path / "model.pt"
    written = run(["export", *LINEAR, "--ckpt_path", which, "--format", "torchscript", "--output", str(out)])
    assert written == out
    expected = load_task(copy.best if which == "best" else copy.last)[0].model.state_dict()
    exported = torch.jit.load(str(out)).state_dict()
    for key, value in expected.items():
        assert torch.equal(exported[f"network.{key}"], value)


def test_export_best_without_a_config_or_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    from fmnist_lightning.cli import run

    from .conftest import LINEAR

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run(["export", "--ckpt_path", "best"])
    assert "needs --config" in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        run(["export", *LINEAR, "--ckpt_path", "last"])
    assert "no run under lightning_logs/linear" in str(exit_.value.code)
    assert not (tmp_path / "lightning_logs").exists()
