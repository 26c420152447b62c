"""Pad-and-random-crop plus horizontal flip, applied identically to an image and its saliency map.

Definition (the DALI pipeline implements the same with `fn.slice(out_of_bounds_policy="pad")` and
`fn.flip`): per sample draw integer offsets dy, dx uniformly in [-p, p] and one coin; then
    out[y, x] = in[y + dy, x + dx]   (0 where that falls outside the image), then mirror if the coin is 1.
Padding is 0 in uint8 for both: black image, saliency -1 ("not salient") -- padding holds no object.
One set of draws is used for image and saliency, so they stay aligned pixel for pixel.
Three implementations of this one definition: `crop_flip` (numpy, the torch backend's workers),
DALI's fn.slice + fn.flip (dali_backend.py) and `crop_flip_gather` (torch, any device: the device
backend, which also has a Numba loop for CPU targets, see device_backend.py). What the backends share:
the DALI and device backends use the same draws (numpy, seeded by (seed, epoch, rank, 2), per batch an
anchor per sample then a coin per sample), so they agree bit for bit; the torch backend draws per
DataLoader worker (seeded by (seed, epoch, rank, 3, worker)), so it shares the distribution only.

Both backends finish their batches in their own parallel workers (DALI's threads, DataLoader
processes): NCHW layout, and on a CPU target also the float conversion, so the training process
runs no torch op for the loader (on 2 cores, its OpenMP threads would spin against DALI's). For a
CUDA target the torch backend ships uint8 (4x fewer bytes to copy) and `to_model_inputs` converts
on the GPU. The conversions are x / 255 and s / 127.5 - 1 in float32 (= uint8_to_saliency).
"""
from __future__ import annotations

import numpy as np
import torch


def draw(rng: np.random.Generator, n: int, padding: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (dy, dx, mirror) draws for a batch of n."""
    dy = rng.integers(-padding, padding + 1, n)
    dx = rng.integers(-padding, padding + 1, n)
    mirror = rng.integers(0, 2, n).astype(bool) if flip else np.zeros(n, bool)
    return dy, dx, mirror


def crop_flip(batch: np.ndarray, dy: np.ndarray, dx: np.ndarray, mirror: np.ndarray, padding: int) -> np.ndarray:
    """Apply the draws to a uint8 batch [N, H, W, C]; returns a new array."""
    n, h, w, _ = batch.shape
    p = padding
    padded = np.pad(batch, ((0, 0), (p, p), (p, p), (0, 0))) if p else batch
    out = np.empty_like(batch)
    for i in range(n):
        view = padded[i, p + dy[i]:p + dy[i] + h, p + dx[i]:p + dx[i] + w]
        out[i] = view[:, ::-1] if mirror[i] else view
    return out


def crop_flip_gather(store: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                     mirror: torch.Tensor) -> torch.Tensor:
    """crop_flip's definition on torch tensors, fused with picking the batch: out[b] = the crop/flip of
    store[idx[b]] (padding p is implied by the draws). store (N, C, H, W) on any device; idx, dy, dx
    integer and mirror bool tensors of shape (B,) on the same device. One gather kernel, no host sync.

    After the crop, out[y, x] = in[y + dy, x + dx]; the mirror reads column w - 1 - x of the crop, so
    the source column is (w - 1 - x if mirror else x) + dx; sources outside the image give 0."""
    _, c, h, w = store.shape
    dev = store.device
    rows = torch.arange(h, device=dev) + dy[:, None]  # (B, H) source row of each output row
    ar_w = torch.arange(w, device=dev)
    cols = torch.where(mirror[:, None], w - 1 - ar_w, ar_w) + dx[:, None]  # (B, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    out = store[idx[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
    return out.mul_(inside[:, None])


def uint8_to_float(x: np.ndarray, saliency: bool) -> np.ndarray:
    """float32 x / 255 (image) or s / 127.5 - 1 (saliency), in numpy for the DataLoader workers."""
    out = x.astype(np.float32)
    if saliency:
        out /= np.float32(127.5)
        out -= np.float32(1.0)
    else:
        out /= np.float32(255.0)
    return out


def to_model_inputs(x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, device: torch.device):
    """NCHW image and N1HW saliency (uint8 or already float), labels -> (x [0,1], s [-1,1], y int64 N) on device."""
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    s = s.to(device, non_blocking=non_blocking)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    if s.dtype == torch.uint8:
        s = s.to(torch.float32).div_(127.5).sub_(1.0)
    y = y.reshape(-1).to(device, dtype=torch.int64, non_blocking=non_blocking)
    return x, s, y
