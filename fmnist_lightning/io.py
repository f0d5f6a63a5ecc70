"""Files the package writes: complete or absent, never over an earlier result, tables made by pandas.

Every file a command leaves behind (checkpoints, reports, predictions, study tables, exports) is
written through :func:`atomic_write`: to a temporary file in the target's folder, flushed, then
renamed into place, so a kill or a full disk leaves the old file or the new one, never half of one.
"""

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "markdown_table", "unused_path", "write_text"]


def unused_path(path: Path) -> Path:
    """``path`` itself if free, else ``stem_1.ext``, ``stem_2.ext``...: never overwrite a result."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved to ``path`` when the block ends cleanly.

    For writers that want a file name (``torch.onnx.export``...). If the block raises, the
    temporary file is removed and whatever was at ``path`` is left as it was.

    Args:
        path: The file to create or replace.
        overwrite: Replace an existing ``path``; False raises ``FileExistsError`` instead (the new
            file is linked into place, which fails if the name was taken meanwhile).

    Yields:
        The temporary path (not yet created).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", sync: bool = False, overwrite: bool = True, **open_kwargs: Any
) -> Iterator[IO]:
    """Open a temporary file beside ``path``; it becomes ``path`` when the block ends cleanly.

    If the block raises (a full disk, a kill turned into an exception), the temporary file is
    removed and whatever was at ``path`` before is left as it was.

    Args:
        path: The file to create or replace.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        sync: ``fsync`` before the rename (checkpoints: the rename must not reach the disk first).
        overwrite: See :func:`atomic_path`.
        **open_kwargs: For :func:`open` (``newline=""`` for CSV...).

    Yields:
        The open temporary file.
    """
    with atomic_path(path, overwrite) as tmp, open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
        yield f
        f.flush()
        if sync:
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
    formats: Mapping[str, Callable[[Any], str]] | None = None,
    align: str | None = None,
) -> str:
    """A GitHub markdown table of ``rows`` (pandas ``DataFrame.to_markdown``, which is tabulate's).

    Args:
        rows: One mapping per row.
        columns: Key -> header, in order (default: every key of the rows, as is).
        formats: Key -> function giving a cell's text (default: ``str``, an empty cell for None).
        align: One letter per column, ``l`` or ``r`` (default: every column left).
    """
    import pandas as pd  # tables only: keep the import off the training path

    columns = dict(columns) if columns is not None else {k: k for row in rows for k in row}
    formats = formats or {}

    def text(key: str, value: Any) -> str:
        if key in formats:
            return formats[key](value)
        return "" if value is None else str(value)

    frame = pd.DataFrame(
        [[text(key, row.get(key)) for key in columns] for row in rows], columns=list(columns.values()), dtype=object
    )
    colalign = [{"l": "left", "r": "right"}[a] for a in align] if align else ["left"] * len(columns)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=colalign)
