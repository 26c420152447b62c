"""Training objectives: what one batch (x, S, y) turns into before the optimizer step.

All inputs are images in [0, 1] (normalization is inside the model), eps in pixel units.

- standard    CE(f(x), y)
- sat         CE(f(x'), y), x' = clamp(x - eps * (w S + (1 - w) r), 0, 1), w ~ Bernoulli(p) per element
              (or per pixel), p = 1 - a^(epoch/tau), tau = 10 (Mangla et al. 2020) or solved from a final p
              (curriculum_tau); fused kernel kernels.sat_perturb
- pgd         CE(f(x_pgd), y), Madry et al. 2018: random start, `pgd_steps` steps of `pgd_alpha`
- sat+pgd     per batch a coin with P(heads) = mix_prob: heads x', tails x_pgd (the paper's combination)
- trades      CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / N, inner max of the same KL (Zhang et al. 2019)
- sat+trades  the same coin: heads x' takes the place of TRADES' inner maximization, tails the real one
- fgsm-rs     Wong et al. 2020: delta ~ U(-eps, eps), one FGSM step of fgsm_alpha * eps, clip to the ball

BatchNorm mode while crafting the attack (attack_bn="auto" follows each method's reference code):
pgd and fgsm-rs attack the model in TRAIN mode (Madry's and Wong's code build the attack on the
training graph: batch statistics, running stats updated by the attack passes too); trades attacks in
EVAL mode (Zhang et al.'s code calls model.eval() for the inner max, then model.train()). Override
with attack_bn="train" | "eval". SAT needs no gradient and no forward pass for its perturbation.

Attacks always run on the bare module (not the DistributedDataParallel wrapper): an input-gradient
is local to each process and must not trigger DDP's gradient all-reduce.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.sat_perturb import sat_perturb
from sat_train.attacks import input_grad, pgd, project_linf

METHODS = ("standard", "sat", "pgd", "sat+pgd", "trades", "sat+trades", "fgsm-rs")
CURRICULUM_METHODS = ("sat", "sat+pgd", "sat+trades")  # the ones whose perturbation follows SAT's p
ATTACK_BN_MODES = ("auto", "train", "eval")
# the TrainConfig fields a Method reads (their defaults, help and checks live in sat_train.config)
HYPERPARAMETERS = ("eps", "sat_per_pixel", "mix_prob", "pgd_steps", "pgd_alpha", "trades_beta", "trades_steps",
                   "fgsm_alpha", "attack_bn", "label_smoothing")
LITERATURE_BN = {"pgd": "train", "sat+pgd": "train", "fgsm-rs": "train", "trades": "eval", "sat+trades": "eval"}


PAPER_TAU = 10.0  # Mangla et al.: p = 1 - a^(epoch/10), made for 100 epochs (p reaches 0.99)


def curriculum_p(epoch: int, a: float = 0.6, tau: float = PAPER_TAU) -> float:
    """SAT's probability of the saliency direction at `epoch` (counted from 0): p = 1 - a^(epoch/tau)."""
    return 1.0 - a ** (epoch / tau)


def curriculum_tau(a: float, epochs: int, tau: float = PAPER_TAU, final_p: float | None = None) -> float:
    """The tau a run uses: `tau` as given, or, when `final_p` is set, the tau whose last epoch
    (epochs - 1) reaches exactly p = final_p, so the curriculum spans a run of any length:
    a^((epochs - 1) / tau) = 1 - final_p  =>  tau = (epochs - 1) ln(a) / ln(1 - final_p)."""
    if final_p is None:
        return tau
    if not 0 < final_p < 1 or not 0 < a < 1 or epochs < 2:
        raise ValueError(f"final p {final_p} needs 0 < final_p < 1, 0 < a < 1 and >= 2 epochs "
                         f"(a={a}, epochs={epochs})")
    return (epochs - 1) * math.log(a) / math.log(1.0 - final_p)


def config_tau(cfg) -> float:
    """The curriculum tau a TrainConfig resolves to (sat_tau, or solved from sat_final_p and epochs)."""
    return curriculum_tau(cfg.sat_a, cfg.epochs, cfg.sat_tau, cfg.sat_final_p)


def uses_curriculum(method: str) -> bool:
    """True for the methods that draw SAT perturbations, so SAT's p (config_p) means something for them."""
    return method in CURRICULUM_METHODS


def config_p(cfg, epoch: int) -> float:
    """SAT's p at `epoch` for a TrainConfig: the fixed sat_p, else the curriculum."""
    return cfg.sat_p if cfg.sat_p is not None else curriculum_p(epoch, cfg.sat_a, config_tau(cfg))


