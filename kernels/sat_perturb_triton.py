"""Triton kernel for the SAT perturbation (see kernels/sat_perturb.py for the math and the draw scheme).

Each program handles 4 * LANES pixels of one (n, c) plane of the contiguous NCHW tensor x: it reads
x and the matching saliency pixels once, mixes, scales, clamps and writes x' once. The grid is
(planes, programs per plane), so no per-element division by the plane size is needed.

Draws: Philox (`tl.rand4x`, counter-based), one call giving the uniforms of 4 elements (a fourth of
the RNG work of one call per element). The stream is fixed by the shape alone, never by the launch
configuration: a plane's pixels are cut into groups of 4 * Q (Q = clamp(next_pow2(plane), 64,
2048) / 4); lane t of plane i (t in [0, groups * Q)) draws with counter i * groups * Q + t, and its
4 uniforms go to the pixels (t // Q) * 4Q + j * Q + t % Q, j = 0..3, i.e. the same offset in the 4
quarters of its group. In per-pixel mode the Bernoulli draws of pixel-plane n use counters past all
the per-element ones (pixel_counters + n * groups * Q + t), so the two streams never overlap. So x'
depends only on (x, s, eps, p, seed) and the shape -- KernelConfig (lanes per program, num_warps,
cache hints) may be tuned per card (bench/sat_kernel.py sweeps CANDIDATES) without changing results.

Indexing is int32 when every offset fits (the common case: fewer address instructions), int64 for
tensors past 2**31 elements; both give the same counters, so the same draws.

Import this module only when triton is installed. To run it on CPU tensors (tests), set
TRITON_INTERPRET=1 before triton is first imported.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_GROUP = 2048  # pixels per quarter group (4 * Q): fixes the draw stream, see the module docstring
INT32_LIMIT = 2**31 - 1


class KernelConfig(NamedTuple):
    """Launch settings; none of them changes the output (see the module docstring)."""

    lanes: int | None = None  # Philox lanes per program (4 pixels each); None = Q, one group per program
    num_warps: int = 4
    hints: bool = False  # x loaded evict-first and x' stored streaming (.cs); S kept in cache (read once per channel)


DEFAULT_CONFIG = KernelConfig()  # the configuration measured at 54% of a copy on an H200 (2026-11-26)
# what bench/sat_kernel.py tries on a GPU: 4 * lanes pixels per program, 1-16 elements per thread and quarter
CANDIDATES = tuple(KernelConfig(lanes, warps, hints) for lanes in (None, 256, 512, 1024, 2048)
                   for warps in (2, 4, 8) for hints in (False, True)
                   if lanes is None or 1 <= lanes // (32 * warps) <= 16)


@triton.jit
def _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, mask, u, uw, eps, p, mid,
                 PER_PIXEL: tl.constexpr, WRITE_U: tl.constexpr, HINTS: tl.constexpr):
    """One quarter of a program's pixels: load x and S, mix with the draws, clamp, store."""
    if HINTS:
        x = tl.load(x_ptr + x_base + hw, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        s = tl.load(s_ptr + s_base + hw, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:
        x = tl.load(x_ptr + x_base + hw, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + s_base + hw, mask=mask, other=0.0).to(tl.float32)
    if PER_PIXEL:
        g = tl.where(uw < p, s, tl.where(u < 0.5, -1.0, 1.0))
    else:
        # one draw decides both: u < p -> saliency; else (u - p) / (1 - p) is uniform again -> its half is the sign
        g = tl.where(u < p, s, tl.where(u < mid, -1.0, 1.0))
    y = tl.minimum(tl.maximum(x - eps * g, 0.0), 1.0).to(out_ptr.dtype.element_ty)
    if HINTS:
        tl.store(out_ptr + x_base + hw, y, mask=mask, cache_modifier=".cs")
    else:
        tl.store(out_ptr + x_base + hw, y, mask=mask)
    if WRITE_U:
        tl.store(u_ptr + x_base + hw, u, mask=mask)
        if PER_PIXEL:
            tl.store(uw_ptr + x_base + hw, uw, mask=mask)


@triton.jit
def _sat_perturb_kernel(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, channels, plane, plane_lanes, pixel_counters,
                        eps, p, mid, seed, PER_PIXEL: tl.constexpr, WRITE_U: tl.constexpr, Q: tl.constexpr,
                        LANES: tl.constexpr, INT64: tl.constexpr, HINTS: tl.constexpr):
    # program (i, b): plane i = (n, c) of x, lanes [b * LANES, (b + 1) * LANES) of that plane
    i = tl.program_id(0)
    if INT64:  # offsets past 2**31 elements
        i = i.to(tl.int64)
    n = i // channels
    t = tl.program_id(1) * LANES + tl.arange(0, LANES)  # lane within the plane (< 2**31: planes are small)
    x_base, s_base = i * plane, n * plane
    # one Philox call -> 4 uniforms for the same offset in the 4 quarters of the lane's group
    u0, u1, u2, u3 = tl.rand4x(seed, i * plane_lanes + t)
    if PER_PIXEL:  # shared by the channels of pixel (n, h, w): counters past every element's
        w0, w1, w2, w3 = tl.rand4x(seed, pixel_counters + n * plane_lanes + t)
    else:
        w0, w1, w2, w3 = u0, u1, u2, u3
    hw = (t // Q) * (4 * Q) + t % Q  # Q is a power of two: a shift and a mask, runs of Q stay contiguous
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u0, w0, eps, p, mid,
                 PER_PIXEL, WRITE_U, HINTS)
    hw += Q
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u1, w1, eps, p, mid,
                 PER_PIXEL, WRITE_U, HINTS)
    hw += Q
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u2, w2, eps, p, mid,
                 PER_PIXEL, WRITE_U, HINTS)
    hw += Q
    _mix_quarter(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, x_base, s_base, hw, hw < plane, u3, w3, eps, p, mid,
                 PER_PIXEL, WRITE_U, HINTS)


