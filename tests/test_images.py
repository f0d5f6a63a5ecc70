"""The user's own images: preprocessing to the Fashion-MNIST layout, streaming a folder, ``predict --data.predict_dir``.

Every image is drawn here or composed from the test set (no download): "photos" are test images
upscaled, inverted onto light and tinted backgrounds, placed off-centre on large canvases, with
noise and JPEG compression, in every mode and format the issue names.
"""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features
from torch.utils.data import DataLoader

from fmnist_lightning import images
from fmnist_lightning.cli import run
from fmnist_lightning.data import CLASS_NAMES, NORMALIZATIONS
from fmnist_lightning.errors import ConfigError, DataError
from fmnist_lightning.images import (
    FIT_SIZE,
    ImageFilesDataset,
    UnreadableImageWarning,
    compose_photo,
    list_image_files,
    preprocess_grey,
    preprocess_image,
    read_image,
)
from fmnist_lightning.inference import load_task, predict_images
from fmnist_lightning.predictions import read_predictions

from .conftest import fast_fit_args

# ---------------------------------------------------------------- helpers


def jpeg(image: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def shifted_correlation(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Best Pearson correlation of two 28x28 images over shifts of up to one pixel.

    Re-centring rounds a box's position to whole pixels, so the same garment found with a box one
    pixel wider (a faint fringe kept or not) lands half a pixel away; the shapes are what we compare.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.pad(np.asarray(b, dtype=np.float64), 1)
    return max(
        float(np.corrcoef(a.ravel(), b[dy : dy + 28, dx : dx + 28].ravel())[0, 1]) for dy in range(3) for dx in range(3)
    )


def bounding_box(image: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the non-zero pixels, inclusive."""
    mask = np.asarray(image) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def recentred(image: np.ndarray) -> np.ndarray:
    """A dataset image with its bounding box (pixels > 0) moved to the centre, as preprocessing centres it."""
    top, bottom, left, right = bounding_box(image)
    crop = image[top : bottom + 1, left : right + 1]
    out = np.zeros_like(image)
    h, w = crop.shape
    out[(28 - h) // 2 : (28 - h) // 2 + h, (28 - w) // 2 : (28 - w) // 2 + w] = crop
    return out


def reference(garment: np.ndarray) -> np.ndarray:
    """What preprocessing makes of the dataset image itself."""
    return preprocess_grey(garment.astype(np.float32))


def write_corrupt_png(path: Path, garment: np.ndarray) -> None:
    """A real PNG cut in half: Pillow reads its header, then fails on the pixels."""
    buf = io.BytesIO()
    Image.fromarray(garment).resize((200, 200)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.fixture(scope="module")
def garments(arrays: dict[str, torch.Tensor]) -> np.ndarray:
    """The first 200 test images, uint8 (200, 28, 28)."""
    return arrays["test_images"][:200].numpy()


@pytest.fixture(scope="module")
def trained(tinyvgg_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the session's TinyVGG (8-16, 30 batches) run: (its last checkpoint, its config.yaml)."""
    copy = tinyvgg_run.copy(tmp_path_factory.mktemp("trained"))
    return copy.last, copy.config


# ---------------------------------------------------------------- preprocessing


def test_a_dataset_image_comes_back_nearly_unchanged(garments):
    # A test image written as a PNG (dark background, 28x28, garment spanning 28 pixels) is already
    # in the layout: preprocessing only re-centres its box (to whole pixels).
    diffs = []
    for garment in garments:
        buf = io.BytesIO()
        Image.fromarray(garment).save(buf, "PNG")
        out = preprocess_image(Image.open(io.BytesIO(buf.getvalue()))).numpy().astype(np.float64)
        diffs.append(np.abs(out - recentred(garment)).mean())
    diffs = np.array(diffs)
    assert diffs.mean() < 0.5  # grey levels out of 255 (measured: 0.28 on 2,000 test images)
    assert np.quantile(diffs, 0.95) < 1.0


@pytest.mark.parametrize("fit_size", [20, 28])
def test_geometry_box_scaled_centred_and_background_inverted(garments, fit_size):
    # Off-centre, light-background, colour, large: the result is the garment's box, fit_size on its
    # longer side, centred, light on a black background, with the brightest pixel at 255.
    for garment in garments[:40]:
        photo = compose_photo(garment, canvas=(900, 700), scale=20, at=(300, 120))
        out = preprocess_image(photo, fit_size=fit_size).numpy()
        top, bottom, left, right = bounding_box(out)
        height, width = bottom - top + 1, right - left + 1
        assert max(height, width) == fit_size
        assert abs((top + bottom) / 2 - 13.5) <= 0.5
        assert abs((left + right) / 2 - 13.5) <= 0.5
        assert out.max() == 255
        if fit_size < 28:  # a black margin all round
            assert out[0].max() == out[-1].max() == out[:, 0].max() == out[:, -1].max() == 0
        # Aspect ratio kept (to the pixel the rounding allows).
        ref_top, ref_bottom, ref_left, ref_right = bounding_box(garment)
        ratio = (ref_bottom - ref_top + 1) / (ref_right - ref_left + 1)
        assert abs(height / width - ratio) < 0.15 * max(ratio, 1)


def test_light_background_is_inverted_and_dark_background_is_not(garments):
    garment = garments[0]
    on_white = compose_photo(garment, background=(255, 255, 255), ink=(0, 0, 0))
    on_black = compose_photo(garment, background=(0, 0, 0), ink=(255, 255, 255))
    for photo in (on_white, on_black):
        out = preprocess_image(photo).numpy()
        assert out[0, 0] == 0
        assert out.max() == 255
        assert shifted_correlation(out, reference(garment)) > 0.9


PHOTOS = {
    "light paper, dark red garment": {},
    "dark background, light garment": {"background": (10, 10, 30), "ink": (250, 200, 150)},
    "large canvas, off-centre": {"canvas": (2000, 1500), "scale": 40, "at": (800, 250)},
    "small garment in a corner": {"canvas": (600, 600), "scale": 6, "at": (420, 420)},
    "sensor noise": {"noise": 6.0},
}


@pytest.mark.parametrize("name", PHOTOS)
def test_composed_photos_come_back_as_the_dataset_image(garments, name):
    corr = [
        shifted_correlation(preprocess_image(compose_photo(g, **PHOTOS[name])), reference(g)) for g in garments[:30]
    ]
    # Measured on 100 images: mean 0.96-0.97, lowest 0.84-0.87 (narrow sandals: a 1-pixel fringe more or less).
    assert np.mean(corr) > 0.93
    assert min(corr) > 0.8


@pytest.mark.parametrize("name", ["light paper, dark red garment", "small garment in a corner"])
def test_a_trained_model_predicts_composed_photos_as_the_originals(trained, arrays, garments, name):
    # The tiny model (about 70% accurate) predicts 200 composed photos as it predicts the test images
    # themselves. Measured: agreement 0.89-0.91 and accuracy within 2 points for this model; with a
    # fast.yaml model (2 epochs, 90.5% on these images) agreement 0.94-0.95 and 90.0-91.5% on the photos.
    task, normalization = load_task(trained[0])
    mean, std = NORMALIZATIONS[normalization]
    labels = arrays["test_labels"][: len(garments)]

    def predict(batch: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(batch).unsqueeze(1).float() / 255
        with torch.no_grad():
            return task.predict_proba((x - mean) / std).argmax(dim=1)

    originals = predict([torch.from_numpy(g) for g in garments])
    photos = predict([preprocess_image(compose_photo(g, **PHOTOS[name])) for g in garments])
    assert (photos == originals).float().mean() >= 0.8
    assert (photos == labels).float().mean() >= (originals == labels).float().mean() - 0.05


def test_jpeg_artefacts_and_specks_do_not_widen_the_box(garments):
    garment = garments[3]
    photo = np.asarray(compose_photo(garment, canvas=(500, 400), at=(100, 60))).copy()
    photo[5:7, 5:7] = 0  # dust specks far from the garment, on the light background
    photo[390:392, 490:492] = 0
    out = preprocess_image(jpeg(Image.fromarray(photo), quality=40))
    assert shifted_correlation(out, reference(garment)) > 0.9
    top, bottom, left, right = bounding_box(out)
    assert max(bottom - top + 1, right - left + 1) == FIT_SIZE


def test_blank_image_gives_zeros():
    assert preprocess_image(Image.new("RGB", (50, 40), (255, 255, 255))).sum() == 0
    assert preprocess_image(Image.new("RGBA", (50, 40), (0, 0, 0, 0))).sum() == 0


def test_compose_photo_refuses_a_garment_off_the_canvas(garments):
    assert compose_photo(garments[0], canvas=(100, 60), scale=2, at=(44, 4)).size == (100, 60)
    with pytest.raises(ConfigError, match="does not fit"):
        compose_photo(garments[0], canvas=(100, 60), scale=2, at=(45, 5))


def test_fit_size_out_of_range_is_refused(garments, tmp_path):
    with pytest.raises(ConfigError, match="fit_size"):
        preprocess_grey(garments[0].astype(np.float32), fit_size=29)
    with pytest.raises(ConfigError, match="fit_size"):
        ImageFilesDataset(tmp_path, fit_size=0)


# ---------------------------------------------------------------- modes and formats


def _rgba_cutout(garment: np.ndarray, rgb: tuple[int, int, int]) -> Image.Image:
    """A garment in one colour whose opacity is its intensity; the transparent pixels hold garbage."""
    big = np.asarray(Image.fromarray(garment).resize((112, 112), Image.Resampling.BICUBIC))
    out = np.random.default_rng(1).integers(0, 256, (112, 112, 4), dtype=np.uint8)
    out[..., :3] = np.where(big[..., None] > 0, np.array(rgb, np.uint8), out[..., :3])
    out[..., 3] = big
    return Image.fromarray(out)


def _palette_with_transparency(garment: np.ndarray) -> Image.Image:
    photo = compose_photo(garment, canvas=(150, 150), scale=4, at=(20, 10)).quantize(32)
    photo.info["transparency"] = int(np.asarray(photo)[0, 0])  # the background's index
    return photo


def _sixteen_bit(garment: np.ndarray) -> Image.Image:
    light = 255 - np.asarray(Image.fromarray(garment).resize((84, 84), Image.Resampling.BICUBIC)).astype(np.uint16)
    return Image.fromarray(light * 257)  # I;16, full 0-65535 range: dark garment on white


def _two_frame_gif(garment: np.ndarray, path: Path) -> None:
    first = compose_photo(garment, canvas=(120, 120), scale=3, at=(10, 20)).convert("P")
    blank = Image.new("P", (120, 120), 0)
    first.save(path, save_all=True, append_images=[blank], duration=100, loop=0)


MAKERS = {
    "grey.png": lambda g, p: compose_photo(g).convert("L").save(p),
    "rgb.jpg": lambda g, p: compose_photo(g).save(p, quality=85),
    "rgb.bmp": lambda g, p: compose_photo(g).save(p),
    "rgb.webp": lambda g, p: compose_photo(g).save(p, quality=90),
    "first_frame.gif": lambda g, p: _two_frame_gif(g, p),
    "dark_cutout_rgba.png": lambda g, p: _rgba_cutout(g, (30, 30, 80)).save(p),
    "light_cutout_rgba.png": lambda g, p: _rgba_cutout(g, (250, 240, 200)).save(p),
    "palette_transparency.png": lambda g, p: _palette_with_transparency(g).save(p),
    "grey_alpha.png": lambda g, p: _rgba_cutout(g, (20, 20, 20)).convert("LA").save(p),
    "sixteen_bit.png": lambda g, p: _sixteen_bit(g).save(p),
    "cmyk.jpg": lambda g, p: compose_photo(g).convert("CMYK").save(p, quality=90),
    "bilevel.png": lambda g, p: compose_photo(g).convert("1").save(p),
}


@pytest.mark.parametrize("name", MAKERS)
def test_every_mode_and_format_is_read(garments, tmp_path, name):
    if name.endswith(".webp") and not features.check("webp"):
        pytest.skip("this Pillow was built without WebP")
    path = tmp_path / name
    for garment in garments[:5]:
        MAKERS[name](garment, path)
        out = read_image(path)
        assert out.shape == (28, 28)
        assert out.dtype == torch.uint8
        assert out[0, 0] == 0
        assert out.max() == 255
        # A bilevel image keeps only the garment's silhouette: the shape matches, not the shading.
        assert shifted_correlation(out, reference(garment)) > (0.7 if name == "bilevel.png" else 0.85)


def test_exif_orientation_of_phone_photos_is_applied(garments, tmp_path):
    garment = garments[0]  # an ankle boot: not symmetric under a quarter turn
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored a quarter turn anticlockwise
    compose_photo(garment).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=90)
    assert shifted_correlation(read_image(tmp_path / "phone.jpg"), reference(garment)) > 0.85


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("notes.txt", b"not an image", "UnidentifiedImageError"),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, ""),
        ("empty.jpg", b"", "UnidentifiedImageError"),
    ],
)
def test_unreadable_files_raise_a_data_error_naming_them(tmp_path, name, content, error):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{name} is not a readable image.*{error}"):
        read_image(tmp_path / name)


