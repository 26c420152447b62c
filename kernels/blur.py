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
def blur_into(src, weights, out):
    """out (H, W) float32 = separable blur of src (H, W, any real dtype) with 1-D weights, reflect-101.

    Row pass into a scratch image, then column pass; both accumulate over the kernel taps in the
    outer loop so the inner loop runs over contiguous pixels (vectorises)."""
    height, width = src.shape
    ks = weights.shape[0]
    r = ks // 2
    if ks == 1:
        for y in range(height):
            for x in range(width):
                out[y, x] = np.float32(src[y, x])
        return out
    xi = reflect101_index(width, r)
    yi = reflect101_index(height, r)
    tmp = np.empty((height, width), np.float32)
    padded = np.empty(width + 2 * r, np.float32)
    for y in range(height):
        for q in range(width + 2 * r):
            padded[q] = np.float32(src[y, xi[q]])
        for x in range(width):
            tmp[y, x] = 0
        for k in range(ks):
            wk = weights[k]
            for x in range(width):
                tmp[y, x] += wk * padded[x + k]
    for y in range(height):
        for x in range(width):
            out[y, x] = 0
        for k in range(ks):
            wk = weights[k]
            row = yi[y + k]
            for x in range(width):
                out[y, x] += wk * tmp[row, x]
    return out


def gaussian_blur(img, sigma_px: float, out=None) -> np.ndarray:
    """float32 (H, W) Gaussian blur with std sigma_px pixels, border reflect-101; sigma 0 returns a copy."""
    img = np.asarray(img)
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
