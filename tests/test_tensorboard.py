"""TensorBoard as a person opens it on a log folder holding two fits and a sweep: the HParams tab read
through TensorBoard's own HParams backend (the handlers behind its /experiment and /session_groups
routes), the scalar groups and the images, from the real event files."""

from pathlib import Path

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups, metadata
from torch.utils.tensorboard import SummaryWriter

from fmnist_lightning import training
from fmnist_lightning.callbacks import HPARAM_COLUMNS, HParamsLogger
from fmnist_lightning.studies import StudyOptions, run_sweep

from .conftest import LINEAR, fast_fit_args

#: The columns a person tunes, as the HParams table names them.
TUNED = ("model", "optimizer", "optimizer/lr", "optimizer/weight_decay", "lr_scheduler", "batch_size", "epochs")
TUNED += ("augment", "precision", "seed")


@pytest.fixture(scope="module")
def logs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One log folder: a fit that was tested, a fit with other hyper-parameters, and a two-point sweep."""
    root = tmp_path_factory.mktemp("tensorboard")
    logs = root / "logs"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        first = [*LINEAR, *fast_fit_args(data_dir, logs)]
        tested = training.fit(first).run_dir
        training.test(first, {"ckpt_path": "best"})
        other = [*LINEAR, *fast_fit_args(data_dir, logs, "--model.optimizer.init_args.lr=0.01", "--data.augment=true")]
        second = training.fit(other).run_dir
        sweep = root / "sweep.yaml"
        sweep.write_text("grid:\n  model.optimizer.init_args.lr: [1.0e-3, 3.0e-3]\n")
        study = run_sweep([*LINEAR, *fast_fit_args(data_dir, logs)], sweep, options=StudyOptions(jobs=1))
    sweep_runs = sorted(p.parent for p in study.rglob("hparams.yaml"))
    assert len(sweep_runs) == 2
    runs = [tested, second, *sweep_runs]
    return {"root": logs, "tested": tested, "other": second, "study": study, "runs": runs, "sweep": (root, sweep)}


def served(root: Path) -> tuple[api_pb2.Experiment, list[api_pb2.SessionGroup], list[str]]:
    """The HParams experiment and rows (session groups) TensorBoard serves for ``root``, and its runs."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(root))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(root), multiplexer=mux, data_provider=provider))
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, backend, "", api_pb2.GetExperimentRequest()).run()
    # As the dashboard asks: every column, every status, the first page of rows.
    columns = [api_pb2.ColParams(hparam=h.name) for h in experiment.hparam_infos]
    columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]
    request = api_pb2.ListSessionGroupsRequest(
        col_params=columns, allowed_statuses=statuses, start_index=0, slice_size=100
    )
    groups = list_session_groups.Handler(request_context, backend, "", request).run().session_groups
    return experiment, list(groups), sorted(mux.Runs())


def run_name(root: Path, run: Path) -> str:
    return run.relative_to(root).as_posix()


def test_every_run_has_its_hparams_row_beside_a_sweep(logs):
    root = logs["root"]
    experiment, groups, runs = served(root)
    shown = {h.name: h.display_name for h in experiment.hparam_infos}
    assert [shown[name] for name, *_ in HPARAM_COLUMNS] == [display for _, display, _ in HPARAM_COLUMNS]
    assert set(TUNED) <= set(shown.values())
    assert not [n for n in shown.values() if "instantiator" in n or n.endswith(("foreach", "capturable", "fused"))]
    assert [m.name.tag for m in experiment.metric_infos] == list(HParamsLogger.METRICS)

    rows = {g.name: g for g in groups}
    assert set(rows) == {run_name(root, run) for run in logs["runs"]}  # one row per run, named after it
    for run in logs["runs"]:
        row = rows[run_name(root, run)]
        values = {shown[k]: v for k, v in row.hparams.items()}
        assert set(TUNED) <= set(values), run
        assert values["model"].string_value == "LinearClassifier"
        assert values["optimizer"].string_value == "Adam"
        assert values["augment"].WhichOneof("kind") == "bool_value"  # true/false, not 1.0000
        metrics = {m.name.tag: m.value for m in row.metric_values}
        assert {"hp/best_val_acc", "hp/best_val_loss"} <= set(metrics), run
        assert 0 < metrics["hp/best_val_acc"] <= 1
    assert rows[run_name(root, logs["tested"])].metric_values[-1].name.tag == "hp/test_acc"
    other = {shown[k]: v for k, v in rows[run_name(root, logs["other"])].hparams.items()}
    assert other["optimizer/lr"].number_value == pytest.approx(0.01)
    assert other["augment"].bool_value is True
    lrs = {rows[run_name(root, run)].hparams[HPARAM_COLUMNS[2][0]].number_value for run in logs["runs"][2:]}
    assert sorted(lrs) == pytest.approx([1e-3, 3e-3])

    # Whichever run's experiment summary TensorBoard picks, it is this one: the sweep writes none of its own.
    expected = HParamsLogger.experiment_summary().value[0].metadata.plugin_data.content
    for run in runs:
        acc = EventAccumulator(str(root / run))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME).get(metadata.EXPERIMENT_TAG)
        assert content is None or content == expected, run
    assert not any("hparams" in Path(run).parts for run in runs)  # no folder of the sweep's shown as a run


def test_scalar_groups_and_confusion_images_read_at_card_size(logs):
    acc = EventAccumulator(str(logs["tested"]), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {t for t in scalars if t.startswith("val/")} == {"val/acc", "val/loss", "val/f1"}
    per_class = {t for t in scalars if t.startswith("val_per_class/")}
    assert len(per_class) == 30
    assert {"val_per_class/precision/T-shirt_top", "val_per_class/f1/Ankle_boot"} <= per_class
    assert {"test_per_class/recall/Bag", "test/acc"} <= scalars
    for tag in ("val/confusion_matrix", "val/confusion_matrix_pct", "test/confusion_matrix"):
        image = acc.Images(tag)[-1]
        assert (image.width, image.height) == (500, 460), tag  # one panel, legible in a default card


def test_a_finished_sweep_run_again_removes_the_hparams_folder_of_earlier_versions(logs, data_dir):
    old = logs["study"] / "hparams"
    with SummaryWriter(str(old)) as writer:  # what earlier versions wrote: an experiment summary of the means
        writer.add_hparams({"model.optimizer.init_args.lr": 0.001}, {"hparams/val_acc_mean": 0.5}, run_name="lr=0.001")
    root, sweep = logs["sweep"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_sweep([*LINEAR, *fast_fit_args(data_dir, logs["root"])], sweep, options=StudyOptions(jobs=1))
    assert not old.exists()
    _, groups, _ = served(logs["root"])
    assert len(groups) == len(logs["runs"])
