"""White-box gradient attacks in [0, 1] pixel space, shared by training (PGD/TRADES/FGSM-RS) and eval.

Models take [0, 1] inputs and normalize inside, so every eps here is in pixel units (8/255 = 8 grey
levels). Attacks never change the model's train/eval mode: the caller decides (see sat_train.methods).
Gradients are taken w.r.t. the input only (torch.autograd.grad), so parameter .grad is untouched.

Speed matters (eval runs PGD-20 at 8 eps): one forward + one input-gradient per step, no extra forward
passes, the eps-ball and [0, 1] box merged into one per-pixel clamp computed once, updates in place.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")
SHAPE_QUANTUM = 8  # early-stopped PGD shrinks its batch in multiples of this (see _pgd_stop_when_fooled)


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


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return _per_sample(t.flatten(1).norm(dim=1).clamp_min(1e-12), t)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    delta = delta * torch.clamp(eps / _l2_norms(delta), max=1.0)
    return (x + delta).clamp_(0.0, 1.0)


def fgsm(model, x, y, eps: float, loss_fn: LossFn = ce_sum) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    return (x + eps * input_grad(model, x, y, loss_fn).sign_()).clamp_(0.0, 1.0).detach()


def _random_start(x, eps, norm, generator):
    if norm == "linf":
        return (x + (2 * _rand_like(x, generator) - 1) * eps).clamp_(0.0, 1.0)
    # uniform direction, radius uniform in [0, eps]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = _per_sample(_rand_like(x.new_empty(len(x)), generator), x)
    return project_l2(x + noise / _l2_norms(noise) * radius * eps, x, eps)


def _pgd_once(model, x, y, eps, alpha, steps, random_start, loss_fn, generator, norm, stop_when_fooled=False):
    x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
    if norm == "linf":
        # the eps-ball intersected with [0, 1] is a per-pixel box: one clamp per step projects onto both
        lo, hi = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    if stop_when_fooled:
        return _pgd_stop_when_fooled(model, x, y, x_adv, eps, alpha, steps, loss_fn, norm,
                                     (lo, hi) if norm == "linf" else None)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
        x_adv = x_adv.detach()  # the graph is freed, so updating this storage in place is safe
        _step(x_adv, g, x, eps, alpha, norm, lo if norm == "linf" else None, hi if norm == "linf" else None)
    return x_adv.detach()


def _step(x_adv, g, x, eps, alpha, norm, lo, hi):
    """One ascent step + projection, in place on x_adv."""
    if norm == "linf":
        x_adv.add_(g.sign_(), alpha=alpha)
        torch.clamp(x_adv, lo, hi, out=x_adv)
    else:
        x_adv.add_(g.div_(_l2_norms(g)), alpha=alpha)
        x_adv.copy_(project_l2(x_adv, x, eps))


def _pgd_stop_when_fooled(model, x, y, x_adv, eps, alpha, steps, loss_fn, norm, box):
    # The forward pass that gives the gradient also tells which samples are already misclassified at
    # the current point: those keep that point (the result never gets weaker than PGD's last iterate)
    # and the batch shrinks so they stop costing compute. It shrinks in multiples of SHAPE_QUANTUM,
    # topped up with broken samples whose results are already kept: every new batch shape costs the
    # backend a new kernel plan (oneDNN primitive / cuDNN algorithm), so few distinct shapes matter.
    members = torch.arange(len(x), device=x.device)  # rows of x in the working batch
    live = torch.ones(len(x), dtype=torch.bool, device=x.device)
    xa, xs, ys = x_adv.clone(), x, y  # x_adv holds the results, xa the working batch's iterates
    lo, hi = box if box is not None else (None, None)
    for _ in range(steps):
        xa.requires_grad_(True)
        logits = model(xa)
        (g,) = torch.autograd.grad(loss_fn(logits, ys), xa)
        xa = xa.detach()
        fooled = live & (logits.detach().argmax(1) != ys)
        if bool(fooled.any()):
            x_adv[members[fooled]] = xa[fooled]  # the point that fooled the model
            live &= ~fooled
            n_live = int(live.sum())
            if n_live == 0:
                return x_adv
            size = -(-n_live // SHAPE_QUANTUM) * SHAPE_QUANTUM
            if size < len(members):
                keep = torch.cat([live.nonzero().flatten(), (~live).nonzero().flatten()])[:size]
                members, xa, g, xs, ys, live = members[keep], xa[keep], g[keep], xs[keep], ys[keep], live[keep]
                if lo is not None:
                    lo, hi = lo[keep], hi[keep]
        _step(xa, g, xs, eps, alpha, norm, lo, hi)
    x_adv[members[live]] = xa[live]
    return x_adv


def pgd(model, x, y, eps: float, alpha: float, steps: int, *, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss_fn: LossFn = ce_sum, generator: torch.Generator | None = None,
        stop_when_fooled: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in L-inf or L2, with random restarts.

    With restarts > 1 each sample keeps the first restart that fools the model (else the first restart);
    later restarts only attack the samples no earlier restart fooled (same answer, less work).
    stop_when_fooled (evaluation only; needs a per-sample loss such as ce_sum): each sample stops at the
    first iterate the model misclassifies, found for free in the forward pass of the next step. A
    stronger-or-equal attack than the last iterate, and faster as samples break."""
    if norm not in NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', not {norm!r}")
    x = x.detach()
    best = _pgd_once(model, x, y, eps, alpha, steps, random_start, loss_fn, generator, norm, stop_when_fooled)
    if restarts <= 1:
        return best
    with torch.no_grad():
        robust = (model(best).argmax(1) == y).nonzero().flatten()
    for _ in range(restarts - 1):
        if len(robust) == 0:
            break
        x_adv = _pgd_once(model, x[robust], y[robust], eps, alpha, steps, random_start, loss_fn, generator, norm,
                          stop_when_fooled)
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y[robust]
        best[robust[fooled]] = x_adv[fooled]
        robust = robust[~fooled]
    return best
