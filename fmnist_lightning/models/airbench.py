"""AirbenchNet: conv -> pool -> BN blocks and a global max-pool, after airbench's CIFAR-10 speed-run network.

Source: K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv:2404.00498, the
``airbench`` code): blocks of conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU whose
convolutions start as the identity (dirac init), a frozen patch-whitening first layer followed by
GELU, global max-pooling and a linear head whose logits are scaled by 1/9. Here the widths are
scaled down for 28x28 grey images on a laptop CPU (24-48-96 instead of 64-256-256). Pooling straight
after each block's first convolution means BN, the activation and the second convolution run on a
quarter of the pixels: at the same cost per image as ``configs/fast94.yaml``'s narrow TinyVGG
(16-32-64, 2 convs per block), the network is 1.5x as wide, and it learns faster per epoch (the
docs' Time to accuracy page; ``configs/fast.yaml``).
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def identity_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """conv3x3 whose first ``in_channels`` filters start as the identity (airbench's dirac init).

    The other ``out_channels - in_channels`` filters keep PyTorch's default initialisation.
    """
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)  # BN's shift replaces the bias
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


def airbench_block(in_channels: int, out_channels: int, bn_momentum: float) -> nn.Sequential:
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU: ``(B, C, H, W) -> (B, out, H // 2, W // 2)``."""
    return nn.Sequential(
        identity_conv(in_channels, out_channels),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels, momentum=bn_momentum),
        nn.GELU(),
        identity_conv(out_channels, out_channels),
        nn.BatchNorm2d(out_channels, momentum=bn_momentum),
        nn.GELU(),
    )


class AirbenchNet(nn.Module):
    """airbench's network shape for small grey images: a whitening stem, conv-pool-BN blocks, global max-pool.

    With the defaults (a 2x2 whitening stem of 8 channels, widths 24-48-96): 164,104 parameters, of
    which the stem's 40 are frozen once set from data (:meth:`init_from_batch`).

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        widths: Output channels of each block; each block halves the spatial size
            (28 -> 27 after the stem -> 13 -> 6 -> 3).
        whitening_kernel: Size of the stem's square patches, whose whitening (each eigen-direction
            of the patch covariance scaled to unit variance, and its negative) is the frozen first
            layer, ``2 * in_channels * k * k`` channels; 0: no stem, the first block sees the image.
        logit_scale: Multiplies the logits (airbench's 1/9 keeps the initial logits small).
        bn_momentum: Momentum of the BN running statistics (PyTorch's convention).
        bn_weight: Train the BN scales; ``False`` keeps them at 1 and trains only the shifts, as
            airbench does (a scale after a convolution only repeats what the filters can learn).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (24, 48, 96),
        whitening_kernel: int = 2,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.1,
        bn_weight: bool = True,
    ) -> None:
        super().__init__()
        if whitening_kernel < 0:
            raise ValueError(f"whitening_kernel must be >= 0, got {whitening_kernel}")
        self.stem: nn.Conv2d | None = None
        channels = in_channels
        if whitening_kernel:
            # (B, C, 28, 28) -> (B, 2 C k k, 29 - k, 29 - k); set from data, then frozen.
            channels = 2 * in_channels * whitening_kernel**2
            self.stem = nn.Conv2d(in_channels, channels, whitening_kernel, bias=True)
            self.stem.weight.requires_grad_(False)
        # Whether the stem has been set from data; saved with the weights, so a resumed or reloaded
        # network is never whitened again.
        self.register_buffer("stem_ready", torch.tensor(self.stem is None))
        blocks = []
        for width in widths:
            blocks.append(airbench_block(channels, width, bn_momentum))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        if not bn_weight:
            for module in self.blocks.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.requires_grad_(False)
        self.pool = nn.AdaptiveMaxPool2d(1)  # (B, C, s, s) -> (B, C, 1, 1)
        self.head = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_batch(self, images: Tensor, eps: float = 5e-4, force: bool = False) -> bool:
        """Set the stem to whiten the patches of ``images`` (normalised, ``(B, C, H, W)``), once.

        The stem's filters are the eigenvectors of the patch covariance divided by the square root
        of their eigenvalue (plus ``eps``), with their negatives, so its outputs are decorrelated and
        of unit variance; its bias stays trainable, its weights frozen.
        :class:`~fmnist_lightning.task.ClassificationTask` calls this with the first training batch of
        every fit; it does nothing when the stem is already set (a resumed run, a reloaded network)
        unless ``force``, or when there is no stem.

        Returns:
            Whether the stem was set.
        """
        if self.stem is None or (bool(self.stem_ready) and not force):
            return False
        k = self.stem.kernel_size[0]
        c = images.shape[1]
        # (B, C, H, W) -> every k x k patch as a row: (B * (H-k+1) * (W-k+1), C * k * k)
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt().unsqueeze(1)).reshape(-1, c, k, k)
        self.stem.weight.copy_(torch.cat([filters, -filters]).to(self.stem.weight))
        self.stem.bias.zero_()
        self.stem_ready.fill_(True)
        return True

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, 28, 28)`` to logits ``(B, num_classes)``."""
        if self.stem is not None:
            # GELU after the whitening, as airbench: both signs of each direction carry information.
            x = nn.functional.gelu(self.stem(x))
        return self.head(self.pool(self.blocks(x)).flatten(1)) * self.logit_scale
