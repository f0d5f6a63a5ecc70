"""Small residual networks for 28x28 images, with optional squeeze-and-excitation.

Source: study 000's suggested extension ("residual connections (ResNet) and attention mechanisms (SE
Block)"), following He et al. 2016 (basic blocks) and Hu et al. 2018 (SE). ``configs/resnet_wide.yaml``
and ``configs/resnet_se.yaml`` train it; the docs' Model zoo page gives what they reached.
"""

from collections.abc import Sequence

from torch import Tensor, nn


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool -> bottleneck MLP -> sigmoid gates per channel.

    Args:
        channels: Channels of the feature map.
        reduction: Bottleneck reduction factor.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Rescale each channel of ``x`` (B, C, H, W) by its gate (B, C, 1, 1)."""
        return x * self.gate(x)


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a residual connection (projected when the shape changes).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (2 halves the spatial size).
        se_reduction: Squeeze-and-excitation reduction factor, or 0 for no SE.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, se_reduction: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.se = SqueezeExcitation(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output, same spatial size or halved when ``stride`` is 2."""
        return self.relu(self.se(self.body(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 28x28 inputs: a conv3x3 stem, stages of basic blocks, global pooling, dropout, linear.

    With the defaults (32-64-128, two SE blocks per stage): 707,298 parameters.

    Each stage after the first halves the spatial size: with the default widths,
    ``(B, 1, 28, 28) -> (B, 32, 28, 28) -> (B, 64, 14, 14) -> (B, 128, 7, 7) -> (B, 10)``.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        widths: Channels of each stage.
        blocks: Basic blocks in each stage.
        se_reduction: Squeeze-and-excitation reduction factor in every block (0: plain ResNet).
        dropout: Dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (2, 2, 2),
        se_reduction: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths and blocks need one entry per stage: {widths}, {blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(channels, width, stride, se_reduction)]
            stage += [BasicBlock(width, width, 1, se_reduction) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero the last BN of each block so every block starts as the identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, 28, 28)`` to logits ``(B, num_classes)``."""
        return self.head(self.stages(self.stem(x)))
