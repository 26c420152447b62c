"""White-box gradient attacks in [0, 1] pixel space, shared by training (PGD/TRADES/FGSM-RS) and eval.

Models take [0, 1] inputs and normalize inside, so every eps here is in pixel units (8/255 = 8 grey
levels). Attacks never change the model's train/eval mode: the caller decides (see sat_train.methods).
Gradients are taken w.r.t. the input only (torch.autograd.grad), so parameter .grad is untouched.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # sum, not mean: per-sample gradients must not shrink with batch size (matters for L2 steps)
    return F.cross_entropy(logits, y, reduction="sum")


def input_grad(model, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = ce_sum) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    delta = delta * torch.clamp(eps / norms, max=1.0)
    return (x + delta).clamp_(0.0, 1.0)


def fgsm(model, x, y, eps: float, loss_fn: LossFn = ce_sum) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    return (x + eps * input_grad(model, x, y, loss_fn).sign()).clamp_(0.0, 1.0).detach()


def _pgd_once(model, x, y, eps, alpha, steps, random_start, loss_fn, generator, norm):
    if random_start:
        if norm == "linf":
            x_adv = (x + (2 * _rand_like(x, generator) - 1) * eps).clamp_(0.0, 1.0)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            radius = _rand_like(x[:, :1, :1, :1] if x.dim() == 4 else x[:, :1], generator)
            x_adv = project_l2(x + noise * radius * eps, x, eps)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        g = input_grad(model, x_adv, y, loss_fn)
        if norm == "linf":
            x_adv = project_linf(x_adv + alpha * g.sign(), x, eps)
        else:
            gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            x_adv = project_l2(x_adv + alpha * g / gn, x, eps)
    return x_adv.detach()


def pgd(model, x, y, eps: float, alpha: float, steps: int, *, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss_fn: LossFn = ce_sum, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in L-inf or L2, with random restarts.

    With restarts > 1 each sample keeps the first restart that fools the model (else the first restart)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', not {norm!r}")
    best = None
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(max(1, restarts)):
        x_adv = _pgd_once(model, x, y, eps, alpha, steps, random_start, loss_fn, generator, norm)
        if restarts <= 1:
            return x_adv
        with torch.no_grad():
            now_fooled = model(x_adv).argmax(1) != y
        if best is None:
            best = x_adv
        else:
            take = now_fooled & ~fooled
            best[take] = x_adv[take]
        fooled |= now_fooled
    return best
