"""Triton kernel for the SAT perturbation (see kernels/sat_perturb.py for the math and the draw scheme).

One program handles BLOCK consecutive elements of the contiguous NCHW tensor x: it reads x and the
matching saliency pixel once, draws its uniforms with `tl.rand(seed, counter)` (Philox, counter-based:
the same seed gives the same x' whatever the launch grid), mixes, scales, clamps and writes x' once.
Counters: element i uses counter i; in per-pixel mode the Bernoulli for pixel q uses counter numel + q,
so the two streams never overlap.

Import this module only when triton is installed. To run it on CPU tensors (tests), set
TRITON_INTERPRET=1 before triton is first imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sat_perturb_kernel(x_ptr, s_ptr, out_ptr, u_ptr, uw_ptr, numel, chw, hw, eps, p, mid, seed,
                        PER_PIXEL: tl.constexpr, WRITE_U: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: batches past 2**31 elements stay correct
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pix = (offs // chw) * hw + offs % hw  # saliency has one channel: (n, h, w) of this element
    s = tl.load(s_ptr + pix, mask=mask, other=0.0).to(tl.float32)
    u = tl.rand(seed, offs)
    if PER_PIXEL:
        uw = tl.rand(seed, numel + pix)
        g = tl.where(uw < p, s, tl.where(u < 0.5, -1.0, 1.0))
    else:
        # one draw decides both: u < p -> saliency; else (u - p) / (1 - p) is uniform again -> its half is the sign
        g = tl.where(u < p, s, tl.where(u < mid, -1.0, 1.0))
    y = tl.minimum(tl.maximum(x - eps * g, 0.0), 1.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_U:
        tl.store(u_ptr + offs, u, mask=mask)
        if PER_PIXEL:
            tl.store(uw_ptr + offs, uw, mask=mask)


def sat_perturb_triton(x: torch.Tensor, s: torch.Tensor, eps: float, p: float, seed: int,
                       per_pixel: bool = False, out: torch.Tensor | None = None, return_draws: bool = False):
    """x' for contiguous x (N, C, H, W) and s (N, 1, H, W) on the same device; see sat_perturb.

    return_draws=True also returns the uniforms used (u per element, and uw per element in
    per-pixel mode, else None): tests compare against the unfused reference on exactly these draws."""
    out = torch.empty_like(x) if out is None else out
    numel = x.numel()
    n, c, h, w = x.shape
    if return_draws:
        u = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        uw = torch.empty_like(u) if per_pixel else u
    else:
        u = uw = out  # never written when WRITE_U is False
    grid = (triton.cdiv(numel, BLOCK),)
    _sat_perturb_kernel[grid](x, s, out, u, uw, numel, c * h * w, h * w, float(eps), float(p), (1.0 + p) / 2.0,
                              int(seed), PER_PIXEL=bool(per_pixel), WRITE_U=bool(return_draws), BLOCK=BLOCK)
    if return_draws:
        return out, u, (uw if per_pixel else None)
    return out
