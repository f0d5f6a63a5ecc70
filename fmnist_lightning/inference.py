"""Using a trained checkpoint in Python: the task it holds, and predictions for your own images."""

from pathlib import Path

import torch
from lightning.pytorch import Trainer

from fmnist_lightning.checkpoints import load_checkpoint
from fmnist_lightning.data import NORMALIZATIONS, FashionMNISTDataModule
from fmnist_lightning.errors import CheckpointError, DataError
from fmnist_lightning.predictions import Predictions
from fmnist_lightning.task import ClassificationTask


def load_task(checkpoint: str | Path) -> tuple[ClassificationTask, str]:
    """Rebuild the task of a CLI checkpoint on the CPU, in eval mode, with its data normalisation.

    Args:
        checkpoint: A ``.ckpt`` written by ``fit`` (it holds the model's and the data's configuration).

    Returns:
        The task and the name of its normalisation (a key of :data:`fmnist_lightning.data.NORMALIZATIONS`).

    Raises:
        CheckpointError: If the file is missing, is not a Lightning checkpoint, or does not hold the
            configuration that rebuilds the network and names its normalisation.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path)
    normalization = (state.get("datamodule_hyper_parameters") or {}).get("normalization")
    if normalization not in NORMALIZATIONS:
        raise CheckpointError(
            f"{path} does not record the data normalisation its network was trained with (a checkpoint of a "
            "task trained without FashionMNISTDataModule?); export it with export_task(task, normalization=...)."
        )
    try:
        task = ClassificationTask.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:  # no model config (TypeError, jsonargparse errors), other weights (RuntimeError)
        raise CheckpointError(
            f"{path} cannot rebuild its network ({type(err).__name__}: {str(err).strip().splitlines()[0]}); "
            "a task built in Python needs ClassificationTask.load_from_checkpoint(path, model=...) and export_task."
        ) from err
    return task.eval(), normalization


def predict_images(checkpoint: str | Path, path: str | Path, batch_size: int = 256) -> Predictions:
    """Predict the user's images with a checkpoint written by the CLI, through the Trainer.

    The same path as ``predict --data.predict_dir``: the data module of the checkpoint (its
    normalisation) streams the images, and the task's ``predict_step`` (with its flip TTA, if it was
    trained so) gives the probabilities. Nothing is written.

    Args:
        checkpoint: A ``.ckpt`` file of ``fit`` (it holds the model and data configuration).
        path: An image file or a folder of images.
        batch_size: Images per batch.

    Returns:
        The predictions: ``files``, ``preds``, ``probs`` (``labels`` are None), in file order.

    Raises:
        DataError: If ``path`` is missing or none of its files could be read.
        CheckpointError: If the checkpoint is missing, unreadable or not written by the CLI.
    """
    task, normalization = load_task(checkpoint)
    dm = FashionMNISTDataModule(normalization=normalization, eval_batch_size=batch_size, predict_dir=str(path))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    outputs = trainer.predict(task, datamodule=dm)
    files = [f for out in outputs for f in out["files"]]
    if not files:
        raise DataError(f"none of the files under {path} could be read as an image (each is named above).")
    probs = torch.cat([out["probs"] for out in outputs]).float()
    preds = probs.argmax(dim=1).tolist()
    names = tuple(dm.class_names)
    return Predictions(list(range(len(files))), files, [None] * len(files), preds, probs, names)
