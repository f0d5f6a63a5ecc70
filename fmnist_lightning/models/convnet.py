"""Plain conv-(BN)-ReLU-(pool) stacks with a fully connected head: the CNNs of studies 001, 003, 004.

One builder, :class:`ConvNet`; the studies' networks are its presets (subclasses that change only
defaults), so every variant the studies tried is an argument:

- ``FashionCNN`` (study 001): conv3x3 32/64/128 with BN, pooling after the first two, FC 6272->256,
  dropout 0.25. Study 001 reports 89.95% test (augmentation + dropout), 90.80% without dropout and
  92.71% without augmentation (its model selection used the test set).
- ``FashionCNNShallow`` (study 001's alternative): two 5x5 convs 16->32 with BN; reported 88.31%.
- ``Network1`` (study 003): unpadded 5x5 convs 1->8->12, FC 192->120->60->40->10, dropout 0.25.
- ``Network2`` (study 003): conv3x3 1->4 + BN, conv5x5 4->16 + BN, FC 784->392->10, dropout 0.5;
  reported ~90.4% test.
- ``LightweightCNN`` (study 004): conv3x3 16 and 32, ReLU with He initialisation, max-pool, dense
  1568->10: exactly 20,490 parameters; reported 90.44% test.
"""

from collections.abc import Sequence

from torch import Tensor, nn


class ConvNet(nn.Module):
    """A stack of conv layers, each conv -> [BN] -> ReLU -> [2x2 max-pool], then an MLP head.

    Its defaults are study 001's FashionCNN: 1,701,578 parameters.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        widths: Output channels of each conv layer.
        kernel_sizes: Kernel size of each conv layer (one value per layer).
        pools: Whether each conv layer is followed by a 2x2 max-pool.
        same_padding: Pad each conv by ``k // 2`` to keep the size; False means no padding (as
            study 003's Network1).
        batch_norm: Batch normalisation after each conv.
        hidden: Widths of the hidden fully connected layers (each Linear -> ReLU).
        dropout: Dropout probability before the fully connected layer that follows the first
            hidden layer (where the studies put it); with no hidden layer, before the classifier.
        he_init: Kaiming-normal initialisation of conv and linear weights (study 004).
        image_size: Height (= width) of the square input images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        kernel_sizes: Sequence[int] = (3, 3, 3),
        pools: Sequence[bool] = (True, True, False),
        same_padding: bool = True,
        batch_norm: bool = True,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.25,
        he_init: bool = False,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if not len(widths) == len(kernel_sizes) == len(pools):
            raise ValueError(
                f"widths, kernel_sizes and pools need one entry per layer: {widths}, {kernel_sizes}, {pools}"
            )
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width, k, pool in zip(widths, kernel_sizes, pools, strict=True):
            pad = k // 2 if same_padding else 0
            # Conv bias kept even before BN, as in the studies, so parameter counts match theirs.
            layers.append(nn.Conv2d(channels, width, k, padding=pad))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            size = size + 2 * pad - k + 1
            if pool:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * size * size  # e.g. FashionCNN: 128 * 7 * 7 = 6272
        for i, width in enumerate(hidden):
            head += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            if i == 0:
                head.append(nn.Dropout(dropout))
            features = width
        if not hidden:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        if he_init:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


class FashionCNN(ConvNet):
    """Study 001's main CNN: conv3x3 32/64/128 with BN, FC 6272->256->10: 1,701,578 parameters.

    See :class:`ConvNet` for the arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        kernel_sizes: Sequence[int] = (3, 3, 3),
        pools: Sequence[bool] = (True, True, False),
        batch_norm: bool = True,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.25,
    ) -> None:
        super().__init__(num_classes, in_channels, widths, kernel_sizes, pools, True, batch_norm, hidden, dropout)


class FashionCNNShallow(ConvNet):
    """Study 001's shallow alternative: two 5x5 convs 16->32 with BN, FC 1568->256->10: 417,578 parameters.

    See :class:`ConvNet` for the arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32),
        kernel_sizes: Sequence[int] = (5, 5),
        pools: Sequence[bool] = (True, True),
        batch_norm: bool = True,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.25,
    ) -> None:
        super().__init__(num_classes, in_channels, widths, kernel_sizes, pools, True, batch_norm, hidden, dropout)


class Network1(ConvNet):
    """Study 003's first network: unpadded 5x5 convs 1->8->12, FC 192->120->60->40->10: 35,890 parameters.

    See :class:`ConvNet` for the arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (8, 12),
        kernel_sizes: Sequence[int] = (5, 5),
        hidden: Sequence[int] = (120, 60, 40),
        dropout: float = 0.25,
    ) -> None:
        super().__init__(num_classes, in_channels, widths, kernel_sizes, (True, True), False, False, hidden, dropout)


class Network2(ConvNet):
    """Study 003's final network: conv3x3 1->4 + BN, conv5x5 4->16 + BN, FC 784->392->10: 313,346 parameters.

    See :class:`ConvNet` for the arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (4, 16),
        kernel_sizes: Sequence[int] = (3, 5),
        hidden: Sequence[int] = (392,),
        dropout: float = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels, widths, kernel_sizes, (True, True), True, True, hidden, dropout)


class LightweightCNN(ConvNet):
    """Study 004's CNN: conv3x3 16 and 32, He init, dense 1568->10: 20,490 parameters.

    See :class:`ConvNet` for the arguments.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32),
        kernel_sizes: Sequence[int] = (3, 3),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            num_classes, in_channels, widths, kernel_sizes, (True, True), True, batch_norm, (), dropout, True
        )
