"""Benchmark: building beyond one process pool (issue 13), each row a ratio against a baseline run
in the same rounds.

    python bench/scale_out.py            # 20k objects (bench/build_shards.py's generated COCO-like set)
    python bench/scale_out.py --quick    # 2k objects, 1 round: a smoke run

Rows (ROWS below; object-storage rows add a Case to it):
  ray-joined   `build-shards --executor ray --ray-address ADDR` on a running 2-CPU Ray instance vs
               `build-shards --workers 2`: the cluster case, where Ray is up before the build
               (target >= 0.9x)
  ray-joined-5x  the same on a set 5 times larger (100k objects): Ray's fixed costs per build (import,
               joining, the job's worker processes starting, disconnecting: ~1 s here) against a build
               of ~25 s instead of ~5 s; the size at which one reaches for a cluster is larger still
  ray-local    `build-shards --executor ray --workers 2`, starting (and stopping) its own local Ray
               instance, vs `--workers 2`: what starting Ray costs on one machine
  s3-build     `build-shards --workers 2 --out s3://...` to a local S3 server (moto_server on 127.0.0.1,
               started by the benchmark) vs the same build to disk: what publishing through S3 costs
  s3-torch     the torch loader (2 workers) from the local S3 server vs from disk: make_loader (sha256
               check of every shard: one streamed pass) + one epoch, in this process
  s3-dali      the same with the DALI backend: from S3 it stages the set into an empty local cache
               first (download + sha256), then reads the local copy
The loader rows read the set the s3-build row's baseline wrote (made once, untimed, if only they run).
Every run is the whole command in a fresh process (what a user waits for), output to a fresh folder;
configurations interleave within a round and each cell is the median over rounds. Prints a markdown
table and writes it to bench/results/scale_out.md.
"""
from __future__ import annotations

import argparse
import dataclasses
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
    s3_bucket: str = ""  # on the moto server this benchmark runs for the s3-* rows


@dataclass
class Case:
    """One table row: `run(ctx, variant)` -> samples written, for variant "baseline" and "candidate"."""

    name: str
    baseline: str  # what the columns say
    candidate: str
    target: float  # candidate speed / baseline speed must reach this
    run: Callable[[Context, str], int]
    needs_ray: bool = False
    needs_s3: bool = False
    scale: int = 1  # this row builds a generated set `scale` times the --objects of the others


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


def s3_build(ctx: Context, variant: str) -> int:
    if variant == "baseline":
        return build_command(ctx, ctx.work / "disk", "--workers", "2")
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = f"{ctx.s3_bucket}/built"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    url = f"s3://{prefix}"
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(ctx.ann_path),
           "--images", str(ctx.images), "--size", str(ctx.size), "--out", url, "--no-progress", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(fs.cat(f"{prefix}/manifest.json"))["counts"]["written"]


def _loader_set(ctx: Context) -> tuple[Path, str]:
    """The loader rows' set: on disk (built once) and on the bucket (uploaded once)."""
    import s3fs

    local = ctx.work / "loader-set"
    if not (local / "manifest.json").exists():
        build_command(ctx, local, "--workers", "2")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = f"{ctx.s3_bucket}/loader-set"
    if not fs.exists(f"{prefix}/manifest.json"):
        for p in sorted(local.iterdir(), key=lambda p: p.name == "manifest.json"):  # manifest last
            if p.is_file():
                fs.put_file(str(p), f"{prefix}/{p.name}")
    return local, f"s3://{prefix}"


def _one_epoch(where, backend: str) -> int:
    from sat_train.loader import make_loader

    loader = make_loader(where, 128, train=True, backend=backend, num_workers=2, device="cpu")
    n = sum(len(y) for _, _, y in loader)
    loader.close()
    return n


def s3_loader(backend: str) -> Callable[[Context, str], int]:
    def run(ctx: Context, variant: str) -> int:
        local, url = _loader_set(ctx)
        if variant == "baseline":
            return _one_epoch(str(local), backend)
        shutil.rmtree(ctx.work / "cache", ignore_errors=True)  # DALI: stage into an empty cache every time
        return _one_epoch(url, backend)
    return run


ROWS = [
    Case("ray-joined", "--workers 2", "Ray, 2 CPUs, joined (--ray-address)", 0.9, ray_joined, needs_ray=True),
    Case("ray-joined-5x", "--workers 2", "Ray, 2 CPUs, joined (--ray-address)", 0.9, ray_joined, needs_ray=True,
         scale=5),
    Case("ray-local", "--workers 2", "Ray, 2 CPUs, local instance started by the build", 0.0, ray_local,
         needs_ray=True),
    Case("s3-build", "--workers 2 to disk", "--workers 2 to s3:// (local moto server)", 0.0, s3_build, needs_s3=True),
    Case("s3-torch", "torch loader from disk", "torch loader from s3:// (streamed)", 0.0, s3_loader("torch"),
         needs_s3=True),
    Case("s3-dali", "DALI loader from disk", "DALI loader from s3:// (staged into an empty cache)", 0.0,
         s3_loader("dali"), needs_s3=True),
]


def start_s3(work: Path) -> tuple[str, subprocess.Popen]:
    """A moto S3 server on 127.0.0.1 for the s3-* rows, with dummy keys in this process's environment
    (the builds it starts inherit them); returns (bucket, server process)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "w"), stderr=subprocess.STDOUT)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", SATPIPE_SHARD_CACHE=str(work / "cache"))
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
    return "bench", proc


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
    s3_server = None
    if any(c.needs_s3 for c in cases):
        ctx.s3_bucket, s3_server = start_s3(ctx.work)
    contexts = {1: ctx}  # per scale: the same settings on a larger generated set
    for scale in sorted({c.scale for c in cases} - {1}):
        big = data.with_name(f"{data.name}-x{scale}")
        contexts[scale] = dataclasses.replace(ctx, ann_path=generate(big, objects * scale), images=big / "images")
    # one untimed run of each: Numba's cache and the OS page cache are warm for every timed run
    for c in cases:
        for variant in ("baseline", "candidate"):
            c.run(contexts[c.scale], variant)
    times: dict = {}
    for rnd in range(rounds):
        for c in cases:
            for variant in ("baseline", "candidate"):
                t = time.perf_counter()
                n = c.run(contexts[c.scale], variant)
                dt = time.perf_counter() - t
                times.setdefault((c.name, variant), []).append((n, dt))
                print(f"round {rnd + 1}/{rounds} {c.name} {variant}: {n} samples in {dt:.2f}s = {n / dt:.0f}/s",
                      flush=True)
    if s3_server is not None:
        s3_server.terminate()
        s3_server.wait()
    shutil.rmtree(ctx.work, ignore_errors=True)

    how = "whole commands in fresh processes" + ("; s3-torch/s3-dali: make_loader + one epoch in this process"
                                                 if any(c.name in ("s3-torch", "s3-dali") for c in cases) else "")
    lines = [f"{objects} objects (rows -Nx: N times as many), {args.size} px, median of {rounds} round(s), {how}", "",
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
