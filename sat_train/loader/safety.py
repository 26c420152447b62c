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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.format import (LABEL_EXT, SALIENCY_EXT, VERIFY_MODES, Manifest, ShardFormatError, check_shard_files,
                           gather_label_components, read_dali_index, read_manifest, unlisted_files)

from .plan import LoaderError

__all__ = ["VERIFY_MODES", "ShardSet", "open_shard_set", "sample_key"]

IndexEntry = list[tuple[str, int, int, str]]  # one sample: (ext, offset, size, member name) per component


@dataclass
class ShardSet:
    manifest: Manifest
    entries: list[list[IndexEntry]]  # per shard, per sample (in tar order)
    warnings: list[str] = field(default_factory=list)  # harmless findings to show the user once

    @property
    def image_ext(self) -> str:
        return self.manifest.image["format"]

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(e) for e in self.entries)

    def key(self, shard: int, ordinal: int) -> str:
        return sample_key(self.entries[shard][ordinal][0][3])


def sample_key(member_name: str) -> str:
    """WebDataset convention: the key is the member's base name up to its first dot."""
    return member_name.rsplit("/", 1)[-1].split(".", 1)[0]


def open_shard_set(shard_dir: str | Path, verify: str = "sha256") -> ShardSet:
    if verify not in VERIFY_MODES:
        raise LoaderError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    try:
        manifest = read_manifest(shard_dir)
    except ShardFormatError as e:
        raise LoaderError(str(e)) from None
    where = manifest.root / "manifest.json"
    if not manifest.shards:
        raise LoaderError(f"{where}: the shard set lists no shards")
    image = manifest.image
    if image.get("channels") not in (1, 3):
        raise LoaderError(f"{where}: image channels must be 1 or 3, got {image.get('channels')!r}")

    problems = check_shard_files(manifest, full=(verify == "sha256"))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        hint = "" if verify == "sha256" else "; --verify-shards sha256 checks every byte"
        raise LoaderError(f"refusing to read shard set {manifest.root}: {problems[0]}{more} "
                          f"(preprocess verify {manifest.root} lists every problem{hint})")

    needed = (image["format"], SALIENCY_EXT, LABEL_EXT)
    entries = []
    for info, idx_path in zip(manifest.shards, manifest.index_paths()):
        try:
            samples = read_dali_index(idx_path)
        except ShardFormatError as e:
            raise LoaderError(str(e)) from None
        if len(samples) != info["samples"]:
            raise LoaderError(f"{idx_path}: {len(samples)} samples indexed, manifest says {info['samples']}")
        tar = manifest.root / info["tar"]
        label_offsets = []
        for sample in samples:
            comp = {ext: (off, size) for ext, off, size, _ in sample}
            missing = [e for e in needed if e not in comp]
            if missing:
                name = sample[0][3] if sample else "?"
                raise LoaderError(f"{tar}: sample {sample_key(name)!r} lacks {', '.join(missing)}")
            if any(off < 0 or size < 0 or off + size > info["bytes"] for _, off, size, _ in sample):
                raise LoaderError(f"{idx_path}: an entry of sample {sample_key(sample[0][3])!r} points past the end "
                                  f"of {info['tar']}")
            if comp[LABEL_EXT][1] != 8:
                raise LoaderError(f"{tar}: sample {sample_key(sample[0][3])!r}: label has {comp[LABEL_EXT][1]} "
                                  f"bytes, not 8")
            label_offsets.append(comp[LABEL_EXT][0])
        _check_labels(tar, samples, gather_label_components(tar, label_offsets), manifest)
        entries.append(samples)
    warnings = [f"{p}: not listed in {where}; ignored" for p in unlisted_files(manifest)]
    return ShardSet(manifest, entries, warnings)


def _check_labels(tar: Path, samples: list[IndexEntry], labels: np.ndarray, manifest: Manifest) -> None:
    """Every label must index the manifest's classes (cross-entropy would fail mid-epoch, eval would
    silently count the sample as wrong)."""
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if len(bad):
        i = int(bad[0])
        more = f" (and {len(bad) - 1} more in this shard)" if len(bad) > 1 else ""
        raise LoaderError(f"{tar}: sample {sample_key(samples[i][0][3])!r} has label {int(labels[i])}, outside "
                          f"0..{manifest.num_classes - 1} ({manifest.num_classes} classes in the manifest){more}")
