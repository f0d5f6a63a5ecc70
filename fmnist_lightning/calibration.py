"""Calibration: how far a model's confidence is from its accuracy, and temperature scaling to mend it.

Metrics of predicted probabilities ``(N, C)`` against true classes ``(N,)``:

- ECE, the expected calibration error of the top-1 confidence over equal-width bins (torchmetrics'
  ``multiclass_calibration_error``, norm l1; Guo et al., "On Calibration of Modern Neural Networks",
  ICML 2017);
- adaptive ECE, the same over equal-mass bins (each bin holds N / bins images; Nguyen & O'Connor,
  EMNLP 2015; "AdaECE" in Mukhoti et al., NeurIPS 2020), which torchmetrics lacks: an accurate
  model puts most images above 0.95, where equal-width bins lump them into one or two bins;
- the Brier score (mean over images of the squared distance between the probability vector and the
  one-hot label, 0 to 2) and the negative log-likelihood (mean cross-entropy, natural log).

Temperature scaling (Guo et al. 2017) divides a model's outputs by one scalar T, fitted on the
validation split by LBFGS on log T (T stays positive) to minimise the NLL; the argmax, and so the
accuracy, is unchanged. A fit is kept as ``temperature.json`` (:func:`write_temperature`,
:func:`read_temperature`: one writer and one reader of the layout) with the checkpoint it belongs to.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.io import write_text

#: Bins of every calibration metric and diagram (torchmetrics' default; the test report's ECE uses 15 too).
BINS = 15
#: The file a temperature fit is stored in, in a robustness report folder.
TEMPERATURE_FILE = "temperature.json"


def expected_calibration_error(probs: Tensor, targets: Tensor, bins: int = BINS) -> float:
    """ECE of the top-1 confidence over ``bins`` equal-width bins (torchmetrics, norm l1)."""
    return float(multiclass_calibration_error(probs.float(), targets, probs.shape[1], n_bins=bins, norm="l1"))


def adaptive_calibration_error(probs: Tensor, targets: Tensor, bins: int = BINS) -> float:
    """ECE over equal-mass bins: the images sorted by confidence, cut into ``bins`` groups of (almost) equal size.

    ``sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|``; with fewer images than bins, each
    image is a bin of its own.
    """
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == targets).float()
    order = confidence.argsort(stable=True)
    n = len(order)
    total = 0.0
    for part in torch.tensor_split(order, min(bins, n)):  # sizes differ by at most one
        total += len(part) / n * abs(float(correct[part].mean() - confidence[part].mean()))
    return total


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over images of ``sum_c (p_c - [c == y])^2`` (0 for certain and right, 2 for certain and wrong)."""
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).pow(2).sum(dim=1).mean())


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> float:
    """Mean of ``-log p_y`` (natural log; probabilities below 1e-12 count as 1e-12)."""
    return float(-probs.float().gather(1, targets[:, None]).clamp_min(1e-12).log().mean())


def calibration_metrics(probs: Tensor, targets: Tensor, bins: int = BINS) -> dict[str, float]:
    """``accuracy``, ``ece``, ``adaptive_ece``, ``brier`` and ``nll`` of probabilities ``(N, C)``."""
    return {
        "accuracy": float((probs.argmax(dim=1) == targets).float().mean()),
        "ece": expected_calibration_error(probs, targets, bins),
        "adaptive_ece": adaptive_calibration_error(probs, targets, bins),
        "brier": brier_score(probs, targets),
        "nll": negative_log_likelihood(probs, targets),
    }


