"""The speedrun's parts: FilterMuon (Muon for convolution filters), translated test-time views, EMA of weights."""

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from fmnist_lightning import ClassificationTask, FashionMNISTDataModule
from fmnist_lightning.augment import translate, tta_views
from fmnist_lightning.models import AirbenchNet
from fmnist_lightning.optim import FilterMuon, orthogonalize

from .conftest import quiet_trainer


def test_orthogonalize_approaches_the_polar_factor():
    torch.manual_seed(0)
    for shape in [(24, 72), (96, 432), (300, 20)]:
        matrix = torch.randn(shape)
        u, _, vt = torch.linalg.svd(matrix, full_matrices=False)
        polar = u @ vt  # the exact nearest semi-orthogonal matrix
        result = orthogonalize(matrix)
        singular = torch.linalg.svdvals(result)
        assert singular.min() > 0.6  # near 1, as Muon's quintic iteration leaves them
        assert singular.max() < 1.2
        cosine = (result * polar).sum() / (result.norm() * polar.norm())
        assert cosine > 0.97


def test_filter_muon_orthogonalises_filters_and_applies_nesterov_sgd_to_the_rest():
    torch.manual_seed(0)
    conv, head = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer = FilterMuon([*conv.parameters(), *head.parameters(), frozen], lr=0.1, momentum=0.9, other_lr_scale=0.5)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # the filter bank; bias, head (no frozen)
    reference = torch.optim.SGD([p.detach().clone().requires_grad_() for p in (conv.bias, *head.parameters())],
                                lr=0.05, momentum=0.9, nesterov=True)  # fmt: skip
    before = conv.weight.detach().clone()
    for step in range(2):
        grads = [torch.randn_like(p) for p in (conv.weight, conv.bias, *head.parameters())]
        for p, g in zip((conv.weight, conv.bias, *head.parameters()), grads, strict=True):
            p.grad = g
        for p, g in zip(reference.param_groups[0]["params"], grads[1:], strict=True):
            p.grad = g.clone()
        if step == 0:
            first = grads[0]
        optimizer.step()
        reference.step()
        if step == 0:  # no momentum yet: the filters moved by lr x the orthogonalised gradient (x 1: 8 < 27)
            expected = before - 0.1 * orthogonalize(first.reshape(8, -1)).view_as(first)
            torch.testing.assert_close(conv.weight.detach(), expected)
    for mine, theirs in zip((conv.bias, *head.parameters()), reference.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach())
    assert torch.equal(frozen, torch.ones(2))


def test_filter_muon_decays_weights_and_refuses_bad_arguments():
    conv = nn.Conv2d(1, 2, 3)
    optimizer = FilterMuon(conv.parameters(), lr=0.1, weight_decay=0.5, other_weight_decay=0.0)
    before = conv.weight.detach().clone()
    conv.weight.grad, conv.bias.grad = torch.zeros_like(conv.weight), torch.zeros_like(conv.bias)
    optimizer.step()  # a zero gradient: only the decoupled decay moves the filters
    torch.testing.assert_close(conv.weight.detach(), before * (1 - 0.1 * 0.5))
    with pytest.raises(ValueError, match="not groups"):
        FilterMuon([{"params": list(conv.parameters())}])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        FilterMuon(conv.parameters(), lr=-1)


def test_filter_muon_trains_airbench_net_on_real_images(arrays):
    torch.manual_seed(0)
    images = (arrays["train_images"][:1024].unsqueeze(1).float() / 255 - 0.5) / 0.5
    labels = arrays["train_labels"][:1024]
    model = AirbenchNet(widths=(8, 16, 16))
    model.init_from_batch(images[:256])
    optimizer = FilterMuon(model.parameters(), lr=0.1, other_lr_scale=1.0)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(model(images), labels).item()
    for _ in range(3):
        for batch in range(0, 1024, 128):
            optimizer.zero_grad()
            loss_fn(model(images[batch : batch + 128]), labels[batch : batch + 128]).backward()
            optimizer.step()
    with torch.no_grad():
        assert loss_fn(model(images), labels).item() < 0.7 * start  # 2.31 -> 1.37 (AdamW lr 0.004: 1.92)


def test_translate_moves_pixels_and_repeats_the_edge():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    down_right = translate(x, 1, 1)
    assert torch.equal(down_right[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert torch.equal(down_right[0, 0, 0, 1:], x[0, 0, 0, :3])  # the top row repeated into the gap
    assert torch.equal(translate(down_right, -1, -1)[0, 0, :3, :3], x[0, 0, :3, :3])


def test_tta_views_and_their_weights():
    x = torch.rand(3, 1, 28, 28)
    for flip, shift, count in [(False, 0, 1), (True, 0, 2), (False, 2, 3), (True, 1, 6)]:
        views = tta_views(x, flip, shift)
        assert len(views) == count
        assert sum(w for _, w in views) == pytest.approx(1.0)
        assert torch.equal(views[0][0], x)
    weights = [w for _, w in tta_views(x, True, 1)]
    assert weights == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]  # airbench's: 1/2 untranslated, 1/4 each shift


def test_predict_proba_averages_the_six_views_by_hand():
    torch.manual_seed(0)
    task = ClassificationTask(AirbenchNet(widths=(8, 8, 8)), tta_flip=True, tta_shift=1).eval()
    x = torch.randn(4, 1, 28, 28)

    def softmax(images: torch.Tensor) -> torch.Tensor:
        return task(images).float().softmax(dim=1)

    def shifted(images: torch.Tensor, d: int) -> torch.Tensor:
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
        return padded[..., 1 - d : 29 - d, 1 - d : 29 - d]

    with torch.no_grad():
        plain = (softmax(x) + softmax(x.flip(-1))) / 2
        moved = [(softmax(shifted(x, d)) + softmax(shifted(x.flip(-1), d))) / 2 for d in (1, -1)]
        expected = 0.5 * plain + 0.25 * moved[0] + 0.25 * moved[1]
        torch.testing.assert_close(task.predict_proba(x), expected)
    with pytest.raises(Exception, match="tta_shift must be >= 0"):
        ClassificationTask(AirbenchNet(widths=(8, 8, 8)), tta_shift=-1)


class Weights(Callback):
    """The network's parameters after every optimizer step (copies)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.named_parameters()})


def test_lightnings_ema_leaves_the_task_holding_the_average_by_hand(data_dir, tmp_path):
    # The speedrun recipes' EMA is Lightning's own callback (trainer.callbacks in a config); this checks it
    # averages this task's network (channels-last, a frozen whitening stem) as EMA's formula says.
    torch.manual_seed(0)
    model, weights = AirbenchNet(widths=(8, 8, 8)), Weights()
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=1)
    trainer = quiet_trainer(tmp_path, limit_train_batches=4, limit_val_batches=0, callbacks=[weights, ema])
    task = ClassificationTask(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer.fit(task, FashionMNISTDataModule(data_dir=str(data_dir), batch_size=64))
    assert len(weights.steps) == 4
    expected = dict(weights.steps[1])  # averaging starts at step index 1 (update_starting_at_step), as a copy
    for step in weights.steps[2:]:
        expected = {k: 0.5 * expected[k] + 0.5 * step[k] for k in expected}
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name])
