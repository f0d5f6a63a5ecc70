"""The user's own images: reading, bringing each to the Fashion-MNIST distribution, streaming a folder.

Fashion-MNIST images are 28x28 grey, a light garment on a black (0) background, trimmed to the
garment, scaled and centred on its bounding box, with the brightest pixel at (or near) 255. A photo
is usually none of these: colour, any size, often a dark garment on a light background, off-centre.
:func:`preprocess_image` maps one to the other:

1. grey (ITU-R 601 luma); transparent pixels are composited on the background that contrasts with
   the garment (white under a dark garment, black under a light one), so a cut-out works either way;
2. the background level is read from the border pixels (their median); a light background is
   inverted, so the garment comes out light on dark, then the background level is subtracted;
3. what lies within two (robust) standard deviations of the background becomes 0; the garment's
   bounding box is found above a further two standard deviations and, on photo-sized images, after
   a 3x3 median filter, above 10% of the peak and without small blobs away from the garment, so
   specks, dust and JPEG ringing do not widen it;
4. the box is scaled (Lanczos, aspect ratio kept) so its longer side is ``fit_size`` pixels (28 by
   default, as in Fashion-MNIST; see :data:`FIT_SIZE`), centred on a 28x28 black canvas by its
   bounding box (as Fashion-MNIST, not by its centre of mass as MNIST), and stretched so its
   brightest pixel is 255.

:class:`ImageFilesDataset` streams a folder (recursively, sorted) or one file through a
``DataLoader``: a batch is decoded when it is asked for, so a folder of any size never sits in memory,
and a file that cannot be read is reported (:class:`UnreadableImageWarning`, naming it) and skipped.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from scipy.ndimage import find_objects, label, median_filter
from torch import Tensor
from torch.utils.data import Dataset

from fmnist_lightning.errors import ConfigError, DataError

#: Side of the network's square input.
IMAGE_SIZE = 28
#: Longer side of the garment's bounding box inside the 28x28 frame. Fashion-MNIST's own garments
#: span the whole frame on their longer side (28 pixels in 98% of the test images, 27 in the rest; its
#: preparation resized the longer edge to 28), unlike MNIST's digits, which fit a 20x20 box. A network
#: trained on Fashion-MNIST expects 28: a fast.yaml model (2 epochs) scored 92.1% on 2,000 test images
#: as they are, 92.0% on the same images through this preprocessing with 28, and 60.8% with 20.
FIT_SIZE = 28
#: Photos are reduced to at most this many pixels on their longer side before the garment is
#: searched: the garment ends up 28 pixels wide or less, and this bounds the time and memory per image
#: (JPEGs are even decoded at a reduced scale; other formats are decoded whole, then reduced).
WORK_SIZE = 512
# Modes Pillow cannot turn into 8-bit grey without clipping: 16/32-bit integers and floats.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# ITU-R 601-2 luma, as Pillow's own RGB -> L conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class UnreadableImageWarning(UserWarning):
    """A file under the predicted path is not an image that can be read; it was skipped."""


def list_image_files(path: str | Path) -> list[Path]:
    """Every file to try as an image: ``path`` itself, or the files under it, recursively and sorted.

    Files and folders whose name starts with a dot (``.DS_Store``, ``.git``, macOS ``._`` resource
    files) are left out: they are the operating system's or a tool's, never the user's photos. Every
    other file is listed whatever its suffix; one that is not an image is reported when read.

    Raises:
        DataError: If ``path`` does not exist, or is a folder with no file in it.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path} does not exist: give an image file or a folder of images.")
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(n.startswith(".") for n in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} holds no files: put the images to predict in it (sub-folders are searched too).")
    return files


