"""The package as a user installs it: a wheel built from this tree, run from a folder outside the repository."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The wheel installed (without its dependencies, which this environment has) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = root.glob("fmnist_lightning-*.whl")
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    # The wheel's copy first on the path, before the editable install of this checkout.
    return {**os.environ, "PYTHONPATH": str(target), "CI": "true"}


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmnist_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_an_installed_wheel_trains_and_tests_with_its_shipped_configs_by_name(installed, data_dir, tmp_path):
    where = run(installed, tmp_path, "--version")
    assert where.returncode == 0, where.stderr
    located = subprocess.run(
        [sys.executable, "-c", "import fmnist_lightning; print(fmnist_lightning.__file__)"],
        cwd=tmp_path,
        env=installed,
        capture_output=True,
        text=True,
        check=True,
    )
    assert not located.stdout.startswith(str(ROOT)), "the test must run the wheel's copy, not this checkout"
    short = [
        f"--data.data_dir={data_dir}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    # The README's first commands, with the config named as an installed user names it.
    fit = run(installed, tmp_path, "fit", "--config", "tinyvgg", *short)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    test = run(installed, tmp_path, "test", "--config", "tinyvgg", "--ckpt_path", "best", *short)
    assert test.returncode == 0, test.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "tinyvgg" / "version_0" / "report" / "metrics.json").is_file(), test.stdout
