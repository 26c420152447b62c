"""Separable Gaussian blur matching `cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)`
on float32 images (Numba).

Kernel: OpenCV's choice for a float image with ksize=0: ksize = cvRound(sigma * 4 * 2 + 1) | 1 (the
"4 sigma" rule; 8-bit images use 3 sigma), weights exp(-x^2 / (2 sigma^2)) for x = i - (ksize-1)/2,
normalised in double and stored as float32 (getGaussianKernel(ksize, sigma, CV_32F)).
Border: reflect-101 (`dcb|abcd|cba`), reflected repeatedly when the kernel is wider than the image,
as cv2's borderInterpolate does. sigma == 0 (or a kernel of size 1) returns a copy.

Run the tests: `python -m pytest -q tests/kernels/test_blur.py`
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def gaussian_kernel(sigma):
    """float32 weights of cv2.getGaussianKernel(cvRound(8 sigma + 1) | 1, sigma, CV_32F); [1] for sigma <= 0."""
    if not sigma > 0.0:
        return np.ones(1, np.float32)
    ksize = int(np.rint(sigma * 8.0 + 1.0)) | 1  # cvRound rounds half to even, like rint
    half = (ksize - 1) * 0.5
    scale = -0.5 / (sigma * sigma)
    w = np.empty(ksize)
    total = 0.0
    for i in range(ksize):
        x = i - half
        w[i] = math.exp(scale * x * x)
        total += w[i]
    return (w * (1.0 / total)).astype(np.float32)


@njit(cache=True)
def reflect101_index(n, radius):
    """Source index of each padded position p in [-radius, n + radius) under reflect-101 (cv2 borderInterpolate)."""
    idx = np.empty(n + 2 * radius, np.int64)
    for q in range(n + 2 * radius):
        p = q - radius
        if n == 1:
            p = 0
        while p < 0 or p >= n:
            if p < 0:
                p = -p
            else:
                p = 2 * n - 2 - p
        idx[q] = p
    return idx


@njit(cache=True)
def _column_pass(src, weights, out, idx):
    """out (H, W) float32 = 1-D blur of src along axis 0 with symmetric weights; idx from reflect101_index.

    Whole rows are accumulated into a local buffer, tap pair by tap pair, so the inner loop runs over
    contiguous memory and vectorises (a per-pixel loop over taps ran ~3x slower)."""
    height, width = out.shape
    ks = weights.shape[0]
    r = ks // 2
    acc = np.empty(width, np.float32)
    for y in range(height):
        centre = src[idx[y + r]]
        wc = weights[r]
        for x in range(width):
            acc[x] = wc * np.float32(centre[x])
        for k in range(r):  # mirrored taps share one multiply (a Gaussian is symmetric)
            wk = weights[k]
            top = src[idx[y + k]]
            bottom = src[idx[y + ks - 1 - k]]
            for x in range(width):
                acc[x] += wk * (np.float32(top[x]) + np.float32(bottom[x]))
        row = out[y]
        for x in range(width):
            row[x] = acc[x]


@njit(cache=True)
def blur_into(src, weights, out):
    """out (H, W) float32 = separable blur of src (H, W, any real dtype) with symmetric 1-D weights, reflect-101.

    Column pass, transpose, column pass, transpose back: both passes then walk contiguous rows.
    (cv2 filters rows first; the order only changes float rounding, ~1e-7.)"""
    height, width = src.shape
    ks = weights.shape[0]
    if ks == 1:
        for y in range(height):
            for x in range(width):
                out[y, x] = np.float32(src[y, x])
        return out
    r = ks // 2
    tmp = np.empty((height, width), np.float32)
    _column_pass(src, weights, tmp, reflect101_index(height, r))
    tmp_t = np.ascontiguousarray(tmp.T)
    out_t = np.empty((width, height), np.float32)
    _column_pass(tmp_t, weights, out_t, reflect101_index(width, r))
    out[:] = out_t.T
    return out


def gaussian_blur(img, sigma_px: float, out=None) -> np.ndarray:
    """float32 (H, W) Gaussian blur with std sigma_px pixels, border reflect-101; sigma 0 returns a copy."""
    img = np.ascontiguousarray(img)
    if img.ndim != 2:
        raise ValueError(f"gaussian_blur needs a 2-D image, got shape {img.shape}")
    sigma_px = float(sigma_px)
    if not (math.isfinite(sigma_px) and sigma_px >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma_px}")
    if out is None:
        out = np.empty(img.shape, np.float32)
    elif out.shape != img.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {img.shape}")
    return blur_into(img, gaussian_kernel(sigma_px), out)
