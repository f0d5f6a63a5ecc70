"""TinyVGG: stacked conv-conv-pool blocks followed by dropout and a linear classifier.

Source: study 000 (TinyVGG, 3x3 conv + BN + ReLU, widths 32 -> 64 -> 128, dropout; "easily exceeds
90%"). The package's recipe ``configs/tinyvgg.yaml`` reaches the figure given on the docs' Model zoo page.
"""

from collections.abc import Sequence

from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, convs: int, batch_norm: bool) -> nn.Sequential:
    """Build ``convs`` times (conv3x3 [-> BN] -> ReLU), then a 2x2 max-pool.

    Args:
        in_channels: Channels entering the block.
        out_channels: Channels of every convolution in the block.
        convs: Number of 3x3 convolutions in the block.
        batch_norm: Whether each convolution is followed by batch normalisation.

    Returns:
        The block; it halves the spatial size (floor), e.g. ``(B, 32, 28, 28) -> (B, 64, 14, 14)``.
    """
    layers: list[nn.Module] = []
    for i in range(convs):
        # A conv followed by BN needs no bias of its own: BN's shift replaces it.
        layers.append(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=not batch_norm)
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class TinyVGG(nn.Module):
    """VGG-style network for 28x28 images: one conv-conv-pool block per entry of ``widths``.

    With the defaults (study 000's 32-64-128 with BN): 298,410 parameters. Study 002's wide variant,
    ``TinyVGG(widths=(64, 128, 256), batch_norm=False, hidden=256, dropout=0)``, has 1,736,906.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        widths: Output channels of each block; each block halves the spatial size.
        convs_per_block: 3x3 convolutions in each block.
        batch_norm: Batch normalisation after every convolution.
        dropout: Dropout probability before the classifier (0 disables it).
        hidden: Width of an optional hidden fully connected layer before the classifier
            (0: the pooled features go straight to the classifier).
        global_pool: Average-pool the last feature map to 1x1 before the classifier instead of
            flattening it.
        image_size: Height (= width) of the square input images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        convs_per_block: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.3,
        hidden: int = 0,
        global_pool: bool = False,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        blocks = []
        channels, size = in_channels, image_size
        for width in widths:
            blocks.append(conv_block(channels, width, convs_per_block, batch_norm))
            channels, size = width, size // 2
        self.features = nn.Sequential(*blocks)
        # (B, C, s, s) -> (B, C * s * s), or (B, C) after global pooling.
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if global_pool else []
        features = channels if global_pool else channels * size * size
        head: list[nn.Module] = [*pool, nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            head += [nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = hidden
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, 28, 28)`` to logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))
