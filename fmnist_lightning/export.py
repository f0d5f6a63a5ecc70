"""Export a trained network to ONNX or TorchScript, with its input normalisation built in.

The exported model takes raw grey images in [0, 1], ``(B, 1, 28, 28)`` float32 with any batch size
``B``, and returns ``(B, num_classes)`` logits: whoever runs it needs no knowledge of the dataset's
mean and std. When the task predicts with flip test-time augmentation (``tta_flip``), that is built
in too, so the exported model predicts exactly as ``test`` and ``predict`` do; its outputs are then
the log of the averaged probabilities (logits whose softmax is the averaged softmax). With a
temperature (``--temperature``, fitted on the validation split by ``robustness``), the outputs are
divided by it, so that their softmax is the calibrated probability.

Every export is checked before it gets its final name: ``onnx.checker``, then the file is run (by
onnxruntime, or ``torch.jit.load`` for TorchScript) on two batch sizes and compared with the PyTorch
network within :data:`TOLERANCE`, all in memory; only then are the bytes written, through
:func:`fmnist_lightning.io.atomic_write` (a full disk leaves nothing behind, no temporary file either).
An existing file is never overwritten: a numbered name is used instead
(:func:`fmnist_lightning.io.unused_path`), and the path written is returned. A folder, a device or
anything else that is not a regular file is refused as the output, not numbered around.
"""

import contextlib
import importlib
import io
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fmnist_lightning.augment import tta_views
from fmnist_lightning.config import RunCLI
from fmnist_lightning.data import NORMALIZATIONS
from fmnist_lightning.errors import ConfigError
from fmnist_lightning.inference import load_task, resolve_temperature
from fmnist_lightning.io import atomic_write, unused_path
from fmnist_lightning.task import ClassificationTask

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
#: ONNX opset: 18 is the oldest the dynamo exporter writes, run by onnxruntime 1.14 and later.
ONNX_OPSET = 18
#: Largest absolute logit difference allowed between the exported model and PyTorch (float32 on
#: CPU differs by about 1e-6 for these networks, from the order of the sums).
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class NormalizedClassifier(nn.Module):
    """A network with its input normalisation (and optionally flip TTA) in front: raw images in, logits out.

    Args:
        network: The classifier, on normalised images ``(B, 1, 28, 28)``.
        mean: Mean subtracted from the raw [0, 1] pixels.
        std: Standard deviation the pixels are divided by.
        tta_flip: Average the softmax of each image and its mirror, and return its log.
        tta_shift: Average over translated views too (``ClassificationTask``'s ``tta_shift``).
        channels_last: Feed the network NHWC tensors, as it was trained (TorchScript keeps this;
            ONNX has no memory format).
        temperature: Divide the outputs by this temperature (None: leave them as they are).
    """

    def __init__(
        self,
        network: nn.Module,
        mean: float,
        std: float,
        tta_flip: bool,
        channels_last: bool,
        temperature: float | None = None,
        tta_shift: int = 0,
    ) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.tta_flip, self.tta_shift = tta_flip, tta_shift
        self.channels_last = channels_last
        self.temperature = temperature

    def _logits(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of raw grey images ``(B, 1, 28, 28)`` in [0, 1]."""
        x = (images - self.mean) / self.std
        if self.tta_flip or self.tta_shift:
            # As ClassificationTask.predict_proba: the weighted mean of the views' softmaxes; its log keeps the argmax.
            probs = sum(w * self._logits(v).softmax(dim=1) for v, w in tta_views(x, self.tta_flip, self.tta_shift))
            logits = probs.clamp_min(1e-12).log()
        else:
            logits = self._logits(x)
        if self.temperature is not None:
            logits = logits / self.temperature
        return logits


def _require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime (and check onnxscript, which the exporter needs), or explain."""
    modules = {}
    for name in _ONNX_PACKAGES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"ONNX export needs the packages {', '.join(_ONNX_PACKAGES)} ({name} is not installed: {err}); "
                "install them with `pip install 'fmnist_lightning[export]'`."
            ) from err
    return modules["onnx"], modules["onnxruntime"]