def test_truncated_png_is_a_data_error(garments, tmp_path):
    write_corrupt_png(tmp_path / "cut.png", garments[0])
    with pytest.raises(DataError, match=r"cut\.png is not a readable image"):
        read_image(tmp_path / "cut.png")


# ---------------------------------------------------------------- the dataset over a folder


def make_folder(root: Path, garments: np.ndarray) -> list[str]:
    """A folder of photos in sub-folders, with a truncated PNG, a text file and hidden files.

    Returns:
        The readable images' paths, sorted.
    """
    (root / "shoes" / "left").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    good = {
        "a_top.png": compose_photo(garments[1]),
        "shoes/left/boot.jpg": jpeg(compose_photo(garments[0], canvas=(800, 600), scale=20, at=(100, 20))),
        "shoes/sandal.webp": compose_photo(garments[8], background=(200, 230, 250), ink=(90, 40, 0)),
        "z_bag.bmp": compose_photo(garments[30], canvas=(300, 300), scale=5, at=(150, 150)),
    }
    for name, image in good.items():
        image.save(root / name)
    write_corrupt_png(root / "shoes" / "broken.png", garments[2])
    (root / "notes.txt").write_text("photos of my wardrobe")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    compose_photo(garments[4]).save(root / ".thumbnails" / "x.png")
    return sorted(str(root / name) for name in good)


