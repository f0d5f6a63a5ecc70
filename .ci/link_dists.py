"""Hard-link installed distributions, with everything they require, into another environment's site-packages.

Run by the environment that has them (``.venv/bin/python .ci/link_dists.py TARGET torch torchvision``):
every file each distribution's RECORD lists under its site-packages (its dist-info included, so pip
counts it as installed there) gets a hard link in TARGET, for the distributions named and, recursively,
those they require. The floors' environment takes torch and torchvision this way from the main one:
this machine's only build of them is CUDA's, about 6 GB with its NVIDIA libraries, which pip would
otherwise unpack a second time (about 90 s of CI). Where a hard link is impossible (another file
system), the file is copied.
"""

import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement


def closure(names: list[str]) -> list:
    """The installed distributions named and those they require, extras included, for this platform; once each."""
    dists: dict[str, object] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        try:
            dist = dists.get(name) or distribution(name)
        except PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        dists[name] = dist
        for extra in ("", *req.extras):  # its own requirements, then those of each extra asked for
            if (name, extra) in done:
                continue
            done.add((name, extra))
            for sub in map(Requirement, dist.requires or []):
                if sub.marker is None:  # unconditional: once, with the distribution's own requirements
                    if not extra:
                        todo.append(sub)
                elif sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return list(dists.values())


def link(dists: list, target: Path) -> int:
    """Link every file of ``dists`` that lies in their site-packages into ``target``; how many."""
    count = 0
    for dist in dists:
        base = Path(dist.locate_file(""))
        for file in dist.files or []:
            if file.parts and file.parts[0] == "..":
                continue  # scripts and data outside site-packages: not needed to import
            source, dest = base / file, target / file
            if not source.is_file() or dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
            count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python .ci/link_dists.py TARGET_SITE_PACKAGES DIST [DIST...]")
    found = closure(sys.argv[2:])
    n = link(found, Path(sys.argv[1]))
    print(f"link_dists.py: {n} files of {len(found)} distributions linked into {sys.argv[1]}", file=sys.stderr)
