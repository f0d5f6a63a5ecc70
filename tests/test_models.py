import re

import pytest
import torch

from fmnist_lightning import ConfigError, models

ALL_MODELS = list(models.MODEL_CLASSES)
MODEL_IDS = [cls.__name__ for cls in ALL_MODELS]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def documented_params(model_cls: type) -> int:
    """The first 'N parameters' figure in the class docstring (what the README's table shows)."""
    match = re.search(r"([\d,]+) parameters", model_cls.__doc__ or "")
    assert match, f"{model_cls.__name__} documents no parameter count"
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("model_cls", ALL_MODELS, ids=MODEL_IDS)
def test_output_shape_and_backward(model_cls):
    model = model_cls()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_cls", ALL_MODELS, ids=MODEL_IDS)
def test_constructor_shape(model_cls):
    model = model_cls(num_classes=7, in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("model_cls", ALL_MODELS, ids=MODEL_IDS)
def test_parameter_count_is_the_documented_one(model_cls):
    assert n_params(model_cls()) == documented_params(model_cls)


@pytest.mark.parametrize("preset", list(models.PRESETS))
def test_every_preset_has_its_documented_parameters_and_shape(preset):
    model = models.build(preset)
    assert n_params(model) == models.PRESET_PARAMETERS[preset]
    assert f"{models.PRESET_PARAMETERS[preset]:,} parameters" in models.convnet.__doc__
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.name == preset


def test_lightweight_cnn_has_exactly_study_004s_parameters():
    assert n_params(models.build("LightweightCNN")) == 20_490


def test_explicit_arguments_override_a_preset():
    shallow = models.ConvNet(preset="FashionCNNShallow", widths=(8, 16))
    convs = [m for m in shallow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(8, (5, 5)), (16, (5, 5))]
    with pytest.raises(ValueError, match="unknown ConvNet preset"):
        models.ConvNet(preset="Nope")
    with pytest.raises(ValueError, match="unknown model"):
        models.build("Nope")


def test_tinyvgg_variants_are_arguments():
    default = models.TinyVGG()
    no_bn = models.TinyVGG(batch_norm=False, dropout=0.0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())
    convs = [m for m in default.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    wide = models.TinyVGG(widths=(64, 128, 256), hidden=256, batch_norm=False, dropout=0.0)
    assert n_params(wide) == 1_736_906  # study 002's 64-64/128-128/256-256 + FC 256


def test_fashion_cnn_dropout_switch_and_fc_size():
    cnn = models.build("FashionCNN")
    fc1 = next(m for m in cnn.modules() if isinstance(m, torch.nn.Linear))
    assert (fc1.in_features, fc1.out_features) == (6272, 256)
    assert [m.p for m in cnn.modules() if isinstance(m, torch.nn.Dropout)] == [0.25]
    x = torch.randn(8, 1, 28, 28)
    with_dropout, no_dropout = cnn.train(), models.build("FashionCNN", dropout=0.0).train()
    assert not torch.equal(with_dropout(x), with_dropout(x))
    assert torch.equal(no_dropout(x), no_dropout(x))  # BN in train mode is deterministic


def test_convnet_rejects_mismatched_layer_lists():
    with pytest.raises(ValueError, match="one entry per layer"):
        models.ConvNet(widths=(8, 16), kernel_sizes=(3,), pools=(True, True))


def test_resnet_se_switch():
    assert n_params(models.ResNet(se_reduction=0)) < n_params(models.ResNet())
    assert not any(isinstance(m, models.resnet.SqueezeExcitation) for m in models.ResNet(se_reduction=0).modules())


def test_transfer_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        models.ResNet18Transfer(weights_path=str(tmp_path / "resnet18.pth"))


def test_transfer_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "resnet18.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable"):
        models.ResNet18Transfer(weights_path=str(bad))


def test_transfer_loads_a_local_state_dict_into_the_adapted_stem(tmp_path):
    from torchvision.models import resnet18

    source = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = models.ResNet18Transfer(weights_path=str(path))
    assert torch.allclose(model.net.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_transfer_unknown_weights_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        models.ResNet18Transfer(weights="IMAGENET_BEST")


def normalised(arrays, n: int) -> torch.Tensor:
    """The first ``n`` training images as the data module feeds them: (n, 1, 28, 28), dataset-normalised."""
    from fmnist_lightning.data import DATASET_MEAN, DATASET_STD

    return (arrays["train_images"][:n].float().div(255).unsqueeze(1) - DATASET_MEAN) / DATASET_STD


def test_airbench_stem_whitens_the_patches_of_real_images(arrays):
    x = normalised(arrays, 256)
    model = models.AirbenchNet()
    assert model.init_from_batch(x)
    out = model.stem(x) - model.stem.bias.view(1, -1, 1, 1)  # (256, 8, 27, 27): 4 directions and their negatives
    covariance = torch.cov(out[:, :4].permute(1, 0, 2, 3).flatten(1))
    # Decorrelated, unit variance (up to eps in the smallest direction's scaling).
    assert torch.allclose(covariance, torch.eye(4), atol=0.05)
    assert torch.allclose(out[:, 4:], -out[:, :4])
    assert not model.stem.weight.requires_grad


def test_airbench_stem_is_set_once_and_travels_with_the_weights(arrays):
    x = normalised(arrays, 128)
    model = models.AirbenchNet()
    model.init_from_batch(x)
    stem = model.stem.weight.clone()
    assert not model.init_from_batch(x[64:])  # a second batch changes nothing
    assert torch.equal(model.stem.weight, stem)
    reloaded = models.AirbenchNet()
    reloaded.load_state_dict(model.state_dict())
    assert not reloaded.init_from_batch(x)  # a reloaded (or resumed) network keeps its stem
    assert torch.equal(reloaded.stem.weight, stem)
    assert model.init_from_batch(x[64:], force=True)
    assert not torch.equal(model.stem.weight, stem)


def test_airbench_without_a_stem_sees_the_image():
    model = models.AirbenchNet(whitening_kernel=0)
    assert model.stem is None
    assert not model.init_from_batch(torch.randn(4, 1, 28, 28))
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="whitening_kernel"):
        models.AirbenchNet(whitening_kernel=-1)


def test_airbench_block_convolutions_start_as_the_identity():
    conv = models.AirbenchNet().blocks[1][0]  # 24 -> 48 channels
    x = torch.randn(2, 24, 6, 6)
    out = conv(x)
    assert torch.equal(out[:, :24], x)  # the first 24 filters pass their channel through
    assert out[:, 24:].abs().sum() > 0  # the rest start random


def test_airbench_frozen_bn_scales_stay_at_one_while_the_shifts_learn(arrays):
    x, y = normalised(arrays, 64), arrays["train_labels"][:64]
    model = models.AirbenchNet(widths=(8, 16, 16), bn_weight=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6
    assert not any(m.weight.requires_grad for m in norms)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert any(m.bias.abs().sum() > 0 for m in norms)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    default = models.AirbenchNet(widths=(8, 16, 16))
    assert trainable == sum(p.numel() for p in default.parameters() if p.requires_grad) - 2 * (8 + 16 + 16)