def identity(batch):
    return batch


def test_folder_is_listed_recursively_sorted_without_hidden_files(garments, tmp_path):
    make_folder(tmp_path, garments)
    names = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert names == sorted(
        ["a_top.png", "notes.txt", "shoes/broken.png", "shoes/left/boot.jpg", "shoes/sandal.webp", "z_bag.bmp"]
    )
    assert list_image_files(tmp_path / "a_top.png") == [tmp_path / "a_top.png"]


def test_folder_batches_skip_and_name_every_unreadable_file(garments, tmp_path):
    readable = make_folder(tmp_path, garments)
    dataset = ImageFilesDataset(tmp_path)
    assert len(dataset) == 6
    with pytest.warns(UnreadableImageWarning) as record:
        batches = list(DataLoader(dataset, batch_size=4, collate_fn=identity))
    warned = sorted(str(w.message) for w in record if issubclass(w.category, UnreadableImageWarning))
    assert len(warned) == 2
    assert any("broken.png is not a readable image" in m for m in warned)
    assert any("notes.txt is not a readable image" in m for m in warned)
    files = [f for _, labels, batch_files in batches for f in batch_files]
    assert sorted(files) == readable
    assert files == [f for f in map(str, dataset.files) if f in readable]
    for images_, labels, batch_files in batches:
        assert labels is None
        assert images_.dtype == torch.uint8
        assert images_.shape == (len(batch_files), 28, 28)


