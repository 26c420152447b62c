"""Open a shard set for reading, refusing anything that could crash DALI.

DALI segfaults (no message) on a truncated tar read through its index and on missing components at
larger batch sizes (see shared/notes/platform.md), so every check here runs BEFORE a pipeline is
built: files present with the manifest's sha256 (verify="sha256", the default: every byte, hashed by
parallel threads, well under 1% of a Fashion-MNIST epoch) or only its byte sizes (verify="size"),
every index entry inside its tar and holding the components the loader reads, every label an 8-byte
class index below the manifest's class count (a label of 77 in a 10-class set would otherwise stop
training mid-epoch with a traceback, or be counted as a wrong answer by eval). Problems become
`LoaderError`, whose one-line message names the file (and the sample).
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shards.format import LABEL_EXT, SALIENCY_EXT, ShardFormatError
from shards.manifest import (HASH_THREADS, VERIFY_MODES, Manifest, check_shard_files, read_manifest,
                             unlisted_problems)
from shards.reading import gather_label_components, index_key, parse_dali_index, read_dali_index, scan_tar
from shards.storage import open_binary, remote_errors

from .plan import LoaderError

__all__ = ["VERIFY_MODES", "ShardSet", "open_shard_set"]

IndexEntry = list[tuple[str, int, int, str]]  # one sample: (ext, offset, size, member name) per component


@dataclass
class ShardSet:
    manifest: Manifest
    entries: list[list[IndexEntry]]  # per shard, per sample (in tar order)
    source: str = ""  # what the user named: a folder or a URL (a staged remote set reads a local copy)
    hold: object = None  # a staged copy's lock (stage.Staged), kept as long as the set is read

    @property
    def image_ext(self) -> str:
        return self.manifest.image["format"]

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(e) for e in self.entries)

    def key(self, shard: int, ordinal: int) -> str:
        return index_key(self.entries[shard][ordinal])


def open_shard_set(shard_dir, verify: str = "sha256", source: str | None = None) -> ShardSet:
    """Check a shard set (a folder or a URL) against its manifest and read its indexes; LoaderError
    (one line naming the file) for anything that must not reach a reader.

    Remote sets are checked the same way, with one streamed pass per tar: its sha256 (verify="sha256")
    and its labels together. With verify="size" only the listing is read, and labels are checked
    as the samples are decoded (the torch and device backends refuse an out-of-range label there)."""
    if verify not in VERIFY_MODES:
        raise LoaderError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    try:
        return _open(shard_dir, verify, str(source if source is not None else shard_dir))
    except ShardFormatError as e:  # a damaged index or tar, or a remote store that cannot be read
        raise LoaderError(str(e)) from None


def _open(shard_dir, verify: str, source: str) -> ShardSet:
    manifest = read_manifest(shard_dir)
    where = manifest.root / "manifest.json"
    if not manifest.shards:
        raise LoaderError(f"{where}: the shard set lists no shards")
    image = manifest.image
    if image.get("channels") not in (1, 3):
        raise LoaderError(f"{where}: image channels must be 1 or 3, got {image.get('channels')!r}")

    remote = manifest.remote
    problems = unlisted_problems(manifest) + check_shard_files(manifest, full=(verify == "sha256" and not remote))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        hint = "" if verify == "sha256" else "; --verify-shards sha256 checks every byte"
        raise LoaderError(f"refusing to read shard set {manifest.root}: {problems[0]}{more} "
                          f"(preprocess verify {manifest.root} lists every problem{hint})")

    if remote:
        with ThreadPoolExecutor(min(HASH_THREADS, len(manifest.shards))) as pool:
            entries = list(pool.map(lambda info: _check_remote_shard(manifest, info, verify), manifest.shards))
    else:
        entries = [_check_shard(manifest, info, read_dali_index(manifest.root / info["index"]), None)
                   for info in manifest.shards]
    return ShardSet(manifest, entries, source)


def _check_remote_shard(manifest: Manifest, info: dict, verify: str) -> list[IndexEntry]:
    """One remote shard: its index read (and hashed) once, then, with sha256, one pass over the tar."""
    idx_path, tar = manifest.root / info["index"], manifest.root / info["tar"]
    with remote_errors(idx_path), open_binary(idx_path) as f:
        data = f.read()
    if verify == "sha256" and hashlib.sha256(data).hexdigest() != info["index_sha256"]:
        raise LoaderError(f"refusing to read shard set {manifest.root}: {idx_path}: sha256 differs from the manifest "
                          f"(corrupt or replaced)")
    samples = parse_dali_index(data.decode("utf-8", "replace"), idx_path)
    labels = None
    if verify == "sha256":
        digest, labels = scan_tar(tar, _label_offsets(samples))
        if digest != info["sha256"]:
            raise LoaderError(f"refusing to read shard set {manifest.root}: {tar}: sha256 differs from the manifest "
                              f"(corrupt or replaced)")
    return _check_shard(manifest, info, samples, labels if labels is not None else False)


def _label_offsets(samples: list[IndexEntry]) -> list[int]:
    return [off for sample in samples for ext, off, _, _ in sample if ext == LABEL_EXT]


def _check_shard(manifest: Manifest, info: dict, samples: list[IndexEntry], labels) -> list[IndexEntry]:
    """Index entries of one shard checked against its manifest entry; labels gathered (None: read them from
    the local tar; False: not checked here) and checked against the class count."""
    image = manifest.image
    needed = (image["format"], SALIENCY_EXT, LABEL_EXT)
    idx_path, tar = manifest.root / info["index"], manifest.root / info["tar"]
    if len(samples) != info["samples"]:
        raise LoaderError(f"{idx_path}: {len(samples)} samples indexed, manifest says {info['samples']}")
    label_offsets = []
    for sample in samples:
        comp = {ext: (off, size) for ext, off, size, _ in sample}
        missing = [e for e in needed if e not in comp]
        if missing:
            raise LoaderError(f"{tar}: sample {index_key(sample)!r} lacks {', '.join(missing)}")
        if any(off < 0 or size < 0 or off + size > info["bytes"] for _, off, size, _ in sample):
            raise LoaderError(f"{idx_path}: an entry of sample {index_key(sample)!r} points past the end "
                              f"of {info['tar']}")
        if comp[LABEL_EXT][1] != 8:
            raise LoaderError(f"{tar}: sample {index_key(sample)!r}: label has {comp[LABEL_EXT][1]} bytes, not 8")
        label_offsets.append(comp[LABEL_EXT][0])
    if labels is None:
        labels = gather_label_components(tar, label_offsets)
    if labels is not False:
        check_labels(tar, samples, labels, manifest)
    return samples


def check_labels(tar, samples: list[IndexEntry], labels: np.ndarray, manifest: Manifest) -> None:
    """Every label must index the manifest's classes (cross-entropy would fail mid-epoch, eval would
    silently count the sample as wrong)."""
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if len(bad):
        i = int(bad[0])
        more = f" (and {len(bad) - 1} more in this shard)" if len(bad) > 1 else ""
        raise LoaderError(f"{tar}: sample {index_key(samples[i])!r} has label {int(labels[i])}, outside "
                          f"0..{manifest.num_classes - 1} ({manifest.num_classes} classes in the manifest){more}")
