"""Transfer learning: torchvision's ResNet-18 adapted to 1-channel 28x28 images.

Source: study 000's suggested extension ("load ImageNet pre-trained weights and fine-tune").
The adapter keeps ImageNet's stem kernels (summed over RGB for a grey input) but with stride 1 and
no max-pool, so a 28x28 image still reaches layer4 as a 4x4 map instead of vanishing to 1x1.
"""

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, resnet18

from fmnist_lightning.errors import ConfigError


class ResNet18Transfer(nn.Module):
    """ResNet-18 with a 1-channel, stride-1 stem and a new classifier: 11,175,370 parameters.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels (the pretrained RGB stem is summed, or averaged
            and repeated, to fit).
        weights: torchvision weights name (e.g. ``"IMAGENET1K_V1"``), loaded through torchvision's
            cache and downloaded when missing; None for random initialisation.
        weights_path: A local ``.pth`` state dict of torchvision's ResNet-18 to load instead
            (for machines without internet).
        freeze_backbone: Train only the new stem and classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        weights: str | None = None,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        net = resnet18(weights=None)
        if weights_path is not None:
            net.load_state_dict(_read_state_dict(weights_path))
        elif weights is not None:
            try:
                tv_weights = ResNet18_Weights[weights]
            except KeyError as err:
                names = ", ".join(w.name for w in ResNet18_Weights)
                raise ConfigError(f"unknown ResNet-18 weights {weights!r}; choose one of: {names}") from err
            try:
                net.load_state_dict(tv_weights.get_state_dict(progress=False))
            except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not here"
                raise ConfigError(
                    f"ResNet-18 weights {weights} are not cached and could not be downloaded ({err}). "
                    f"Download {tv_weights.url} on a machine with internet and pass it as weights_path, "
                    f"or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}, or use weights: null."
                ) from err
        stem = net.conv1.weight.data  # (64, 3, 7, 7)
        if in_channels == 1:
            stem = stem.sum(dim=1, keepdim=True)
        elif in_channels != 3:
            stem = stem.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=1, padding=3, bias=False)
        net.conv1.weight.data.copy_(stem)
        net.maxpool = nn.Identity()
        if freeze_backbone:
            for p in net.parameters():
                p.requires_grad_(False)
            net.conv1.weight.requires_grad_(True)
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, 28, 28)`` to logits ``(B, num_classes)``."""
        return self.net(x)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"weights_path {file} does not exist; give the path of torchvision's resnet18 .pth file.")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors for a damaged file
        raise ConfigError(f"weights_path {file} is not a readable PyTorch state dict ({err}).") from err
