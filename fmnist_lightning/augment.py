"""Batched image augmentation on tensors, with independent random parameters for every image.

torchvision's v2 transforms draw one set of parameters per call, so applied to a batch they crop,
flip and rotate every image the same way; applied per image they cost a Python call per image. Here
each operation is a handful of tensor ops over the whole batch on its own device: crop-with-padding,
flip and rotation are one affine ``grid_sample``, random erasing is one masked fill.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchAugment(nn.Module):
    """Train-time augmentation of a float batch ``(B, C, H, W)`` in ``[0, 1]``.

    Every image gets its own shift, flip, angle and erasing box. Pixels that move in from outside
    the image are 0 (black), as with torchvision's ``RandomCrop(padding=...)``.

    Args:
        crop_padding: Random crop after zero-padding by this many pixels, i.e. a random integer
            shift of up to ``crop_padding`` pixels in each direction (0 disables it).
        hflip_prob: Probability of a horizontal flip (0 disables it).
        rotation_degrees: Rotate by an angle drawn uniformly from ``[-d, d]`` degrees (0 disables it).
        erasing_prob: Probability of random erasing (a box of 2-33% of the area, aspect ratio 0.3-3.3,
            set to 0), as torchvision's ``RandomErasing`` defaults (0 disables it).
    """

    def __init__(
        self,
        crop_padding: int = 2,
        hflip_prob: float = 0.5,
        rotation_degrees: float = 0.0,
        erasing_prob: float = 0.0,
    ) -> None:
        super().__init__()
        self.crop_padding = crop_padding
        self.hflip_prob = hflip_prob
        self.rotation_degrees = rotation_degrees
        self.erasing_prob = erasing_prob

    @property
    def enabled(self) -> bool:
        """Whether any operation is switched on."""
        return bool(self.crop_padding or self.hflip_prob or self.rotation_degrees or self.erasing_prob)

    def forward(self, images: Tensor) -> Tensor:
        """Augment ``images`` (B, C, H, W); returns a new tensor of the same shape and dtype."""
        if self.crop_padding or self.rotation_degrees:
            images = self._affine(images)
        elif self.hflip_prob:
            images = self._flip(images)
        if self.erasing_prob:
            images = self._erase(images)
        return images

    def _affine(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device
        angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(self.rotation_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # x-scale -1 mirrors the sampling grid, i.e. flips the image horizontally.
        flip = torch.where(torch.rand(b, device=dev) < self.hflip_prob, -1.0, 1.0)
        # Integer shifts in pixels, converted to grid_sample's [-1, 1] units (2 / size per pixel).
        p = self.crop_padding
        shift = torch.randint(-p, p + 1, (b, 2), device=dev).float()
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0] * 2 / w], dim=1),
                torch.stack([sin * flip, cos, shift[:, 1] * 2 / h], dim=1),
            ],
            dim=1,
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Integer shifts and flips land exactly on pixel centres: nearest is exact and cheaper.
        mode = "bilinear" if self.rotation_degrees else "nearest"
        return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="zeros", align_corners=False)

    def _flip(self, images: Tensor) -> Tensor:
        # Flips alone: a select between the batch and its mirror, exactly what the affine path gives for
        # them, without its grid (a batched matrix product and a grid_sample, about 1 ms a batch of 256 on CPU).
        flip = torch.rand(images.shape[0], device=images.device) < self.hflip_prob
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)

    def _erase(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device
        area = torch.empty(b, device=dev).uniform_(0.02, 0.33) * h * w
        log_ratio = torch.empty(b, device=dev).uniform_(math.log(0.3), math.log(3.3))
        ratio = torch.exp(log_ratio)
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
        left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
        apply = torch.rand(b, device=dev) < self.erasing_prob
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = (
            (rows >= top.view(b, 1, 1))
            & (rows < (top + eh).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1))
            & (cols < (left + ew).view(b, 1, 1))
            & apply.view(b, 1, 1)
        )  # (B, H, W)
        return images.masked_fill(box.unsqueeze(1), 0.0)


def translate(images: Tensor, dy: int, dx: int) -> Tensor:
    """Shift a batch ``(B, C, H, W)`` by ``dy`` rows and ``dx`` columns, the edge pixels repeated into the gap.

    Repeating the edge fills the gap with the background (Fashion-MNIST's garments are centred on
    it) whatever normalisation the images have had.
    """
    h, w = images.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(images, (p, p, p, p), mode="replicate")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(images: Tensor, flip: bool = False, shift: int = 0) -> list[tuple[Tensor, float]]:
    """Test-time augmentation: the views of a batch, each with its weight (they sum to 1).

    With ``flip``, each image and its mirror; with ``shift`` (pixels), each of those also translated
    by ``(shift, shift)`` and ``(-shift, -shift)``, as airbench's test-time augmentation: the
    untranslated views weigh 1/2 together, each translated pair 1/4. Views are kept apart (not one
    batch): a network's batch of ``eval_batch_size`` stays the size that was measured fastest.
    """
    views = [images, images.flip(-1)] if flip else [images]
    weighted = [(v, 1.0 / len(views)) for v in views]
    if shift:
        moved = [translate(v, d, d) for d in (shift, -shift) for v in views]
        weighted = [(v, w / 2) for v, w in weighted] + [(v, 1 / (2 * len(moved))) for v in moved]
    return weighted
