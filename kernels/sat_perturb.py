"""The SAT perturbation (Mangla et al. 2020) as one fused pass: draws, mix, scale, clamp.

    x' = clamp(x - eps * g, 0, 1),   g = w * S + (1 - w) * r,   w ~ Bernoulli(p),   r uniform in {-1, +1}

x: images (N, C, H, W) in [0, 1]; S: saliency (N, 1, H, W) in [-1, 1], broadcast over the colour
channels. The paper's reference code draws w per element of the image tensor (`per_pixel=False`,
the default): each colour channel of a pixel decides on its own between saliency and noise. With
`per_pixel=True` one w is drawn per pixel and shared by its channels (the signs r stay per element).

Draw scheme (both backends): one uniform u per element. Per element: w = [u < p] and, when w = 0,
r = -1 if u < (1 + p) / 2 else +1 -- given u >= p, (u - p) / (1 - p) is again uniform, so its lower
half is an unbiased sign. One draw instead of two halves the RNG work. Per pixel: w = [uw < p] with a
second uniform uw per pixel, r = -1 if u < 1/2 else +1.

Randomness comes from a counter-based generator keyed by an integer seed (Philox `tl.rand4x` on CUDA,
a SplitMix64 hash on CPU), so x' depends only on (x, s, eps, p, seed), not on threads or launch grid.
The seed is `seed` if given, else drawn from `generator` (else from torch's global generator), so
torch.manual_seed / a per-epoch torch.Generator make training reproducible. CPU and CUDA draw
different streams for the same seed.

Backends: "triton" (CUDA; also CPU tensors under TRITON_INTERPRET=1, for tests), "numba" (CPU:
parallel loop, reads x and s once, writes x' once, no temporaries), "torch" (any device/dtype:
vectorized with one draw). "auto" = triton on CUDA, numba on CPU float32/float64, else torch.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

BACKENDS = ("auto", "triton", "numba", "torch")
_SEED_BOUND = 2**31 - 1  # seeds fit a signed 32-bit kernel argument on every backend


def draw_seed(generator: torch.Generator | None = None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, device=device).item())


# ----------------------------------------------------------------------------- CPU: numba

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_TO_UNIT = np.float32(1.0 / (1 << 24))


@numba.njit(inline="always")
def _uniform(seed, counter):
    """SplitMix64 of (seed, counter) -> float32 in [0, 1) with 24 random bits (exact in float32)."""
    z = seed + (counter + np.uint64(1)) * _GOLDEN  # uint64 throughout: mixing with int64 would go float64
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return np.float32(z >> _S40) * _TO_UNIT


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _sat_perturb_numba(x, s, out, u_out, uw_out, eps, p, mid, seed, per_pixel, write_u):
    # x, out: (N*C, HW) contiguous; s: (N, HW); one parallel task per image channel plane
    rows, hw = x.shape
    channels = rows // s.shape[0]
    numel = np.uint64(rows * hw)
    seed = np.uint64(seed)
    one, minus_one = x.dtype.type(1.0), x.dtype.type(-1.0)
    zero = x.dtype.type(0.0)
    half = np.float32(0.5)
    for row in numba.prange(rows):
        n = row // channels
        base = np.uint64(row) * np.uint64(hw)
        pix_base = np.uint64(n) * np.uint64(hw)
        for j in range(hw):
            u = _uniform(seed, base + np.uint64(j))
            if per_pixel:
                uw = _uniform(seed, numel + pix_base + np.uint64(j))
                g = s[n, j] if uw < p else (minus_one if u < half else one)
                if write_u:
                    uw_out[row, j] = uw
            else:
                g = s[n, j] if u < p else (minus_one if u < mid else one)
            if write_u:
                u_out[row, j] = u
            v = x[row, j] - eps * g
            out[row, j] = zero if v < zero else (one if v > one else v)


def _numba_backend(x, s, eps, p, seed, per_pixel, out, return_draws):
    n, c, h, w = x.shape
    xa = x.detach().numpy().reshape(n * c, h * w)
    sa = s.detach().to(x.dtype).contiguous().numpy().reshape(n, h * w)
    oa = out.numpy().reshape(n * c, h * w)
    f = np.float32 if x.dtype == torch.float32 else np.float64
    if return_draws:
        u = torch.empty(x.shape, dtype=torch.float32)
        uw = torch.empty_like(u) if per_pixel else torch.empty(0, dtype=torch.float32)
        ua, uwa = u.numpy().reshape(n * c, h * w), (uw.numpy().reshape(n * c, h * w) if per_pixel else uw.numpy().reshape(0, 0))
    else:
        ua = uwa = np.empty((0, 0), dtype=np.float32)
    # eps/p/mid in x's dtype so the arithmetic stays in float32 (numba would widen to float64)
    _sat_perturb_numba(xa, sa, oa, ua, uwa, f(eps), np.float32(p), np.float32((1.0 + p) / 2.0), seed,
                       bool(per_pixel), bool(return_draws))
    if return_draws:
        return out, u, (uw if per_pixel else None)
    return out


# ----------------------------------------------------------------------------- any device: torch

def _torch_backend(x, s, eps, p, seed, per_pixel, out, return_draws):
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    minus_one = torch.tensor(-1.0, dtype=x.dtype, device=x.device)
    if per_pixel:
        uw = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=gen, device=x.device).expand_as(x)
        g = torch.where(uw < p, s.to(x.dtype), torch.where(u < 0.5, minus_one, -minus_one))
    else:
        uw = None
        g = torch.where(u < p, s.to(x.dtype), torch.where(u < (1.0 + p) / 2.0, minus_one, -minus_one))
    torch.clamp(x - eps * g, 0.0, 1.0, out=out)  # x - eps*g then clamp: same rounding as the reference
    if return_draws:
        return out, u, (uw.contiguous() if per_pixel else None)
    return out


# ----------------------------------------------------------------------------- entry point

def sat_perturb(x: torch.Tensor, s: torch.Tensor, eps: float, p: float, generator: torch.Generator | None = None,
                per_pixel: bool = False, seed: int | None = None, *, backend: str = "auto",
                out: torch.Tensor | None = None, return_draws: bool = False):
    """x' = clamp(x - eps * (w * S + (1 - w) * r), 0, 1) in one pass; see the module docstring.

    x (N, C, H, W) float in [0, 1]; s (N, 1, H, W) in [-1, 1]; 0 <= p <= 1. Returns a new tensor
    (or `out`), detached from autograd. return_draws=True returns (x', u, uw) for tests."""
    if x.dim() != 4 or s.dim() != 4 or s.shape[1] != 1 or s.shape[0] != x.shape[0] or s.shape[2:] != x.shape[2:]:
        raise ValueError(f"sat_perturb: x must be (N, C, H, W) and s (N, 1, H, W); got {tuple(x.shape)} and {tuple(s.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sat_perturb: p={p} is not a probability")
    if backend not in BACKENDS:
        raise ValueError(f"sat_perturb: backend must be one of {BACKENDS}, not {backend!r}")
    if seed is None:
        seed = draw_seed(generator)
    seed = int(seed) % _SEED_BOUND
    x = x.detach().contiguous()
    s = s.detach().contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError("sat_perturb: `out` must be a contiguous tensor of x's shape, dtype and device")
    if backend == "auto":
        if x.is_cuda:
            backend = "triton"
        elif x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            backend = "numba"
        else:
            backend = "torch"
    if backend == "triton":
        from kernels.sat_perturb_triton import sat_perturb_triton

        return sat_perturb_triton(x, s.to(x.dtype), eps, p, seed, per_pixel, out, return_draws)
    if backend == "numba":
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sat_perturb: the numba backend needs CPU float32/float64, got {x.device} {x.dtype}")
        return _numba_backend(x, s, eps, p, seed, per_pixel, out, return_draws)
    return _torch_backend(x, s, eps, p, seed, per_pixel, out, return_draws)
