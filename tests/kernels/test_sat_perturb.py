"""The fused SAT kernel against a plain, unfused PyTorch reference, on the same random draws."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.sat_perturb import sat_perturb

EPS = 8 / 255


def reference(x, s, eps, w, r):
    """The paper's formula, unfused: x' = clamp(x - eps * (w * S + (1 - w) * r), 0, 1)."""
    return torch.clamp(x - eps * (w * s + (1 - w) * r), 0.0, 1.0)


def draws_to_w_r(u, uw, p, per_pixel):
    """The documented draw scheme: which uniform decides w and which decides the sign."""
    if per_pixel:
        return (uw < p).to(u.dtype), torch.where(u < 0.5, -1.0, 1.0)
    return (u < p).to(u.dtype), torch.where(u < (1 + p) / 2, -1.0, 1.0)


def batch(n=8, c=3, h=12, w=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    s = torch.rand(n, 1, h, w, generator=g, dtype=dtype) * 2 - 1
    return x, s


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_matches_reference_on_same_draws(backend, per_pixel, p):
    x, s = batch()
    out, u, uw = sat_perturb(x, s, EPS, p, seed=123, per_pixel=per_pixel, backend=backend, return_draws=True)
    w, r = draws_to_w_r(u, uw, p, per_pixel)
    assert torch.equal(out, reference(x, s, EPS, w, r))


def test_float64_and_channels_last_inputs():
    x, s = batch(dtype=torch.float64)
    out, u, _ = sat_perturb(x, s, EPS, 0.5, seed=1, return_draws=True)
    w, r = draws_to_w_r(u.double(), None, 0.5, False)
    assert out.dtype == torch.float64 and torch.equal(out, reference(x, s, EPS, w, r))
    x32, s32 = batch()
    a = sat_perturb(x32.to(memory_format=torch.channels_last), s32, EPS, 0.5, seed=2)
    assert torch.equal(a, sat_perturb(x32, s32, EPS, 0.5, seed=2))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_p1_is_pure_saliency_and_p0_pure_sign_noise(backend):
    x, s = batch()
    assert torch.equal(sat_perturb(x, s, EPS, 1.0, seed=5, backend=backend), torch.clamp(x - EPS * s, 0, 1))
    out = sat_perturb(x, s, EPS, 0.0, seed=5, backend=backend)
    minus, plus = torch.clamp(x - EPS, 0, 1), torch.clamp(x + EPS, 0, 1)
    assert ((out == minus) | (out == plus)).all()
    inner = (x > EPS) & (x < 1 - EPS)  # away from the clamp both signs are visible
    share_minus = (out[inner] == minus[inner]).float().mean().item()
    assert 0.45 < share_minus < 0.55


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("per_pixel", [False, True])
def test_statistics(backend, per_pixel):
    # saliency 0 marks "saliency chosen" as x' == x; noise entries sit at x -/+ eps (x kept off the clamp)
    p = 0.3
    x = torch.full((64, 3, 16, 16), 0.5)
    s = torch.zeros(64, 1, 16, 16)
    out = sat_perturb(x, s, EPS, p, seed=9, per_pixel=per_pixel, backend=backend)
    sal = out == x
    noise = ~sal
    assert torch.allclose(out[noise], torch.where(out[noise] < 0.5, 0.5 - EPS, 0.5 + EPS))
    assert abs(sal.float().mean().item() - p) < 0.02
    assert abs((out[noise] < 0.5).float().mean().item() - 0.5) < 0.02
    if per_pixel:  # one Bernoulli per pixel, shared by the channels
        assert (sal[:, 0] == sal[:, 1]).all() and (sal[:, 1] == sal[:, 2]).all()
    else:
        assert not (sal[:, 0] == sal[:, 1]).all()


def test_reproducible_from_seed_and_generator():
    x, s = batch()
    a = sat_perturb(x, s, EPS, 0.5, seed=7)
    assert torch.equal(a, sat_perturb(x, s, EPS, 0.5, seed=7))
    assert not torch.equal(a, sat_perturb(x, s, EPS, 0.5, seed=8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b1 = [sat_perturb(x, s, EPS, 0.5, generator=g1) for _ in range(2)]
    b2 = [sat_perturb(x, s, EPS, 0.5, generator=g2) for _ in range(2)]
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1]) and not torch.equal(b1[0], b1[1])


@pytest.mark.parametrize("bad", [dict(s_shape=(8, 3, 12, 12)), dict(s_shape=(8, 1, 10, 12)), dict(p=1.5), dict(backend="cuda")])
def test_bad_arguments(bad):
    x, _ = batch()
    s = torch.zeros(bad.get("s_shape", (8, 1, 12, 12)))
    with pytest.raises(ValueError, match="sat_perturb"):
        sat_perturb(x, s, EPS, bad.get("p", 0.5), seed=0, backend=bad.get("backend", "auto"))


TRITON_SCRIPT = textwrap.dedent(r"""
    import torch
    from kernels.sat_perturb import sat_perturb
    eps = 8 / 255
    for shape, per_pixel, p in [(s, pp, p) for s in ((3, 3, 20, 20), (2, 3, 50, 50)) for pp in (False, True)
                                for p in (0.0, 0.35, 1.0)]:  # 400 px: one part-filled block; 2500: two blocks
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        s = torch.rand(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(1)) * 2 - 1
        out, u, uw = sat_perturb(x, s, eps, p, seed=42, per_pixel=per_pixel, backend="triton", return_draws=True)
        if per_pixel:
            w, r = (uw < p).float(), torch.where(u < 0.5, -1.0, 1.0)
            assert torch.equal(uw[:, 0], uw[:, 2]), "per-pixel draw differs across channels"
        else:
            w, r = (u < p).float(), torch.where(u < (1 + p) / 2, -1.0, 1.0)
        ref = torch.clamp(x - eps * (w * s + (1 - w) * r), 0, 1)
        assert torch.equal(out, ref), (per_pixel, p, (out - ref).abs().max())
        again = sat_perturb(x, s, eps, p, seed=42, per_pixel=per_pixel, backend="triton")
        assert torch.equal(out, again), "not reproducible from the seed"
        assert u.unique().numel() > 0.99 * u.numel(), "draws repeat: counters overlap"
        if per_pixel:
            assert torch.isin(uw[:, 0], u).float().mean() < 0.01, "per-pixel and per-element streams overlap"
    # statistics: share of saliency entries vs p, noise entries exactly at x -/+ eps
    x = torch.full((16, 3, 16, 16), 0.5)
    out, u, _ = sat_perturb(x, torch.zeros(16, 1, 16, 16), eps, 0.3, seed=3, backend="triton", return_draws=True)
    sal = (out == x).float().mean().item()
    assert abs(sal - 0.3) < 0.03, sal
    noise = out[out != x]
    assert torch.allclose(noise, torch.where(noise < 0.5, 0.5 - eps, 0.5 + eps))
    assert abs((noise < 0.5).float().mean().item() - 0.5) < 0.03
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.02
    # launch settings never change the draws: part of a group per program, several groups, int64 offsets
    import kernels.sat_perturb_triton as kt
    x = torch.rand(1, 3, 50, 50, generator=torch.Generator().manual_seed(4))  # 2500 px: groups of 2048
    s = torch.rand(1, 1, 50, 50, generator=torch.Generator().manual_seed(5)) * 2 - 1
    want = kt.sat_perturb_triton(x, s, eps, 0.4, 9, per_pixel=True, return_draws=True)
    for cfg in (kt.KernelConfig(64, 2, True), kt.KernelConfig(1024, 8, False), "int64"):
        if cfg == "int64":
            kt.INT32_LIMIT, cfg = 0, None
        got = kt.sat_perturb_triton(x, s, eps, 0.4, 9, per_pixel=True, return_draws=True, config=cfg)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), cfg
    assert kt.DEFAULT_CONFIG in kt.CANDIDATES and len(kt.CANDIDATES) > 10
    print("TRITON-INTERPRET-OK")
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")  # must be set before triton is imported: own process
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "TRITON-INTERPRET-OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("per_pixel", [False, True])
def test_triton_on_cuda_matches_reference(per_pixel):
    x, s = (t.cuda() for t in batch(n=64, h=32, w=32))
    out, u, uw = sat_perturb(x, s, EPS, 0.4, seed=11, per_pixel=per_pixel, return_draws=True)
    w, r = draws_to_w_r(u, uw, 0.4, per_pixel)
    # the GPU may fuse x - eps*g into one FMA: allow one rounding step
    assert torch.allclose(out, reference(x, s, EPS, w, r), atol=1e-6, rtol=0)
    assert torch.equal(out, sat_perturb(x, s, EPS, 0.4, seed=11, per_pixel=per_pixel))
    assert torch.allclose(sat_perturb(x, s, EPS, 1.0, seed=1), torch.clamp(x - EPS * s, 0, 1), atol=1e-6, rtol=0)
    bf = sat_perturb(x.bfloat16(), s.bfloat16(), EPS, 0.4, seed=11, per_pixel=per_pixel)
    assert bf.dtype == torch.bfloat16
