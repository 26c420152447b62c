"""`preprocess verify DIR`: check a shard set completely against its manifest.

    preprocess verify shards/coco/train
    preprocess verify s3://bucket/shards/coco/train     (or https://...; credentials: the S3 client's own)

Checks that every shard and index name in the manifest is a plain file name inside DIR, presence,
byte size and sha256 of every tar and index, the sample count of every tar, that every tar member is
a regular file with a plain name (no `..`, absolute names, links or devices), that each sample has
all its components and every image and saliency map decodes to the manifest's shape, labels are in
range, and each DALI index matches the members of its tar byte for byte.
Tar or index files in DIR that the manifest does not list are problems too (fit and eval refuse such
a folder: it holds more than this build). Prints one line per problem (naming the file) and exits 1 if
there is any, 0 otherwise.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

from shards.cli import CommandParser, add_progress
from shards.format import CLS_EXT, LABEL_EXT, META_EXT, SALIENCY_EXT, ShardFormatError
from shards.manifest import Manifest, check_shard_files, read_manifest, unlisted_problems
from shards.reading import DECODERS, iter_members, missing_components, read_dali_index

MAX_PER_SHARD = 10  # problem lines per shard before summarising (a broken shard is broken)


def _check_sample(key: str, parts: dict, manifest: Manifest) -> list[str]:
    image = manifest.image
    missing = missing_components(parts, image, extra=(CLS_EXT, META_EXT))
    if missing:
        return [f"sample {key}: missing {', '.join(missing)}"]
    problems = []
    for ext in (image["format"], SALIENCY_EXT, LABEL_EXT):  # each field through the reader's own decoder
        try:
            value = DECODERS[ext](parts[ext], image, key)
        except ShardFormatError as e:
            problems.append(str(e))
            continue
        if ext == LABEL_EXT:
            if not 0 <= value < manifest.num_classes:
                problems.append(f"sample {key}: label {value} outside 0..{manifest.num_classes - 1}")
            elif parts[CLS_EXT].strip() != str(value).encode():
                problems.append(f"sample {key}: cls {parts[CLS_EXT]!r} differs from label {value}")
    return problems


def verify_shard(manifest: Manifest, entry: dict) -> list[str]:
    """Problems inside one shard whose size and sha256 already matched."""
    tar_path, idx_path = manifest.root / entry["tar"], manifest.root / entry["index"]
    problems: list[str] = []
    samples: list[tuple[str, list]] = []
    for m in iter_members(tar_path, problems=problems):
        if not samples or samples[-1][0] != m.key:
            samples.append((m.key, []))
        samples[-1][1].append(m)
    if len(samples) != entry["samples"]:
        problems.append(f"{tar_path}: {len(samples)} samples, manifest says {entry['samples']}")
    for key, ms in samples:
        problems += [f"{tar_path}: {p}" for p in _check_sample(key, {m.ext: m.data for m in ms}, manifest)]
    index = read_dali_index(idx_path)
    actual = [[(m.ext, m.offset, m.size, m.name) for m in ms] for _, ms in samples]
    if index != actual:
        bad = next((i for i, (a, b) in enumerate(zip(index, actual)) if a != b), min(len(index), len(actual)))
        problems.append(f"{idx_path}: does not match {tar_path.name} (first difference at sample {bad})")
    if len(problems) > MAX_PER_SHARD:
        problems = problems[:MAX_PER_SHARD] + [f"{tar_path}: ... and {len(problems) - MAX_PER_SHARD} more problems"]
    return problems


def verify(root, progress: bool = True) -> list[str]:
    """Every problem of the shard set in `root` (a folder or a URL), one line each."""
    manifest = root if isinstance(root, Manifest) else read_manifest(root)
    problems = check_shard_files(manifest, full=True)
    for entry in tqdm(manifest.shards, unit="shard", disable=not progress, file=sys.stderr):
        files = (str(manifest.root / entry["tar"]) + ":", str(manifest.root / entry["index"]) + ":")
        if any(p.startswith(files) for p in problems):  # missing, truncated or corrupt: named already
            continue
        try:
            problems += verify_shard(manifest, entry)
        except ShardFormatError as e:
            problems.append(str(e))
    return problems


def build_parser() -> CommandParser:
    ap = CommandParser("preprocess verify", __doc__)
    ap.add_argument("dir", help="shard set folder or URL (s3://bucket/prefix, https://...) holding manifest.json")
    add_progress(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.dir
    try:
        m = read_manifest(root)
        problems = unlisted_problems(m) + verify(m, progress=args.progress)
    except ShardFormatError as e:
        print(f"preprocess verify: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"preprocess verify: {root}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{root}: OK ({m.num_samples} samples in {len(m.shards)} shards verified)")
    return 0