def _alpha_to_grey(image: Image.Image) -> np.ndarray:
    """Grey ``(H, W)`` of an image with transparency, composited on the background that suits it."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    grey, alpha = rgba[..., :3] @ _LUMA, rgba[..., 3] / 255
    if not alpha.any():  # fully transparent: nothing to see
        return np.zeros(grey.shape, dtype=np.float32)
    key = image.info.get("transparency")
    if isinstance(key, int | tuple) and not alpha.all():
        # One colour keyed out (GIF, 8-bit PNG): the pixels around the garment were drawn on that
        # colour (anti-aliased edges are blends with it), so the image as drawn is the right picture,
        # unless the garment itself is about as light as the key.
        key_grey, garment_grey = float(np.median(grey[alpha == 0])), float(np.median(grey[alpha > 0]))
        if abs(key_grey - garment_grey) >= 32:
            return grey
    # A real alpha channel (a cut-out): a dark garment vanishes on black and a light one on white, so
    # pick the other one; the light-background inversion then handles white as for any photo.
    garment = float((grey * alpha).sum() / alpha.sum())
    background = 255.0 if garment < 127.5 else 0.0
    return grey * alpha + background * (1 - alpha)


def image_to_grey(image: Image.Image) -> np.ndarray:
    """Turn a Pillow image of any mode into grey float32 ``(H, W)`` in [0, 255].

    Grey, RGB, palette and bilevel images use Pillow's luma; 16-bit and float images are scaled into
    [0, 255] rather than clipped; images with transparency are composited (see the module docstring).
    """
    if image.mode in _WIDE_MODES:
        grey = np.asarray(image, dtype=np.float32)
        peak = float(grey.max()) if grey.size else 0.0
        scale = 255.0 if image.mode == "F" and peak <= 1 else 255 / 65535 if peak > 255 else 1.0
        return np.clip(grey * scale, 0, 255)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _alpha_to_grey(image)
    if image.mode not in ("1", "L", "P", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV: through RGB, which Pillow converts to L
    return np.asarray(image.convert("L"), dtype=np.float32)


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """Drop small blobs away from the garment: dust, a JPEG-smeared speck, a stain on the background.

    The median filter removes single specks, not those JPEG has smeared over a block. The garment is
    the blobs of at least 2% of the largest one's area; a smaller blob is kept only if it reaches
    into their box widened by 5% of the image's size, as the detached bits of a garment (a hem's
    fringe, a strap's end) do.
    """
    labels, count = label(mask)
    if count <= 1:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    large = areas >= 0.02 * areas.max()
    core = np.isin(labels, np.flatnonzero(large) + 1)
    rows, cols = np.flatnonzero(core.any(axis=1)), np.flatnonzero(core.any(axis=0))
    margin = max(1, round(0.05 * max(mask.shape)))
    top, bottom, left, right = rows[0] - margin, rows[-1] + margin, cols[0] - margin, cols[-1] + margin
    keep = [
        i + 1
        for i, box in enumerate(find_objects(labels))
        if large[i] or (box[0].start <= bottom and box[0].stop > top and box[1].start <= right and box[1].stop > left)
    ]
    return np.isin(labels, keep)


def _check_fit_size(fit_size: int) -> None:
    if not 1 <= fit_size <= IMAGE_SIZE:
        raise ConfigError(f"fit_size must be in [1, {IMAGE_SIZE}] pixels, got {fit_size}.")


def _fit(grey: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a float ``(H, W)`` array to ``size`` (width, height) with Pillow's 32-bit float mode."""
    return np.asarray(Image.fromarray(grey.astype(np.float32)).resize(size, resample), dtype=np.float32)


