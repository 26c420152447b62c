"""Saliency maps from a trained classifier ("teacher"), for whole batches in one pass.

    from sat_train.explain import ExplainConfig, explain
    maps = explain(model, x, labels, ExplainConfig(explainer="gradcam++"), keys)   # (N, H, W) float32

Explainers (reference: SAT_ECML2020's gradcam.py), with each one's default normalization:
- grad-sign (sign): d logit_t / dx, the plain gradient. What the reference's "GuidedBackprop" computes:
  it rewires nn.ReLU modules only, and its networks call F.relu.
- guided-backprop (sign): the same gradient with the guided ReLU rule (backward passes relu(grad) where
  the input was > 0) at EVERY ReLU: nn.ReLU, F.relu, torch.relu, Tensor.relu and their in-place forms.
- smoothgrad (minmax): mean of d logit_t / dx over n = 10 copies x + N(0, (0.15 (max x - min x))^2)
  (the reference's noise: 0.15 of each image's value range).
- integrated-gradients (minmax): captum's, zero baseline, trapezoid rule over 100 intervals (the
  reference's 101 points; captum scales its trapezoid weights by 100/101, which normalization removes).
- gradcam (minmax): captum's LayerGradCam on the last block, ReLU, bilinear upsampling to the image.
- gradcam++ (minmax): Grad-CAM++ (Chattopadhay et al. 2018) on the last block, ReLU, bilinear upsampling.
- guided-gradcam++ (symmetric): guided-backprop gradient x upsampled Grad-CAM++.
`deletion_check` measures faithfulness (tests and bench/teacher.py).

Conventions:
- target: the true label (default) or the prediction (`target="pred"`, what the reference uses).
- Gradients are of the target's logit. (The reference's Integrated Gradients differentiates the
  cross-entropy loss instead, which flips the sign; its min-max map is then 1 - ours.)
- Grad-CAM++ (the paper's eq. with g = d logit / dA_ij at the layer): alpha_ij = g_ij^2 / (2 g_ij^2 +
  g_ij^3 sum_ab A_ab) (a zero denominator counts as 1, as in the reference), w_k = sum_ij alpha relu(g),
  map = relu(sum_k w_k A_k). The reference sums A_ab g_ab^3 instead of g_ij^3 sum_ab A_ab: the same
  wherever g is constant over positions, as for every sat_train model (the layer feeds global average
  pooling and a linear head), different otherwise. The reference multiplies g by
  exp(logit) inside the relu, a positive factor per image that every normalization below removes;
  it is left out because exp overflows float32 for logits above ~88. The reference omits the final
  ReLU (the paper has it).
- guided-gradcam++: the reference combines sign(gradient) g and its min-max Grad-CAM++ c as
  (g + 1)(c + 1) / 2 - 1; here it is Selvaraju et al.'s product (guided gradient x CAM), normalized
  symmetric to [-1, 1], the reference's range.
- Channels: the reference keeps one map per colour channel. The shard format stores one 8-bit map per
  pixel (SAT applies it to every channel), so colour attributions are reduced: `sum` (default: the
  derivative along a grey shift of the pixel, which is the direction a shared map perturbs), `mean`, or
  `max-abs` (the channel value of largest magnitude). One-channel images are unaffected.
- Normalization per image: sign -> {-1, 0, 1}; minmax -> [0, 1] ((a - min) / (max - min), 0 where
  the map is constant); symmetric -> [-1, 1] (a / max |a|, 0 where a is 0 everywhere).
- Optional blur after normalization (`blur_sigma_frac`, a fraction of the image side, as for
  annotation maps); a Gaussian average keeps the range.
- Stored as uint8 g = round((s + 1) * 127.5), read back as g / 127.5 - 1 (step 2/255, error <= 1/255):
  sign {-1, 0, 1} -> {0, 128, 255} -> {-1, 1/255, 1}; minmax [0, 1] -> 128..255 (0 reads back as 1/255);
  symmetric [-1, 1] -> 0..255.

Passes per batch: one forward/backward (gradient explainers, Grad-CAM, Grad-CAM++), two for guided
Grad-CAM++ (a plain pass for the CAM, a guided one for the gradient), one over the n noisy copies
(SmoothGrad) or the steps + 1 path points (IG), cut into chunks of at most 4096 images for memory.
Batching: each map depends only on its own image (the model runs in eval mode; SmoothGrad's noise is
drawn from a generator seeded by (seed, sample key)), so batched maps equal per-image maps up to
float rounding, and a map does not change with batch size, shard or resume.

Why one file over 350 lines: a sixth of it is the conventions above (what differs from the reference
and why); the explainers share ExplainConfig, target selection, channel reduction and normalization,
and are best checked against each other in one place (deletion_check, tests/sat_train/test_explain.py).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from shards.cli import Config, option

EXPLAINERS = ("grad-sign", "guided-backprop", "smoothgrad", "integrated-gradients", "gradcam", "gradcam++",
              "guided-gradcam++")
DEFAULT_NORMALIZE = {"grad-sign": "sign", "guided-backprop": "sign", "smoothgrad": "minmax",
                     "integrated-gradients": "minmax", "gradcam": "minmax", "gradcam++": "minmax",
                     "guided-gradcam++": "symmetric"}
NORMALIZATIONS = ("sign", "minmax", "symmetric")
RANGES = {"sign": [-1.0, 1.0], "minmax": [0.0, 1.0], "symmetric": [-1.0, 1.0]}
CHANNEL_MODES = ("sum", "mean", "max-abs")
TARGETS = ("label", "pred")
CAM_EXPLAINERS = ("gradcam", "gradcam++", "guided-gradcam++")
MAX_EXPANDED = 4096  # images per forward when SmoothGrad / IG expand a batch (memory bound, not math)


class ExplainError(ValueError):
    """A bad explainer setting or a model it cannot explain; one line."""


@dataclass(frozen=True)
class ExplainConfig(Config):
    config_error = ExplainError

    explainer: str = option("grad-sign", "how maps are computed (grad-sign: what the paper's code computes)",
                            choices=EXPLAINERS)
    target: str = option("label", "class explained: the true label or the teacher's prediction (pred, the reference "
                         "code)", choices=TARGETS)
    normalize: str = option("auto", "per-image range: sign {-1,0,1}, minmax [0,1], symmetric [-1,1]; auto = the "
                            "reference code's per explainer (" + ", ".join(f"{k} {v}" for k, v in
                                                                           DEFAULT_NORMALIZE.items()) + ")",
                            choices=("auto",) + NORMALIZATIONS)
    channels: str = option("sum", "colour attributions -> one map per pixel (the format stores one; the reference "
                           "kept one per channel)", choices=CHANNEL_MODES)
    blur_sigma_frac: float = option(0.0, "Gaussian blur of the normalized map, std as a fraction of the image side "
                                    "(0: none)")
    smoothgrad_samples: int = option(10, "SmoothGrad: noisy copies")
    smoothgrad_sigma: float = option(0.15, "SmoothGrad: noise std as a fraction of each image's value range")
    ig_steps: int = option(100, "Integrated Gradients: trapezoid intervals from the zero baseline (steps + 1 model "
                           "evaluations)")
    cam_layer: str = option("auto", "Grad-CAM explainers: module name of the layer (model.named_modules()); auto = "
                            "the last block")
    seed: int = option(0, "seed of SmoothGrad's noise (per sample key)")

    def validate(self) -> "ExplainConfig":
        def need(ok, msg):
            if not ok:
                raise ExplainError(msg)

        need(np.isfinite(self.blur_sigma_frac) and self.blur_sigma_frac >= 0, "blur sigma fraction must be >= 0")
        need(self.smoothgrad_samples >= 1 and self.smoothgrad_sigma >= 0, "smoothgrad samples >= 1 and sigma >= 0")
        need(self.ig_steps >= 1, "integrated-gradients steps must be >= 1")
        return self

    @property
    def normalization(self) -> str:
        return DEFAULT_NORMALIZE[self.explainer] if self.normalize == "auto" else self.normalize

    def params(self, model: nn.Module | None = None) -> dict:
        """Every setting that changes this explainer's maps (others are left out, so that an unused flag
        does not give a different fingerprint); auto values resolved."""
        p = {k: v for k, v in asdict(self).items() if k in ("explainer", "target", "channels", "blur_sigma_frac")}
        p["normalize"] = self.normalization
        if self.explainer == "smoothgrad":
            p.update(smoothgrad_samples=self.smoothgrad_samples, smoothgrad_sigma=self.smoothgrad_sigma, seed=self.seed)
        if self.explainer == "integrated-gradients":
            p.update(ig_steps=self.ig_steps, ig_baseline=0.0, ig_rule="trapezoid")
        if self.explainer in CAM_EXPLAINERS:
            p.update(cam_layer=find_cam_layer(model, self.cam_layer)[0] if model is not None else self.cam_layer,
                     cam_upsample="bilinear")
        return p


# ----------------------------------------------------------------------------- guided ReLU everywhere

class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes relu(grad) where the output is positive (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class GuidedReLUMode(TorchFunctionMode):
    """While active, every ReLU call (nn.ReLU modules call F.relu; torch.relu, Tensor.relu, in-place forms)
    runs the guided rule. A TorchFunctionMode sees each torch call, so this needs no knowledge of the
    architecture and patches no global. In-place calls return a new tensor (the models here use the
    return value). `calls` counts the ReLUs it replaced (tests check it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RELU_FUNCTIONS:
            self.calls += 1
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- building blocks

def find_cam_layer(model: nn.Module, name: str = "auto") -> tuple[str, nn.Module]:
    """(name, module) whose output Grad-CAM uses: the given module, or the last block before pooling."""
    modules = dict(model.named_modules())
    if name != "auto":
        if name not in modules:
            raise ExplainError(f"cam layer {name!r} is not a module of the model (e.g. {', '.join(list(modules)[1:6])})")
        return name, modules[name]
    prefix = "body." if isinstance(getattr(model, "body", None), nn.Module) else ""
    body = model.body if prefix else model
    for attr in ("layers", "blocks"):  # sat_train.models ResNet / PreAct / WideResNet: the residual stages
        if isinstance(getattr(body, attr, None), nn.Module):
            return prefix + attr, getattr(body, attr)
    if isinstance(body, nn.Sequential):  # small_cnn: the module feeding the global pooling
        for i, m in enumerate(body):
            if isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten)) and i > 0:
                return f"{prefix}{i - 1}", body[i - 1]
    raise ExplainError(f"no default Grad-CAM layer for {type(body).__name__}; name one (cam_layer)")