def _onnx_bytes(model: nn.Module, example: Tensor) -> bytes:
    """The ONNX file's bytes, checked by ``onnx.checker``; in memory, so that only the atomic write touches the disk."""
    onnx, _ = _require_onnx()
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (example,),
        None,  # no file: the program is returned, and serialised below as torch's own save does
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: batch}},
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    # One self-contained file: these networks are far below protobuf's 2 GB.
    data = program.model_proto.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    return data


def _torchscript_bytes(model: nn.Module, example: Tensor) -> bytes:
    """The TorchScript archive's bytes, saved to memory.

    ``torch.jit.save`` to a file on a full disk aborts the process from C++ (``c10::Error``, exit 134)
    and leaves its half-written file; to a buffer it cannot fail that way, and the bytes then go
    through the atomic write like every other file the package writes.
    """
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what the issue asks for and
        # what C++ (libtorch) and older deployments load; the warning would only repeat that.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=Warning)
        traced = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def load_exported(path: str | Path) -> Callable[[Tensor], Tensor]:
    """Load an exported model as a function from raw images ``(B, 1, 28, 28)`` in [0, 1] to logits.

    The format is recognised from the content: TorchScript files are zip archives, ONNX files are
    not. ONNX models run with onnxruntime on the CPU.

    Raises:
        ConfigError: If the file is missing, or is ONNX and onnxruntime is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"exported model {path} does not exist.")
    return _run_exported(path.read_bytes())


def _run_exported(data: bytes) -> Callable[[Tensor], Tensor]:
    """:func:`load_exported` on a file's bytes (an export is checked in memory, before it is written)."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=Warning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()

        def run_torchscript(images: Tensor) -> Tensor:
            with torch.inference_mode():
                return module(images.float())

        return run_torchscript
    _, ort = _require_onnx()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: images.detach().float().cpu().numpy()})[0])

    return run_onnx


