"""Multi-layer perceptron on flattened pixels.

Source: study 000's Linear+ReLU variant of the linear baseline (no accuracy reported there).
"""

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected network: flatten, then (Linear -> ReLU -> Dropout) per hidden layer, then Linear.

    With the defaults (one hidden layer of 256): 203,530 parameters.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        hidden: Width of each hidden layer (empty: logistic regression).
        dropout: Dropout probability after each hidden layer.
        image_size: Height (= width) of the square input images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * image_size * image_size
        for width in hidden:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.net(x)
