"""`preprocess verify DIR`: check a shard set completely against its manifest.

    preprocess verify shards/coco/train

Checks that every shard and index name in the manifest is a plain file name inside DIR, presence,
byte size and sha256 of every tar and index, the sample count of every tar, that every tar member is
a regular file with a plain name (no `..`, absolute names, links or devices), that each sample has
all its components and every image and saliency map decodes to the manifest's shape, labels are in
range, and each DALI index matches the members of its tar byte for byte.
Prints one line per problem (naming the file) and exits 1 if there is any, 0 otherwise. Tar or index
files in DIR that the manifest does not list get a warning line (readers ignore them; the set is
still valid).
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from shards.format import (CLS_EXT, LABEL_EXT, META_EXT, SALIENCY_EXT, Manifest, ShardFormatError,
                           check_shard_files, decode_label, read_dali_index, read_manifest, unlisted_files,
                           unsafe_member)

MAX_PER_SHARD = 10  # problem lines per shard before summarising (a broken shard is broken)


def _tar_members(path: Path):
    """([(key, ext, data offset, size, name, bytes)] in tar order, [problems with members that have no
    place in a shard]); ShardFormatError if damaged. Nothing is extracted: unsafe members are named."""
    out, problems = [], []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                reason = unsafe_member(m)
                if reason:
                    problems.append(f"{path}: member {m.name!r} is {reason} (a shard holds regular files only)")
                elif m.isfile():
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    out.append((key, ext, m.offset_data, m.size, m.name, tf.extractfile(m).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{path}: damaged tar ({e})") from None
    return out, problems


def _check_sample(key: str, parts: dict, manifest: Manifest) -> list[str]:
    img = manifest.image
    fmt, h, w, c = img["format"], img["height"], img["width"], img["channels"]
    problems = []
    missing = [e for e in (fmt, SALIENCY_EXT, LABEL_EXT, CLS_EXT, META_EXT) if e not in parts]
    if missing:
        return [f"sample {key}: missing {', '.join(missing)}"]
    if fmt == "raw":
        if len(parts[fmt]) != h * w * c:
            problems.append(f"sample {key}: raw image has {len(parts[fmt])} bytes, expected {h * w * c}")
    else:
        flag = cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR
        pix = cv2.imdecode(np.frombuffer(parts[fmt], np.uint8), flag)
        if pix is None:
            problems.append(f"sample {key}: image does not decode")
        elif pix.shape[:2] != (h, w):
            problems.append(f"sample {key}: image is {pix.shape[1]}x{pix.shape[0]}, manifest says {w}x{h}")
    sal = cv2.imdecode(np.frombuffer(parts[SALIENCY_EXT], np.uint8), cv2.IMREAD_UNCHANGED)
    if sal is None or sal.dtype != np.uint8 or sal.shape != (h, w):
        problems.append(f"sample {key}: saliency does not decode to {w}x{h} uint8 grey")
    try:
        label = decode_label(parts[LABEL_EXT])
        if not 0 <= label < manifest.num_classes:
            problems.append(f"sample {key}: label {label} outside 0..{manifest.num_classes - 1}")
        elif parts[CLS_EXT].strip() != str(label).encode():
            problems.append(f"sample {key}: cls {parts[CLS_EXT]!r} differs from label {label}")
    except ShardFormatError as e:
        problems.append(f"sample {key}: {e}")
    return problems


def verify_shard(manifest: Manifest, entry: dict) -> list[str]:
    """Problems inside one shard whose size and sha256 already matched."""
    tar_path, idx_path = manifest.root / entry["tar"], manifest.root / entry["index"]
    members, problems = _tar_members(tar_path)
    samples: list[tuple[str, list]] = []
    for m in members:
        if not samples or samples[-1][0] != m[0]:
            samples.append((m[0], []))
        samples[-1][1].append(m)
    if len(samples) != entry["samples"]:
        problems.append(f"{tar_path}: {len(samples)} samples, manifest says {entry['samples']}")
    for key, ms in samples:
        problems += [f"{tar_path}: {p}" for p in _check_sample(key, {m[1]: m[5] for m in ms}, manifest)]
    index = read_dali_index(idx_path)
    actual = [[(m[1], m[2], m[3], m[4]) for m in ms] for _, ms in samples]
    if index != actual:
        bad = next((i for i, (a, b) in enumerate(zip(index, actual)) if a != b), min(len(index), len(actual)))
        problems.append(f"{idx_path}: does not match {tar_path.name} (first difference at sample {bad})")
    if len(problems) > MAX_PER_SHARD:
        problems = problems[:MAX_PER_SHARD] + [f"{tar_path}: ... and {len(problems) - MAX_PER_SHARD} more problems"]
    return problems


def warnings(root: Path) -> list[str]:
    """Findings that leave the set valid: files the manifest does not list."""
    manifest = read_manifest(root)
    return [f"{p}: not listed in the manifest (readers ignore it; left from another build?)"
            for p in unlisted_files(manifest)]


def verify(root: Path, progress: bool = True) -> list[str]:
    manifest = read_manifest(root)
    problems = check_shard_files(manifest, full=True)
    broken = {p.split(":", 1)[0] for p in problems}
    for entry in tqdm(manifest.shards, unit="shard", disable=not progress, file=sys.stderr):
        if str(manifest.root / entry["tar"]) in broken or str(manifest.root / entry["index"]) in broken:
            continue
        try:
            problems += verify_shard(manifest, entry)
        except ShardFormatError as e:
            problems.append(str(e))
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="preprocess verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="shard set folder (holds manifest.json)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    try:
        problems = verify(root, progress=not args.no_progress)
    except ShardFormatError as e:
        print(f"preprocess verify: {e}", file=sys.stderr)
        return 1
    for w in warnings(root):
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"preprocess verify: {root}: {len(problems)} problems", file=sys.stderr)
        return 1
    m = read_manifest(root)
    print(f"{root}: OK ({m.num_samples} samples in {len(m.shards)} shards verified)")
    return 0
