"""Reading a shard set's manifest.json and checking the files it lists.

Readers check sha256 (the default: every byte; the shards are hashed by parallel threads) or only
sizes (opt-in, cheap) against the manifest before opening tars: DALI segfaults on truncated tars,
so nothing corrupt may reach it. Shard and index names in a manifest are plain file names inside
its folder (`read_manifest` refuses `../x.tar`, `/etc/hostname`, ...). A shard set may also be a URL
(`s3://bucket/prefix`, `https://host/path`): `Manifest.root` is then a UPath (shards/storage.py) and
every check below reads through fsspec.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import FORMAT_NAME, FORMAT_VERSION, IMAGE_FORMATS, MANIFEST_NAME, ShardFormatError
from shards.storage import StorageError, is_url, list_sizes, location, missing_because, remote_errors, sha256_file

VERIFY_MODES = ("sha256", "size")  # how readers check shard files before use: every byte (default) | sizes only
HASH_THREADS = 8  # hashlib and file reads release the GIL: shards are hashed in parallel threads
SHARD_KEYS = {"tar": str, "index": str, "samples": int, "bytes": int, "sha256": str, "index_bytes": int,
              "index_sha256": str}


@dataclass
class Manifest:
    """A parsed manifest.json. `raw` keeps every field; the common ones are attributes. `root` is the
    set's folder: a Path, or a UPath for a URL."""

    root: Path
    raw: dict = field(repr=False)

    @property
    def shards(self) -> list[dict]:
        return self.raw["shards"]

    @property
    def classes(self) -> list[str]:
        return self.raw["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.raw["classes"])

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def image(self) -> dict:
        """{"format": "jpg"|"png"|"raw", "height": H, "width": W, "channels": C}"""
        return self.raw["image"]

    @property
    def fingerprint(self) -> dict:
        return self.raw["fingerprint"]

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    def tar_paths(self) -> list[Path]:
        return [self.root / s["tar"] for s in self.shards]

    def index_paths(self) -> list[Path]:
        return [self.root / s["index"] for s in self.shards]


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Load and sanity-check DIR/manifest.json (or URL/manifest.json); ShardFormatError names the file
    and the problem."""
    root = location(root)
    path = root / MANIFEST_NAME
    if is_url(root):
        with remote_errors(path):
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except FileNotFoundError as e:
                why = missing_because(e)  # no bucket, no server: say so, not "no manifest"
                if why:
                    raise StorageError(f"{path}: {why}") from None
                raise ShardFormatError(f"{path}: no manifest (not a shard set, or its build did not finish)") from None
    else:
        if not root.is_dir():
            raise ShardFormatError(f"{root}: not a folder")
        if not path.is_file():
            raise ShardFormatError(f"{path}: no manifest (not a shard set, or its build did not finish)")
        text = path.read_bytes().decode("utf-8", "replace")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: not a satpipe shard manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format version {raw.get('format_version')}, this satpipe reads {FORMAT_VERSION}")
    for k in ("shards", "classes", "image", "counts", "config", "fingerprint"):
        if k not in raw:
            raise ShardFormatError(f"{path}: missing field {k!r}")
    image = raw["image"]
    if not isinstance(image, dict) or image.get("format") not in IMAGE_FORMATS:
        raise ShardFormatError(f"{path}: unknown image format {image.get('format') if isinstance(image, dict) else image!r}")
    if not all(_positive_int(image.get(k)) for k in ("height", "width", "channels")):
        raise ShardFormatError(f"{path}: image height, width and channels must be positive integers, got {image}")
    classes = raw["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ShardFormatError(f"{path}: classes must be a non-empty list of names")
    _check_shard_entries(path, raw["shards"])
    return Manifest(root=root, raw=raw)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def plain_file_name(name) -> bool:
    """A name that can only mean a file directly inside the shard set's folder: no folder part, not
    absolute, not `.`/`..` (a manifest must never make a reader open `/etc/hostname` or `../x.tar`)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and Path(name).name == name)


def _check_shard_entries(path, shards) -> None:
    if not isinstance(shards, list):
        raise ShardFormatError(f"{path}: 'shards' must be a list")
    seen: set[str] = set()
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise ShardFormatError(f"{path}: shard entry {i} is not an object")
        for key, typ in SHARD_KEYS.items():
            v = s.get(key)
            if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):
                raise ShardFormatError(f"{path}: shard entry {i}: {key} = {v!r} is not a valid {typ.__name__}")
        for key in ("tar", "index"):
            if not plain_file_name(s[key]):
                raise ShardFormatError(f"{path}: shard entry {i}: {key} {s[key]!r} is not a plain file name inside "
                                       f"{path.parent} (refusing a path that leaves the shard set)")
            if s[key] in seen:
                raise ShardFormatError(f"{path}: shard entry {i}: {s[key]!r} is listed twice")
            seen.add(s[key])


def unlisted_files(manifest: Manifest) -> list[Path]:
    """Tar and index files in the shard set's folder that the manifest does not list (readers ignore them:
    left over from another build, or copied in by hand). Temp files of an unfinished write are not listed.
    A web server without a folder listing shows none."""
    listed = {s[k] for s in manifest.shards for k in ("tar", "index")}
    return sorted((manifest.root / name for name in list_sizes(manifest.root)
                   if name.endswith((".tar", ".idx")) and name not in listed), key=str)


def unlisted_problems(manifest: Manifest) -> list[str]:
    """One problem per tar or index in the set's folder that the manifest does not list. Readers would
    ignore such a file, but it means the folder holds more than this build (a copy made by hand, another
    tool's output): verify, fit and eval refuse the set until it is moved out, rather than guess."""
    return [f"{p}: a tar or index the manifest does not list (another build's, or copied in?); move it out of "
            f"{manifest.root}" for p in unlisted_files(manifest)]


def check_shard_files(manifest: Manifest, full: bool = False, threads: int = HASH_THREADS) -> list[str]:
    """Problems with the shard files, one message per problem (empty list = fine).

    Cheap with full=False (presence and byte sizes: enough to keep truncated tars away from DALI; one
    listing for a remote set); `full=True` also compares the sha256 of every tar and index with the
    manifest (reads everything, in up to `threads` threads: hashing runs outside the GIL, so threads
    use every core and disk, or overlap network reads)."""
    problems, to_hash = [], []
    sizes = list_sizes(manifest.root)
    for s in manifest.shards:
        for name, size_key, sha_key in ((s["tar"], "bytes", "sha256"), (s["index"], "index_bytes", "index_sha256")):
            p = manifest.root / name
            size = sizes.get(name)
            if size is None and (manifest.remote and not sizes):  # no listing (a web server): ask per file
                size = _remote_size(p)
            if size is None:
                problems.append(f"{p}: missing")
                continue
            if size != s[size_key]:
                problems.append(f"{p}: {size} bytes, manifest says {s[size_key]} (truncated or replaced)")
            elif full:
                to_hash.append((p, s[sha_key]))
    if to_hash:
        with ThreadPoolExecutor(max(1, min(threads, len(to_hash)))) as pool:
            digests = list(pool.map(sha256_file, [p for p, _ in to_hash]))
        problems += [f"{p}: sha256 differs from the manifest (corrupt or replaced)"
                     for (p, want), got in zip(to_hash, digests) if got != want]
    return problems


def _remote_size(path) -> int | None:
    with remote_errors(path):
        try:
            return int(path.fs.size(path.path))
        except FileNotFoundError:
            return None
