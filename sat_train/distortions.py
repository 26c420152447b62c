"""The paper's natural distortions: contrast reduction, low-pass and high-pass filtering.

Mangla et al. 2020 (arXiv 2006.07828) test robustness beyond adversarial noise with the distortions of
Geirhos et al. 2018. Their reference code (github.com/Puneet2000/SAT_ECML2020, io_utils.test_dict and
distortions.py) evaluates at these levels, which are the defaults here:

    contrast   c in 0.1 0.3 0.5 0.7 0.9 1      x' = (1 - c) / 2 + c * x            (colour kept)
    low-pass   sigma in 1 2 4 8 16 32          x' = G_sigma * grey(x)              (Gaussian blur)
    high-pass  sigma in 2.82 2 1.414 1 0.7 0.5 x' = grey(x) - G_sigma * grey(x) + shift to the background grey

Filters work on the grey image (skimage's rgb2gray weights) and are repeated over the model's channels,
as in the reference. The Gaussian is scipy.ndimage's (truncated at 4 sigma) with constant padding at
the background grey. The reference hard-codes that grey as 0.4423 (its CIFAR mean); `grey=None` here
uses each image's own mean grey instead, so a black-background dataset (Fashion-MNIST) gets no bright
frame from the padding and the result does not depend on batching. Pass grey=0.4423 for the reference.

Everything runs on the tensor's device as separable convolutions: no per-image numpy round trips.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = {
    "contrast": (0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
    "low-pass": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
    "high-pass": (2.82, 2.0, 1.414, 1.0, 0.7, 0.5),
}
LEVEL_NAME = {"contrast": "contrast", "low-pass": "sigma", "high-pass": "sigma"}
RGB_TO_GREY = (0.2125, 0.7154, 0.0721)  # ITU-R 709 luma, skimage.color.rgb2gray
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W); grey images pass through."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"grey conversion needs 1 or 3 channels, got {x.shape[1]}")
    w = torch.tensor(RGB_TO_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = int(TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(grey: torch.Tensor, sigma: float, cval: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian on (N, 1, H, W), padding with a per-image constant `cval` (N,)."""
    k = gaussian_kernel1d(sigma, grey.dtype, grey.device)
    r = (len(k) - 1) // 2
    # F.pad takes one scalar value, so pad with 0 and add the constant back: blur(x - c) + c
    c = cval.view(-1, 1, 1, 1)
    out = F.pad(grey - c, (r, r, r, r))
    out = F.conv2d(out, k.view(1, 1, 1, -1))
    out = F.conv2d(out, k.view(1, 1, -1, 1))
    return out + c


def _background(grey: torch.Tensor, grey_level: float | None) -> torch.Tensor:
    if grey_level is None:
        return grey.mean(dim=(1, 2, 3))
    return torch.full((len(grey),), float(grey_level), dtype=grey.dtype, device=grey.device)


def contrast(x: torch.Tensor, level: float) -> torch.Tensor:
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"contrast level must be in [0, 1], got {level}")
    return (1.0 - level) / 2.0 + x * level


def low_pass(x: torch.Tensor, sigma: float, grey: float | None = None) -> torch.Tensor:
    g = to_grey(x)
    out = gaussian_blur(g, sigma, _background(g, grey)).clamp_(0.0, 1.0)
    return out.expand_as(x).contiguous()


def high_pass(x: torch.Tensor, sigma: float, grey: float | None = None) -> torch.Tensor:
    g = to_grey(x)
    bg = _background(g, grey)
    out = g - gaussian_blur(g, sigma, bg)
    # shift the (near zero-mean) detail image to the background grey so its statistics stay image-like
    out = out + (bg - out.mean(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    return out.clamp_(0.0, 1.0).expand_as(x).contiguous()


def distort(x: torch.Tensor, kind: str, level: float, grey: float | None = None) -> torch.Tensor:
    """One distortion at one level on a [0, 1] batch (N, C, H, W); output has the same shape."""
    if kind == "contrast":
        return contrast(x, level)
    if kind == "low-pass":
        return low_pass(x, level, grey)
    if kind == "high-pass":
        return high_pass(x, level, grey)
    raise ValueError(f"unknown distortion {kind!r}; choose from {', '.join(LEVELS)}")


def check_level(kind: str, level: float) -> None:
    if kind not in LEVELS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {', '.join(LEVELS)}")
    if kind == "contrast" and not 0.0 <= level <= 1.0:
        raise ValueError(f"contrast level must be in [0, 1], got {level}")
    if kind != "contrast" and not (level > 0 and math.isfinite(level)):
        raise ValueError(f"{kind} sigma must be a positive number, got {level}")
