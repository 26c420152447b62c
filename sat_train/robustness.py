"""The attack suite: which attacks to run (`build_specs`) and running them over a stream of batches.

Conventions (RobustBench / AutoAttack's):
- robust accuracy counts a sample only if the model gets it right clean AND under the attack, so an
  attack can never report more accuracy than clean; attacks only run on clean-correct samples (the
  others count as wrong anyway), which saves (1 - clean accuracy) of the work;
- natural distortions are not adversarial: they report plain accuracy on the distorted images;
- every attack gets its own random stream per batch, seeded from (seed, attack, batch number), so a
  result does not change when other attacks are switched on or off, and reruns are bit-identical.
"""
from __future__ import annotations

import time
import warnings
import zlib
from dataclasses import dataclass, field

import torch

from sat_train import attacks, distortions
from sat_train.attacks import SHAPE_QUANTUM
from sat_train.autoattack import autoattack
from sat_train.cw import cw_l2

ADVERSARIAL = ("fgsm", "pgd", "cw-l2", "autoattack")


@dataclass
class Spec:
    """One row of the results: an attack (or distortion) at one strength."""

    attack: str  # clean | fgsm | pgd | cw-l2 | autoattack | contrast | low-pass | high-pass
    norm: str | None = None  # linf | l2 for adversarial attacks
    eps: float | None = None  # pixel units ([0, 1] images)
    level: float | None = None  # distortion level (contrast factor or Gaussian sigma)
    params: dict = field(default_factory=dict)  # steps, step size, restarts, ... as recorded in the JSON
    limit: int | None = None  # only the first `limit` samples (AutoAttack / CW subsets)

    @property
    def key(self) -> str:
        parts = [self.attack, self.norm or "", f"{self.eps:.8g}" if self.eps is not None else "",
                 f"{self.level:.8g}" if self.level is not None else "", str(self.params.get("steps", ""))]
        return "/".join(parts)


def build_specs(cfg) -> list[Spec]:
    """The rows an EvalConfig asks for, in the order they are printed."""
    specs = [Spec("clean")]
    eps_list = list(cfg.eps)  # [0, 1] pixel units

    def pgd_params(steps, step_size):
        return {"steps": steps, "step_size": step_size, "random_start": True, "restarts": cfg.pgd_restarts,
                "stop_when_fooled": cfg.pgd_early_stop}

    for e in eps_list if cfg.fgsm else []:
        specs.append(Spec("fgsm", "linf", e, params={"steps": 1, "step_size": e}))
    for e in eps_list:
        specs.append(Spec("pgd", "linf", e, params=pgd_params(cfg.pgd_steps, e * cfg.pgd_step_ratio)))
    if eps_list:
        e = max(eps_list)  # the steps sweep for the gradient-masking check, at the largest eps
        for k in sorted(set(cfg.check_steps) - {cfg.pgd_steps}):
            specs.append(Spec("pgd", "linf", e, params=pgd_params(k, e * cfg.pgd_step_ratio)))
    for e in cfg.l2_eps:  # step 2.5 * eps / k: Madry et al.'s rule, reaches the sphere from anywhere inside
        specs.append(Spec("pgd", "l2", e, params=pgd_params(cfg.pgd_steps, 2.5 * e / cfg.pgd_steps)))
    if cfg.cw:
        specs.append(Spec("cw-l2", "l2", None, limit=cfg.cw, params={
            "steps": cfg.cw_steps, "search_steps": cfg.cw_search_steps, "lr": cfg.cw_lr,
            "initial_const": cfg.cw_initial_const, "confidence": cfg.cw_confidence}))
    if cfg.autoattack:
        specs.append(Spec("autoattack", "linf", cfg.autoattack_eps, limit=cfg.autoattack,
                          params={"version": cfg.autoattack_version, "stages": None}))
    if cfg.distortions:
        for kind, levels in (("contrast", cfg.contrast), ("low-pass", cfg.low_pass), ("high-pass", cfg.high_pass)):
            for level in levels:
                distortions.check_level(kind, level)
                specs.append(Spec(kind, level=float(level), params={"grey": cfg.distortion_grey}))
    return specs


def prepare_for_attack(model, example: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """(the model as eval attacks it, a record of which model that is).

    Eval mode, frozen weights, BatchNorm folded into the convolutions: in eval mode BatchNorm is a
    fixed affine map, so folding it into the preceding conv (torch.fx.experimental.optimization.fuse)
    is the same function with one op less per layer, forward and backward (~15% per PGD step on cnn4 /
    resnet18 on CPU). Models fx cannot trace, or whose folded logits disagree with the original on
    `example`, are attacked unfolded; the record says so and why ({"batchnorm_folded": bool,
    "batchnorm_layers": int, "reason": str | None}), and eval writes it into its results."""
    model = model.eval()
    model.requires_grad_(False)  # eval never trains: attacks need input gradients only
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    def unfolded(reason: str):
        return model, {"batchnorm_folded": False, "batchnorm_layers": layers, "reason": reason}

    if not layers:
        return unfolded("the model has no BatchNorm layers")
    try:
        with warnings.catch_warnings():  # torch.fx's imports raise torch.jit deprecation noise
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

            folded = fuse(model).eval()
    except Exception as e:  # tracing fails on data-dependent control flow, among others: recorded, not hidden
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return unfolded(f"torch.fx could not trace the model: {type(e).__name__}: {first}"[:300])
    folded.requires_grad_(False)
    with torch.no_grad():
        a, b = model(example), folded(example)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-6):
        return unfolded(f"the folded model's logits differ from the original by up to {float((a - b).abs().max()):.3g}")
    left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return folded, {"batchnorm_folded": True, "batchnorm_layers": layers,
                    "reason": f"{left} BatchNorm layer(s) without a preceding conv kept" if left else None}


