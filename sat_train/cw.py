"""Carlini-Wagner L2 (Carlini & Wagner 2017) with a short, bounded budget.

Minimum-norm attack: per sample, minimise ||x' - x||_2^2 + c * max(Z_y - max_{i!=y} Z_i + kappa, 0)
over x' = (tanh(w) + 1) / 2 (so x' stays in [0, 1] without clipping), with Adam on w, and a binary
search over c. The defaults are the paper's evaluation budget (Mangla et al. 2020 ran advertorch's
CarliniWagnerL2Attack with 3 binary-search steps x 20 iterations, lr 0.01, initial c = 1e-3): a cheap
probe, not a strong attack, so always read it next to PGD and AutoAttack.

Nothing here is random: the result is a function of the model and the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UPPER_CONST = 1e10  # "no upper bound found yet" for the binary search
TANH_SHRINK = 1 - 1e-6  # keeps atanh finite for pixels at exactly 0 or 1


@dataclass
class CWResult:
    x_adv: torch.Tensor  # best (smallest-L2) adversarial found per sample, else the clean input
    success: torch.Tensor  # bool per sample: an adversarial example was found
    l2: torch.Tensor  # L2 norm of x_adv - x (0 where no success)


def _margin(logits: torch.Tensor, y: torch.Tensor, confidence: float) -> torch.Tensor:
    real = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return real - other + confidence  # > 0 while the true class still wins by kappa


def cw_l2(model, x: torch.Tensor, y: torch.Tensor, *, steps: int = 20, search_steps: int = 3, lr: float = 0.01,
          initial_const: float = 1e-3, confidence: float = 0.0) -> CWResult:
    """Untargeted CW-L2 on a [0, 1] batch. Gradients are taken w.r.t. the attack variable only."""
    if steps < 1 or search_steps < 1:
        raise ValueError("cw_l2 needs steps >= 1 and search_steps >= 1")
    x = x.detach()
    n = len(x)
    w0 = torch.atanh((2 * x - 1) * TANH_SHRINK)
    const = torch.full((n,), float(initial_const), device=x.device, dtype=x.dtype)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, UPPER_CONST)
    best_l2sq = torch.full_like(const, float("inf"))
    best_adv = x.clone()
    for _ in range(search_steps):
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(steps):
            x_new = (torch.tanh(w0 + delta) + 1) / 2
            logits = model(x_new)
            l2sq = (x_new - x).flatten(1).pow(2).sum(1)
            margin = _margin(logits, y, confidence)
            loss = (l2sq + const * margin.clamp_min(0)).sum()
            (delta.grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                # x_new is the point these logits belong to: record it before the step moves on
                adversarial = (logits.argmax(1) != y) if confidence == 0 else _margin(logits, y, 0.0) < -confidence
                better = adversarial & (l2sq < best_l2sq)
                best_l2sq = torch.where(better, l2sq.detach(), best_l2sq)
                best_adv[better] = x_new.detach()[better]
                found |= adversarial
            opt.step()
        # binary search on c: shrink it where we succeeded, grow it (x10 until bracketed) where we did not
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        bracketed = upper < UPPER_CONST
        const = torch.where(bracketed, (lower + upper) / 2, const * 10)
    success = torch.isfinite(best_l2sq)
    l2 = torch.where(success, best_l2sq, torch.zeros_like(best_l2sq)).sqrt()
    return CWResult(best_adv, success, l2)
