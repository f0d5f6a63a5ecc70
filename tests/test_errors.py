"""Every bad input a clear error: one line, a non-zero exit, no traceback, and the file tree untouched.

The table below runs each case through the CLI in-process (``main``); a few run as real processes
too, to see the exit status and stderr a user sees. The workspace holds a real tiny run (its
checkpoints, config and logs), broken checkpoints and data files, and is compared file by file
(path, size, modification time) before and after each case: no run folder appears, nothing is
overwritten or removed.
"""

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist_lightning.cli import main
from fmnist_lightning.data import IDX_FILES

from .conftest import LINEAR, ROOT, TINYVGG, fast_fit_args


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time; every folder too."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in sorted(folder.rglob("*"))
    }


def write_idx_labels(path: Path, labels: list[int]) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + bytes(labels))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir, tinyvgg_run, linear_run):
    """A workspace: a fitted tiny TinyVGG run, a linear run, broken checkpoints, broken data folders."""
    ws = tmp_path_factory.mktemp("ws")
    logs = ws / "logs"
    good = tinyvgg_run.copy(logs).last
    shutil.rmtree(linear_run.copy(logs).report)  # an untested run, for compare
    bad = ws / "ckpts"
    bad.mkdir()
    (bad / "empty.ckpt").write_bytes(b"")
    (bad / "truncated.ckpt").write_bytes(good.read_bytes()[:2000])
    (bad / "random.ckpt").write_bytes(os.urandom(5000))
    (bad / "text.ckpt").write_text("not a checkpoint\n")
    (bad / "folder.ckpt").mkdir()
    torch.save({"weight": torch.zeros(3)}, bad / "state_dict.pth")
    # A run whose last.ckpt is corrupt: best/last cannot be resolved from it.
    broken = ws / "broken_logs" / "tinyvgg" / "version_0" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.ckpt").write_bytes(b"\x00" * 100)
    # Data folders: random bytes as .gz, truncated IDX files, labels out of range.
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    (ws / "gz_garbage").mkdir()
    for name in IDX_FILES:
        (ws / "gz_garbage" / name).write_bytes(os.urandom(300))
    for folder, edit in (("truncated", "truncate"), ("labels", "labels")):
        target = ws / folder / "FashionMNIST" / "raw"
        target.mkdir(parents=True)
        for name in IDX_FILES:
            src = raw / name.removesuffix(".gz")
            data = src.read_bytes()
            (target / src.name).write_bytes(data[:1000] if edit == "truncate" else data)
        if edit == "labels":
            write_idx_labels(target / "train-labels-idx1-ubyte", [12] * 60_000)
    (ws / "a_file").write_text("a file, not a folder\n")
    (ws / "gz_garbage_tgz").mkdir()
    with gzip.open(ws / "gz_garbage_tgz" / "x.gz", "wb") as f:
        f.write(b"x")
    return ws


def fit_args(ws: Path, data_dir: Path, *extra: str) -> list[str]:
    return fast_fit_args(data_dir, ws / "logs", *extra)


