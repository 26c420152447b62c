"""Teacher saliency: batched maps vs the reference's one-image loop, and SAT on stored vs online maps.

    python bench/teacher.py             # 10k Fashion-MNIST train images, cnn4 teacher (3 epochs), every explainer
    python bench/teacher.py --quick     # 1024 images, a briefly trained teacher, grad-sign + gradcam++ (smoke run)
    python bench/teacher.py --device cuda --threads 8

Same teacher (a `sat-train fit --method standard` cnn4 run), same images, same explainer code:
  1. maps/s: (a) `sat-train teacher-saliency` end to end (input check, decode, one forward/backward per
     batch, encode, shards, manifest); (b) the same explainer on batches, compute only; (c) the explainer
     called one image at a time, as the reference code does inside its training loop (for SmoothGrad the
     reference is slower still: one pass per noisy copy, here the copies of one image share a pass).
     Target on CPU: a / c >= 1.5 for grad-sign (the reference's explainer); on a GPU >= 20.
  2. SAT epoch (cnn4 student, batch 128): on the stored teacher maps vs computing grad-sign maps online,
     per batch, one image at a time (the reference). Target: online / stored >= 3.
  3. Faithfulness on held-out test images: true-class probability drop when the 20% most salient pixels
     are set to 0 (the background), vs 20% random pixels, vs the salient masks misplaced onto other images;
     every explainer by default (--faithfulness-explainers), also those not timed.
  4. On a CPU: one process with every core as torch threads vs one single-thread process per core, i.e.
     whether a `--workers` option would pay (the command has none: see the README's teacher section).
Timings are the median of --rounds interleaved rounds. Writes bench/results/teacher.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from shards.derive import decode_images
from shards.format import MANIFEST_NAME, decode_label
from shards.manifest import read_manifest
from shards.reading import iter_tar_samples
from shards.storage import atomic_write_bytes
from sat_train.explain import EXPLAINERS, ExplainConfig, deletion_check, explain
from sat_train.teacher import teacher_saliency

RESULTS = Path(__file__).resolve().parent / "results" / "teacher.md"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_shards(work: Path, split: str, limit: int) -> Path:
    from preprocess.cli import main as preprocess

    out = work / f"fmnist-{split}-{limit}"
    if not (out / MANIFEST_NAME).exists():
        rc = preprocess(["build-shards", "fashion-mnist", "--split", split, "--limit", str(limit), "--out", str(out),
                         "--overwrite", "--no-progress"])
        if rc != 0:
            raise SystemExit(f"bench/teacher.py: build-shards failed for {out}")
    return out


def train_teacher(work: Path, shards: Path, epochs: int, limit_batches: int) -> Path:
    from sat_train.fit import main as fit

    run = work / f"teacher-{shards.name}-e{epochs}-l{limit_batches}"
    if not (run / "summary.json").exists():
        rc = fit(["--shards", str(shards), "--method", "standard", "--arch", "cnn4", "--epochs", str(epochs),
                  "--limit-batches", str(limit_batches), "--run", str(run), "--overwrite", "--no-progress"])
        if rc != 0:
            raise SystemExit(f"bench/teacher.py: training the teacher failed ({run})")
    return run


def load_images(shards: Path, device):
    m = read_manifest(shards)
    samples = [s for tar in m.tar_paths() for s in iter_tar_samples(tar)]
    x = torch.from_numpy(decode_images(samples, m.image)).permute(0, 3, 1, 2).float().div(255).to(device)
    y = torch.tensor([decode_label(s["label.i64"]) for s in samples], device=device)
    return x, y, [s["__key__"] for s in samples]


def maps_per_second(args, device, shards, run, model, x, y, keys, explainer, out: Path) -> dict:
    cfg = ExplainConfig(explainer=explainer)
    n, b = len(x), args.batch_size
    expensive = explainer in ("smoothgrad", "integrated-gradients")  # many passes per image
    single = min(n, args.single_images // 8 if expensive else args.single_images)

    def command():
        teacher_saliency(shards, run, out, cfg, batch_size=b, device=str(device.type), overwrite=True, progress=False,
                         log=lambda m: None)

    def batched():
        for i in range(0, n, b):
            explain(model, x[i:i + b], y[i:i + b], cfg, keys[i:i + b])

    def one_by_one():
        for i in range(single):
            explain(model, x[i:i + 1], y[i:i + 1], cfg, keys[i:i + 1])

    times: dict[str, list[float]] = {"command": [], "batched": [], "single": []}
    for r in range(args.rounds):
        order = [("command", command), ("batched", batched), ("single", one_by_one)]
        for name, fn in order[r % 3:] + order[:r % 3]:  # rotate who goes first
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(fn, device))
    rate = {"command": n / statistics.median(times["command"]), "batched": n / statistics.median(times["batched"]),
            "single": single / statistics.median(times["single"])}
    return rate


def sat_epochs(args, device, teacher_set: Path, plain_set: Path, model) -> dict:
    """Seconds per SAT epoch: stored teacher maps vs grad-sign maps computed online, one image at a time."""
    from sat_train.loader import make_loader
    from sat_train.methods import Method
    from sat_train.models import build_model

    cfg = ExplainConfig(explainer="grad-sign")
    method = Method("sat")
    times: dict[str, list[float]] = {"stored": [], "online": []}

    def epoch(shards, online: bool) -> float:
        torch.manual_seed(0)
        student = build_model("cnn4", 10, 1, 28).to(device)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        loader = make_loader(str(shards), 128, train=True, device=device, num_workers=args.loader_workers)
        gen = torch.Generator(device=device).manual_seed(0)
        steps = min(len(loader), args.sat_batches) if args.sat_batches else len(loader)

        def run():
            for i, (xb, sb, yb) in enumerate(loader):
                if i >= steps:
                    break
                if online:  # the reference: every map of every batch, one forward/backward per image
                    sb = torch.cat([torch.from_numpy(explain(model, xb[j:j + 1], yb[j:j + 1], cfg)) for j in range(len(xb))])
                    sb = sb.to(device)[:, None]
                out = method.step(student, student, xb, sb, yb, p=0.5, generator=gen, coin=None)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()

        seconds = timed(run, device)
        loader.close()
        return seconds / steps * len(loader)  # per full epoch

    for r in range(args.rounds):
        for name in (("stored", "online") if r % 2 == 0 else ("online", "stored")):
            times[name].append(epoch(teacher_set if name == "stored" else plain_set, name == "online"))
    return {k: statistics.median(v) for k, v in times.items()}


def _explain_random(task) -> float:
    """Seconds for grad-sign maps of n random 28 px images with a fresh cnn4, in batches of 256 (pool worker)."""
    n, threads = task
    torch.set_num_threads(threads)
    from sat_train.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn4", 10, 1, 28).eval().requires_grad_(False)
    x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    t0 = time.perf_counter()
    for i in range(0, n, 256):
        explain(model, x[i:i + 256], y[i:i + 256], ExplainConfig())
    return time.perf_counter() - t0


def cpu_parallelism(args) -> dict:
    """maps/s on the CPU: one process with every core as torch threads vs one single-thread process per core
    (what a --workers option would do). Decides whether --workers is worth having."""
    import multiprocessing as mp

    cores, n = os.cpu_count() or 1, args.images
    times: dict[str, list[float]] = {"threads": [], "processes": []}
    with mp.get_context("spawn").Pool(cores) as pool:
        pool.map(_explain_random, [(256, 1)] * cores)  # imports and first calls out of the timing
        for r in range(args.rounds):
            for name in (("threads", "processes") if r % 2 == 0 else ("processes", "threads")):
                t0 = time.perf_counter()
                if name == "threads":
                    _explain_random((n, cores))
                else:
                    pool.map(_explain_random, [(n // cores, 1)] * cores)
                times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(args.threads)
    return {"cores": cores, **{k: n / statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024 images, 1 round, 2 explainers (smoke run)")
    ap.add_argument("--images", type=int, help="train images for the maps (default 10000; quick 1024)")
    ap.add_argument("--explainers", nargs="+", choices=EXPLAINERS, help="explainers timed (default: all; quick: "
                    "grad-sign gradcam++)")
    ap.add_argument("--faithfulness-explainers", nargs="+", choices=EXPLAINERS, default=list(EXPLAINERS),
                    help="explainers in the faithfulness table (default: all; cheap next to timing them)")
    ap.add_argument("--batch-size", type=int, default=256, help="maps per forward/backward (default 256)")
    ap.add_argument("--single-images", type=int, help="images for the one-at-a-time loop (default 2048; quick 256)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds, median reported (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the issue's probe)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--sat-batches", type=int, help="SAT batches timed per epoch, scaled to a full epoch (0 = all; "
                                                    "default 20; quick 4)")
    ap.add_argument("--loader-workers", type=int, default=2, help="loader workers for the SAT epochs")
    ap.add_argument("--eval-images", type=int, help="test images for faithfulness (default 1000; quick 256)")
    ap.add_argument("--work", default="/tmp/satpipe-bench/teacher", help="shards and teacher run are cached here")
    args = ap.parse_args(argv)
    q = args.quick
    args.images = args.images or (1024 if q else 10000)
    args.explainers = args.explainers or (["grad-sign", "gradcam++"] if q else list(EXPLAINERS))
    args.single_images = args.single_images or (256 if q else 2048)
    args.rounds = args.rounds or (1 if q else 3)
    args.sat_batches = (4 if q else 20) if args.sat_batches is None else args.sat_batches
    args.eval_images = args.eval_images or (256 if q else 1000)
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        print(f"bench/teacher.py: {FASHION_MNIST} missing (apt install dataset-fashion-mnist)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from sat_train.checkpoint import load_model

    train = build_shards(work, "train", args.images)
    test = build_shards(work, "test", args.eval_images)
    run = train_teacher(work, train, epochs=4 if q else 3, limit_batches=0)
    model, ckpt = load_model(run, device=device)
    model.requires_grad_(False)
    x, y, keys = load_images(train, device)

    rows = []
    for e in args.explainers:
        rate = maps_per_second(args, device, train, run, model, x, y, keys, e, work / f"maps-{e}")
        rows.append((e, rate))
        print(f"{e}: {rate}", file=sys.stderr)
    teacher_set = work / "teacher-grad-sign"
    teacher_saliency(train, run, teacher_set, ExplainConfig(), batch_size=args.batch_size, device=device.type,
                     overwrite=True, progress=False, log=lambda m: None)
    sat = sat_epochs(args, device, teacher_set, train, model)
    par = cpu_parallelism(args) if device.type == "cpu" else None
    xt, yt, kt = load_images(test, device)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    faith = {e: deletion_check(model, xt, yt, explain(model, xt, yt, ExplainConfig(explainer=e), kt))
             for e in args.faithfulness_explainers}

    where = f"{platform.machine()} {device.type}, {args.threads} torch thread(s)"
    lines = [f"Teacher: cnn4, `sat-train fit --method standard` ({ckpt.get('epoch')} epochs on {args.images} Fashion-MNIST "
             f"train images, {acc:.1%} on {len(xt)} test images); {where}; batch {args.batch_size}; median of "
             f"{args.rounds} round(s).", "",
             "| explainer | (a) command maps/s | (b) batched, compute only | (c) one image at a time | a / c | b / c |",
             "|---|---:|---:|---:|---:|---:|"]
    for e, r in rows:
        lines.append(f"| {e} | {r['command']:,.0f} | {r['batched']:,.0f} | {r['single']:,.0f} | "
                     f"{r['command'] / r['single']:.2f}x | {r['batched'] / r['single']:.2f}x |")
    lines += ["", f"SAT epoch on {args.images} images (cnn4 student, batch 128, p = 0.5; "
              f"{'all' if not args.sat_batches else args.sat_batches} batches timed, scaled to the epoch):", "",
              "| saliency | s / epoch | online / stored |", "|---|---:|---:|",
              f"| stored teacher maps (grad-sign shard set) | {sat['stored']:.1f} | 1.00x |",
              f"| online, one image per forward/backward (reference) | {sat['online']:.1f} | "
              f"{sat['online'] / sat['stored']:.2f}x |",
              *([] if par is None else [
                  "", f"CPU parallelism, grad-sign on {args.images} random 28 px images, cnn4, batch 256 "
                  "(compute only):", "",
                  "| layout | maps/s | vs threads |", "|---|---:|---:|",
                  f"| 1 process x {par['cores']} torch threads | {par['threads']:,.0f} | 1.00x |",
                  f"| {par['cores']} processes x 1 thread (a --workers option) | {par['processes']:,.0f} | "
                  f"{par['processes'] / par['threads']:.2f}x |"]),
              "", f"Faithfulness on {len(xt)} test images (true-class probability drop; 20% of the pixels set to 0):", "",
              "| explainer | 20% most salient | 20% random | salient masks misplaced | salient > random |",
              "|---|---:|---:|---:|---|"]
    for e, d in faith.items():
        lines.append(f"| {e} | {d['salient']:.3f} | {d['random']:.3f} | {d['misaligned']:.3f} | "
                     f"{'yes' if d['salient'] > d['random'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(RESULTS, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
