"""``FilterMuon``: Muon for convolution filters, Nesterov SGD for every other parameter, one optimizer.

Muon (Keller Jordan, 2024) replaces a weight matrix's momentum update by its nearest semi-orthogonal
matrix (a few Newton-Schulz iterations): every direction of the update moves at the same rate. On
CIFAR-10 it is what took airbench from 94% in 3.3 s to 2.6 s (airbench94_muon): applied to the
convolution filters, each bank ``(out, in, kh, kw)`` seen as the matrix ``(out, in*kh*kw)``, with
Nesterov SGD for the biases, the batch-norm parameters and the classifier head.

``torch.optim.Muon`` takes 2-D parameters only and no others, so a network's filters (4-D) and the
rest need this one class: it keeps the two rules in two parameter groups of one optimizer, so that
Lightning's loop, its checkpoints and every scheduler (OneCycleLR included) treat them as one. The
rest's learning rate is ``lr * other_lr_scale``: a scheduler that scales ``lr`` scales both alike.

From a config::

    model:
      optimizer:
        class_path: fmnist_lightning.optim.FilterMuon
        init_args: {lr: 0.05, other_lr_scale: 0.1}
"""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

#: Keller Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon's defaults too).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """The nearest semi-orthogonal matrix to ``matrix`` (2-D), approximately: ``U S' V^T`` with ``S'`` near 1.

    Muon's quintic Newton-Schulz iteration (its singular values end near 1, 0.68 to 1.13 for random
    matrices of these shapes, which trains as well as exact orthogonalisation). In float32: these
    matrices are at most a few hundred wide, and bfloat16 matrix products are emulated (slower) on
    CPUs without native bf16.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp_min(eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class FilterMuon(Optimizer):
    """Muon for every 4-D parameter (convolution filters), Nesterov SGD with momentum for the others.

    Args:
        params: The parameters (a module's ``parameters()``); they are split into the two groups here,
            so parameter groups given by the caller are refused.
        lr: Learning rate of the filters' Muon updates (an orthogonalised update of spectral norm near
            1, scaled by ``sqrt(max(1, out / (in*kh*kw)))``).
        momentum: Momentum of both rules.
        nesterov: Nesterov momentum for both rules.
        weight_decay: Decoupled weight decay of the filters (``p *= 1 - lr * weight_decay``).
        other_lr_scale: The other parameters' learning rate, as a multiple of ``lr``.
        other_weight_decay: Decoupled weight decay of the other parameters.
        ns_steps: Newton-Schulz iterations of each Muon update.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        other_lr_scale: float = 0.1,
        other_weight_decay: float = 0.0,
        ns_steps: int = 5,
    ) -> None:
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise ValueError("FilterMuon makes its own parameter groups: pass the parameters, not groups")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if other_lr_scale < 0 or other_weight_decay < 0 or ns_steps < 1:
            raise ValueError("other_lr_scale and other_weight_decay must be >= 0 and ns_steps >= 1")
        trained = [p for p in params if p.requires_grad]
        filters = [p for p in trained if p.ndim == 4]
        others = [p for p in trained if p.ndim != 4]
        groups = [
            {"params": filters, "muon": True, "lr_scale": 1.0, "weight_decay": weight_decay},
            {"params": others, "muon": False, "lr_scale": other_lr_scale, "weight_decay": other_weight_decay},
        ]
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"] * group["lr_scale"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    matrix = update.reshape(len(update), -1)
                    scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                    update = orthogonalize(matrix, group["ns_steps"]).view_as(p) * scale
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr)
        return loss