def test_a_batch_with_no_readable_file_is_empty_not_missing(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.warns(UnreadableImageWarning, match="a.txt"):
        images_, labels, files = ImageFilesDataset(tmp_path).__getitems__([0])
    assert images_.shape == (0, 28, 28)
    assert labels is None
    assert files == []


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        ImageFilesDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no files"):
        ImageFilesDataset(tmp_path / "empty")


@pytest.fixture(scope="module")
def thousands(garments: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 small PNGs (test images inverted onto white, 56x56) in 10 sub-folders."""
    root = tmp_path_factory.mktemp("thousands")
    for i in range(2000):
        folder = root / f"part{i % 10}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(255 - garments[i % len(garments)]).resize((56, 56)).save(folder / f"{i:04d}.png")
    return root


def test_a_folder_is_read_batch_by_batch_never_all_at_once(thousands, monkeypatch):
    calls = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path, fit_size: calls.append(path) or real(path, fit_size))
    loader = DataLoader(ImageFilesDataset(thousands), batch_size=64, collate_fn=identity)
    assert len(loader) == 32
    first, _, files = next(iter(loader))
    assert len(calls) == 64
    assert first.shape == (64, 28, 28)
    assert files == [str(p) for p in sorted(thousands.rglob("*.png"))[:64]]


# ---------------------------------------------------------------- predict, end to end


def test_predict_images_on_thousands_of_files(trained, thousands):
    ckpt, _ = trained
    result = predict_images(ckpt, thousands, batch_size=500)
    assert len(result.files) == 2000
    assert result.files == sorted(result.files)
    assert result.probs.shape == (2000, 10)
    assert result.class_names == CLASS_NAMES
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(2000), atol=1e-5)
    assert all(label is None for label in result.labels)


def test_predict_cli_writes_user_image_predictions(tmp_path, trained, garments, monkeypatch):
    ckpt, config = trained
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    readable = make_folder(photos, garments)
    logs = tmp_path / "logs"
    # No Fashion-MNIST anywhere: predicting the user's images must not need it.
    no_data = [f"--data.system_dir={tmp_path / 'nowhere'}", "--data.download=false"]
    args = fast_fit_args(tmp_path / "no_data", logs, *no_data)
    with pytest.warns(UnreadableImageWarning) as record:
        path = run(["predict", "--config", str(config), *args, f"--ckpt_path={ckpt}", f"--data.predict_dir={photos}"])
    warned = " ".join(str(w.message) for w in record)
    assert "broken.png" in warned
    assert "notes.txt" in warned
    assert path.name == "predictions.csv"

    result = read_predictions(path)
    assert result.files == readable
    assert all(label is None for label in result.labels)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row, probs in zip(rows, result.probs, strict=True):
        top = probs.topk(3)
        assert row["pred_class"] == CLASS_NAMES[int(row["pred"])] == CLASS_NAMES[int(top.indices[0])]
        assert [row["pred_class"], row["top2_class"], row["top3_class"]] == [CLASS_NAMES[i] for i in top.indices]
        assert float(row["prob"]) >= float(row["top2_prob"]) >= float(row["top3_prob"])
        assert row["label"] == ""

    # The model's normalisation was applied by the data module, and its flip TTA by predict_step.
    task, normalization = load_task(ckpt)
    mean, std = NORMALIZATIONS[normalization]
    x = torch.stack([read_image(f) for f in readable]).unsqueeze(1).float() / 255
    with torch.no_grad():
        expected = task.predict_proba((x - mean) / std)
    assert torch.allclose(result.probs, expected, atol=2e-6)  # the CSV keeps 6 decimals

    # The library path gives the same predictions.
    library = predict_images(ckpt, photos)
    assert library.files == readable
    assert torch.allclose(library.probs, result.probs, atol=2e-6)


def test_predict_cli_on_a_single_file_and_without_predict_dir(tmp_path, trained, data_dir, garments, monkeypatch):
    ckpt, config = trained
    monkeypatch.chdir(tmp_path)
    compose_photo(garments[0]).save(tmp_path / "boot.png")
    args = ["predict", "--config", str(config), *fast_fit_args(data_dir, tmp_path / "logs"), f"--ckpt_path={ckpt}"]
    first = run([*args, f"--data.predict_dir={tmp_path / 'boot.png'}"])
    assert read_predictions(first).files == [str(tmp_path / "boot.png")]
    # Without predict_dir: the test set as before, with labels and no file names, in a new file.
    second = run(args)
    assert second != first
    assert read_predictions(first).files == [str(tmp_path / "boot.png")]  # not written over
    result = read_predictions(second)
    assert len(result.files) == 2 * 256
    assert set(result.files) == {""}
    assert result.labels[:5] == [9, 2, 1, 1, 6]  # the first test labels


def test_predict_cli_with_no_readable_image_fails_and_writes_nothing(tmp_path, trained, monkeypatch):
    ckpt, config = trained
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    (junk / "b.png").write_bytes(b"garbage")
    logs = tmp_path / "logs"
    args = ["predict", "--config", str(config), *fast_fit_args(tmp_path, logs), f"--ckpt_path={ckpt}"]
    with pytest.warns(UnreadableImageWarning), pytest.raises(SystemExit) as exit_:
        run([*args, f"--data.predict_dir={junk}"])
    assert "no image could be read" in str(exit_.value.code)
    assert str(junk) in str(exit_.value.code)
    assert not list(logs.rglob("predictions*.csv"))
    assert not list(logs.rglob("*.tmp"))
    with pytest.raises(SystemExit) as exit_:
        run([*args, f"--data.predict_dir={tmp_path / 'missing'}"])
    assert "missing does not exist" in str(exit_.value.code)
