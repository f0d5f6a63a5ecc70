"""Using a trained checkpoint in Python: the task it holds, and predictions for your own images."""

import math
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from fmnist_lightning.calibration import TEMPERATURE_FILE, file_sha256, read_temperature, scaled_probs
from fmnist_lightning.checkpoints import load_checkpoint
from fmnist_lightning.data import NORMALIZATIONS, FashionMNISTDataModule
from fmnist_lightning.errors import CheckpointError, ConfigError, DataError
from fmnist_lightning.predictions import Predictions
from fmnist_lightning.runs import run_dir_of_checkpoint
from fmnist_lightning.task import ClassificationTask

#: Where ``robustness`` reports are in a run folder (``robustness/``, ``robustness_1/``...).
ROBUSTNESS_REPORTS = "robustness*"


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


def resolve_temperature(temperature: float | str | Path | None, checkpoint: str | Path) -> float | None:
    """The temperature to divide a checkpoint's outputs by (temperature scaling), or None for none.

    Args:
        temperature: None (no scaling); a number; a ``temperature.json`` written by ``robustness``; or
            ``"auto"``: the newest ``robustness*/temperature.json`` in the checkpoint's run folder that
            was fitted for this checkpoint.
        checkpoint: The checkpoint the temperature is for. A file fitted for another checkpoint (another
            SHA-256: another run, or ``last.ckpt`` rewritten by a later epoch) is refused.

    Raises:
        ConfigError: For a temperature that is not positive, a file that is not a temperature.json or
            belongs to another checkpoint, or ``auto`` with no fit of this checkpoint in its run folder.
    """
    if temperature is None:
        return None
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        value = float(temperature)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--temperature must be a positive number, got {temperature}.")
        return value
    try:
        return resolve_temperature(float(str(temperature)), checkpoint)
    except ValueError:
        pass  # not a number: "auto" or a file
    digest = file_sha256(checkpoint)
    if str(temperature) == "auto":
        run = run_dir_of_checkpoint(Path(checkpoint))
        files = (
            sorted(run.glob(f"{ROBUSTNESS_REPORTS}/{TEMPERATURE_FILE}"), key=lambda p: -p.stat().st_mtime)
            if run
            else []
        )
        for file in files:
            record = read_temperature(file)
            if record.get("checkpoint_sha256") == digest:
                return record["temperature"]
        where = f"{run}/{ROBUSTNESS_REPORTS}/" if run else "(it is not in a run folder)"
        raise ConfigError(
            f"--temperature auto: no {TEMPERATURE_FILE} fitted for {checkpoint} in {where}; run `robustness` on this "
            "checkpoint first, or give the file."
        )
    record = read_temperature(temperature)
    if record.get("checkpoint_sha256") != digest:
        raise ConfigError(
            f"--temperature {temperature} was fitted for another checkpoint ({record.get('checkpoint')}), not "
            f"{checkpoint}; use the {TEMPERATURE_FILE} of this checkpoint's `robustness` report."
        )
    return record["temperature"]


def predict_images(
    checkpoint: str | Path,
    path: str | Path,
    batch_size: int = 256,
    temperature: float | str | Path | None = None,
) -> Predictions:
    """Predict the user's images with a checkpoint written by the CLI, through the Trainer.

    The same path as ``predict --data.predict_dir``: the data module of the checkpoint (its
    normalisation) streams the images, and the task's ``predict_step`` (with its flip TTA, if it was
    trained so) gives the probabilities. Nothing is written.

    Args:
        checkpoint: A ``.ckpt`` file of ``fit`` (it holds the model and data configuration).
        path: An image file or a folder of images.
        batch_size: Images per batch.
        temperature: Divide the outputs by a fitted temperature before the softmax (see
            :func:`resolve_temperature`: a number, a ``temperature.json`` or ``"auto"``); None: as trained.

    Returns:
        The predictions: ``files``, ``preds``, ``probs`` (``labels`` are None), in file order.

    Raises:
        DataError: If ``path`` is missing or none of its files could be read.
        CheckpointError: If the checkpoint is missing, unreadable or not written by the CLI.
        ConfigError: For a temperature that cannot be used (see :func:`resolve_temperature`).
    """
    task, normalization = load_task(checkpoint)
    scale = resolve_temperature(temperature, checkpoint)
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
    if (
        scale is not None
    ):  # softmax(log p / T): the same as softmax(logits / T), and under flip TTA as robustness fits it
        probs = scaled_probs(probs.clamp_min(1e-12).log(), scale)
    preds = probs.argmax(dim=1).tolist()
    names = tuple(dm.class_names)
    return Predictions(list(range(len(files))), files, [None] * len(files), preds, probs, names)
