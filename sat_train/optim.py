"""Optimizer and per-step learning-rate schedule built from a TrainConfig.

The schedule is a LambdaLR stepped once per batch: its state_dict (the step count) goes into the
checkpoint, the shape is recomputed from the config, so a resumed run continues on the same curve.
One weight decay for all parameters (BatchNorm and biases included), as in the SAT, TRADES and
Madry reference code the results are compared with.
"""
from __future__ import annotations

import bisect
import math

import torch


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg, warmup_steps: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based) out of `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    # piecewise: multiply by gamma at each milestone (fractions of training)
    return cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step / max(1, total_steps))


def make_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg, warmup))