def export_task(
    task: ClassificationTask,
    format: ExportFormat,
    output: str | Path,
    normalization: str = "dataset",
    tta_flip: bool | None = None,
    temperature: float | None = None,
) -> Path:
    """Export a task's network with its input normalisation built in (see the module docstring).

    Args:
        task: The trained task (moved to the CPU and put in eval mode).
        format: ``onnx`` or ``torchscript``.
        output: The file to write; if it exists, a numbered name beside it (``model_1.onnx``...). A
            folder or a device is refused (:func:`check_output`).
        normalization: The data module's ``normalization`` the network was trained with.
        tta_flip: Build in flip test-time augmentation; None follows ``task.tta_flip``. The
            translated views of ``task.tta_shift`` come with it (False leaves every view out).
        temperature: Build in temperature scaling: the outputs divided by it (None: none).

    Returns:
        The path written.

    Raises:
        ConfigError: For an unknown format or normalisation, a temperature that is not positive, ONNX
            export without its packages, an output that is a folder, a device or under a file, or a
            file that cannot be written (a full disk...: nothing is left behind).
        RuntimeError: If the exported model does not reproduce PyTorch's logits within :data:`TOLERANCE`.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}.")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}.")
    if format == "onnx":
        _require_onnx()  # before any work, so a missing package is the first and only message
    check_output(output, format)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature}.")
    mean, std = NORMALIZATIONS[normalization]
    tta = task.tta_flip if tta_flip is None else tta_flip
    shift = task.tta_shift if tta else 0  # tta_flip=False: the bare network, no test-time views at all
    model = NormalizedClassifier(task.model, mean, std, tta, task.channels_last, temperature, shift)
    model = model.cpu().eval()
    # Made and checked in memory: a failed export writes nothing.
    example = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        data = (_onnx_bytes if format == "onnx" else _torchscript_bytes)(model, example)
        run = _run_exported(data)
        for batch in (1, 5):  # another batch size than the example's: the batch axis is dynamic
            images = torch.rand(batch, 1, 28, 28)
            diff = (run(images) - model(images)).abs().max().item()
            if not diff <= TOLERANCE:
                raise RuntimeError(
                    f"the exported {format} model's logits differ from PyTorch's by {diff:.3g} "
                    f"(> {TOLERANCE}) at batch size {batch}; nothing was written."
                )
    return _write_new(Path(output), data)


def check_output(output: str | Path, format: str) -> None:
    """Refuse an output that is not a file name: a folder, a device, a path under a file.

    ``unused_path`` would number its way around them (``outdir`` -> ``outdir_1``, ``/dev/null`` ->
    ``/dev/null_1``) and write a file nobody asked for; a regular file there is another matter, it is
    kept and the export gets a numbered name beside it.

    Raises:
        ConfigError: Naming the output and what to give instead.
    """
    path = Path(output)
    example = f"model{SUFFIXES.get(format, '')}"
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder, not a file: give the file to write, e.g. {path / example}.")
    if str(output).endswith(("/", os.sep)):
        raise ConfigError(
            f"--output {output} names a folder (a trailing /): give the file to write, e.g. {path / example}."
        )
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"--output {path} is not a regular file (a device, a pipe or a socket): give the name of a file to write."
        )
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--output {path}: {folder} is a file, not a folder; give a path in a folder.")


def _write_new(output: Path, data: bytes) -> Path:
    """Write ``data`` to ``output`` or, if taken, a numbered name beside it, atomically; return the path.

    A failed write (a full disk, a read-only folder) leaves neither the file nor its temporary, nor
    the folders made for it.
    """
    target = unused_path(output)
    made = []  # the folders that the write creates, innermost first
    for folder in target.parents:
        if folder.exists():
            break
        made.append(folder)
    try:
        with atomic_write(target, "wb", sync=True, overwrite=False) as f:
            f.write(data)
    except OSError as err:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(
            f"could not write the export {target} ({err.strerror or err}); nothing was written: free some space "
            "or give another --output."
        ) from err
    return target


def run_checkpoint(ckpt_path: str, config: str | None = None, prog: str | None = None) -> str:
    """The checkpoint ``ckpt_path`` names: ``best``/``last`` of a config's latest run, or a path as given.

    ``best`` and ``last`` are resolved exactly as ``test`` resolves them (the latest run of the
    config's name, never an older run in its place), by parsing the config as ``test`` would.

    Raises:
        ConfigError: For ``best`` or ``last`` without a config.
        CheckpointError: If the latest run of the config's name has no such checkpoint.
        SystemExit: For a config the parser refuses (one line on stderr).
    """
    if config is None:
        if ckpt_path in ("best", "last"):
            raise ConfigError(
                f"--ckpt_path {ckpt_path} needs --config (the config whose latest run to export), "
                "or give a checkpoint's path."
            )
        return ckpt_path
    args = ["--config", config, "--ckpt_path", ckpt_path]
    return str(RunCLI(args, stage="test", build=False, prog=prog).config.ckpt_path)


def export_checkpoint(
    ckpt_path: str | Path,
    format: ExportFormat = "onnx",
    output: str | Path | None = None,
    tta_flip: bool | None = None,
    temperature: float | str | Path | None = None,
) -> Path:
    """Export the network of a CLI checkpoint, normalisation built in (see :func:`export_task`).

    Args:
        ckpt_path: A ``.ckpt`` written by ``fit``.
        format: ``onnx`` or ``torchscript``.
        output: The file to write; by default the checkpoint's path with ``.onnx`` or ``.pt``. If
            it exists, a numbered name beside it is used (``model_1.onnx``...): never overwritten. A
            folder or a device is refused (:func:`check_output`).
        tta_flip: Build in flip test-time augmentation; None follows the checkpoint's ``tta_flip``.
        temperature: Build in temperature scaling: a number, a ``temperature.json`` of ``robustness``, or
            ``"auto"`` (the latest fitted for this checkpoint in its run folder; see
            :func:`~fmnist_lightning.inference.resolve_temperature`); None: none.

    Returns:
        The path written.

    Raises:
        CheckpointError: For a missing or unreadable checkpoint, or one that cannot rebuild its network.
        ConfigError: For an unknown format, ONNX export without the onnx, onnxruntime and onnxscript
            packages, an output that is not a file name, a file that cannot be written, or a temperature
            that cannot be used.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}.")
    if format == "onnx":
        _require_onnx()
    if output is not None:
        check_output(output, format)  # before the checkpoint is read: the cheaper refusal first
    task, normalization = load_task(ckpt_path)
    scale = resolve_temperature(temperature, ckpt_path)
    output = Path(ckpt_path).with_suffix(SUFFIXES[format]) if output is None else output
    return export_task(task, format, output, normalization=normalization, tta_flip=tta_flip, temperature=scale)
