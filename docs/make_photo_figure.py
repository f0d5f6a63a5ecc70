"""Draw docs/photo_predictions.png: "photos" composed from test images, and a checkpoint's top-3 for each.

    python docs/make_photo_figure.py --ckpt_path lightning_logs/tinyvgg/version_0/checkpoints/last.ckpt

Ten test images, one per class, become photos the way a phone would see them: a dark garment on
light paper, colour tints, a large canvas with the garment off-centre, a light garment on a dark
background, sensor noise and JPEG compression. They are written as files and predicted by
:func:`fmnist_lightning.images.predict_images`, the path of ``predict --data.predict_dir``. Each panel
shows the photo, the 28x28 image the network saw and the top-3 classes with their
probabilities (green when the first is right, red when not).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from fmnist_lightning.data import CLASS_NAMES, SYSTEM_DATA_DIR, load_fashion_mnist
from fmnist_lightning.images import compose_photo, predict_images, read_image, top_k
from fmnist_lightning.predictions import Predictions

#: How each photo is composed (keyword arguments of compose_photo, plus the file format).
STYLES = [
    ("light paper, dark red", {}, "png"),
    ("blue tint, beige", {"background": (230, 215, 190), "ink": (30, 50, 140)}, "jpg"),
    ("large, off-centre", {"canvas": (1600, 1200), "scale": 24, "at": (900, 300), "ink": (20, 20, 20)}, "jpg"),
    ("dark background", {"background": (25, 25, 35), "ink": (240, 220, 170)}, "png"),
    ("noise, green", {"background": (200, 235, 200), "ink": (0, 90, 30), "noise": 8.0}, "jpg"),
]


def compose_photos(images: np.ndarray, labels: np.ndarray, folder: Path) -> dict[str, tuple[int, str]]:
    """Write one photo per class (the first test image of each), styles in turn.

    Returns:
        For each file written, its true class and the style's name.
    """
    truth = {}
    for cls in range(len(CLASS_NAMES)):
        index = int(np.flatnonzero(labels == cls)[0])
        style, kwargs, suffix = STYLES[cls % len(STYLES)]
        path = folder / f"{cls:02d}_{CLASS_NAMES[cls].replace('/', '_')}.{suffix}"
        compose_photo(images[index], seed=cls, **kwargs).save(path, **({"quality": 85} if suffix == "jpg" else {}))
        truth[str(path)] = (cls, style)
    return truth


def photo_figure(predictions: Predictions, truth: dict[str, tuple[int, str]], columns: int = 5) -> Figure:
    """Each photo beside the 28x28 image the network saw, with its top-3 classes."""
    rows = -(-len(predictions.files) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    panels = fig.subfigures(rows, columns).ravel()
    tops = top_k(predictions.probs, predictions.class_names, k=3)
    for panel, file, top in zip(panels, predictions.files, tops, strict=False):
        photo_ax, input_ax = panel.subplots(1, 2, width_ratios=(4, 1.5))
        with Image.open(file) as photo:
            photo.thumbnail((400, 400))
            photo_ax.imshow(np.asarray(photo.convert("RGB")))
        input_ax.imshow(read_image(file).numpy(), cmap="gray", vmin=0, vmax=255)
        cls, style = truth[file]
        photo_ax.set_title(f"{CLASS_NAMES[cls]} ({style})", fontsize=9, loc="left")
        input_ax.set_title("28x28 input", fontsize=8)
        photo_ax.set_xlabel(
            "\n".join(f"{k}. {name} {p:.0%}" for k, (name, p) in enumerate(top, 1)),
            fontsize=9,
            color="tab:green" if top[0][0] == CLASS_NAMES[cls] else "tab:red",
            loc="left",
        )
        for ax in (photo_ax, input_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def main(argv: list[str] | None = None) -> Path:
    """Compose the photos, predict them, draw and save the figure; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`")
    parser.add_argument("--data_dir", default="data", help="where the Fashion-MNIST files are (or are staged)")
    parser.add_argument("--system_dir", default=SYSTEM_DATA_DIR)
    parser.add_argument("--output", default=str(Path(__file__).parent / "photo_predictions.png"))
    parser.add_argument("--photos_dir", help="keep the composed photos in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    arrays = load_fashion_mnist(args.data_dir, args.system_dir, download=False)
    images, labels = arrays["test_images"].numpy(), arrays["test_labels"].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.photos_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        truth = compose_photos(images, labels, folder)
        predictions = predict_images(args.ckpt_path, folder)
        fig = photo_figure(predictions, truth)
        output = Path(args.output)
        fig.savefig(output, dpi=80)  # a figure of the docs: regenerated in place
    right = sum(p == truth[f][0] for f, p in zip(predictions.files, predictions.preds, strict=True))
    print(f"{right} of {len(predictions.files)} photos right (top-1); figure: {output}")
    return output


if __name__ == "__main__":
    main()
