"""Open a shard set for reading, refusing anything that could crash DALI.

DALI segfaults (no message) on a truncated tar read through its index and on missing components at
larger batch sizes (see shared/notes/platform.md), so every check here runs BEFORE a pipeline is
built: files present with the manifest's byte sizes (or sha256 on request), every index entry
inside its tar and holding the components the loader reads. Problems become `LoaderError`, whose
one-line message names the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.format import (LABEL_EXT, SALIENCY_EXT, Manifest, ShardFormatError, check_shard_files, read_dali_index,
                           read_manifest)

from .plan import LoaderError

VERIFY_MODES = ("size", "sha256")

IndexEntry = list[tuple[str, int, int, str]]  # one sample: (ext, offset, size, member name) per component


@dataclass
class ShardSet:
    manifest: Manifest
    entries: list[list[IndexEntry]]  # per shard, per sample (in tar order)

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


def open_shard_set(shard_dir: str | Path, verify: str = "size") -> ShardSet:
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
    if image["format"] == "raw" and not all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width")):
        raise LoaderError(f"{where}: raw images need positive integer height and width in 'image'")

    problems = check_shard_files(manifest, full=(verify == "sha256"))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise LoaderError(f"refusing to read shard set {manifest.root}: {problems[0]}{more}")

    needed = (image["format"], SALIENCY_EXT, LABEL_EXT)
    entries = []
    for info, idx_path in zip(manifest.shards, manifest.index_paths()):
        try:
            samples = read_dali_index(idx_path)
        except ShardFormatError as e:
            raise LoaderError(str(e)) from None
        if len(samples) != info["samples"]:
            raise LoaderError(f"{idx_path}: {len(samples)} samples indexed, manifest says {info['samples']}")
        for sample in samples:
            exts = {ext for ext, *_ in sample}
            missing = [e for e in needed if e not in exts]
            if missing:
                name = sample[0][3] if sample else "?"
                raise LoaderError(f"{manifest.root / info['tar']}: sample {sample_key(name)!r} lacks {', '.join(missing)}")
            if any(off + size > info["bytes"] for _, off, size, _ in sample):
                raise LoaderError(f"{idx_path}: an entry of sample {sample_key(sample[0][3])!r} points past the end "
                                  f"of {info['tar']}")
        entries.append(samples)
    return ShardSet(manifest, entries)
