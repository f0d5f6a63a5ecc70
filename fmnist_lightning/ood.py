"""Out-of-distribution detection: telling Fashion-MNIST garments from inputs that are not garments.

Two scores of a classifier's outputs, each higher for inputs it takes to be in-distribution:

- MSP, the maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified
  and Out-of-Distribution Examples in Neural Networks", ICLR 2017);
- the energy score, ``logsumexp`` of the logits, i.e. minus the free energy at temperature 1 (Liu et
  al., "Energy-based Out-of-distribution Detection", NeurIPS 2020).

Each is judged by how well it separates the Fashion-MNIST test images (in-distribution, the positive
class) from a set of other images: the area under the ROC curve (torchmetrics' ``binary_auroc``) and
the false-positive rate at 95% true-positive rate (FPR95: the share of the other images scoring at
least as high as the 95% best-scored garments, from torchmetrics' ``binary_roc``).

The other images (:func:`ood_sets`), each uint8 ``(N, 28, 28)`` light on black as Fashion-MNIST:
MNIST and KMNIST test sets through torchvision where they are on disk or can be downloaded (a failed
download is skipped with a one-line note), scikit-learn's bundled 8x8 digits upscaled to 28x28, uniform
noise, and a folder of the user's images brought to the Fashion-MNIST layout as ``predict`` does
(:mod:`fmnist_lightning.images`).
"""

import contextlib
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc

from fmnist_lightning.errors import ConfigError, DataError
from fmnist_lightning.images import ImageFilesDataset

#: Seconds a download of MNIST or KMNIST may wait for the network before it is skipped.
DOWNLOAD_TIMEOUT = 10.0
#: Images of uniform noise.
NOISE_IMAGES = 2000
#: The scores, by name: each maps a model's raw logits ``(N, C)`` to one number per image, higher = garment.
SCORES = ("msp", "energy")


def msp_score(logits: Tensor) -> Tensor:
    """Maximum softmax probability of each row of ``logits`` ``(N, C)``."""
    return logits.float().softmax(dim=1).max(dim=1).values


def energy_score(logits: Tensor) -> Tensor:
    """``logsumexp`` of each row of ``logits`` ``(N, C)``: minus the free energy (higher = more in-distribution)."""
    return logits.float().logsumexp(dim=1)


