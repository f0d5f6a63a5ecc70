"""The dependencies of pyproject.toml at their floors: ``name>=X`` printed as ``name==X`` (pip constraints).

torch and torchvision are left out: this project's machines have one build of each on disk.
With ``--check``, compares the installed versions with the floors instead and fails on a mismatch.
"""

import re
import sys
from importlib.metadata import version

import tomllib

SKIP = {"torch", "torchvision"}


def floors(pyproject: str) -> dict[str, str]:
    """Each dependency's floor by name, from ``pyproject``'s ``[project] dependencies``."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([0-9][0-9.]*)", dep.replace(" ", ""))
        if match is None:
            sys.exit(f"floors.py: {dep!r} has no plain >= floor")
        if match.group(1) not in SKIP:
            pins[match.group(1)] = match.group(3)
    return pins


if __name__ == "__main__":
    check = "--check" in sys.argv
    pins = floors(sys.argv[-1])
    if not check:
        print("\n".join(f"{name}=={floor}" for name, floor in pins.items()))
        sys.exit(0)
    from packaging.version import Version  # installed with the package (lightning needs it), not before

    wrong = {name: version(name) for name, floor in pins.items() if Version(version(name)) != Version(floor)}
    if wrong:
        sys.exit(f"floors.py: not at their floors: {wrong}")
    print(f"all {len(pins)} dependencies at their floors: {pins}")
