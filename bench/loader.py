"""Loader throughput: DALI (CPU pipeline here, mixed GPU decode on CUDA) vs the torch backend.

    python bench/loader.py            # 16k images per size, 3 timed epochs
    python bench/loader.py --quick    # 4k images, 2 timed epochs (a smoke run)

All backends read the SAME shard set (JPEG image + PNG saliency + int64 label, written with the
production ShardWriter) through `make_loader(train=True)`: shuffled plan, pad-4 crop + flip on
image and saliency, batch 128, the same number of worker threads (DALI threads = DataLoader
worker processes). Timed from the start of each epoch to its last float batch on the device, so the
per-epoch pipeline / worker start-up is included. The device backend's column (sat_train/loader/
device_backend.py) times the same epochs of the set it decoded once when it was made (that decode is
not in its rate; bench/fit_throughput.py reports it as setup). Prints a ratio table and writes it to
bench/results/loader.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from sat_train.loader import dali_available, make_loader
from shards.format import FORMAT_NAME, FORMAT_VERSION, encode_label, saliency_to_uint8
from shards.storage import atomic_write_bytes, atomic_write_json
from shards.writer import ShardWriter

RESULTS = Path(__file__).resolve().parent / "results" / "loader.md"


def photo_like(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth multi-scale colour field with an object-like blob and sensor noise (JPEG-realistic
    entropy, unlike flat or white-noise images), and a saliency map peaked on the blob."""
    img = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((2, 0.5), (4, 0.3), (8, 0.15), (size // 2, 0.05)):
        img += weight * cv2.resize(rng.random((cells, cells, 3), dtype=np.float32), (size, size),
                                   interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
    img = img * (1 - blob[..., None]) + blob[..., None] * rng.random(3, dtype=np.float32)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8), saliency_to_uint8(blob * 2 - 1)


def write_shard_set(root: Path, num: int, size: int, per_shard: int = 1024, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos, done = [], 0
    with tqdm(total=num, desc=f"shards {size}x{size}", leave=False) as bar:
        while done < num:
            with ShardWriter(root / f"bench-{len(infos):06d}.tar") as w:
                for _ in range(min(per_shard, num - done)):
                    img, sal = photo_like(rng, size)
                    w.write({"__key__": f"b{done:07d}", "label.i64": encode_label(done % 10),
                             "cls": str(done % 10).encode(), "json": b"{}",
                             "jpg": cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
                             "sal.png": cv2.imencode(".png", sal)[1].tobytes()})
                    done += 1
                    bar.update()
            infos.append(w.info.to_dict())
    atomic_write_json(root / "manifest.json", {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "split": "bench", "config": {"bench": "loader"},
        "fingerprint": {"digest": f"bench-{size}-{num}-{seed}"}, "classes": [str(i) for i in range(10)],
        "image": {"format": "jpg", "height": size, "width": size, "channels": 3}, "shards": infos,
        "counts": {"read": num, "written": num, "skipped": {}}})
    return root


def images_per_second(root: Path, backend: str, args, device: torch.device, decode: str = "auto") -> float:
    loader = make_loader(root, args.batch_size, train=True, backend=backend, num_workers=args.workers,
                         device=device, seed=0, decode=decode)
    loader.set_epoch(0)
    for _ in loader:  # warm-up epoch: imports, first fork, page cache
        pass
    seen, start = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loader.set_epoch(epoch)
        for x, s, y in loader:
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    loader.close()
    return seen / elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (4k images, 2 epochs)")
    ap.add_argument("--images", type=int, default=None, help="images per size (default 16384, --quick 4096)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs (default 3, --quick 2)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.images = args.images or (4096 if args.quick else 16384)
    args.epochs = args.epochs or (2 if args.quick else 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dali_available():
        raise SystemExit("bench/loader.py: nvidia.dali does not import; nothing to compare")
    # on CUDA both decode placements (dali_backend.py: "auto" takes cpu up to 64x64, gpu above)
    variants = {"dali mixed (GPU decode)": "gpu", "dali CPU decode -> GPU": "cpu"} if device.type == "cuda" \
        else {"dali cpu": "auto"}
    columns = [*variants, "device backend (decoded once)"]

    rows, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="satpipe-bench-loader-") as tmp:
        for size in args.sizes:
            root = write_shard_set(Path(tmp) / f"s{size}", args.images, size)
            base = images_per_second(root, "torch", args, device)
            dali = [images_per_second(root, "dali", args, device, decode) for decode in variants.values()]
            resident = images_per_second(root, "device", args, device)  # its one-off decode is not timed
            rows.append((size, base, dali + [resident]))
            print(f"{size}x{size}: torch {base:,.0f} img/s, " + ", ".join(
                f"{name} {d:,.0f} img/s ({d / base:.2f}x)" for name, d in zip(columns, dali + [resident])),
                flush=True)

    command = " ".join(["python bench/loader.py", *(argv if argv is not None else sys.argv[1:])])
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    lines = [
        "# Loader throughput (bench/loader.py)", "",
        f"`{command}`: {args.images} JPEG images per size "
        f"(+ PNG saliency), batch {args.batch_size}, train mode (shuffle, pad-4 crop + flip on image and saliency), "
        f"{args.workers} worker threads each, {args.epochs} timed epochs after a warm-up epoch, output on `{device}`. "
        f"Host: {os.cpu_count()} cores, {cpu}; GPU: {gpu}. Load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (other work on the machine makes both columns slower and noisier).", "",
        "| size | torch backend (img/s) | " + " | ".join(f"{name} (img/s) | ratio" for name in columns) + " |",
        "|---|---:|" + "---:|---:|" * len(columns)]
    lines += [f"| {s}x{s} | {b:,.0f} | " + " | ".join(f"{d:,.0f} | {d / b:.2f}x" for d in ds) + " |"
              for s, b, ds in rows]
    if device.type == "cuda":
        lines += ["", "Target: DALI on one GPU >= 30,000 img/s at 32x32. The loader keeps one DALI pipeline for the "
                  "whole run; each timed epoch includes its start (reset, prefetch) and ends when its last batch "
                  "is on the GPU."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, table.encode())


if __name__ == "__main__":
    main()
