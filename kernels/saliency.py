"""Masks to SAT saliency maps, and a weak foreground mask for images on plain backgrounds (Numba).

Convention (the paper's): s = 2 * blur(m) - 1 in [-1, 1], salient = +1, background = -1.
Blur width: sigma_px = sigma_frac * max(H, W), i.e. a fraction of the output size, so the same
config gives the same look at 32 and 64 px. sigma_frac = 0 is the paper's hard map (s in {-1, +1}).
Storage: 8-bit, g = round((s + 1) * 127.5) (the shard format's encoding, `shards.format.saliency_to_uint8`);
`mask_to_saliency_u8` fuses blur and encoding in one Numba call and gives bit-identical bytes to
`saliency_to_uint8(mask_to_saliency(...))` because it runs the same float32 operations in the same order.

Per-object path in a builder: `rasterize_polygons(..., out=m)` then `mask_to_saliency_u8(m, f, out=g)`:
two compiled calls, no Python loop over pixels, the output buffers reusable.

Run the tests: `python -m pytest -q tests/kernels/test_saliency.py`
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.blur import blur_into, gaussian_kernel

_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF_LEVELS = np.float32(127.5)


def sigma_px_for(shape, sigma_frac: float) -> float:
    """Blur std in pixels for an output of this shape: sigma_frac * max(H, W)."""
    sigma_frac = float(sigma_frac)
    if not (math.isfinite(sigma_frac) and sigma_frac >= 0):
        raise ValueError(f"sigma_frac must be finite and >= 0, got {sigma_frac}")
    return sigma_frac * max(shape[0], shape[1])


@njit(cache=True)
def _in_unit_range(mask):
    """A {0, 255} mask passed by mistake would come out all salient: refuse it instead. A little
    slack, because resampled float masks (cv2.resize of {0, 1}) can land a rounding error outside."""
    for v in mask.ravel():
        if not (v >= -1e-3 and v <= 1.001):  # NaN fails too
            return False
    return True


@njit(cache=True)
def _saliency_f32(mask, sigma_px, out):
    """Returns False (out untouched) when mask has values outside [0, 1]."""
    if not _in_unit_range(mask):
        return False
    blur_into(mask, gaussian_kernel(sigma_px), out)
    height, width = out.shape
    for y in range(height):
        for x in range(width):
            s = _TWO * out[y, x] - _ONE
            # normalised float32 weights can sum to 1 + eps: keep the documented range
            out[y, x] = min(max(s, -_ONE), _ONE)
    return True


@njit(cache=True)
def _saliency_u8(mask, sigma_px, out):
    height, width = out.shape
    soft = np.empty((height, width), np.float32)
    if not _saliency_f32(mask, sigma_px, soft):
        return False
    for y in range(height):
        for x in range(width):
            # same float32 ops as shards.format.saliency_to_uint8: rint((s + 1) * 127.5), clip
            g = np.rint((soft[y, x] + _ONE) * _HALF_LEVELS)
            out[y, x] = np.uint8(min(max(g, np.float32(0.0)), np.float32(255.0)))
    return True


def _check_mask(mask) -> np.ndarray:
    # C order always: one compiled variant per dtype instead of one per memory layout too
    mask = np.ascontiguousarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)
    return mask


def _range_error(mask) -> str:
    return f"mask values must lie in [0, 1], got min {mask.min()}, max {mask.max()}"  # NaN shows as nan


def mask_to_saliency(mask, sigma_frac: float, out=None) -> np.ndarray:
    """mask (H, W) uint8/float in [0, 1] -> float32 saliency in [-1, 1]: 2 * blur(mask) - 1.

    sigma_px = sigma_frac * max(H, W); sigma_frac = 0 gives the hard map (+1 on the mask, -1 off it)."""
    mask = _check_mask(mask)
    if out is None:
        out = np.empty(mask.shape, np.float32)
    elif out.shape != mask.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {mask.shape}")
    if not _saliency_f32(mask, sigma_px_for(mask.shape, sigma_frac), out):
        raise ValueError(_range_error(mask))
    return out


def mask_to_saliency_u8(mask, sigma_frac: float, out=None) -> np.ndarray:
    """Same as mask_to_saliency, encoded for storage: uint8 round((s + 1) * 127.5) (0 = background, 255 = salient)."""
    mask = _check_mask(mask)
    if out is None:
        out = np.empty(mask.shape, np.uint8)
    elif out.shape != mask.shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {mask.shape}")
    if not _saliency_u8(mask, sigma_px_for(mask.shape, sigma_frac), out):
        raise ValueError(_range_error(mask))
    return out


@njit(cache=True)
def _foreground(img, threshold, out):
    height, width, channels = img.shape
    # the 1-pixel frame, each pixel once (a 1-row or 1-column image is all frame)
    n_border = height * width if (height <= 2 or width <= 2) else 2 * (height + width) - 4
    frame = np.empty(n_border, np.float64)
    background = np.empty(channels, np.float64)
    for ch in range(channels):
        n = 0
        for y in range(height):
            for x in range(width):
                if y == 0 or y == height - 1 or x == 0 or x == width - 1:
                    frame[n] = img[y, x, ch]
                    n += 1
        background[ch] = np.median(frame[:n])
    for y in range(height):
        for x in range(width):
            diff = 0.0
            for ch in range(channels):
                diff = max(diff, abs(img[y, x, ch] - background[ch]))
            out[y, x] = 1 if diff > threshold else 0
    return out


def foreground_mask(img, threshold: float = 16.0, out=None) -> np.ndarray:
    """uint8 {0, 1} mask of pixels that differ from the background colour by more than `threshold` grey levels.

    Background colour = per-channel median of the image's 1-pixel border (the frame is background on
    plain-background data such as Fashion-MNIST's black); difference = max over channels of |pixel - bg|.
    A real but weak saliency: the object's silhouette, holes and dark parts included as they are."""
    img = np.ascontiguousarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {np.asarray(img).shape}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if out is None:
        out = np.empty(img.shape[:2], np.uint8)
    elif out.shape != img.shape[:2] or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {img.shape[:2]}")
    return _foreground(img, threshold, out)
