"""ClassificationTask's hook for networks with a data-dependent initialisation (AirbenchNet's whitening stem)."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from fmnist_lightning import ClassificationTask, FashionMNISTDataModule
from fmnist_lightning.models import AirbenchNet, LinearClassifier

from .conftest import quiet_trainer


class FirstBatch(Callback):
    """Keep the images of the first training batch as the task receives them (callbacks run first)."""

    def __init__(self) -> None:
        self.images: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.images is None:
            self.images = batch[0].clone()


def small_fit(data_dir: Path, tmp_path: Path, model: AirbenchNet, *callbacks: Callback, **trainer_args) -> Trainer:
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=list(callbacks), **trainer_args)
    trainer.fit(ClassificationTask(model), FashionMNISTDataModule(data_dir=str(data_dir), batch_size=64))
    return trainer


def test_fit_whitens_the_stem_from_its_first_training_batch_and_keeps_it_frozen(data_dir, tmp_path):
    model = AirbenchNet(widths=(8, 16, 16))
    first = FirstBatch()
    small_fit(data_dir, tmp_path, model, first)
    reference = AirbenchNet(widths=(8, 16, 16))
    reference.init_from_batch(first.images)
    # Two epochs of training later, the stem is still the whitening of the first batch.
    assert bool(model.stem_ready)
    assert torch.allclose(model.stem.weight, reference.stem.weight)
    assert not torch.equal(model.stem.bias, torch.zeros_like(model.stem.bias))  # its bias trains


class StemsAgree(Callback):
    """Under DDP, write whether every rank ended with rank 0's stem (rank 0 writes the file)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        stems = pl_module.all_gather(pl_module.model.stem.weight)  # (world_size, 8, 1, 2, 2)
        if trainer.is_global_zero:
            Path(self.out).write_text(str(all(torch.equal(stems[0], s) for s in stems[1:])))


@pytest.mark.slow
def test_ddp_ranks_share_rank_zeros_whitening(data_dir, tmp_path):
    # Each rank's first batch is another shard of the data, so without the broadcast the stems differ.
    out = tmp_path / "agree.txt"
    small_fit(
        data_dir, tmp_path, AirbenchNet(widths=(8, 16, 16)), StemsAgree(str(out)), strategy="ddp_spawn", devices=2
    )
    assert out.read_text() == "True"


@pytest.mark.slow
def test_a_compiled_network_trains_and_checkpoints_as_the_eager_one(data_dir, tmp_path):
    torch.manual_seed(0)
    model, eager = LinearClassifier(), LinearClassifier()  # compiles in seconds (a CNN: a minute on 2 cores)
    eager.load_state_dict(model.state_dict())
    task = ClassificationTask(model, compile=True)
    trainer = quiet_trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(task, FashionMNISTDataModule(data_dir=str(data_dir), batch_size=64))
    assert task._compiled
    # Compiled in place: the checkpoint's keys are the eager network's, and an eager task loads it.
    [checkpoint] = (tmp_path / "checkpoints").glob("*.ckpt") or list(tmp_path.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert {k.removeprefix("model.") for k in state if k.startswith("model.")} == set(eager.state_dict())
    eager.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    x = torch.randn(16, 1, 28, 28)
    task.eval(), eager.eval()
    with torch.no_grad():
        assert torch.allclose(task(x), eager(x), atol=1e-5)