def preprocess_grey(grey: np.ndarray, fit_size: int = FIT_SIZE) -> np.ndarray:
    """Bring a grey image to the Fashion-MNIST layout (steps 2-4 of the module docstring).

    Args:
        grey: Grey image ``(H, W)`` in [0, 255].
        fit_size: Longer side of the garment's box in the 28x28 result, 1 to 28.

    Returns:
        uint8 ``(28, 28)``: a light garment on a 0 background, centred. An image with nothing on its
        background (blank) gives all zeros.

    Raises:
        ConfigError: If ``fit_size`` is out of range.
    """
    _check_fit_size(fit_size)
    h, w = grey.shape
    if max(h, w) > WORK_SIZE:
        scale = WORK_SIZE / max(h, w)
        grey = _fit(grey, (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
        h, w = grey.shape
    # The outer 2% of each side (at least one pixel) is taken to be background.
    b = max(1, round(0.02 * min(h, w)))
    border = np.concatenate([grey[:b].ravel(), grey[-b:].ravel(), grey[:, :b].ravel(), grey[:, -b:].ravel()])
    background = float(np.median(border))
    if background > 127.5:  # a garment photographed on paper, a wall, a white product background
        grey, border, background = 255 - grey, 255 - border, 255 - background
    # Robust noise of the background (MAD scaled to a std): sensor noise, JPEG blocks, paper texture.
    # What lies within 2 sigma of the background level becomes 0, as Fashion-MNIST's background is.
    noise = 1.4826 * float(np.median(np.abs(border - background)))
    x = np.clip(grey - (background + 2 * noise), 0, None)
    photo = min(h, w) >= 2 * IMAGE_SIZE
    # On a photo-sized image, a lone speck or a JPEG artefact is a few pixels: the median removes it
    # from the box search, and the box holds what is above 10% of the peak. A small image is taken
    # as it is: a dataset image's faint 1-pixel fringe is part of its box (cutting it would rescale
    # the garment), and its thin straps are one pixel wide.
    smooth = median_filter(x, size=3, mode="nearest") if photo else x
    peak = float(smooth.max())
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    mask = smooth > max(2 * noise, 0.1 * peak if photo else 0.0)
    if photo:
        mask = _without_specks(mask)
    if not mask.any():  # a blank image, or nothing above the background's noise
        return out.astype(np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ch, cw = crop.shape
    scale = fit_size / max(ch, cw)
    nw, nh = max(1, round(cw * scale)), max(1, round(ch * scale))
    # Lanczos over the whole reduction: antialiased like Fashion-MNIST's own resize, no aliasing.
    small = np.clip(_fit(crop, (nw, nh), Image.Resampling.LANCZOS), 0, None)
    # Centred by the bounding box (Fashion-MNIST's way), not by the centre of mass (MNIST's).
    top, left = (IMAGE_SIZE - nh) // 2, (IMAGE_SIZE - nw) // 2
    out[top : top + nh, left : left + nw] = small
    top_value = float(out.max())
    if top_value > 0:
        out *= 255 / top_value  # Fashion-MNIST garments reach 255 (over 90% of the images)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess_image(image: Image.Image, fit_size: int = FIT_SIZE) -> Tensor:
    """Bring a Pillow image of any size and mode to the Fashion-MNIST layout.

    Args:
        image: The image (the first frame of an animation is used).
        fit_size: Longer side of the garment's box in the 28x28 result.

    Returns:
        uint8 ``(28, 28)``, ready for the data module's normalisation.
    """
    factor = max(image.size) // WORK_SIZE
    if factor >= 2 and image.mode not in ("1", "P") and not image.mode.startswith("I;16"):
        # Box-average by a whole factor first (Pillow's reduce, alpha-aware): a large photo never
        # becomes a full-size float array, so memory and time stay those of a WORK_SIZE image.
        image = image.reduce(factor)
    return torch.from_numpy(preprocess_grey(image_to_grey(image), fit_size))


def read_image(path: str | Path, fit_size: int = FIT_SIZE) -> Tensor:
    """Read one image file and preprocess it (see :func:`preprocess_image`).

    Large JPEGs are decoded at a reduced scale (Pillow's ``draft``), and the EXIF orientation of
    phone photos is applied.

    Returns:
        uint8 ``(28, 28)``.

    Raises:
        DataError: If the file is missing, not an image Pillow can read, or damaged.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (WORK_SIZE, WORK_SIZE))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
            image.load()
            image = ImageOps.exif_transpose(image)
    # Pillow raises assorted errors for what is not an image or is damaged (UnidentifiedImageError,
    # OSError for a truncated file, SyntaxError or ValueError from some plugins, DecompressionBombError).
    except Exception as err:
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: {err})") from err
    return preprocess_image(image, fit_size)


class ImageFilesDataset(Dataset):
    """The user's images: a folder (recursively, sorted by path) or a single file, read on demand.

    Only the file list is kept; images are decoded when a batch asks for them (in the DataLoader's
    workers when it has some), so memory does not grow with the folder. Batches have the layout of
    the data module's predict batches: ``(images uint8 (B, 28, 28), None, files)``, where ``None``
    stands for the unknown labels and ``files`` is the path of each image. A file that cannot be read
    is left out of its batch with an :class:`UnreadableImageWarning` naming it.

    Args:
        path: An image file, or a folder searched recursively (see :func:`list_image_files`).
        fit_size: Longer side of the garment's box in the 28x28 images.

    Raises:
        DataError: If ``path`` does not exist or holds no file.
    """

    def __init__(self, path: str | Path, fit_size: int = FIT_SIZE) -> None:
        _check_fit_size(fit_size)
        self.root = Path(path)
        self.files = list_image_files(self.root)
        self.fit_size = fit_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        """The preprocessed image ``(28, 28)`` of file ``index``; raises DataError if unreadable."""
        return read_image(self.files[index], self.fit_size)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, None, list[str]]:
        """One batch, without the files that cannot be read (each reported by a warning)."""
        images, files = [], []
        for i in indices:
            try:
                images.append(self[i])
            except DataError as err:
                warnings.warn(f"{err}; skipped", UnreadableImageWarning, stacklevel=2)
                continue
            files.append(str(self.files[i]))
        # A batch whose every file failed is empty rather than missing: the loader's length holds.
        batch = torch.stack(images) if images else torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        return batch, None, files


def compose_photo(
    garment: np.ndarray | Tensor,
    canvas: tuple[int, int] = (400, 300),
    scale: int = 8,
    at: tuple[int, int] = (30, 20),
    background: tuple[int, int, int] = (245, 240, 225),
    ink: tuple[int, int, int] = (60, 20, 20),
    noise: float = 0.0,
    seed: int = 0,
) -> Image.Image:
    """A "photo" made from a Fashion-MNIST image, to try the preprocessing without a camera.

    The garment is upscaled ``scale`` times (bicubic) and its intensity used as the opacity of
    ``ink`` over ``background``: by default a dark red garment on off-white paper, the inverse of the
    dataset's light garment on black.

    Args:
        garment: uint8 ``(28, 28)``, e.g. a test image.
        canvas: Photo size (width, height) in pixels.
        scale: Upscaling factor of the garment (it covers ``28 * scale`` pixels square).
        at: Position (x, y) of the garment's top-left corner; it must fit in the canvas.
        background: RGB colour of the background.
        ink: RGB colour of the garment.
        noise: Standard deviation of Gaussian sensor noise, in grey levels.
        seed: Seed of the noise.

    Returns:
        An RGB image.
    """
    size = IMAGE_SIZE * scale
    if at[0] + size > canvas[0] or at[1] + size > canvas[1]:
        raise ConfigError(f"a garment of {size} pixels at {at} does not fit a {canvas[0]}x{canvas[1]} canvas.")
    small = Image.fromarray(np.asarray(garment, dtype=np.uint8))
    opacity = np.zeros((canvas[1], canvas[0], 1), np.float32)
    big = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    opacity[at[1] : at[1] + size, at[0] : at[0] + size, 0] = big
    rgb = np.array(background, np.float32) * (1 - opacity) + np.array(ink, np.float32) * opacity
    if noise:
        rgb += np.random.default_rng(seed).normal(0, noise, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def top_k(probs: Tensor, class_names: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable classes of each row of ``probs`` ``(N, C)``, as (name, probability)."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(class_names[i], float(v)) for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
    ]
