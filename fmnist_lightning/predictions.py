"""The predictions CSV: the one place that writes and reads it.

One layout serves the test set (``test`` reports, ``predict`` without images) and the user's own
images (``predict --data.predict_dir``): one row per image with

``index, file, label, pred, pred_class, prob, top2_class, top2_prob, top3_class, top3_prob, p_<class>...``

where ``file`` is empty for dataset images and ``label`` is empty when the true class is unknown.
Rows are streamed in batches to a temporary file beside the target, renamed into place when
complete, so an interrupted run never leaves a half-written CSV under the final name.
"""

import csv
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.io import atomic_write

TOP_K = 3


def probability_columns(class_names: Sequence[str]) -> list[str]:
    """Column names of the class probabilities: ``p_<class name>``."""
    return [f"p_{name}" for name in class_names]


def header(class_names: Sequence[str]) -> list[str]:
    """The CSV header for these classes."""
    top = [c for k in range(2, TOP_K + 1) for c in (f"top{k}_class", f"top{k}_prob")]
    return ["index", "file", "label", "pred", "pred_class", "prob", *top, *probability_columns(class_names)]


class PredictionsWriter:
    """Stream predictions to a CSV, batch by batch; the file appears under ``path`` only when closed cleanly.

    Use as a context manager::

        with PredictionsWriter(path, CLASS_NAMES) as writer:
            writer.write(probs, labels=labels)           # dataset images: index counts up
            writer.write(probs, files=["a.png", ...])    # user images

    Args:
        path: The CSV to create. An existing file is never overwritten (pick a free name with
            :func:`fmnist_lightning.io.unused_path` first); ``FileExistsError`` if it exists.
        class_names: Class names in label order.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = tuple(class_names)
        self.rows = 0
        self._file = None
        self._target: AbstractContextManager | None = None

    def __enter__(self) -> "PredictionsWriter":
        return self.open()

    def open(self) -> "PredictionsWriter":
        """Start the file (under a temporary name); for use without ``with``, paired with :meth:`close`."""
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; predictions are never written over an earlier file")
        self._target = atomic_write(self.path, newline="")
        self._file = self._target.__enter__()
        self._writer = csv.writer(self._file)
        self._writer.writerow(header(self.class_names))
        return self

    def write(
        self,
        probs: Tensor,
        labels: Tensor | Sequence[int] | None = None,
        files: Sequence[str] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        """Append one row per image of a batch.

        Args:
            probs: Class probabilities ``(B, num_classes)``.
            labels: True classes, or None when unknown.
            files: Source file of each image (user images), or None for dataset images.
            indices: Index of each image in its dataset; by default the running row count.
        """
        if self._file is None:
            raise RuntimeError("use PredictionsWriter as a context manager (or call open() first)")
        probs = probs.detach().float().cpu()
        n = len(probs)
        top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        labels = [None] * n if labels is None else [int(v) for v in torch.as_tensor(labels).tolist()]
        files = [""] * n if files is None else list(files)
        indices = range(self.rows, self.rows + n) if indices is None else indices
        names = self.class_names
        for idx, file, label, tp, ti, p in zip(
            indices, files, labels, top_p.tolist(), top_i.tolist(), probs.tolist(), strict=True
        ):
            top = [v for k in range(1, len(ti)) for v in (names[ti[k]], f"{tp[k]:.6f}")]
            row = [int(idx), file, "" if label is None else label, ti[0], names[ti[0]], f"{tp[0]:.6f}", *top]
            self._writer.writerow(row + [f"{v:.6f}" for v in p])
        self.rows += n

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(discard=exc_type is not None)

    def close(self, discard: bool = False) -> None:
        """Rename the finished file into place, or remove it if ``discard`` (the run failed)."""
        if self._target is None:
            return
        target, self._target, self._file = self._target, None, None
        if discard or self.path.exists():  # taken meanwhile: never written over
            target.__exit__(_Discarded, _Discarded(), None)
        else:
            target.__exit__(None, None, None)


class _Discarded(Exception):
    """Thrown into :func:`atomic_write` to drop an unfinished file."""


def write_predictions(
    path: str | Path,
    probs: Tensor,
    class_names: Sequence[str],
    labels: Tensor | Sequence[int] | None = None,
    files: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
) -> Path:
    """Write all predictions at once (see :class:`PredictionsWriter`); returns the path."""
    with PredictionsWriter(path, class_names) as writer:
        writer.write(probs, labels=labels, files=files, indices=indices)
    return Path(path)


@dataclass
class Predictions:
    """The content of a predictions CSV.

    Attributes:
        index: Dataset index of each row.
        files: Source file of each row ("" for dataset images).
        labels: True class of each row, or None where unknown.
        preds: Predicted class of each row.
        probs: Class probabilities ``(N, num_classes)``.
        class_names: Class names, from the header.
    """

    index: list[int]
    files: list[str]
    labels: list[int | None]
    preds: list[int]
    probs: Tensor
    class_names: tuple[str, ...] = field(default=())

    @property
    def correct(self) -> list[bool]:
        """Whether each prediction is right (rows with a known label only make sense here)."""
        return [p == y for p, y in zip(self.preds, self.labels, strict=True)]


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions CSV written by :class:`PredictionsWriter`.

    Raises:
        ConfigError: If the file is missing, unreadable or not in this layout.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            head = next(reader)
            prob_cols = [i for i, name in enumerate(head) if name.startswith("p_")]
            col = {name: i for i, name in enumerate(head)}
            index, files, labels, preds, probs = [], [], [], [], []
            for row in reader:
                index.append(int(row[col["index"]]))
                files.append(row[col["file"]] if "file" in col else "")  # reports before the file column
                label = row[col["label"]]
                labels.append(int(label) if label != "" else None)
                preds.append(int(row[col["pred"]]))
                probs.append([float(row[i]) for i in prob_cols])
    except (OSError, StopIteration, KeyError, ValueError, IndexError, csv.Error, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is missing or not a predictions CSV of this package ({type(err).__name__}: {err}); "
            "write it again with `test` or `predict`."
        ) from err
    names = tuple(head[i].removeprefix("p_") for i in prob_cols)
    tensor = torch.tensor(probs, dtype=torch.float32).reshape(len(probs), len(names))
    return Predictions(index, files, labels, preds, tensor, names)