def scaled_probs(outputs: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(outputs / T)``: a model's outputs (its logits, or the log of its flip-averaged probabilities)."""
    return (outputs.float() / temperature).softmax(dim=1)


@dataclass(frozen=True)
class TemperatureFit:
    """A temperature fitted on validation outputs.

    Attributes:
        temperature: T; a model's outputs are divided by it before the softmax.
        nll_before: NLL of the validation images at T = 1.
        nll_after: NLL at the fitted T.
        images: Validation images it was fitted on.
    """

    temperature: float
    nll_before: float
    nll_after: float
    images: int


def fit_temperature(outputs: Tensor, targets: Tensor, max_iter: int = 100) -> TemperatureFit:
    """Fit T minimising the NLL of ``softmax(outputs / T)`` by LBFGS on log T, in float64.

    Args:
        outputs: A model's outputs on the validation images ``(N, C)`` (never the test images).
        targets: Their classes ``(N,)``.
        max_iter: LBFGS iterations at most (it converges in about ten on one scalar).

    Returns:
        The temperature and the NLL before and after.
    """
    with torch.inference_mode(False), torch.enable_grad():
        # A copy made outside inference mode: inference tensors cannot be saved for backward.
        z = outputs.detach().to(torch.float64).clone()
        y = targets.detach().clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = float(log_t.detach().exp())
        before = float(F.cross_entropy(z, y))
        after = float(F.cross_entropy(z / temperature, y))
    if not math.isfinite(temperature) or after > before:  # never worse than leaving the outputs alone
        temperature, after = 1.0, before
    return TemperatureFit(temperature, before, after, len(y))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (a checkpoint's identity: the same bytes wherever the run folder moved)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_temperature(path: str | Path, fit: TemperatureFit, checkpoint: str | Path, **extra: Any) -> Path:
    """Write ``temperature.json``: the fit, the checkpoint's path and SHA-256, and ``extra`` keys.

    Args:
        path: The file to write (atomically).
        fit: The fit.
        checkpoint: The checkpoint whose outputs were fitted.
        **extra: More to record (the model's name, whether flip TTA was on...).
    """
    record = {
        "temperature": fit.temperature,
        "val_nll_before": fit.nll_before,
        "val_nll_after": fit.nll_after,
        "val_images": fit.images,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        **extra,
    }
    return write_text(path, json.dumps(record, indent=1) + "\n")


def read_temperature(path: str | Path) -> dict[str, Any]:
    """Read a ``temperature.json`` written by :func:`write_temperature`.

    Returns:
        Its keys; ``temperature`` a positive finite float.

    Raises:
        ConfigError: If the file is missing, not JSON, or has no positive finite ``temperature``.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"temperature file {path} does not exist; give a temperature.json of `robustness`.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"temperature file {path} is not readable JSON ({err}).") from err
    value = record.get("temperature") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"temperature file {path} holds no positive 'temperature' (a temperature.json of `robustness`)."
        )
    return {**record, "temperature": float(value)}


def fit_record(fit: TemperatureFit) -> dict[str, float]:
    """The fit as plain data (for a report's ``metrics.json``)."""
    return asdict(fit)


def reliability_bins(probs: Tensor, targets: Tensor, bins: int = BINS) -> dict[str, Tensor]:
    """Per equal-width confidence bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN where empty)."""
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == targets).float()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (k/bins, (k+1)/bins], as torchmetrics bins
    count = torch.bincount(index, minlength=bins).float()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    empty = count == 0
    confidence_mean = torch.where(empty, torch.nan, conf_sum / count.clamp_min(1))
    accuracy = torch.where(empty, torch.nan, correct_sum / count.clamp_min(1))
    return {"count": count, "confidence": confidence_mean, "accuracy": accuracy}


def reliability_figure(panels: dict[str, tuple[Tensor, Tensor]], bins: int = BINS) -> Figure:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal, with ECE and AdaECE.

    Args:
        panels: Title -> (probabilities ``(N, C)``, true classes ``(N,)``).
        bins: Equal-width confidence bins.
    """
    fig = Figure(figsize=(4 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    edges = torch.linspace(0, 1, bins + 1)
    for ax, (title, (probs, targets)) in zip(axes, panels.items(), strict=True):
        stats = reliability_bins(probs, targets, bins)
        filled = stats["count"] > 0
        left, width = edges[:-1][filled].numpy(), 1 / bins
        acc, conf = stats["accuracy"][filled].numpy(), stats["confidence"][filled].numpy()
        ax.bar(
            left, acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy"
        )
        ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="tab:red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ece, ace = expected_calibration_error(probs, targets, bins), adaptive_calibration_error(probs, targets, bins)
        ax.set_title(f"{title}\nECE {ece:.4f}, AdaECE {ace:.4f}", fontsize=10)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    return fig