# (name, subcommand and arguments built from ws and data_dir, expected words in the message)
CASES = [
    # optimizer, model, task
    ("negative lr", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr=-1")], "learning rate"),
    ("negative weight decay", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.weight_decay=-1")], "weight_decay"),
    ("unknown optimizer", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer=torch.optim.Nope")], "optimizer"),
    ("label smoothing 1.5", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.label_smoothing=1.5")], "label_smoothing"),
    ("label smoothing negative", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.label_smoothing=-0.1")], "label_smoothing"),
    ("dropout 1.5", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--model.model.init_args.dropout=1.5")], "dropout"),
    ("dropout negative", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--model.model.init_args.dropout=-0.2")], "dropout"),
    ("unknown model argument", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--model.model.init_args.depth=3")], "depth"),
    ("unknown preset", lambda w, d: ["fit", "--config", str(ROOT / "configs" / "lightweight.yaml"), *fit_args(w, d, "--model.model.init_args.preset=Big")], "preset"),
    ("one-cycle total_steps too small", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--model.lr_scheduler.init_args.total_steps=1")], "OneCycleLR"),
    # data
    ("val_split 1.5", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=1.5")], "val_split"),
    ("val_split 0.0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=0.0")], "val_split"),
    ("val_split rounds to 0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=0.000001")], "val_split"),
    ("val_split rounds to all", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=0.9999999")], "val_split"),
    ("val_split count 60000", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=60000")], "val_split"),
    ("val_split negative count", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.val_split=-5")], "val_split"),
    ("num_folds 1", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.num_folds=1")], "num_folds"),
    ("more folds than a class has images", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.num_folds=7000")], "num_folds"),
    ("fold out of range", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.num_folds=5", "--data.fold=5")], "fold"),
    ("fold without num_folds", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.fold=2")], "num_folds"),
    ("rotation above 180", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.rotation_degrees=200")], "rotation_degrees"),
    ("rotation negative", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.rotation_degrees=-5")], "rotation_degrees"),
    ("crop padding 30", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.crop_padding=30")], "crop_padding"),
    ("flip probability 2", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.hflip_prob=2")], "hflip_prob"),
    ("erasing probability negative", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.erasing_prob=-1")], "erasing_prob"),
    ("batch size 0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.batch_size=0")], "batch sizes"),
    ("eval batch size 0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.eval_batch_size=0")], "batch sizes"),
    ("negative workers", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.num_workers=-1")], "num_workers"),
    ("unknown normalization", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.normalization=zscore")], "normalization"),
    ("missing data, download off", lambda w, d: ["fit", *LINEAR, *fast_fit_args(w / "nodata", w / "logs", f"--data.system_dir={w / 'nowhere'}", "--data.download=false")], "apt-get install dataset-fashion-mnist"),
    ("random bytes as .gz files", lambda w, d: ["fit", *LINEAR, *fast_fit_args(w / "staged", w / "logs", f"--data.system_dir={w / 'gz_garbage'}", "--data.download=false")], "corrupt"),
    ("truncated IDX files", lambda w, d: ["fit", *LINEAR, *fast_fit_args(w / "truncated", w / "logs")], "corrupt"),
    ("labels of 12 in the data", lambda w, d: ["fit", *LINEAR, *fast_fit_args(w / "labels", w / "logs")], "labels"),
    ("data_dir is a file", lambda w, d: ["fit", *LINEAR, *fast_fit_args(w / "a_file", w / "logs", f"--data.system_dir={d}/nowhere", "--data.download=false")], "a_file"),
    # trainer and config
    ("max_epochs negative", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.max_epochs=-5")], "max_epochs"),
    ("max_epochs not a number", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.max_epochs=abc")], "max_epochs"),
    ("last-epoch validation of an open-ended fit", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--validation_schedule.last_epoch_only=true", "--trainer.max_epochs=-1")], "last_epoch_only"),
    ("unknown precision", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.precision=bogus")], "precision"),
    ("gpu asked for, none here", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.accelerator=cuda")] if not torch.cuda.is_available() else None, "cuda"),
    ("unknown data key", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--data.no_such_key=1")], "no_such_key"),
    ("unknown trainer key", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.epochs=3")], "epochs"),
    ("config file missing", lambda w, d: ["fit", "--config", str(w / "nope.yaml")], "nope.yaml"),
    ("config file is not YAML", lambda w, d: ["fit", "--config", str(w / "a_file")], "Unexpected config"),
    ("unknown subcommand", lambda w, d: ["train"], "train"),
    ("no subcommand", lambda w, d: [], "subcommand"),
    # paths from user input
    ("logger name escapes the log folder", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.logger.init_args.name=../../x")], "inside the log folder"),
    ("logger name absolute", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, f"--trainer.logger.init_args.name={w}/abs")], "inside the log folder"),
    ("logger version escapes", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.logger.init_args.version=../v")], "inside the log folder"),
    ("prediction file name with ..", lambda w, d: ["predict", *LINEAR, *fit_args(w, d, "--prediction_writer.filename=../p.csv", "--ckpt_path=last")], "plain file name"),
    ("log folder under a file", lambda w, d: ["fit", *LINEAR, *fast_fit_args(d, w / "a_file" / "logs")], "is a file"),
    ("predict folder missing", lambda w, d: ["predict", *LINEAR, *fit_args(w, d, f"--data.predict_dir={w / 'no_photos'}", "--ckpt_path=last")], "no_photos"),
    # checkpoints
    ("checkpoint missing", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'none.ckpt'}")], "does not exist"),
    ("checkpoint empty", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'empty.ckpt'}")], "empty"),
    ("checkpoint truncated", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'truncated.ckpt'}")], "corrupt"),
    ("checkpoint random bytes", lambda w, d: ["validate", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'random.ckpt'}")], "corrupt"),
    ("checkpoint is text", lambda w, d: ["predict", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'text.ckpt'}")], "corrupt"),
    ("checkpoint is a folder", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'folder.ckpt'}")], "not a file"),
    ("checkpoint is a plain state dict", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'state_dict.pth'}")], "not a Lightning checkpoint"),
    ("resume from a corrupt checkpoint", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'ckpts' / 'truncated.ckpt'}")], "corrupt"),
    ("checkpoint of another architecture", lambda w, d: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={w / 'logs' / 'linear' / 'version_0' / 'checkpoints' / 'last.ckpt'}")], "LinearClassifier"),
    ("checkpoint of other widths", lambda w, d: ["test", "--config", str(ROOT / "configs" / "tinyvgg.yaml"), *fit_args(w, d, f"--ckpt_path={w / 'logs' / 'tinyvgg' / 'version_0' / 'checkpoints' / 'last.ckpt'}")], "widths"),
    ("checkpoint of another normalisation", lambda w, d: ["predict", *TINYVGG, *fit_args(w, d, "--data.normalization=unit", "--ckpt_path=last")], "normalization dataset"),
    ("best without a run", lambda w, d: ["test", "--config", str(ROOT / "configs" / "mlp.yaml"), *fit_args(w, d, "--ckpt_path=best")], "Run `fit`"),
    ("best from a corrupt last.ckpt", lambda w, d: ["test", *TINYVGG, *fast_fit_args(d, w / "broken_logs", "--ckpt_path=best")], "corrupt"),
    ("last from a corrupt last.ckpt", lambda w, d: ["validate", *TINYVGG, *fast_fit_args(d, w / "broken_logs", "--ckpt_path=last")], "corrupt"),
    ("fit from best", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--ckpt_path=best")], "not supported by fit"),
    ("resume one-cycle with more epochs", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--trainer.max_epochs=3", "--ckpt_path=last")], "OneCycleLR"),
    # tools
    ("compare one run", lambda w, d: ["compare", str(w / "logs" / "tinyvgg" / "version_0")], "at least two"),
    ("compare untested runs", lambda w, d: ["compare", str(w / "logs" / "tinyvgg" / "version_0"), str(w / "logs" / "linear" / "version_0"), "--output", str(w / "cmp")], "run `test`"),
    ("compare a missing folder", lambda w, d: ["compare", str(w / "nope1"), str(w / "nope2"), "--output", str(w / "cmp")], "not a folder"),
    ("export a missing checkpoint", lambda w, d: ["export", "--ckpt_path", str(w / "none.ckpt")], "does not exist"),
    ("export a text checkpoint", lambda w, d: ["export", "--ckpt_path", str(w / "ckpts" / "text.ckpt")], "corrupt"),
    ("export to an unknown format", lambda w, d: ["export", "--ckpt_path", str(w / "ckpts" / "text.ckpt"), "--format", "tflite"], "format"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(ws, data_dir, capsys, monkeypatch, name, build, words):
    args = build(ws, Path(data_dir))
    if args is None:
        pytest.skip("not a bad input on this machine")
    monkeypatch.chdir(ws)
    before = tree(ws)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    code = exit_.value.code
    message = code if isinstance(code, str) else err
    assert code not in (0, None), f"{name}: exited 0"
    assert words.lower() in message.lower(), f"{name}: {message!r}"
    assert "Traceback" not in err
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"{name}: {message!r}"
    assert tree(ws) == before, f"{name}: the file tree changed"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["fit", *LINEAR, "--model.optimizer.init_args.lr=-1"], "learning rate"),  # a refusal of the library
        (["fit", *LINEAR, "--data.nope=1"], "nope"),  # one of the parser (exit status 2)
    ],
    ids=["negative lr", "unknown key"],
)
def test_a_real_process_prints_one_line_and_exits_non_zero(tmp_path, data_dir, args, words):
    cmd = [sys.executable, "-m", "fmnist_lightning", *args, f"--data.data_dir={data_dir}"]
    cmd.append(f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert words in errors[0]
    assert not (tmp_path / "logs").exists()


def test_debug_shows_the_traceback(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="does not exist"):
        main(["--debug", "test", *TINYVGG, *fast_fit_args(data_dir, tmp_path), f"--ckpt_path={tmp_path / 'x.ckpt'}"])


def test_read_only_log_folder_is_a_clear_error_and_nothing_is_written(tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    locked = subprocess.run(["chattr", "+i", str(logs)], capture_output=True, check=False)
    if locked.returncode != 0:  # root ignores permission bits: an immutable folder is truly read-only
        pytest.skip(f"chattr +i unavailable here: {locked.stderr.decode().strip()}")
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", *LINEAR, *fast_fit_args(data_dir, logs)])
        assert "not writable" in str(exit_.value.code)
        assert list(logs.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(logs)], check=True)
    shutil.rmtree(logs)