def kl_sum(logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
    """sum over the batch of KL(probs_clean || softmax(logits_adv)): TRADES' loss (size_average=False)."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), probs_clean, reduction="sum")


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar to backpropagate
    train_logits: torch.Tensor  # logits of the inputs the model was trained on (for "input accuracy")
    clean_logits: torch.Tensor | None  # logits of the clean batch when the objective computed them anyway
    perturbation: str  # "clean" | "sat" | "pgd" | "trades" | "fgsm-rs"


@contextlib.contextmanager
def bn_mode(module: torch.nn.Module, mode: str):
    """Run a block with the module in train or eval mode, restoring the previous mode after."""
    was_training = module.training
    module.train(mode == "train")
    try:
        yield
    finally:
        module.train(was_training)


class Method:
    """One training objective with its hyper-parameters; `step` is called once per batch.

    `model` is what the training forward goes through (maybe DDP-wrapped, compiled), `bare` the plain
    module the attacks use. `generator` drives the per-process random draws, `coin` (same seed on every
    process) the per-batch choice of sat+pgd / sat+trades, so all processes take the same branch."""

    def __init__(self, name: str, *, channels_last: bool = False, **hyper):
        """`Method("pgd", pgd_steps=2)`: the hyper-parameters and their defaults are TrainConfig's (listed
        once, there); anything not given takes TrainConfig's default, and is validated as a config is."""
        from sat_train.config import ConfigError, TrainConfig  # config imports this module's lists

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
        try:
            cfg = TrainConfig(method=name, **hyper)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self._take(cfg, channels_last)

    @classmethod
    def from_config(cls, cfg, channels_last: bool = False) -> "Method":
        self = cls.__new__(cls)
        self._take(cfg, channels_last)
        return self

    def _take(self, cfg, channels_last: bool) -> None:
        self.name = cfg.method
        for key in HYPERPARAMETERS:
            setattr(self, key, getattr(cfg, key))
        self.attack_bn = LITERATURE_BN.get(self.name, "train") if cfg.attack_bn == "auto" else cfg.attack_bn
        self.channels_last = channels_last  # CUDA: tensors the model sees go NHWC (faster convolutions)

    @property
    def trains_on_clean(self) -> bool:
        """True when every step computes clean logits anyway (clean accuracy comes for free)."""
        return self.name in ("standard", "trades", "sat+trades")

    def ce(self, logits, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    # ------------------------------------------------------------------------- perturbations

    def sat(self, x, s, p, generator):
        return sat_perturb(x, s, self.eps, p, generator=generator, per_pixel=self.sat_per_pixel)

    def pgd(self, bare, x, y, generator):
        with bn_mode(bare, self.attack_bn):
            return pgd(bare, x, y, self.eps, self.pgd_alpha, self.pgd_steps, random_start=True, generator=generator)

    def fgsm_rs(self, bare, x, y, generator):
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        x_start = (x + delta).clamp_(0.0, 1.0)  # Wong et al. clamp x + delta into the image box
        with bn_mode(bare, self.attack_bn):
            g = input_grad(bare, x_start, y)
        return project_linf(x_start + self.fgsm_alpha * self.eps * g.sign(), x, self.eps).detach()

    def trades_inner(self, bare, x, generator):
        """Zhang et al.'s inner maximization: start at x + 0.001 N(0, 1), signed steps on the KL."""
        with bn_mode(bare, self.attack_bn):
            with torch.no_grad():
                probs = F.softmax(bare(x).float(), dim=1)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = project_linf(x + 0.001 * noise, x, self.eps)
            for _ in range(self.trades_steps):
                g = input_grad(bare, x_adv, probs, kl_sum)
                x_adv = project_linf(x_adv + self.pgd_alpha * g.sign(), x, self.eps)
        return x_adv.detach()

    # ------------------------------------------------------------------------- one batch

    def step(self, model, bare, x, s, y, *, p: float, generator: torch.Generator | None,
             coin: torch.Generator | None) -> StepResult:
        """Loss of one batch. x arrives NCHW-contiguous; with channels_last set, what the model sees is
        converted once (SAT perturbs the NCHW tensor first, so its kernel reads x without a copy)."""
        name = self.name
        if name in ("sat+pgd", "sat+trades"):
            heads = bool(torch.rand(1, generator=coin).item() < self.mix_prob)
            base = name.split("+")[1]
            name = ("sat" if base == "pgd" else "trades-sat") if heads else base
        if name == "standard":
            logits = model(self.fmt(x))
            return StepResult(self.ce(logits, y), logits, logits, "clean")
        if name == "sat":
            logits = model(self.fmt(self.sat(x, s, p, generator)))
            return StepResult(self.ce(logits, y), logits, None, "sat")
        if name in ("pgd", "fgsm-rs"):
            attack = self.pgd if name == "pgd" else self.fgsm_rs
            logits = model(attack(bare, self.fmt(x), y, generator))
            return StepResult(self.ce(logits, y), logits, None, name)
        # trades / trades with the SAT point in place of the inner maximization
        xf = self.fmt(x)
        x_adv = self.fmt(self.sat(x, s, p, generator)) if name == "trades-sat" else self.trades_inner(bare, xf, generator)
        logits = model(xf)
        logits_adv = model(x_adv)
        robust = kl_sum(logits_adv, F.softmax(logits.float(), dim=1)) / len(x)
        loss = self.ce(logits, y) + self.trades_beta * robust
        return StepResult(loss, logits_adv, logits, "sat" if name == "trades-sat" else "trades")

    def fmt(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t
