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

from .conftest import LINEAR, ROOT, TINYVGG, fast_fit_args, small_disk


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
    # The latest run lost its checkpoints; an older one has them: best/last must not fall back to it.
    older = tinyvgg_run.copy(ws / "gone_logs").run_dir
    (older.parent / "version_1").mkdir()
    shutil.copy(older / "config.yaml", older.parent / "version_1" / "config.yaml")
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
    (ws / "nan.yaml").write_text("grid:\n  model.optimizer.init_args.lr: [0.01, .nan]\n")
    (ws / "inf.yaml").write_text(
        "n_trials: 2\nsearch:\n  model.optimizer.init_args.lr: {type: float, low: 0.001, high: .inf}\n"
    )
    (ws / "pad.yaml").write_text("grid:\n  data.crop_padding: [2, -1]\n")
    (ws / "widths.yaml").write_text(
        "ablation:\n  reference: {}\n  arms:\n    no_layers: {model.model.init_args.widths: []}\n"
    )
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
    ("max_epochs 0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.max_epochs=0")], "trains nothing"),
    ("max_steps 0", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--trainer.max_steps=0")], "trains nothing"),
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
    ("last when the latest run lost its checkpoints", lambda w, d: ["fit", *TINYVGG, *fast_fit_args(d, w / "gone_logs", "--trainer.max_epochs=2", "--ckpt_path=last")], "version_1 has no checkpoints/last.ckpt"),
    ("best when the latest run lost its checkpoints", lambda w, d: ["test", *TINYVGG, *fast_fit_args(d, w / "gone_logs", "--ckpt_path=best")], "version_1 has no checkpoints/last.ckpt"),
    ("fit from best", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--ckpt_path=best")], "not supported by fit"),
    ("resume one-cycle with more epochs", lambda w, d: ["fit", *TINYVGG, *fit_args(w, d, "--trainer.max_epochs=3", "--ckpt_path=last")], "OneCycleLR"),
    # studies: the whole plan is built before anything is queued
    ("kfold with more folds than a class has images", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d), "--num_folds=60001"], "num_folds must be in [2, 6000]"),
    ("grid value the data module refuses", lambda w, d: ["sweep", *LINEAR, *fit_args(w, d), f"--sweep={w / 'pad.yaml'}"], "point crop_padding=-1: crop_padding must be in [0, 27]"),
    ("ablation arm the network refuses", lambda w, d: ["sweep", *TINYVGG, *fit_args(w, d), f"--sweep={w / 'widths.yaml'}"], "no_layers"),
    ("kfold with no seeds", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d), "--num_folds=2", "--seeds=0"], "seeds"),
    ("NaN in a sweep file", lambda w, d: ["sweep", *LINEAR, *fit_args(w, d), f"--sweep={w / 'nan.yaml'}"], "lr: nan is not a finite number"),
    ("infinity in a sweep file", lambda w, d: ["sweep", *LINEAR, *fit_args(w, d), f"--sweep={w / 'inf.yaml'}"], "not a finite number"),
    ("journal storage is a folder", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d), "--num_folds=2", f"--storage={w / 'ckpts'}"], "is a folder"),
    ("study with no workers", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d), "--num_folds=2", "--jobs=0"], "jobs must be at least 1"),
    # tools
    ("compare one run", lambda w, d: ["compare", str(w / "logs" / "tinyvgg" / "version_0")], "at least two"),
    ("compare untested runs", lambda w, d: ["compare", str(w / "logs" / "tinyvgg" / "version_0"), str(w / "logs" / "linear" / "version_0"), "--output", str(w / "cmp")], "run `test`"),
    ("compare a missing folder", lambda w, d: ["compare", str(w / "nope1"), str(w / "nope2"), "--output", str(w / "cmp")], "not a folder"),
    ("export a missing checkpoint", lambda w, d: ["export", "--ckpt_path", str(w / "none.ckpt")], "does not exist"),
    ("export a text checkpoint", lambda w, d: ["export", "--ckpt_path", str(w / "ckpts" / "text.ckpt")], "corrupt"),
    ("export to an unknown format", lambda w, d: ["export", "--ckpt_path", str(w / "ckpts" / "text.ckpt"), "--format", "tflite"], "format"),
    # export outputs: never numbered around a folder or a device
    ("export to an existing folder", lambda w, d: ["export", "--ckpt_path", str(w / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"), "--format", "torchscript", "--output", str(w / "ckpts")], "ckpts is a folder, not a file"),
    ("export to a folder name (trailing /)", lambda w, d: ["export", "--ckpt_path", str(w / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"), "--output", f"{w / 'new_folder'}/"], "names a folder"),
    ("export to a device", lambda w, d: ["export", "--ckpt_path", str(w / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"), "--format", "torchscript", "--output", "/dev/null"], "/dev/null is not a regular file"),
    ("export into a file as if a folder", lambda w, d: ["export", "--ckpt_path", str(w / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"), "--output", str(w / "a_file" / "sub" / "m.onnx")], "a_file is a file, not a folder"),
    # numbers that are not numbers, seeds numpy refuses
    ("lr nan", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr", "nan")], "--model.optimizer.init_args.lr: nan is not a finite number"),
    ("lr inf", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr=inf")], "--model.optimizer.init_args.lr: inf is not a finite number"),
    ("lr -inf", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr=-inf")], "--model.optimizer.init_args.lr: -inf is not a finite number"),
    ("lr .nan (YAML's NaN)", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr=.nan")], "--model.optimizer.init_args.lr: nan is not a finite number"),
    ("lr 1e999 (an infinite float)", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.lr=1e999")], "--model.optimizer.init_args.lr: inf is not a finite number"),
    ("label smoothing .inf", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--model.label_smoothing=.inf")], "--model.label_smoothing: inf is not a finite number"),
    ("weight decay nan in a study", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d, "--model.optimizer.init_args.weight_decay=.nan"), "--num_folds=2"], "weight_decay: nan is not a finite number"),
    ("seed negative", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--seed_everything", "-1")], "--seed_everything -1 is out of range"),
    ("seed above 2**32 - 1", lambda w, d: ["fit", *LINEAR, *fit_args(w, d, "--seed_everything=4294967296")], "--seed_everything 4294967296 is out of range"),
    # study storage: the README's driverless URL reaches the database (psycopg2), and says where it failed
    ("storage database unreachable", lambda w, d: ["kfold", *LINEAR, *fit_args(w, d), "--num_folds=2", "--storage=postgresql://nobody:secret@127.0.0.1:1/x"], "cannot open the study storage postgresql://nobody:***@127.0.0.1:1/x"),
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


def _good_checkpoint(ws: Path) -> Path:
    return ws / "logs" / "tinyvgg" / "version_0" / "checkpoints" / "last.ckpt"


# (name, writes the bad file into a folder outside the workspace and returns it, arguments, expected words)
FILE_CASES = [
    ("empty config file", lambda f: f / "empty.yaml", lambda w, d, p: ["fit", "--config", str(p)], "config file {p} is empty"),
    ("config file of comments only", lambda f: f / "comments.yaml", lambda w, d, p: ["fit", "--config", str(p)], "config file {p} is empty"),
    ("lr .nan in a config file", lambda f: f / "nan.yaml", lambda w, d, p: ["fit", *LINEAR, "--config", str(p), *fit_args(w, d)], "--model.optimizer.init_args.lr: nan is not a finite number"),
    ("lr nan (text) in a config file", lambda f: f / "nan_text.yaml", lambda w, d, p: ["fit", *LINEAR, "--config", str(p), *fit_args(w, d)], "--model.optimizer.init_args.lr (in {p}): nan is not a finite number"),
    ("pickled whole model as a checkpoint", lambda f: f / "whole.pt", lambda w, d, p: ["test", *TINYVGG, *fit_args(w, d, f"--ckpt_path={p}")], "holds a pickled whole model (a TinyVGG"),
    ("export a pickled whole model", lambda f: f / "whole.pt", lambda w, d, p: ["export", "--ckpt_path", str(p)], "not a Lightning checkpoint written by `fit`"),
    ("callback whose module fails to import", lambda f: f / "broken_callbacks.py", lambda w, d, p: ["fit", *LINEAR, *fit_args(w, d, "--trainer.callbacks+=broken_callbacks.Nope")], "--trainer.callbacks: cannot use broken_callbacks.Nope: No module named 'no_such_package_xyz'"),
]  # fmt: skip
FILE_CONTENTS = {
    "empty.yaml": b"",
    "comments.yaml": b"# nothing here yet\n\n",
    "nan.yaml": b"model:\n  optimizer:\n    init_args:\n      lr: .nan\n",
    "nan_text.yaml": b"model:\n  optimizer:\n    init_args:\n      lr: nan\n",
    "broken_callbacks.py": b"import no_such_package_xyz\n\nNope = no_such_package_xyz.Nope\n",
}


@pytest.mark.parametrize(("name", "path", "build", "words"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_is_one_clear_line_and_changes_nothing(
    ws, data_dir, tmp_path, capsys, monkeypatch, name, path, build, words
):
    from fmnist_lightning.models import TinyVGG

    bad = path(tmp_path)
    if bad.name == "whole.pt":
        torch.save(TinyVGG(widths=(8, 16)), bad)  # torch.save(model, path): the whole module, pickled
    else:
        bad.write_bytes(FILE_CONTENTS[bad.name])
    monkeypatch.syspath_prepend(str(tmp_path))  # broken_callbacks is found, and fails to import
    before = tree(tmp_path)
    args = build(ws, Path(data_dir), bad)
    test_bad_input_is_one_clear_line_and_changes_nothing(
        ws, data_dir, capsys, monkeypatch, name, lambda w, d: args, words.format(p=bad)
    )
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("arg", "missing", "words"),
    [
        (
            "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar",
            "rich",
            "cannot build lightning.pytorch.callbacks.RichProgressBar: `RichProgressBar` requires `rich`",
        ),
        (
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "wandb",
            "cannot build lightning.pytorch.loggers.WandbLogger: Requirement 'wandb",
        ),
    ],
    ids=["RichProgressBar without rich", "WandbLogger without wandb"],
)
def test_a_class_whose_package_is_missing_says_what_to_install(ws, data_dir, capsys, monkeypatch, arg, missing, words):
    """The cause of a class that cannot be built, in one line: not "Does not validate against any of the Union subtypes"."""
    import importlib.util

    if missing == "rich":  # installed here: hide it as Lightning sees it, a missing requirement
        monkeypatch.setattr("lightning.pytorch.callbacks.progress.rich_progress._RICH_AVAILABLE", False)
    elif importlib.util.find_spec(missing) is not None:
        pytest.skip(f"{missing} is installed here")
    args = ["fit", *LINEAR, *fit_args(ws, Path(data_dir), arg)]
    test_bad_input_is_one_clear_line_and_changes_nothing(
        ws, data_dir, capsys, monkeypatch, arg, lambda w, d: args, words
    )


def test_non_finite_numbers_in_overrides_and_dicts_are_refused_by_name(capsys):
    """Dotted overrides and whole configs as dicts (the studies' way in) are checked like the command line."""
    import yaml

    from fmnist_lightning.config import parse
    from fmnist_lightning.errors import ConfigError

    lr = "model.optimizer.init_args.lr"
    with pytest.raises(ConfigError, match=rf"^--{lr}: nan is not a finite number"):
        parse(LINEAR, overrides={lr: float("nan")})
    with pytest.raises(ConfigError, match=r"^--seed_everything 4294967296 is out of range"):
        parse(LINEAR, overrides={"seed_everything": 2**32})
    config = yaml.safe_load((ROOT / "configs" / "linear.yaml").read_text())
    config["model"]["lr_scheduler"]["init_args"]["factor"] = float("-inf")
    with pytest.raises(ConfigError, match=r"^--model.lr_scheduler.init_args.factor: -inf is not a finite number"):
        parse(config)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the text "inf", refused by the parser: named too
        parse(LINEAR, overrides={lr: "inf"})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--{lr}: inf is not a finite number" in err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tinyvgg_run, fmt):
    """A real process (TorchScript's native writer aborted the process, exit 134, leaving its .tmp)."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        output = disk / "models" / f"model.{fmt}"  # its folder is made for it, and removed again
        cmd = [sys.executable, "-m", "fmnist_lightning", "export", "--ckpt_path", str(tinyvgg_run.last)]
        done = subprocess.run(
            [*cmd, "--format", fmt, "--output", str(output)], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 1, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith("fmnist_lightning: error: could not write the export")
        assert "No space left on device" in lines[0]
        assert list(disk.iterdir()) == []  # no file, no hidden temporary, no folder


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--model.optimizer.init_args.lr=-1"], "learning rate"),  # refused once the Trainer exists
        (["--data.system_dir=/nowhere", "--data.download=false"], "apt-get install dataset-fashion-mnist"),
        (["--model.label_smoothing=1.5"], "label_smoothing"),  # refused while building, after the seed is set
    ],
    ids=["negative lr", "missing data", "label smoothing 1.5"],
)
def test_a_command_refused_after_the_trainer_is_built_prints_only_its_error(tmp_path, data_dir, extra, words):
    """No "Seed set to 42", "GPU available", "TPU available" before the one line of the error."""
    data = data_dir if "--data.download=false" not in extra else tmp_path / "no_data"
    cmd = [sys.executable, "-m", "fmnist_lightning", "fit", *LINEAR, f"--data.data_dir={data}", *extra]
    cmd.append(f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fmnist_lightning: error: ")
    assert words in lines[0]
    assert not (tmp_path / "logs").exists()


def test_lightning_info_lines_wait_for_the_run_and_go_with_its_error():
    """Held while a run is built, printed in order when it starts, dropped when it fails; warnings pass."""
    import logging

    from fmnist_lightning.config import HELD_INFO

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        HELD_INFO.hold()
        logger.info("Seed set to 1")
        logger.info("GPU available: False")
        logger.warning("a warning")
        assert seen == ["a warning"]
        HELD_INFO.release()  # the Trainer starts
        assert seen == ["a warning", "Seed set to 1", "GPU available: False"]
        HELD_INFO.hold()
        logger.info("Seed set to 2")
        HELD_INFO.drop()  # the build failed
        logger.info("later")
        assert seen[3:] == ["later"]
    finally:
        logger.removeHandler(handler)
        HELD_INFO.drop()


def test_a_successful_fit_says_its_seed_and_device_in_one_line_and_lightnings_lines_under_debug(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "fmnist_lightning", "fit", *LINEAR, *fast_fit_args(data_dir, tmp_path / "logs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on cpu, precision 32-true" in done.stderr
    assert "seed 42" in done.stderr
    assert "GPU available" not in done.stderr
    assert "Seed set to 42" not in done.stderr
    debug = subprocess.run([cmd[0], *cmd[1:3], "--debug", *cmd[3:]], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert "Seed set to 42" in debug.stderr
    assert "GPU available" in debug.stderr
