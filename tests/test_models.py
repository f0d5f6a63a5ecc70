import pytest
import torch

from fmnist_lightning import models

ALL_MODELS = [getattr(models, name) for name in models.__all__]


@pytest.mark.parametrize("model_cls", ALL_MODELS, ids=models.__all__)
def test_output_shape_and_backward(model_cls):
    model = model_cls()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_cls", ALL_MODELS, ids=models.__all__)
def test_constructor_shape(model_cls):
    model = model_cls(num_classes=7, in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_linear_parameter_count():
    assert sum(p.numel() for p in models.LinearClassifier().parameters()) == 784 * 10 + 10


def test_tinyvgg_variants_are_arguments():
    default = models.TinyVGG()
    no_bn = models.TinyVGG(batch_norm=False, dropout=0.0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())
    convs = [m for m in default.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    wide = models.TinyVGG(widths=(64, 128, 256), hidden=256, batch_norm=False)
    assert wide(torch.randn(2, 1, 28, 28)).shape == (2, 10)
