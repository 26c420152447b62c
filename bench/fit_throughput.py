"""Images/s of real `sat-train fit` epochs per loader backend, against the compute-only rate.

    python bench/fit_throughput.py            # CPU: cnn4, 32x32, batch 128, 4096 images, 3 rounds
    python bench/fit_throughput.py --quick    # 1024 images (CPU) / 16384 (CUDA), 1 round: a smoke run
    python bench/fit_throughput.py --device cuda   # resnet18, 32x32, batch 512, 50,000 images (CIFAR-10 sized)

The shard set is bench/loader.py's (photo-like JPEG images + PNG saliency + labels). Each backend
(torch, dali, device) trains with `sat_train.fit.fit` exactly as `sat-train fit --method sat` does,
for one warm-up epoch plus the timed ones; its rate is read from RUN/metrics.jsonl (the epochs'
own images/s). "setup s" is the rest of fit's wall time (verifying the shards, building the model,
DALI's pipeline, the device backend's one-off decode, checkpoints).

The baseline is the same training loop with no loader: `sat_train.fit.run_epoch` (the very loop fit
runs: Method.step, optimizer and scheduler steps, the clean-accuracy probe, metric sums) fed a few
batches already on the device, the same model, config, batch, AMP and channels_last as fit uses.
Each round times the baseline and then every backend, so load on the machine hits all alike; the
ratio is per round, the median over rounds is reported. Targets (issue 14): device backend >= 0.95x
of compute-only on CPU, >= 0.9x on a GPU (resnet18, 32x32, batch 512); DALI and torch as measured.
Table to stdout and bench/results/fit_throughput.md (fit_throughput_cuda.md on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from loader import write_shard_set  # bench/loader.py (this script's folder is on sys.path)
from sat_train import distributed as D
from sat_train.config import from_dict
from sat_train.fit import amp_dtype, fit, run_epoch
from sat_train.loader import dali_available
from sat_train.methods import Method, curriculum_p
from sat_train.models import build_model, model_spec
from sat_train.optim import make_optimizer, make_scheduler
from shards.storage import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "dali", "device")


class ResidentBatches:
    """A 'loader' of batches already on the device: `steps` batches cycling over a few fixed ones."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def compute_only(cfg, info, image, num_classes: int, steps: int, epochs: int) -> float:
    """Images/s of fit's own epoch loop on resident batches (set up as sat_train.fit._fit does)."""
    device = info.device
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as fit sets it (round 1 runs before any fit)
    bare = build_model(**model_spec(cfg.arch, num_classes, image["channels"], image["height"])).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(bare.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    method = Method.from_config(cfg, channels_last=channels_last)
    dtype = amp_dtype(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    g = torch.Generator(device=device).manual_seed(1)
    shape = (cfg.batch_size, image["channels"], image["height"], image["width"])
    batches = [(torch.rand(shape, generator=g, device=device),
                torch.rand((shape[0], 1, *shape[2:]), generator=g, device=device) * 2 - 1,
                torch.randint(0, num_classes, (shape[0],), generator=g, device=device)) for _ in range(4)]
    rates = []
    for epoch in range(1 + epochs):  # epoch 0 warms up (cudnn autotune, numba load, allocator)
        gen = torch.Generator(device=device).manual_seed(epoch)
        coin = torch.Generator().manual_seed(epoch)
        stats = run_epoch(bare, bare, ResidentBatches(batches, steps), method, optimizer, scheduler, scaler, autocast,
                          curriculum_p(epoch, cfg.sat_a), gen, coin, cfg, steps, info, desc="compute only")
        if epoch:
            rates.append(stats["images"] / stats["epoch_time_s"])
    return statistics.mean(rates)


def fit_rate(cfg) -> tuple[float, float, str]:
    """(images/s over the timed epochs, setup seconds, fit's captured stderr)."""
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        fit(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(cfg.run) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # epoch 0 is the warm-up
    rate = sum(r["images"] for r in timed) / sum(r["epoch_time_s"] for r in timed)
    return rate, wall - sum(r["epoch_time_s"] for r in rows), err.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small set and one round (a smoke run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--arch", default=None, help="default: resnet18 on CUDA, cnn4 on CPU")
    ap.add_argument("--method", default="sat", help="training method (default sat)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    ap.add_argument("--images", type=int, default=None, help="images in the set (default 50000 CUDA / 4096 CPU)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs per fit after one warm-up (default 2 CUDA / 1 CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of (compute-only, every backend) (default 3, --quick 1)")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads (default 8 CUDA / 2 CPU)")
    ap.add_argument("--out", type=Path, default=None, help="table file (default bench/results/fit_throughput[_cuda].md)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.arch = args.arch or ("resnet18" if cuda else "cnn4")
    args.batch_size = args.batch_size or (512 if cuda else 128)
    args.images = args.images or ((16384 if args.quick else 50000) if cuda else (1024 if args.quick else 4096))
    args.epochs = args.epochs or (2 if cuda else 1)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else (8 if cuda else 2)
    backends = [b for b in args.backends if b != "dali" or dali_available()]
    skipped = [b for b in args.backends if b not in backends]
    info = D.DistInfo(device=device)

    load_before = os.getloadavg()[0]
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    rates: dict[str, list[float]] = {b: [] for b in ["compute only", *backends]}
    setup: dict[str, list[float]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="satpipe-bench-fit-") as tmp:
        root = write_shard_set(Path(tmp) / "set", args.images, args.size)
        base = dict(shards=str(root), arch=args.arch, method=args.method, epochs=1 + args.epochs,
                    batch_size=args.batch_size, num_workers=args.workers, progress=False, device=device.type,
                    seed=0, overwrite=True)
        steps = args.images // args.batch_size  # fit drops the last partial batch
        image = {"channels": 3, "height": args.size, "width": args.size}
        for r in range(args.rounds):
            cfg = from_dict({**base, "run": f"{tmp}/compute"}, "bench")
            ref = compute_only(cfg, info, image, 10, steps, args.epochs)
            rates["compute only"].append(ref)
            line = [f"round {r + 1}/{args.rounds}: compute only {ref:,.0f} img/s"]
            for b in backends:
                cfg = from_dict({**base, "loader_backend": b, "run": f"{tmp}/run-{b}"}, "bench")
                try:
                    rate, extra, _ = fit_rate(cfg)
                except Exception:
                    print(f"bench/fit_throughput.py: fit with loader {b} failed", file=sys.stderr)
                    raise
                rates[b].append(rate)
                ratios[b].append(rate / ref)
                setup[b].append(extra)
                line.append(f"{b} {rate:,.0f} ({rate / ref:.2f}x)")
            print(", ".join(line), flush=True)

    target = 0.9 if cuda else 0.95
    name = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads"
    command = " ".join(["python bench/fit_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Fit throughput per loader backend (bench/fit_throughput.py)", "",
             f"`{command}` on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
             f"`sat-train fit --method {args.method}`, {args.arch}, batch {args.batch_size}, {args.images} JPEG "
             f"{args.size}x{args.size} images + PNG saliency, {args.workers} loader workers, 1 warm-up + {args.epochs} "
             f"timed epoch(s) per fit, median of {args.rounds} round(s). Load average {load_before:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end.", "",
             "| loader | fit img/s | compute-only img/s | ratio | target | setup s (decode, verify, pipeline) |",
             "|---|---:|---:|---:|---|---:|"]
    ref_med = statistics.median(rates["compute only"])
    for b in backends:
        ratio = statistics.median(ratios[b])
        goal = f">= {target}x: {'met' if ratio >= target else 'MISSED'}" if b == "device" else "as measured"
        lines.append(f"| {b} | {statistics.median(rates[b]):,.0f} | {ref_med:,.0f} | {ratio:.2f}x | {goal} | "
                     f"{statistics.median(setup[b]):.1f} |")
    if skipped:
        lines += ["", f"Not measured: {', '.join(skipped)} (nvidia.dali does not import here)."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = args.out or RESULTS / ("fit_throughput_cuda.md" if cuda else "fit_throughput.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, table.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
