"""Cost of one training step per method, and the fused SAT kernel against the unfused PyTorch formula.

    python bench/train_step.py            # cnn4 on CPU / resnet18 on CUDA, batch 128, 32x32x3
    python bench/train_step.py --quick    # small batch, few steps (a smoke run)
    python bench/train_step.py --arch preact-resnet18 --batch-size 256 --device cuda

Part 1: the SAME model, batch (x, S, y) and SGD optimizer; a step = perturbation (if any) + forward +
backward + optimizer step, exactly `sat_train.methods.Method.step` as `fit` runs it (no data loading).
Methods run round-robin (one step each per round, so machine noise hits all of them alike) and
each reports the median over rounds, as a ratio to `standard`. Targets: sat <= 1.10x standard.
"sat (unfused)" is the same step with the plain PyTorch perturbation, for scale.

Part 2: `kernels.sat_perturb` (fused: Triton on CUDA, numba on CPU) against the unfused reference
(torch.bernoulli + torch.randint + mix + clamp). Target on CPU: >= 2x. On CUDA also the achieved
memory bandwidth (x read + S read + x' write) against a device-to-device copy measured here and the
card's datasheet peak where known (target >= 60%).

Writes the tables to bench/results/train_step.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kernels.sat_perturb import sat_perturb
from sat_train.methods import Method
from sat_train.models import build_model
from shards.storage import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.md"
METHODS = [("standard", "standard", {}), ("sat", "sat", {}), ("sat (unfused)", "sat", {"unfused": True}),
           ("fgsm-rs", "fgsm-rs", {}), ("pgd-7", "pgd", {"pgd_steps": 7}), ("trades (10 steps)", "trades", {})]
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "A10": 600.0, "T4": 320.0}  # datasheets


def unfused_sat(x, s, eps, p, generator=None):
    """The formula as written, one PyTorch op per term (the baseline the fused kernel must beat)."""
    w = torch.bernoulli(torch.full_like(x, p), generator=generator)
    r = torch.randint(0, 2, x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    g = w * s + (1 - w) * r
    return torch.clamp(x - eps * g, 0.0, 1.0)


class UnfusedSat(Method):
    def sat(self, x, s, p, generator):
        return unfused_sat(x, s, self.eps, p, generator)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_steps(args, device):
    torch.manual_seed(0)
    model = build_model(args.arch, 10, args.channels, args.image_size).to(device)
    x = torch.rand(args.batch_size, args.channels, args.image_size, args.image_size, device=device)
    s = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=device) * 2 - 1
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    channels_last = device.type == "cuda"  # as fit does: model NHWC, Method converts what the model sees
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    methods = []
    for label, name, kw in METHODS:
        cls = UnfusedSat if kw.get("unfused") else Method
        methods.append((label, cls(name, channels_last=channels_last, **{k: v for k, v in kw.items() if k != "unfused"})))

    def step(method):
        if autocast is not None:
            with autocast:
                out = method.step(model, model, x, s, y, p=0.5, generator=gen, coin=None)
        else:
            out = method.step(model, model, x, s, y, p=0.5, generator=gen, coin=None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    model.train()
    for _, m in methods:  # warm-up: numba load, cudnn autotune, allocator
        for _ in range(args.warmup):
            step(m)
    times = {label: [] for label, _ in methods}
    for _ in tqdm(range(args.rounds), desc="train steps (rounds)", file=sys.stderr):
        for label, m in methods:
            sync(device)
            t = time.perf_counter()
            step(m)
            sync(device)
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med


def time_fn(fn, device, repeats):
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bench_kernel(args, device):
    n = args.kernel_batch
    x = torch.rand(n, args.channels, args.kernel_size, args.kernel_size, device=device)
    s = torch.rand(n, 1, args.kernel_size, args.kernel_size, device=device) * 2 - 1
    out = torch.empty_like(x)
    gen = torch.Generator(device=device).manual_seed(0)
    eps = 8 / 255
    rows = {
        "unfused reference": time_fn(lambda: unfused_sat(x, s, eps, 0.5, gen), device, args.kernel_repeats),
        "fused sat_perturb": time_fn(lambda: sat_perturb(x, s, eps, 0.5, generator=gen, out=out), device,
                                     args.kernel_repeats),
        "fused, per pixel": time_fn(lambda: sat_perturb(x, s, eps, 0.5, generator=gen, out=out, per_pixel=True),
                                    device, args.kernel_repeats),
    }
    if device.type == "cpu":
        rows["fused, torch backend"] = time_fn(lambda: sat_perturb(x, s, eps, 0.5, generator=gen, out=out,
                                                                   backend="torch"), device, args.kernel_repeats)
    bytes_moved = x.numel() * 4 * 2 + s.numel() * 4  # read x, write x', read S once
    bw = {}
    if device.type == "cuda":
        copy_t = time_fn(lambda: out.copy_(x), device, args.kernel_repeats)
        bw["copy_gbps"] = 2 * x.numel() * 4 / copy_t / 1e9
        name = torch.cuda.get_device_name(device)
        bw["peak_gbps"] = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    return rows, bytes_moved, tuple(x.shape), bw


def render(args, device, steps, kernel) -> str:
    rows, bytes_moved, shape, bw = kernel
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    lines = [f"# bench/train_step.py{' --quick' if args.quick else ''}", "",
             f"Device: {dev}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"## Training step: {args.arch}, batch {args.batch_size} x {args.channels}x{args.image_size}x{args.image_size}, "
             f"median of {args.rounds} round-robin rounds", "",
             "| method | ms / step | vs standard |", "|---|---:|---:|"]
    base = steps["standard"]
    for label, t in steps.items():
        lines.append(f"| {label} | {t * 1e3:.2f} | {t / base:.2f}x |")
    verdict = "met" if steps["sat"] / base <= 1.10 else "MISSED"
    lines += ["", f"Target sat <= 1.10x standard: {verdict} ({steps['sat'] / base:.3f}x).", "",
              f"## SAT perturbation kernel: x {shape}, float32, median of {args.kernel_repeats}", "",
              "| implementation | ms | speed-up vs unfused | GB/s |", "|---|---:|---:|---:|"]
    ref = rows["unfused reference"]
    for label, t in rows.items():
        lines.append(f"| {label} | {t * 1e3:.3f} | {ref / t:.2f}x | {bytes_moved / t / 1e9:.1f} |")
    fused = rows["fused sat_perturb"]
    lines += ["", f"Target fused >= 2x unfused: {'met' if ref / fused >= 2 else 'MISSED'} ({ref / fused:.1f}x)."]
    if bw:
        achieved = bytes_moved / fused / 1e9
        lines.append(f"Bandwidth: fused {achieved:.0f} GB/s = {100 * achieved / bw['copy_gbps']:.0f}% of a device copy "
                     f"({bw['copy_gbps']:.0f} GB/s)" + (f", {100 * achieved / bw['peak_gbps']:.0f}% of the datasheet "
                                                         f"peak ({bw['peak_gbps']:.0f} GB/s); target >= 60%."
                                                         if bw["peak_gbps"] else "."))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch and few rounds (smoke run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--arch", default=None, help="default: resnet18 on CUDA, cnn4 on CPU")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    args.arch = args.arch or ("resnet18" if cuda else "cnn4")
    args.batch_size = args.batch_size or (16 if args.quick else (512 if cuda else 128))
    args.rounds = args.rounds or (2 if args.quick else (20 if cuda else 8))
    args.warmup = 1 if args.quick else args.warmup
    args.kernel_batch = 128 if not cuda else (256 if args.quick else 2048)
    args.kernel_size = args.image_size if not cuda else 64
    args.kernel_repeats = 20 if args.quick else 100
    steps = bench_steps(args, device)
    kernel = bench_kernel(args, device)
    text = render(args, device, steps, kernel)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
