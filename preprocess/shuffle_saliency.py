"""`preprocess shuffle-saliency IN --out OUT --seed S`: the `shuffled` saliency control.

    preprocess shuffle-saliency shards/fashion-mnist/train --out shards/fashion-mnist-shuffled/train --seed 0
    sat-train fit --shards shards/fashion-mnist-shuffled/train --method sat

Every image gets the saliency map of another image: a seeded, uniformly random derangement (a
permutation without fixed points) over the whole set, so maps cross shards. The maps themselves are
copied byte for byte, so their statistics, and with them SAT's perturbation size and structure, are
those of IN; only their alignment with the object is broken. That is the control that tells whether
*aligned* saliency matters (issue 12). Each sample's json gains `"saliency_from": <key>`, the sample
whose map it carries; everything else (keys, labels, image bytes, shard names and order) is IN's.

Memory stays small for any set size: the permutation (8 bytes per sample) and, per sample, where its
map lies in IN's tars (taken from IN's DALI indexes). Maps are read on demand with positioned reads,
in file order per batch. The output is written through shards/derive.py: resumable per shard, atomic,
manifest last, recording the derivation (`shuffle-saliency`, seed) and IN's fingerprint.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.derive import Batch, Derivation, DeriveError, derive, open_input, run_command
from shards.format import SALIENCY_EXT, ShardFormatError, TAR_BLOCK, split_member_name
from shards.manifest import Manifest, read_manifest
from shards.reading import read_dali_index
from preprocess.tar_fast import FastShardWriter
from shards.cli import CommandParser, Config, ConfigError, add_fields, add_progress, fail, from_file_and_flags, option

DERIVATION = "shuffle-saliency"
MAX_OPEN_TARS = 16


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of range(n) with perm[i] != i for every i (rejection sampling:
    about e = 2.7 draws on average, whatever n)."""
    if n < 2:
        raise ValueError(f"a set of {n} sample(s) has no derangement: each image must get another image's map")
    rng = np.random.default_rng(seed)
    identity = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == identity).any():
            return perm