def _targets(model, x, labels, mode):
    if mode == "label":
        return labels
    with torch.no_grad():
        return model(x).argmax(1)


def input_gradient(model, x, labels, mode, guided=False) -> torch.Tensor:
    """d logit_target / dx for the whole batch in one forward/backward (eval mode: samples independent)."""
    x = x.detach().requires_grad_(True)
    with GuidedReLUMode() if guided else contextlib.nullcontext():
        logits = model(x)
        t = logits.argmax(1) if mode == "pred" else labels
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    return g


def _sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def smoothgrad(model, x, labels, cfg: ExplainConfig, keys) -> torch.Tensor:
    n, (b, c, h, w) = cfg.smoothgrad_samples, x.shape
    t = _targets(model, x, labels, cfg.target)
    # noise drawn on the CPU per sample key: the same map whatever the batch, device or resume point
    noise = torch.stack([torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(_sample_seed(cfg.seed, k)))
                         for k in keys]).to(x.device)
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(b, 1, 1, 1, 1)
    xs = (x[:, None] + cfg.smoothgrad_sigma * spread * noise).flatten(0, 1)
    ts = t.repeat_interleave(n)
    step = max(n, MAX_EXPANDED // n * n)
    grads = torch.cat([input_gradient(model, xs[i:i + step], ts[i:i + step], "label") for i in range(0, len(xs), step)])
    return grads.view(b, n, c, h, w).mean(1)


def integrated_gradients(model, x, labels, cfg: ExplainConfig) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    t = _targets(model, x, labels, cfg.target)
    points = cfg.ig_steps + 1
    return IntegratedGradients(model).attribute(
        x, baselines=0.0, target=t, n_steps=points, method="riemann_trapezoid",
        internal_batch_size=len(x) * max(1, min(points, MAX_EXPANDED // len(x))))


def gradcam(model, x, labels, cfg: ExplainConfig) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    t = _targets(model, x, labels, cfg.target)
    cam = LayerGradCam(model, find_cam_layer(model, cfg.cam_layer)[1]).attribute(x, target=t, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")


def gradcam_pp_from(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ map (N, 1, u, v) from a layer's activations A and gradients g = d logit / dA (N, K, u, v)."""
    g2 = grads.pow(2)
    denom = 2 * g2 + activations.sum((2, 3), keepdim=True) * grads.pow(3)
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * grads.clamp(min=0)).sum((2, 3), keepdim=True)
    return (weights * activations).sum(1, keepdim=True).clamp(min=0)


def gradcam_pp(model, x, labels, cfg: ExplainConfig) -> torch.Tensor:
    _, layer = find_cam_layer(model, cfg.cam_layer)
    seen = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("a", out))
    try:
        logits = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    act = seen["a"]
    t = logits.argmax(1) if cfg.target == "pred" else labels
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act)
    cam = gradcam_pp_from(act.detach(), g)
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)


def attribute(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: ExplainConfig, keys=None) -> torch.Tensor:
    """Raw attributions: (N, C, H, W) for gradient explainers, (N, 1, H, W) for Grad-CAM ones."""
    e = cfg.explainer
    if e in ("grad-sign", "guided-backprop"):
        return input_gradient(model, x, labels, cfg.target, guided=e == "guided-backprop")
    if e == "smoothgrad":
        return smoothgrad(model, x, labels, cfg, keys if keys is not None else [str(i) for i in range(len(x))])
    if e == "integrated-gradients":
        return integrated_gradients(model, x, labels, cfg)
    if e == "gradcam":
        return gradcam(model, x, labels, cfg)
    if e == "gradcam++":
        return gradcam_pp(model, x, labels, cfg)
    if e == "guided-gradcam++":
        # two passes: the CAM needs true gradients at the layer, guided ReLUs after it would change them
        cam = gradcam_pp(model, x, labels, cfg)
        t = _targets(model, x, labels, cfg.target)
        return input_gradient(model, x, t, "label", guided=True) * cam
    raise ExplainError(f"unknown explainer {e!r}")


def reduce_channels(a: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W)."""
    if a.shape[1] == 1:
        return a[:, 0]
    if mode == "sum":
        return a.sum(1)
    if mode == "mean":
        return a.mean(1)
    return a.gather(1, a.abs().argmax(1, keepdim=True))[:, 0]  # max-abs, sign kept


def normalize(a: torch.Tensor, how: str) -> torch.Tensor:
    """Per image (N, H, W): sign {-1, 0, 1}, minmax [0, 1], symmetric [-1, 1]; constant maps -> 0."""
    if how == "sign":
        return torch.sign(a)
    flat = a.flatten(1)
    if how == "minmax":
        lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
        span = hi - lo
        return torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(a))
    if how == "symmetric":
        m = flat.abs().amax(1).view(-1, 1, 1)
        return torch.where(m > 0, a / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(a))
    raise ExplainError(f"unknown normalization {how!r}")


def blur(maps: np.ndarray, sigma_frac: float) -> np.ndarray:
    if sigma_frac <= 0:
        return maps
    from kernels.blur import gaussian_blur
    from kernels.saliency import sigma_px_for

    sigma = sigma_px_for(maps.shape[1:], sigma_frac)
    return np.stack([gaussian_blur(m, sigma) for m in maps])


def explain(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: ExplainConfig, keys=None) -> np.ndarray:
    """float32 (N, H, W) maps in the normalization's range for images x (N, C, H, W) in [0, 1].

    `model` must be in eval mode (BatchNorm statistics fixed), else samples of a batch interact."""
    if model.training:
        raise ExplainError("the model must be in eval mode (model.eval())")
    a = attribute(model, x, labels.to(x.device), cfg, keys)
    maps = normalize(reduce_channels(a.detach().float(), cfg.channels), cfg.normalization)
    return blur(maps.cpu().numpy().astype(np.float32), cfg.blur_sigma_frac)


def deletion_check(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, maps: np.ndarray, frac: float = 0.2,
                   background: float = 0.0, seed: int = 0, repeats: int = 5) -> dict:
    """Faithfulness by deletion: the mean drop of the true class's probability when the `frac` most salient
    pixels of each image (all channels) are set to `background`, against `frac` random pixels ("random")
    and against the same salient masks handed to other images ("misaligned": same size and shape, wrong
    place; it separates "which pixels" from "scattered or contiguous"). Both baselines are averaged over
    `repeats` draws. Ties in a map (sign maps have many) are broken at random."""
    rng = np.random.default_rng(seed)
    n, (h, w) = len(x), maps.shape[1:]
    k = int(round(frac * h * w))
    flat = maps.reshape(n, -1)
    salient = np.lexsort((rng.random(flat.shape), -flat), axis=1)[:, :k]

    def drop(pixels) -> float:
        out = x.clone().flatten(2)
        idx = torch.from_numpy(pixels).to(x.device)[:, None, :].expand(-1, x.shape[1], -1)
        with torch.no_grad():
            p = F.softmax(model(out.scatter_(2, idx, background).view_as(x)), 1)
        return float((base - p.gather(1, labels[:, None])[:, 0]).mean())

    with torch.no_grad():
        base = F.softmax(model(x), 1).gather(1, labels[:, None])[:, 0]
    random = [drop(np.argsort(rng.random(flat.shape), axis=1)[:, :k]) for _ in range(repeats)]
    misaligned = [drop(salient[np.roll(np.arange(n), r)]) for r in range(1, min(repeats, n - 1) + 1)]
    return {"salient": drop(salient), "random": float(np.mean(random)),
            "misaligned": float(np.mean(misaligned)) if misaligned else float("nan")}