def sat_perturb_triton(x: torch.Tensor, s: torch.Tensor, eps: float, p: float, seed: int,
                       per_pixel: bool = False, out: torch.Tensor | None = None, return_draws: bool = False,
                       config: KernelConfig | None = None):
    """x' for contiguous x (N, C, H, W) and s (N, 1, H, W) on the same device; see sat_perturb.

    return_draws=True also returns the uniforms used (u per element, and uw per element in
    per-pixel mode, else None): tests compare against the unfused reference on exactly these draws.
    `config`: launch settings (default DEFAULT_CONFIG); results do not depend on it."""
    config = config or DEFAULT_CONFIG
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
    q = max(64, min(MAX_GROUP, triton.next_power_of_2(plane))) // 4
    plane_lanes = triton.cdiv(plane, 4 * q) * q  # lanes per plane: whole groups
    lanes = min(config.lanes or q, triton.next_power_of_2(plane_lanes))
    pixel_counters = n * c * plane_lanes  # the per-pixel stream starts after the per-element one
    # the largest offset or counter the kernel forms (lanes past the plane included), in int32 or not
    biggest = max(n * c * (triton.cdiv(plane_lanes, lanes) * lanes * 4), pixel_counters * 2 + plane_lanes * 4)
    grid = (n * c, triton.cdiv(plane_lanes, lanes))
    _sat_perturb_kernel[grid](x, s, out, u, uw, c, plane, plane_lanes, pixel_counters, float(eps), float(p),
                              (1.0 + p) / 2.0, int(seed), PER_PIXEL=bool(per_pixel), WRITE_U=bool(return_draws),
                              Q=q, LANES=lanes, INT64=biggest > INT32_LIMIT, HINTS=bool(config.hints),
                              num_warps=config.num_warps)
    if return_draws:
        return out, u, (uw if per_pixel else None)
    return out
