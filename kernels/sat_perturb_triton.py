"""Triton kernel for the SAT perturbation (see kernels/sat_perturb.py for the math and the draw scheme).

One program handles BLOCK pixels of one (n, c) plane of the contiguous NCHW tensor x: it reads x
and the matching saliency pixels once, mixes, scales, clamps and writes x' once. The grid is
(planes, blocks per plane), so no per-element integer division is needed to find the saliency
pixel. Draws: Philox (`tl.rand4x`, counter-based, so x' depends only on the seed and the shape),
one call giving the uniforms of 4 elements, a quarter block apart (a fourth of the RNG work of one
call per element; the kernel was compute-bound on the RNG and the 64-bit index division, at 39% of
copy bandwidth on an H200). In per-pixel mode the Bernoulli draws come from counters past all the
per-element ones, so the two streams never overlap.

Import this module only when triton is installed. To run it on CPU tensors (tests), set
TRITON_INTERPRET=1 before triton is first imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048


@triton.jit
def _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, mask, u, uw, eps, p, mid,
                 PER_PIXEL: tl.constexpr, WRITE_U: tl.constexpr):
    """One quarter of a program's block: load x and S, mix with the draws, clamp, store."""
    x = tl.load(x_ptr + x_base + hw, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + s_base + hw, mask=mask, other=0.0).to(tl.float32)
    if PER_PIXEL:
        g = tl.where(uw < p, s, tl.where(u < 0.5, -1.0, 1.0))
    else:
        # one draw decides both: u < p -> saliency; else (u - p) / (1 - p) is uniform again -> its half is the sign
        g = tl.where(u < p, s, tl.where(u < mid, -1.0, 1.0))
    y = tl.minimum(tl.maximum(x - eps * g, 0.0), 1.0)
    tl.store(out_ptr + x_base + hw, y.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_U:
        tl.store(u_ptr + x_base + hw, u, mask=mask)
        if PER_PIXEL:
            tl.store(uw_ptr + x_base + hw, uw, mask=mask)


@triton.jit
def _sat_perturb_kernel(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, channels, plane, blocks, pixel_counters,
                        eps, p, mid, seed, PER_PIXEL: tl.constexpr, WRITE_U: tl.constexpr, BLOCK: tl.constexpr):
    # program (i, b): plane i = (n, c) of x, block b of that plane's pixels. No per-element division.
    i = tl.program_id(0).to(tl.int64)  # int64 bases: batches past 2**31 elements stay correct
    b = tl.program_id(1)
    n = i // channels
    QUARTER: tl.constexpr = BLOCK // 4
    lane = tl.arange(0, QUARTER)
    x_base, s_base = i * plane, n * plane
    # one Philox call -> 4 uniforms: counter (i * blocks + b) * QUARTER + lane feeds the 4 quarters
    u0, u1, u2, u3 = tl.rand4x(seed, (i * blocks + b) * QUARTER + lane)
    if PER_PIXEL:  # shared by the channels of pixel (n, h, w): counters past every element's
        w0, w1, w2, w3 = tl.rand4x(seed, pixel_counters + (n * blocks + b) * QUARTER + lane)
    else:
        w0, w1, w2, w3 = u0, u1, u2, u3
    hw = b * BLOCK + lane
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u0, w0, eps, p, mid,
                 PER_PIXEL, WRITE_U)
    hw += QUARTER
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u1, w1, eps, p, mid,
                 PER_PIXEL, WRITE_U)
    hw += QUARTER
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u2, w2, eps, p, mid,
                 PER_PIXEL, WRITE_U)
    hw += QUARTER
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u3, w3, eps, p, mid,
                 PER_PIXEL, WRITE_U)


def sat_perturb_triton(x: torch.Tensor, s: torch.Tensor, eps: float, p: float, seed: int,
                       per_pixel: bool = False, out: torch.Tensor | None = None, return_draws: bool = False):
    """x' for contiguous x (N, C, H, W) and s (N, 1, H, W) on the same device; see sat_perturb.

    return_draws=True also returns the uniforms used (u per element, and uw per element in
    per-pixel mode, else None): tests compare against the unfused reference on exactly these draws."""
    out = torch.empty_like(x) if out is None else out
    n, c, h, w = x.shape
    if return_draws:
        u = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        uw = torch.empty_like(u) if per_pixel else u
    else:
        u = uw = out  # never written when WRITE_U is False
    if x.numel() == 0:
        return (out, u, uw if per_pixel else None) if return_draws else out
    plane = h * w
    block = max(64, min(MAX_BLOCK, triton.next_power_of_2(plane)))  # a block stays inside one plane
    blocks = triton.cdiv(plane, block)
    pixel_counters = n * c * blocks * (block // 4)  # the per-pixel stream starts after the per-element one
    _sat_perturb_kernel[(n * c, blocks)](x, s, out, u, uw, c, plane, blocks, pixel_counters, float(eps), float(p),
                                         (1.0 + p) / 2.0, int(seed), PER_PIXEL=bool(per_pixel),
                                         WRITE_U=bool(return_draws), BLOCK=block)
    if return_draws:
        return out, u, (uw if per_pixel else None)
    return out
