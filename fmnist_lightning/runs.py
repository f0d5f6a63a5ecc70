"""Run folders: finding a run's checkpoints, naming new result files, keeping paths inside the log folder."""

from pathlib import Path


def unused_path(path: Path) -> Path:
    """``path`` itself if free, else ``stem_1.ext``, ``stem_2.ext``...: never overwrite a result."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate
