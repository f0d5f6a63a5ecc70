"""A corruption benchmark of the test images: twelve corruptions at five severities, made on the fly.

After Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019), who shipped CIFAR-10-C and ImageNet-C as files: here the corrupted images
are generated from the clean ones whenever they are needed, deterministically, so that nothing is
stored and every model sees exactly the same images. The corruptions are for evaluation only: the
training path (:mod:`fmnist_lightning.data`, :mod:`fmnist_lightning.augment`) never imports this module.

Every corruption works on a whole batch at once with tensor operations (torchvision's v2 functional
ops, ``grid_sample``, a grouped ``conv2d``; JPEG through ``torchvision.io``'s list codecs), with its
random draws (noise, the sign of a rotation, the direction of a blur or a shift) from a generator
seeded per (corruption, severity, seed) (:func:`corruption_seed`): the same images come out on every
call, bitwise, on the CPU. Images go in as uint8 ``(N, H, W)``/``(N, 1, H, W)`` (the data module's
layout) or float in [0, 1], and come out with the same shape, dtype and range; uint8 results are
rounded, as an 8-bit image file would store them.

The severity parameters are one table, :data:`SEVERITIES`, with their units in :data:`PARAMETERS`.
The severities were chosen on Fashion-MNIST's 28x28 garments (light on a black background): at
severity 1 a garment is plainly the same garment, at 5 a person still recognises most of them.
"""

import math
import warnings
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

from fmnist_lightning.errors import ConfigError

#: The severity parameter of every corruption, at severities 1 to 5 (units in :data:`PARAMETERS`).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "impulse_noise": (0.01, 0.03, 0.06, 0.10, 0.15),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.35, 1.75),
    "motion_blur": (3, 5, 7, 9, 11),
    "rotation": (10, 20, 30, 45, 60),
    "shear": (10, 20, 30, 40, 50),
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),
    "translation": (2, 3, 4, 5, 6),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.6, 0.45, 0.3, 0.2, 0.1),
    "inversion": (0.2, 0.4, 0.6, 0.8, 1.0),
    "jpeg": (50, 30, 15, 10, 5),
}
#: What each corruption does, and what its parameter in :data:`SEVERITIES` means.
PARAMETERS: dict[str, str] = {
    "gaussian_noise": "adds N(0, s^2) noise to every pixel; s in [0, 1] pixel units",
    "impulse_noise": "sets a fraction s of the pixels to black or white (salt and pepper, half each)",
    "gaussian_blur": "Gaussian blur of standard deviation s pixels (kernel 2 * ceil(3 s) + 1)",
    "motion_blur": "averages along a line s pixels long, at a random angle per image",
    "rotation": "rotates by s degrees about the centre, clockwise or anticlockwise at random",
    "shear": "shears horizontally by s degrees, left or right at random",
    "scale": "zooms out about the centre by the factor s (the garment shrinks, black around it)",
    "translation": "shifts by s pixels in a random direction (black comes in)",
    "brightness": "adds s to every pixel (the black background turns grey), clipped to [0, 1]",
    "contrast": "blends with the image's mean grey, keeping the fraction s of the contrast",
    "inversion": "blends with the inverted image, by the fraction s (1: fully inverted)",
    "jpeg": "JPEG compression at quality s (of 100)",
}
#: Severity levels, 1 (mild) to 5 (strong).
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)


def corruption_seed(name: str, severity: int, seed: int = 0) -> int:
    """The seed of a (corruption, severity)'s generator: a CRC-32 of the three, stable across processes.

    Python's ``hash`` of a string changes with every process; this does not, and it does not depend
    on the order of :data:`SEVERITIES` either.
    """
    return zlib.crc32(f"{name}/{severity}/{seed}".encode())


def check_corruptions(
    names: Sequence[str] | None, severities: Sequence[int] | None = None
) -> tuple[list[str], list[int]]:
    """The corruptions and severities to run (all of them for None), checked.

    Raises:
        ConfigError: For an unknown corruption name, a severity outside 1-5, or an empty or repeated list.
    """
    chosen = list(SEVERITIES) if names is None else [str(n) for n in names]
    levels = list(LEVELS) if severities is None else [int(s) for s in severities]
    unknown = [n for n in chosen if n not in SEVERITIES]
    if unknown:
        raise ConfigError(f"unknown corruption {', '.join(map(repr, unknown))}: choose from {', '.join(SEVERITIES)}.")
    bad = [s for s in levels if s not in LEVELS]
    if bad:
        raise ConfigError(f"severity {', '.join(map(str, bad))} is out of range: severities run from 1 to 5.")
    if not chosen or not levels:
        raise ConfigError("give at least one corruption and one severity (or leave them out for all).")
    if len(set(chosen)) != len(chosen) or len(set(levels)) != len(levels):
        raise ConfigError("a corruption or a severity is listed twice: list each once.")
    return chosen, levels


def _random_sign(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def _affine(x: Tensor, matrix: Tensor, shift: Tensor | None = None) -> Tensor:
    """Resample ``x`` (B, 1, H, W) at ``matrix @ p + shift`` for every output pixel p (normalised coordinates).

    One ``affine_grid`` + ``grid_sample`` for the whole batch, each image with its own (2, 2) matrix;
    pixels from outside the image are black, as the dataset's background.
    """
    b = x.shape[0]
    shift = torch.zeros(b, 2) if shift is None else shift
    theta = torch.cat([matrix, shift.unsqueeze(2)], dim=2).to(x)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_noise(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return (x + s * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)


def _impulse_noise(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    u = torch.rand(x.shape, generator=g).to(x)
    return torch.where(u < s / 2, 0.0, torch.where(u > 1 - s / 2, 1.0, x))


def _gaussian_blur(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    k = 2 * math.ceil(3 * s) + 1
    return TF.gaussian_blur(x, [k, k], [s, s])


def _motion_blur(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    """A grouped ``conv2d``: every image with its own antialiased line kernel of length ``s`` at a random angle."""
    b, c, h, w = x.shape
    length = int(s)
    k = length if length % 2 else length + 1
    angle = torch.rand(b, generator=g) * math.pi  # a line has no direction: [0, pi) covers every angle
    direction = torch.stack([angle.cos(), angle.sin()], dim=1)  # (B, 2)
    r = torch.arange(k, dtype=torch.float32) - k // 2
    points = torch.stack(torch.meshgrid(r, r, indexing="xy"), dim=-1).reshape(1, k * k, 2)  # (1, k*k, [x, y])
    # Distance of each kernel pixel to the segment of half-length (length - 1) / 2 through the centre.
    along = (points * direction[:, None]).sum(-1).clamp(-(length - 1) / 2, (length - 1) / 2)  # (B, k*k)
    dist = (points - along[..., None] * direction[:, None]).norm(dim=-1)
    kernel = (1 - dist).clamp_min(0)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).reshape(b, 1, k, k).to(x)
    # (1, B, H, W) with B groups: each image convolved with its own kernel in one call.
    out = F.conv2d(x.reshape(1, b * c, h, w), kernel.repeat_interleave(c, dim=0), padding=k // 2, groups=b * c)
    return out.reshape(b, c, h, w).clamp(0, 1)


def _rotation(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    angle = _random_sign(x.shape[0], g) * math.radians(s)
    cos, sin = angle.cos(), angle.sin()
    return _affine(x, torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1))


def _shear(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    b = x.shape[0]
    tan = _random_sign(b, g) * math.tan(math.radians(s))
    ones, zeros = torch.ones(b), torch.zeros(b)
    return _affine(x, torch.stack([torch.stack([ones, tan], 1), torch.stack([zeros, ones], 1)], 1))


def _scale(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return _affine(x, torch.eye(2).expand(x.shape[0], 2, 2) / s)


def _translation(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    b, _, h, w = x.shape
    angle = torch.rand(b, generator=g) * 2 * math.pi
    # s pixels, in grid_sample's normalised units (2 / size per pixel); sampling at p - shift moves the image by +shift.
    shift = -torch.stack([angle.cos() * s * 2 / w, angle.sin() * s * 2 / h], dim=1)
    return _affine(x, torch.eye(2).expand(b, 2, 2), shift)


def _brightness(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    # Additive, as ImageNet-C's brightness (on HSV's value): the black background lights up too, which
    # torchvision's multiplicative adjust_brightness would leave black.
    return (x + s).clamp(0, 1)


def _contrast(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return TF.adjust_contrast(x, s)  # per image: (x - mean) * s + mean


def _inversion(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    return torch.lerp(x, TF.invert(x), s)


def _jpeg(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    images = (x * 255).round().to(torch.uint8).cpu()
    with warnings.catch_warnings():
        # torchvision 0.29 announces that TorchCodec will take over its image codecs; these still work.
        warnings.filterwarnings(
            "ignore", message=".*image decoding and encoding capabilities", category=DeprecationWarning
        )
        # torchvision's list codecs loop in C++; its v2 `jpeg` would loop over the images in Python.
        decoded = decode_jpeg(encode_jpeg(list(images), quality=int(s)))
    return torch.stack(decoded).to(x.device, x.dtype) / 255


_CORRUPT: dict[str, Callable[[Tensor, float, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "rotation": _rotation,
    "shear": _shear,
    "scale": _scale,
    "translation": _translation,
    "brightness": _brightness,
    "contrast": _contrast,
    "inversion": _inversion,
    "jpeg": _jpeg,
}
assert _CORRUPT.keys() == SEVERITIES.keys() == PARAMETERS.keys()


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``images`` under corruption ``name`` at ``severity``, the same on every call (see the module docstring).

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, 1, H, W)`` with values 0-255, or float in [0, 1].
        name: A key of :data:`SEVERITIES`.
        severity: 1 (mild) to 5 (strong).
        seed: Chooses another draw of the random parameters; 0 is the benchmark's.

    Returns:
        The corrupted images: same shape, dtype and range as ``images`` (uint8 rounded).

    Raises:
        ConfigError: For an unknown corruption or a severity outside 1-5.
    """
    check_corruptions([name], [severity])
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    squeeze = images.dim() == 3
    x = images.unsqueeze(1) if squeeze else images
    x = x.float() / 255 if images.dtype == torch.uint8 else x.float()
    g = torch.Generator().manual_seed(corruption_seed(name, severity, seed))  # on the CPU: the same draws everywhere
    out = _CORRUPT[name](x, float(SEVERITIES[name][severity - 1]), g)
    if images.dtype == torch.uint8:
        out = (out * 255).round().clamp(0, 255).to(torch.uint8)
    else:
        out = out.clamp(0, 1).to(images.dtype)
    return out.squeeze(1) if squeeze else out
