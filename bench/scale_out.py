"""Benchmark: building beyond one process pool (issue 13), each row a ratio against a baseline run
in the same rounds.

    python bench/scale_out.py            # 20k objects (bench/build_shards.py's generated COCO-like set)
    python bench/scale_out.py --quick    # 2k objects, 1 round: a smoke run

Rows (ROWS below; object-storage rows add a Case to it):
  ray-joined   `build-shards --executor ray --ray-address ADDR` on a running 2-CPU Ray instance vs
               `build-shards --workers 2`: the cluster case, where Ray is up before the build
               (target >= 0.9x)
  ray-local    `build-shards --executor ray --workers 2`, starting (and stopping) its own local Ray
               instance, vs `--workers 2`: what starting Ray costs on one machine
Every run is the whole command in a fresh process (what a user waits for), output to a fresh folder;
configurations interleave within a round and each cell is the median over rounds. Prints a markdown
table and writes it to bench/results/scale_out.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
from build_shards import generate  # noqa: E402  (the COCO-like set the build benchmark uses)

from shards.storage import atomic_write_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scale_out.md"


@dataclass
class Context:
    ann_path: Path
    images: Path
    work: Path
    size: int
    ray_address: str = ""  # of the Ray instance this benchmark runs for the `joined` rows


@dataclass
class Case:
    """One table row: `run(ctx, variant)` -> samples written, for variant "baseline" and "candidate"."""

    name: str
    baseline: str  # what the columns say
    candidate: str
    target: float  # candidate speed / baseline speed must reach this
    run: Callable[[Context, str], int]
    needs_ray: bool = False


def build_command(ctx: Context, out: Path, *extra: str) -> int:
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(ctx.ann_path),
           "--images", str(ctx.images), "--size", str(ctx.size), "--out", str(out), "--no-progress", *extra]
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "manifest.json").read_text())["counts"]["written"]


def ray_joined(ctx: Context, variant: str) -> int:
    if variant == "baseline":
        return build_command(ctx, ctx.work / "local", "--workers", "2")
    return build_command(ctx, ctx.work / "ray", "--executor", "ray", "--ray-address", ctx.ray_address)


def ray_local(ctx: Context, variant: str) -> int:
    if variant == "baseline":
        return build_command(ctx, ctx.work / "local", "--workers", "2")
    return build_command(ctx, ctx.work / "ray-local", "--executor", "ray", "--workers", "2")


ROWS = [
    Case("ray-joined", "--workers 2", "Ray, 2 CPUs, joined (--ray-address)", 0.9, ray_joined, needs_ray=True),
    Case("ray-local", "--workers 2", "Ray, 2 CPUs, local instance started by the build", 0.0, ray_local,
         needs_ray=True),
]


def start_ray() -> str:
    """A 2-CPU Ray instance in this process for the `joined` rows; its address for the builds."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    return ray.get_runtime_context().gcs_address


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2k objects, 1 round (smoke run)")
    ap.add_argument("--objects", type=int, default=None, help="objects to generate (default 20000; quick 2000)")
    ap.add_argument("--data", default="/tmp/satpipe-bench/coco", help="where the generated data set is cached")
    ap.add_argument("--size", type=int, default=64, help="output size in pixels")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument("--rows", nargs="+", default=[c.name for c in ROWS], help="rows to run (default: all)")
    args = ap.parse_args(argv)
    objects = args.objects or (2000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    cases = [c for c in ROWS if c.name in args.rows]
    data = Path(args.data)
    ctx = Context(generate(data, objects), data / "images", data.parent / "scale-out", args.size)
    if any(c.needs_ray for c in cases):
        ctx.ray_address = start_ray()
    # one untimed run of each: Numba's cache and the OS page cache are warm for every timed run
    for c in cases:
        for variant in ("baseline", "candidate"):
            c.run(ctx, variant)
    times: dict = {}
    for rnd in range(rounds):
        for c in cases:
            for variant in ("baseline", "candidate"):
                t = time.perf_counter()
                n = c.run(ctx, variant)
                dt = time.perf_counter() - t
                times.setdefault((c.name, variant), []).append((n, dt))
                print(f"round {rnd + 1}/{rounds} {c.name} {variant}: {n} samples in {dt:.2f}s = {n / dt:.0f}/s",
                      flush=True)
    shutil.rmtree(ctx.work, ignore_errors=True)

    lines = [f"{objects} objects, {args.size} px, median of {rounds} round(s), whole commands in fresh processes", "",
             "| row | baseline | samples/s | candidate | samples/s | candidate / baseline | target |",
             "|---|---|---:|---|---:|---:|---:|"]
    for c in cases:
        rate = {v: times[(c.name, v)][0][0] / statistics.median(dt for _, dt in times[(c.name, v)])
                for v in ("baseline", "candidate")}
        target = f">= {c.target:.1f}x" if c.target else "-"
        lines.append(f"| {c.name} | {c.baseline} | {rate['baseline']:.0f} | {c.candidate} | {rate['candidate']:.0f} "
                     f"| {rate['candidate'] / rate['baseline']:.2f}x | {target} |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_bytes(RESULTS, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
