"""Fashion-MNIST build-shards throughput: satpipe vs a plain OpenCV loop (images/s, ratios).

    python bench/build_shards_fmnist.py            # the full 60k train split, satpipe at 1 and 2 workers
    python bench/build_shards_fmnist.py --quick    # the first 10k images (a smoke run)

Both read the real Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist, Debian's
dataset-fashion-mnist) and write WebDataset shards of 1000 samples with `foreground` saliency
(median border colour, threshold, Gaussian blur sigma = 0.05 * 28 px, 8-bit PNG):

  baseline  the loop one writes first: numpy IDX arrays, per image OpenCV absdiff + threshold +
            GaussianBlur + imencode (PNG image and saliency) + webdataset TarWriter, one process
  satpipe   `preprocess build-shards fashion-mnist --saliency foreground` (raw 28x28 images,
            Numba foreground + blur kernels, shuffled shards, DALI indexes, manifest), 1 and 2 workers

Prints the table and writes it to bench/results/build_shards_fmnist.md. `bench_fashion_mnist()` returns
the rows so a combined bench table (bench/build_shards.py) can include them.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

FMNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).resolve().parent / "results" / "build_shards_fmnist.md"
SIGMA_FRAC, THRESHOLD, SHARD = 0.05, 0.1 * 255, 1000


def opencv_loop(images: np.ndarray, labels: np.ndarray, out: Path) -> int:
    """The plain baseline: one image at a time, OpenCV ops, TarWriter shards of SHARD samples."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    sigma = SIGMA_FRAC * images.shape[1]
    ksize = 2 * int(np.ceil(3 * sigma)) + 1
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=SHARD, verbose=0) as sink:
        for i in tqdm(range(len(images)), desc="opencv loop", leave=False, mininterval=1.0):
            img = images[i]
            border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
            mask = (cv2.absdiff(img, np.full_like(img, int(np.median(border)))) > THRESHOLD).astype(np.float32)
            soft = cv2.GaussianBlur(mask, (ksize, ksize), sigma)
            sal = np.clip(np.rint(soft * 2.0 * 127.5), 0, 255).astype(np.uint8)  # round((2b - 1 + 1) * 127.5)
            sink.write({"__key__": f"train_{i:05d}", "png": cv2.imencode(".png", img)[1].tobytes(),
                        "sal.png": cv2.imencode(".png", sal)[1].tobytes(), "cls": str(int(labels[i])).encode(),
                        "json": b'{"source_id": %d}' % i})
    return len(images)


def satpipe_build(limit: int, workers: int, out: Path) -> int:
    from preprocess.build import build
    from preprocess.config import BuildConfig

    cfg = BuildConfig(source="fashion-mnist", root=str(FMNIST), split="train", unit="image", size=28,
                      image_format="raw", saliency="foreground", sigma_frac=SIGMA_FRAC, shard_size=SHARD,
                      workers=workers, out=str(out), progress=False, source_options={"limit": limit})
    manifest = build(cfg, log=lambda *a: None)
    return manifest["counts"]["written"]


def _timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def bench_fashion_mnist(limit: int = 60000, workers=(1, 2), tmp: Path | None = None) -> list[dict]:
    """Rows {name, images, seconds, images_per_s, vs_baseline} for the baseline and each worker count."""
    from preprocess.sources.idx_mnist import load_idx_split

    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="bench-fmnist-")) if own_tmp else tmp
    try:
        images, labels, _ = load_idx_split(FMNIST, "train", limit=limit)
        # warm up: numba compiles (or loads its cache) and imports happen outside the timed runs
        satpipe_build(200, 1, tmp / "warm")
        rows = []
        secs, n = _timed(opencv_loop, images, labels, tmp / "baseline")
        rows.append({"name": "plain OpenCV loop (1 process)", "images": n, "seconds": secs})
        for w in workers:
            secs, n = _timed(satpipe_build, limit, w, tmp / f"satpipe-{w}")
            rows.append({"name": f"satpipe build-shards, {w} worker{'s' * (w > 1)}", "images": n, "seconds": secs})
        base = rows[0]["images"] / rows[0]["seconds"]
        for r in rows:
            r["images_per_s"] = r["images"] / r["seconds"]
            r["vs_baseline"] = r["images_per_s"] / base
        return rows
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = ["| Fashion-MNIST train, foreground saliency | images | seconds | images/s | vs baseline |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | {r['vs_baseline']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first 10k images only")
    ap.add_argument("--limit", type=int, default=0, help="images to use (default: 60000, --quick: 10000)")
    args = ap.parse_args()
    if not FMNIST.is_dir():
        raise SystemExit(f"{FMNIST}: missing; apt-get install dataset-fashion-mnist")
    limit = args.limit or (10000 if args.quick else 60000)
    rows = bench_fashion_mnist(limit)
    text = table(rows)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# bench/build_shards_fmnist.py{' --quick' if args.quick else ''}\n\n"
                       f"Machine: {platform.processor() or platform.machine()}, "
                       f"{__import__('os').cpu_count()} logical CPUs; target: satpipe >= 3x the baseline.\n\n"
                       f"{text}\n")


if __name__ == "__main__":
    main()
