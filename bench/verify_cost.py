"""What the default shard check at `fit` start costs, against one training epoch (target: <= 5%).

    preprocess build-shards fashion-mnist --split train --out /tmp/fm-train
    python bench/verify_cost.py /tmp/fm-train                 # cnn4, batch 128, sat: the demo's config
    python bench/verify_cost.py /tmp/fm-train --quick         # fewer timed batches: a smoke run

Times, on the same shard set and in the same process:
- opening the set as fit does (`sat_train.loader.safety.open_shard_set`) with `verify="sha256"` (the
  default: sha256 of every tar and index in parallel threads, the index checks, every label against
  the class count) and with `verify="size"` (the opt-in cheap mode); their difference is what the
  default costs;
- the sha256 pass alone with 1 thread and with the default thread count;
- one epoch of `sat-train fit` (cnn4, batch 128, --method sat, the torch/DALI loader fit picks),
  estimated from a timed run of `--limit-batches N` batches after a warm-up epoch (numba compiles,
  DALI builds its pipeline), scaled to the full epoch's batch count.
The files are warm in the page cache (as right after a build); from a cold disk the hashing reads at
disk speed instead. Each timing is the median of --rounds. Table to stdout and bench/results/verify_cost.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sat_train.config import from_dict
from sat_train.fit import fit
from sat_train.loader.safety import open_shard_set
from shards.manifest import check_shard_files, read_manifest
from shards.storage import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def epoch_seconds(shards: Path, batches: int, batch_size: int, arch: str, method: str) -> tuple[float, int]:
    """(estimated seconds of one full fit epoch, batches in it) from a timed run of `batches` batches."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict({"shards": str(shards), "run": f"{tmp}/run", "arch": arch, "method": method,
                         "batch_size": batch_size, "epochs": 2, "limit_batches": batches, "progress": False,
                         "schedule": "constant", "verify_shards": "size"})
        with contextlib.redirect_stderr(io.StringIO()):
            fit(cfg)
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    full = read_manifest(shards).num_samples // batch_size  # fit drops the last partial batch
    return rows[-1]["epoch_time_s"] / batches * full, full  # the second epoch: warm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", type=Path, help="shard set to check and train on (e.g. Fashion-MNIST train)")
    ap.add_argument("--batches", type=int, default=40, help="timed training batches (default 40)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per check timing; the median is reported")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--arch", default="cnn4")
    ap.add_argument("--method", default="sat")
    ap.add_argument("--quick", action="store_true", help="10 timed batches, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = 10, 1
    manifest = read_manifest(args.shards)
    size_mb = sum(s["bytes"] + s["index_bytes"] for s in manifest.shards) / 1e6

    check_shard_files(manifest, full=True)  # warm the page cache: every row reads warm files
    open_sha = _median_time(lambda: open_shard_set(args.shards, "sha256"), args.rounds)
    open_size = _median_time(lambda: open_shard_set(args.shards, "size"), args.rounds)
    hash_1 = _median_time(lambda: check_shard_files(manifest, full=True, threads=1), args.rounds)
    hash_n = _median_time(lambda: check_shard_files(manifest, full=True), args.rounds)
    epoch, steps = epoch_seconds(args.shards, args.batches, args.batch_size, args.arch, args.method)

    cost = open_sha - open_size
    rows = [("open the set, verify=sha256 (the default)", open_sha), ("open the set, verify=size (opt-in)", open_size),
            ("  difference: what the default costs", cost), ("sha256 of every tar + index, 1 thread", hash_1),
            ("sha256 of every tar + index, default threads", hash_n),
            (f"one fit epoch ({args.arch}, batch {args.batch_size}, {args.method}, {steps} batches, estimated)", epoch)]
    lines = [f"Shard set {args.shards}: {manifest.num_samples} samples, {len(manifest.shards)} shards, "
             f"{size_mb:.0f} MB (tars + indexes), warm page cache; median of {args.rounds} round(s); the epoch "
             f"from {args.batches} timed batches after a warm-up epoch.", "",
             "| step | seconds | % of one epoch |", "|---|---:|---:|"]
    lines += [f"| {name} | {t:.3f} | {100 * t / epoch:.2f}% |" for name, t in rows]
    verdict = "holds" if cost <= 0.05 * epoch else "FAILS"
    lines += ["", f"Default check at fit start: {cost:.3f} s = {100 * cost / epoch:.2f}% of an epoch "
              f"(target <= 5%: {verdict})."]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        atomic_write_bytes(RESULTS / "verify_cost.md", table.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