def fpr_at_tpr(in_scores: Tensor, out_scores: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the first ROC point whose true-positive rate reaches ``tpr``.

    Positives are ``in_scores``; a threshold accepts the scores at or above it.
    """
    scores, labels = _scores_and_labels(in_scores, out_scores)
    fpr, tprs, _ = binary_roc(scores, labels)
    return float(fpr[tprs >= tpr - 1e-12].min())


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve of ``in_scores`` (positives) against ``out_scores`` (ties count a half)."""
    return float(binary_auroc(*_scores_and_labels(in_scores, out_scores)))


def _scores_and_labels(in_scores: Tensor, out_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets' scores as dense ranks in [0, 1] (ties kept), with labels 1 (in) and 0 (out).

    torchmetrics takes scores outside [0, 1] for logits and applies a sigmoid, which in float32 makes
    energy scores of 20 and 25 both 1.0: a tie that was not there. Ranks keep the order and the ties exactly.
    """
    _, ranks = torch.unique(torch.cat([in_scores.double(), out_scores.double()]), return_inverse=True)
    scores = ranks.double() / max(int(ranks.max()), 1)
    labels = torch.cat([torch.ones(len(in_scores), dtype=torch.long), torch.zeros(len(out_scores), dtype=torch.long)])
    return scores, labels


def detection_metrics(in_scores: Tensor, out_scores: Tensor) -> dict[str, float]:
    """``auroc`` and ``fpr95`` of one score on one pair of sets."""
    return {"auroc": auroc(in_scores, out_scores), "fpr95": fpr_at_tpr(in_scores, out_scores)}


# --- the sets of other images -------------------------------------------------------------------


@dataclass
class OODSet:
    """A set of images that are not garments.

    Attributes:
        name: Its name in the report (``mnist``, ``digits``...).
        images: uint8 ``(N, 28, 28)``, light on black.
        source: Where the images came from, in words.
    """

    name: str
    images: Tensor
    source: str


def digits_images() -> Tensor:
    """scikit-learn's bundled 1,797 handwritten digits (8x8, 0-16), upscaled to uint8 ``(N, 28, 28)``.

    Raises:
        ConfigError: If scikit-learn, an optional extra, is not installed.
    """
    try:
        from sklearn.datasets import load_digits  # the optional extra: imported only when the digits are wanted
    except ImportError as err:
        raise ConfigError(
            "the digits OOD set needs scikit-learn: pip install 'fmnist_lightning[robustness]' (or scikit-learn)."
        ) from err
    small = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), ink high
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    return (big / 16 * 255).round().clamp(0, 255).to(torch.uint8).squeeze(1)


def uniform_noise_images(n: int = NOISE_IMAGES, seed: int = 0) -> Tensor:
    """``n`` images of independent uniform pixels 0-255, uint8 ``(n, 28, 28)``, the same for the same seed."""
    return torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def folder_images(path: str | Path) -> Tensor:
    """The user's images in ``path`` (a file or a folder, searched recursively), as ``predict`` reads them.

    Each is brought to the Fashion-MNIST layout (:func:`fmnist_lightning.images.read_image`); a file that
    cannot be read is named in a warning and left out.

    Raises:
        DataError: If ``path`` does not exist, holds no file, or no file in it is a readable image.
    """
    dataset = ImageFilesDataset(path)
    images, _, files = dataset.__getitems__(range(len(dataset)))
    if not files:
        raise DataError(f"none of the files under {path} could be read as an image (each is named above).")
    return images


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Torchvision's downloads open URLs without a timeout: give them one, for this block only."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def torchvision_images(name: str, root: str | Path, download: bool = True, timeout: float = DOWNLOAD_TIMEOUT) -> Tensor:
    """The 10k test images of torchvision's MNIST or KMNIST under ``root``, downloaded there if asked.

    A failed download removes the folders it made.

    Raises:
        DataError: If the set is not under ``root`` and cannot be downloaded (the reason in one line).
    """
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "kmnist": datasets.KMNIST}[name]
    try:
        return cls(str(root), train=False, download=False).data.clone()
    except RuntimeError:  # "Dataset not found"
        if not download:
            raise DataError(f"{name}: not in {root} and downloads are off") from None
    folder = Path(root) / cls.__name__
    made = [p for p in (folder / "raw", folder, Path(root)) if not p.exists()]
    try:
        with _socket_timeout(timeout), warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            return cls(str(root), train=False, download=True).data.clone()
    except Exception as err:  # network errors come in many types (URLError, timeouts, RuntimeError of the mirrors)
        for path in made:  # innermost first
            if path == folder:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise DataError(f"{name}: not in {root} and the download failed ({reason})") from err


#: The sets :func:`ood_sets` knows, in report order (``folder`` is the user's ``ood_dir``).
OOD_SETS = ("mnist", "kmnist", "digits", "uniform_noise", "folder")


def ood_sets(
    names: tuple[str, ...] = OOD_SETS,
    data_dir: str | Path = "data",
    folder: str | Path | None = None,
    download: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT,
    noise_images: int = NOISE_IMAGES,
) -> tuple[list[OODSet], list[str]]:
    """Load the other image sets: those that cannot be had (no download, no scikit-learn) are skipped with a note.

    Args:
        names: Which sets (of :data:`OOD_SETS`); ``folder`` is used only with ``folder`` given.
        data_dir: Where torchvision keeps MNIST and KMNIST (the data module's ``data_dir``).
        folder: The user's images (a folder or a file).
        download: Try to download MNIST and KMNIST when they are not in ``data_dir``.
        timeout: Seconds a download may wait for the network.
        noise_images: Images of uniform noise.

    Returns:
        The sets, and one line for each set skipped.

    Raises:
        DataError: For a ``folder`` that is missing, empty or holds no readable image (the user asked for it).
        ConfigError: For an unknown set name.
    """
    unknown = [n for n in names if n not in OOD_SETS]
    if unknown:
        raise ConfigError(f"unknown OOD set {', '.join(map(repr, unknown))}: choose from {', '.join(OOD_SETS)}.")
    sets, notes = [], []
    for name in names:
        if name in ("mnist", "kmnist"):
            try:
                sets.append(OODSet(name, torchvision_images(name, data_dir, download, timeout), f"torchvision {name}"))
            except DataError as err:
                notes.append(f"{err}; skipped.")
        elif name == "digits":
            try:
                sets.append(OODSet(name, digits_images(), "scikit-learn load_digits, 8x8 upscaled"))
            except ConfigError as err:  # an optional extra: the rest of the report does not need it
                notes.append(f"digits: {err} Skipped.")
        elif name == "uniform_noise":
            sets.append(OODSet(name, uniform_noise_images(noise_images), "uniform pixels 0-255, seed 0"))
        elif folder is not None:
            sets.append(OODSet("folder", folder_images(folder), str(folder)))
    return sets, notes


def score_histograms(in_scores: Mapping[str, Tensor], out_scores: Mapping[str, Mapping[str, Tensor]]) -> Figure:
    """One panel per score: the histogram of the garments' scores and of each other set's.

    Args:
        in_scores: Score name -> the Fashion-MNIST test images' scores.
        out_scores: Set name -> score name -> its images' scores.
    """
    fig = Figure(figsize=(6 * len(in_scores), 4.2), layout="constrained")
    axes = fig.subplots(1, len(in_scores), squeeze=False)[0]
    for ax, (score, ins) in zip(axes, in_scores.items(), strict=True):
        everything = torch.cat([ins, *(s[score] for s in out_scores.values())]).float()
        low, high = float(everything.min()), float(everything.max())
        bins = torch.linspace(low, high if high > low else low + 1, 51).tolist()
        ax.hist(ins.float().numpy(), bins=bins, density=True, alpha=0.5, label="Fashion-MNIST test (in)")
        for name, scores in out_scores.items():
            ax.hist(scores[score].float().numpy(), bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
        ax.set_xlabel({"msp": "maximum softmax probability", "energy": "energy score (logsumexp of the logits)"}[score])
        ax.set_ylabel("density")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return fig