class MapReader:
    """Random access to IN's `sal.png` members by global sample position, via IN's DALI indexes."""

    def __init__(self, manifest: Manifest):
        shard, offset, size = [], [], []
        for n, (info, idx_path) in enumerate(zip(manifest.shards, manifest.index_paths())):
            try:
                index = read_dali_index(idx_path)
            except ShardFormatError as e:
                raise DeriveError(str(e)) from None
            if len(index) != info["samples"]:
                raise DeriveError(f"{idx_path}: {len(index)} samples indexed, the manifest says {info['samples']}")
            for sample in index:
                member = next((m for m in sample if m[0] == SALIENCY_EXT), None)
                if member is None:
                    raise DeriveError(f"{manifest.root / info['tar']}: sample {sample[0][3]!r} has no {SALIENCY_EXT}")
                shard.append(n)
                offset.append(member[1])
                size.append(member[2])
        self.tars = manifest.tar_paths()
        self.shard = np.asarray(shard, np.int32)
        self.offset = np.asarray(offset, np.int64)
        self.size = np.asarray(size, np.int64)
        self._open: OrderedDict[int, int] = OrderedDict()  # shard -> fd, least recently used first

    def _fd(self, shard: int) -> int:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) >= MAX_OPEN_TARS:
            os.close(self._open.popitem(last=False)[1])
        self._open[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return self._open[shard]

    def read(self, positions: np.ndarray) -> list[tuple[str, bytes]]:
        """(key, sal.png bytes) of the samples at these global positions, in the given order."""
        out: list = [None] * len(positions)
        for j in np.lexsort((self.offset[positions], self.shard[positions])):  # file order: sequential reads
            p = int(positions[j])
            s, off, size = int(self.shard[p]), int(self.offset[p]), int(self.size[p])
            # the member's tar header sits in the block before its data: its name gives the key
            raw = os.pread(self._fd(s), TAR_BLOCK + size, off - TAR_BLOCK)
            key, ext = split_member_name(raw[:100].split(b"\0", 1)[0].decode("utf-8", "replace"))
            if ext != SALIENCY_EXT or len(raw) != TAR_BLOCK + size:
                raise DeriveError(f"{self.tars[s]}: its index does not point at a {SALIENCY_EXT} at byte {off}")
            out[j] = (key, raw[TAR_BLOCK:])
        return out

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


def make_maps_fn(perm: np.ndarray, reader: MapReader):
    def make_maps(batch: Batch) -> list[dict]:
        sources = reader.read(perm[batch.first:batch.first + len(batch.samples)])
        out = []
        for sample, (src_key, png) in zip(batch.samples, sources):
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DeriveError(f"{batch.where}: sample {sample['__key__']!r} has a json that does not parse") from None
            meta = meta if isinstance(meta, dict) else {"meta": meta}
            meta["saliency_from"] = src_key
            out.append({SALIENCY_EXT: png, "json": json.dumps(meta, sort_keys=True).encode()})
        return out

    return make_maps


def worker_maps(in_dir: str, seed: int):
    """make_maps for a --workers process (the derangement is recomputed: a pure function of the seed)."""
    manifest = read_manifest(in_dir)
    return make_maps_fn(derangement(manifest.num_samples, seed), MapReader(manifest))


def shuffle_saliency(in_dir, out_dir, seed: int, *, batch_size: int = 1024, overwrite: bool = False,
                     progress: bool = True, log=print, workers: int = 1) -> dict:
    manifest = open_input(in_dir)
    try:
        perm = derangement(manifest.num_samples, seed)
    except ValueError as e:
        raise DeriveError(f"{manifest.root}: {e}") from None
    reader = MapReader(manifest)
    source = dict(manifest.raw.get("saliency") or {})
    saliency = {**source, "kind": "shuffled", "source_kind": source.get("kind"), "seed": seed}
    derivation = Derivation(DERIVATION, {"seed": seed, "permutation": "uniform derangement over the whole set"},
                            saliency, execution={"batch_size": batch_size})
    try:
        return derive(in_dir, out_dir, derivation, make_maps_fn(perm, reader), batch_size=batch_size,
                      overwrite=overwrite, progress=progress, log=log, manifest=manifest, writer_cls=FastShardWriter,
                      workers=workers, maps_factory=functools.partial(worker_maps, str(manifest.root), seed))
    finally:
        reader.close()


@dataclass
class ShuffleConfig(Config):
    seed: int = option(0, "seed of the derangement (which image gets which map)")
    batch_size: int = option(1024, "maps read per batch (memory only)")
    workers: int = option(1, "shards written by N processes")
    overwrite: bool = option(False, "replace whatever else OUT holds (an output of this very derivation is kept and "
                             "resumed anyway)")

    def validate(self) -> None:
        if self.batch_size < 1 or self.workers < 1:
            raise ConfigError("batch_size and workers must be >= 1")


PROG = "preprocess shuffle-saliency"


def build_parser() -> CommandParser:
    ap = CommandParser(PROG, __doc__)
    ap.add_argument("input", metavar="IN_SHARDS", help="input shard set (folder with manifest.json)")
    ap.add_argument("--out", required=True, metavar="OUT_SHARDS", help="output shard set folder to write")
    ap.add_argument("--config", metavar="FILE.toml", help="TOML file of the option keys below; flags override it")
    add_fields(ap, ShuffleConfig)
    add_progress(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    prog = PROG
    args = build_parser().parse_args(argv)
    try:
        (cfg,) = from_file_and_flags((ShuffleConfig,), args, args.config)
    except ConfigError as e:
        return fail(prog, str(e))
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    return run_command(prog, args.out, lambda: shuffle_saliency(
        Path(args.input), Path(args.out), cfg.seed, batch_size=cfg.batch_size, overwrite=cfg.overwrite,
        progress=args.progress, log=log, workers=cfg.workers))
