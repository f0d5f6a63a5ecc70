"""Plain conv-(BN)-ReLU-(pool) stacks with a fully connected head: the CNNs of studies 001, 003, 004.

One builder, :class:`ConvNet`; the studies' networks are presets of it, one line of data each in
:data:`PRESETS` (``ConvNet(preset="FashionCNN")``, or ``preset: FashionCNN`` in a config), and every
variant the studies tried is an argument on top (``ConvNet(preset="FashionCNN", dropout=0.0)``):

- ``FashionCNN`` (study 001): conv3x3 32/64/128 with BN, pooling after the first two, FC 6272->256,
  dropout 0.25: 1,701,578 parameters. Study 001 reports 89.95% test (augmentation + dropout),
  90.80% without dropout and 92.71% without augmentation (its model selection used the test set).
- ``FashionCNNShallow`` (study 001's alternative): two 5x5 convs 16->32 with BN, FC 1568->256:
  417,578 parameters; reported 88.31%.
- ``Network1`` (study 003): unpadded 5x5 convs 1->8->12, FC 192->120->60->40->10, dropout 0.25:
  35,890 parameters.
- ``Network2`` (study 003): conv3x3 1->4 + BN, conv5x5 4->16 + BN, FC 784->392->10, dropout 0.5:
  313,346 parameters; reported ~90.4% test.
- ``LightweightCNN`` (study 004): conv3x3 16 and 32, ReLU with He initialisation, max-pool, dense
  1568->10: exactly 20,490 parameters; reported 90.44% test.
"""

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

#: The studies' networks as data: each entry overrides ConvNet's defaults (study 001's FashionCNN).
PRESETS: dict[str, dict[str, Any]] = {
    "FashionCNN": {},
    "FashionCNNShallow": {"widths": (16, 32), "kernel_sizes": (5, 5), "pools": (True, True)},
    "Network1": {"widths": (8, 12), "kernel_sizes": (5, 5), "pools": (True, True), "same_padding": False,
                 "batch_norm": False, "hidden": (120, 60, 40)},
    "Network2": {"widths": (4, 16), "kernel_sizes": (3, 5), "pools": (True, True), "hidden": (392,), "dropout": 0.5},
    "LightweightCNN": {"widths": (16, 32), "kernel_sizes": (3, 3), "pools": (True, True), "batch_norm": False,
                       "hidden": (), "dropout": 0.0, "he_init": True},
}  # fmt: skip
#: Parameter counts of the presets (checked by the tests; shown on the docs' Model zoo page).
PRESET_PARAMETERS = {
    "FashionCNN": 1_701_578,
    "FashionCNNShallow": 417_578,
    "Network1": 35_890,
    "Network2": 313_346,
    "LightweightCNN": 20_490,
}
Preset = Literal["FashionCNN", "FashionCNNShallow", "Network1", "Network2", "LightweightCNN"]


class ConvNet(nn.Module):
    """A stack of conv layers, each conv -> [BN] -> ReLU -> [2x2 max-pool], then an MLP head.

    Its defaults are study 001's FashionCNN: 1,701,578 parameters. An argument left at None takes
    the preset's value, or the default below when the preset does not set it.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        preset: One of the studies' networks (:data:`PRESETS`), or None for the plain defaults.
        widths: Output channels of each conv layer (default ``(32, 64, 128)``).
        kernel_sizes: Kernel size of each conv layer, one value per layer (default ``(3, 3, 3)``).
        pools: Whether each conv layer is followed by a 2x2 max-pool (default ``(True, True, False)``).
        same_padding: Pad each conv by ``k // 2`` to keep the size; False means no padding (as
            study 003's Network1). Default True.
        batch_norm: Batch normalisation after each conv (default True).
        hidden: Widths of the hidden fully connected layers, each Linear -> ReLU (default ``(256,)``).
        dropout: Dropout probability before the fully connected layer that follows the first
            hidden layer (where the studies put it); with no hidden layer, before the classifier
            (default 0.25).
        he_init: Kaiming-normal initialisation of conv and linear weights, as study 004 (default False).
        image_size: Height (= width) of the square input images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        preset: Preset | None = None,
        widths: Sequence[int] | None = None,
        kernel_sizes: Sequence[int] | None = None,
        pools: Sequence[bool] | None = None,
        same_padding: bool | None = None,
        batch_norm: bool | None = None,
        hidden: Sequence[int] | None = None,
        dropout: float | None = None,
        he_init: bool | None = None,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        # Explicit arguments beat the preset, which beats the builder's defaults.
        given = {k: v for k, v in locals().items() if k in _BUILDER_DEFAULTS and v is not None}
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown ConvNet preset {preset!r}; choose one of {', '.join(PRESETS)}")
        args = {**_BUILDER_DEFAULTS, **PRESETS.get(preset or "FashionCNN", {}), **given}
        widths, kernel_sizes, pools = args["widths"], args["kernel_sizes"], args["pools"]
        same_padding, batch_norm, hidden = args["same_padding"], args["batch_norm"], args["hidden"]
        dropout, he_init = args["dropout"], args["he_init"]
        self.name = preset or "ConvNet"
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


_BUILDER_DEFAULTS: dict[str, Any] = {
    "widths": (32, 64, 128),
    "kernel_sizes": (3, 3, 3),
    "pools": (True, True, False),
    "same_padding": True,
    "batch_norm": True,
    "hidden": (256,),
    "dropout": 0.25,
    "he_init": False,
}