def _generator(seed: int, spec: Spec, batch_no: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(f"{seed}:{spec.key}:{batch_no}".encode()))
    return g


class _Tally:
    def __init__(self):
        self.correct, self.time_s, self.extra = [], 0.0, {}


def _attack(model, spec: Spec, x, y, gen, n_classes, seed, tally: _Tally) -> torch.Tensor:
    p = spec.params
    if spec.attack == "fgsm":
        return attacks.fgsm(model, x, y, spec.eps)
    if spec.attack == "pgd":
        return attacks.pgd(model, x, y, spec.eps, p["step_size"], p["steps"], norm=spec.norm,
                           random_start=p["random_start"], restarts=p["restarts"], generator=gen,
                           stop_when_fooled=p["stop_when_fooled"])
    if spec.attack == "cw-l2":
        r = cw_l2(model, x, y, steps=p["steps"], search_steps=p["search_steps"], lr=p["lr"],
                  initial_const=p["initial_const"], confidence=p["confidence"])
        tally.extra.setdefault("l2", []).append(r.l2[r.success].cpu())
        return r.x_adv
    if spec.attack == "autoattack":
        r = autoattack(model, x, y, spec.eps, n_classes=n_classes, version=p["version"], seed=seed)
        stages = tally.extra.setdefault("stages", {})
        for name, robust in r.stages:
            stages[name] = stages.get(name, 0) + robust
        tally.extra["max_linf"] = max(tally.extra.get("max_linf", 0.0), r.max_linf)
        return r.x_adv
    return distortions.distort(x, spec.attack, spec.level, p["grey"])


def _attack_rows(ok: torch.Tensor) -> torch.Tensor:
    """Rows to attack: the clean-correct ones (attacking already-wrong samples cannot change the count),
    topped up with wrong ones to a multiple of SHAPE_QUANTUM so batch shapes repeat across batches (each
    new shape costs the backend a new kernel plan). The extra rows stay wrong whatever the attack does."""
    right, wrong = ok.nonzero().flatten(), (~ok).nonzero().flatten()
    if len(right) == 0:
        return right
    size = min(len(ok), -(-len(right) // SHAPE_QUANTUM) * SHAPE_QUANTUM)
    return torch.cat([right, wrong[: size - len(right)]]).sort().values


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_suite(model, batches, specs: list[Spec], *, n_classes: int, seed: int = 0, progress=None) -> list[dict]:
    """Evaluate `model` (eval mode, [0, 1] inputs) on every (x, y) batch under every spec.

    Returns one dict per spec: attack, norm, eps, eps_255, level, params, accuracy, correct, n, time_s."""
    tallies = [_Tally() for _ in specs]
    offset = 0
    for batch_no, (x, y) in enumerate(batches):
        device = x.device
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            clean_ok = model(x).argmax(1) == y
        _sync(device)
        clean_time = time.perf_counter() - t0
        for spec, tally in zip(specs, tallies):
            take = len(x) if spec.limit is None else max(0, min(len(x), spec.limit - offset))
            if take == 0:
                continue
            if spec.attack == "clean":
                tally.correct.append(clean_ok[:take].cpu())
                tally.time_s += clean_time
                continue
            xs, ys, ok = x[:take], y[:take], clean_ok[:take].clone()
            _sync(device)
            t0 = time.perf_counter()
            if spec.attack in ADVERSARIAL:
                # CW / AutoAttack statistics (L2 norms, stage counts) must only see clean-correct rows
                todo = _attack_rows(ok) if spec.attack in ("fgsm", "pgd") else ok.nonzero().flatten()
                if len(todo):
                    gen = _generator(seed, spec, batch_no, device)
                    x_adv = _attack(model, spec, xs[todo], ys[todo], gen, n_classes, seed, tally)
                    with torch.no_grad():
                        ok[todo] &= model(x_adv).argmax(1) == ys[todo]
            else:
                with torch.no_grad():
                    ok = model(_attack(model, spec, xs, ys, None, n_classes, seed, tally)).argmax(1) == ys
            _sync(device)
            tally.time_s += time.perf_counter() - t0
            tally.correct.append(ok.cpu())
        offset += len(x)
        if progress is not None:
            progress.update(len(x))
    return [_row(spec, tally) for spec, tally in zip(specs, tallies)]


def _row(spec: Spec, tally: _Tally) -> dict:
    correct = torch.cat(tally.correct) if tally.correct else torch.zeros(0, dtype=torch.bool)
    n = len(correct)
    row = {"attack": spec.attack, "norm": spec.norm, "eps": spec.eps,
           "eps_255": None if spec.eps is None or spec.norm != "linf" else round(spec.eps * 255, 6),
           "level": spec.level, "params": dict(spec.params), "n": n, "correct": int(correct.sum()),
           "accuracy": float(correct.float().mean()) if n else None, "time_s": round(tally.time_s, 4),
           "per_sample": correct}
    if spec.attack == "cw-l2":
        l2 = torch.cat(tally.extra["l2"]) if tally.extra.get("l2") else torch.zeros(0)
        row["params"]["median_l2"] = float(l2.median()) if len(l2) else None
        row["params"]["mean_l2"] = float(l2.mean()) if len(l2) else None
    if spec.attack == "autoattack":
        row["params"]["stages"] = tally.extra.get("stages", {})
        row["params"]["max_linf"] = tally.extra.get("max_linf", 0.0)
    return row
