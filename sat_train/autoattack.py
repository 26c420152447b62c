"""AutoAttack (Croce & Hein 2020) through torchattacks, with per-stage robust accuracy.

The standard version runs APGD-CE, APGD-T, FAB-T and Square in sequence, each on the samples the
previous stages did not fool. torchattacks' AutoAttack only returns the final images; we run the same
attack objects it builds ourselves, in its order, to also report how many samples survive each stage
(a stage that fools many samples PGD missed is the classic sign of gradient masking).

torchattacks 3.5 pins torchvision, which cannot be installed beside this torch; its attacks do not use
it, so it is installed with --no-deps (see README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

STANDARD_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class AutoAttackResult:
    x_adv: torch.Tensor
    robust: torch.Tensor  # bool per sample: still classified correctly after every stage
    stages: list = field(default_factory=list)  # [(stage name, samples still robust after it)]
    max_linf: float = 0.0  # largest |x_adv - x| seen: must be <= eps


def autoattack(model, x: torch.Tensor, y: torch.Tensor, eps: float, *, n_classes: int, norm: str = "Linf",
               version: str = "standard", seed: int = 0) -> AutoAttackResult:
    """Run AutoAttack on one batch; the model should be in eval mode (torchattacks also enforces it)."""
    import torchattacks  # imported here: `sat-train eval` without --autoattack must not need it

    x, y = x.detach(), y.detach()
    aa = torchattacks.AutoAttack(model, norm=norm, eps=eps, version=version, n_classes=n_classes, seed=seed)
    attacks = getattr(getattr(aa, "_autoattack", None), "attacks", None)
    devices = [x.device] if x.device.type == "cuda" else []
    # APGD/FAB/Square reseed torch's global RNG: keep that from leaking into the rest of the eval
    with torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        x_adv = x.clone()
        stages = []
        if attacks is None:  # another torchattacks layout: still the library's AutoAttack, only no stages
            x_adv = aa(x, y).detach()
            with torch.no_grad():
                robust = model(x_adv).argmax(1) == y
        else:
            names = STANDARD_STAGES if version == "standard" else [type(a).__name__.lower() for a in attacks]
            for name, attack in zip(names, attacks):
                todo = robust.nonzero().flatten()
                if len(todo):
                    adv = attack(x[todo], y[todo]).detach()
                    with torch.no_grad():
                        fooled = model(adv).argmax(1) != y[todo]
                    x_adv[todo[fooled]] = adv[fooled]
                    robust[todo[fooled]] = False
                stages.append((name, int(robust.sum())))
    max_linf = float((x_adv - x).abs().max()) if len(x) else 0.0
    return AutoAttackResult(x_adv, robust, stages, max_linf)
