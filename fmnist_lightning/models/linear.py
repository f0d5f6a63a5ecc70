"""Logistic-regression baseline: one affine map from the 784 pixels to the class logits.

Source: study 000 (linear baseline, ~80-83% test accuracy) and study 001's logistic-regression
baseline. Expected here: about 84% test accuracy (see the docs' Model zoo page).
"""

from torch import Tensor, nn


class LinearClassifier(nn.Module):
    """Multinomial logistic regression on flattened images: 7,850 parameters (784 x 10 + 10).

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        image_size: Height (= width) of the square input images.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.fc(self.flatten(x))
