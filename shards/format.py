"""The satpipe shard format: names, encodings and keys (the contract between `preprocess` and `sat_train`).

A shard set is a folder (or an object-storage prefix) holding

    <split>-000000.tar   WebDataset tar: one sample = files sharing a key, e.g.
                           k.jpg | k.png | k.raw   the image (raw = H*W*C uint8, HWC, shape in the manifest)
                           k.sal.png                saliency, 8-bit grey, value = round((s + 1) * 127.5), s in [-1, 1]
                           k.label.i64              class index, 8 bytes little-endian int64 (DALI batches it)
                           k.cls                    class index as ASCII text (webdataset's convention)
                           k.json                   {"source_id": ..., "boxes": [[x, y, w, h], ...], ...}
    <split>-000000.idx   DALI index (v1.2) for the tar, written while the tar is written
    provenance.json      which software wrote the set (shards/provenance.py); not part of its identity
    manifest.json        written last: config, input fingerprint, classes, per-shard size/sha256/count, counts

The package splits the format by job:
    shards/format.py      this file: names, component encodings, sample keys
    shards/storage.py     atomic local writes, sha256, URLs (s3://, https://) through fsspec
    shards/writer.py      ShardWriter: one tar + its DALI index, atomically
    shards/manifest.py    reading and checking a manifest and the files it lists
    shards/reading.py     iterating a tar's samples, DALI indexes, decoding a sample
    shards/provenance.py  version stamp and provenance of shard sets, runs and reports
"""
from __future__ import annotations

import hashlib
import re

FORMAT_NAME = "satpipe-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROVENANCE_NAME = "provenance.json"
IMAGE_FORMATS = ("jpg", "png", "raw")
SALIENCY_EXT = "sal.png"
LABEL_EXT = "label.i64"
CLS_EXT = "cls"
META_EXT = "json"
DALI_INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
MAX_KEY_LEN = 80  # keeps every member name under USTAR's 100 chars, so each header is one block
FIXED_MTIME = 0  # fixed tar member times make builds byte-identical


class ShardFormatError(Exception):
    """A shard set or one of its files does not match the format or its manifest."""


# ----------------------------------------------------------------------------- keys

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(raw: str) -> str:
    """Make a WebDataset sample key: no dots (they split key from extension), no slashes, short.

    Long keys keep a hash suffix so two different long ids never collide."""
    key = _KEY_BAD.sub("_", str(raw)).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(str(raw).encode()).hexdigest()[:12]
        key = key[: MAX_KEY_LEN - 13] + "_" + digest
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """(key, ext) of a tar member name, WebDataset's convention: the base name up to its first dot is
    the key, the rest the extension (`a/k1.sal.png` -> ("k1", "sal.png"))."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


# ----------------------------------------------------------------------------- component encodings

def encode_label(label: int) -> bytes:
    return int(label).to_bytes(8, "little", signed=True)


def decode_label(data: bytes) -> int:
    if len(data) != 8:
        raise ShardFormatError(f"label component has {len(data)} bytes, expected 8")
    return int.from_bytes(data, "little", signed=True)


def saliency_to_uint8(s):
    """float saliency in [-1, 1] -> uint8 grey levels (round((s + 1) * 127.5))."""
    import numpy as np

    return np.clip(np.rint((np.asarray(s, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def uint8_to_saliency(g):
    """uint8 grey levels -> float32 saliency in [-1, 1]; inverse of saliency_to_uint8 up to rounding."""
    import numpy as np

    return np.asarray(g, dtype=np.float32) / 127.5 - 1.0

