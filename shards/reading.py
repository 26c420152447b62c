"""Reading shards: a tar's members and samples, DALI indexes, labels at index offsets, decoding a sample.

Every reader of the project goes through here (preprocess verify/preview, the loaders, derived
sets), so a sample means the same thing everywhere. Each stored field is paired with its decoder,
webdataset-style (`DECODERS`): the image by the manifest's format (jpg/png through OpenCV, raw as
H*W*C bytes), the saliency map as 8-bit grey levels (`shards.format.uint8_to_saliency` turns them
into [-1, 1]), the label as a little-endian int64. Decoders check the manifest's shape and raise
ShardFormatError("sample KEY: ...") so callers can add the file name and re-raise in their own terms.

Tars are read as streams (tarfile "r|"), from a local path or a URL (fsspec file objects,
shards/storage.py), so a shard on object storage is read once, front to back.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

from shards.format import (CLS_EXT, DALI_INDEX_VERSION, LABEL_EXT, META_EXT, SALIENCY_EXT, ShardFormatError,
                           decode_label, split_member_name)
from shards.storage import open_binary, remote_errors

REQUIRED = (SALIENCY_EXT, LABEL_EXT)  # besides the image, what every sample holds for training


# ----------------------------------------------------------------------------- tar members and samples

@dataclass
class Member:
    key: str
    ext: str
    offset: int  # of the data in the tar
    size: int
    name: str
    data: bytes | None  # None for members not selected


def unsafe_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member has no place in a shard (None = a regular file with a plain relative name)."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith(("/", "\\")) or ".." in parts:
        return "a name that leaves the extraction folder"
    if member.issym() or member.islnk():
        return "a link"
    if member.isdev():
        return "a device file"
    if not member.isfile():
        return "not a regular file"
    return None


def iter_members(tar_path, select: Callable[[str, str], bool] | None = None,
                 problems: list[str] | None = None) -> Iterator[Member]:
    """Yield the regular-file members of one tar in order, streamed (nothing is extracted to disk).

    `select(key, ext)` False: the member is yielded without its bytes (not read into memory).
    Members that have no place in a shard (links, devices, names leaving the folder) are skipped; with
    `problems` given, one line each is appended there. ShardFormatError (naming the file) on a damaged tar."""
    try:
        with remote_errors(tar_path), open_binary(tar_path, stream=True) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                reason = unsafe_member(m)
                if reason:
                    if problems is not None and m.name:
                        problems.append(f"{tar_path}: member {m.name!r} is {reason} (a shard holds regular files only)")
                    continue
                key, ext = split_member_name(m.name)
                wanted = select is None or select(key, ext)
                yield Member(key, ext, m.offset_data, m.size, m.name, tf.extractfile(m).read() if wanted else None)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{tar_path}: damaged tar ({e})") from None


def iter_tar_samples(tar_path, exts: tuple[str, ...] | None = None, keys=None) -> Iterator[dict]:
    """Yield samples {"__key__": key, ext: bytes} of one shard in order.

    `exts`: only these components are read (others are skipped in the stream); `keys`: only samples
    with these keys are yielded. Raises ShardFormatError (naming the file) on a damaged tar."""
    def select(key, ext):
        return (exts is None or ext in exts) and (keys is None or key in keys)

    current: dict | None = None
    for m in iter_members(tar_path, select if exts is not None or keys is not None else None):
        if current is not None and current["__key__"] != m.key:
            yield current
            current = None
        if m.data is None:
            continue
        if current is None:
            current = {"__key__": m.key}
        current[m.ext] = m.data
    if current is not None:
        yield current


def read_dali_index(idx_path) -> list[list[tuple[str, int, int, str]]]:
    """Parse a v1.2 DALI index: per sample a list of (ext, offset, size, member name)."""
    with remote_errors(idx_path), open_binary(idx_path) as f:
        text = f.read().decode("utf-8", "replace")
    return parse_dali_index(text, idx_path)


def parse_dali_index(text: str, where) -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    try:
        version, count = lines[0].split()
        if version != DALI_INDEX_VERSION:
            raise ValueError(f"version {version}")
        out = []
        for line in lines[1:]:
            f = line.split()
            out.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
        if len(out) != int(count):
            raise ValueError(f"{len(out)} entries, header says {count}")
    except (ValueError, IndexError) as e:
        raise ShardFormatError(f"{where}: bad DALI index ({e})") from None
    return out


def index_key(entry: list[tuple[str, int, int, str]]) -> str:
    """The sample key of one DALI index entry (its first component's member name)."""
    return split_member_name(entry[0][3])[0] if entry else "?"


def gather_label_components(tar_path, offsets) -> "np.ndarray":
    """int64 labels read at the given byte offsets of a local tar (the `label.i64` components, from its
    index): one mmap and a vectorized gather. (Remote tars: `scan_tar`.)"""
    import numpy as np

    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size == 0:
        return np.zeros(0, np.int64)
    with open(tar_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, np.uint8)
        try:
            raw = data[offsets[:, None] + np.arange(8)]
        finally:
            del data  # the view must go before the mmap closes
    return raw.view("<i8").reshape(-1).astype(np.int64)


def scan_tar(tar_path, label_offsets, chunk: int = 1 << 20) -> tuple[str, "np.ndarray"]:
    """(sha256, int64 labels at `label_offsets`) of a tar in one streamed pass: for remote shards, whose
    every byte is read once to check it, the labels come with that read."""
    import numpy as np

    order = np.argsort(np.asarray(label_offsets, dtype=np.int64), kind="stable")
    starts = np.asarray(label_offsets, dtype=np.int64)[order]
    labels = np.zeros(len(starts), np.int64)
    h, pos, tail, k = hashlib.sha256(), 0, b"", 0
    with remote_errors(tar_path), open_binary(tar_path, stream=True) as f:
        while block := f.read(chunk):
            h.update(block)
            window, base = tail + block, pos - len(tail)  # 7 bytes carried over: a label may span two reads
            while k < len(starts) and starts[k] + 8 <= pos + len(block):
                o = int(starts[k]) - base
                labels[order[k]] = int.from_bytes(window[o:o + 8], "little", signed=True)
                k += 1
            pos += len(block)
            tail = window[-7:]
    return h.hexdigest(), labels


# ----------------------------------------------------------------------------- decoding

_READ_RGB = None


def _cv2():
    global _READ_RGB
    import cv2

    if _READ_RGB is None:
        _READ_RGB = getattr(cv2, "IMREAD_COLOR_RGB", 0) or False  # OpenCV >= 4.10 decodes straight to RGB
    return cv2


def decode_image(data: bytes | None, image: dict, key: str = "?"):
    """uint8 (H, W, C) pixels (RGB for C = 3) of one sample's image, checked against the manifest's
    {"format", "height", "width", "channels"}."""
    import numpy as np

    fmt, h, w, c = image["format"], image["height"], image["width"], image["channels"]
    if data is None:
        raise ShardFormatError(f"sample {key!r} has no .{fmt} image")
    if fmt == "raw":
        if len(data) != h * w * c:
            raise ShardFormatError(f"sample {key!r}: raw image has {len(data)} bytes, manifest shape {h}x{w}x{c} "
                                   f"needs {h * w * c}")
        return np.frombuffer(data, np.uint8).reshape(h, w, c)
    if c == 1:
        return decode_grey(data, (h, w), key, fmt)[..., None]
    cv2 = _cv2()
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, _READ_RGB) if _READ_RGB else cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.shape != (h, w, 3):
        got = "does not decode" if img is None else f"is {img.shape[1]}x{img.shape[0]}x{img.shape[2]}"
        raise ShardFormatError(f"sample {key!r}: {fmt} image {got}, the manifest says {w}x{h}x3")
    return img if _READ_RGB else img[..., ::-1]


def decode_grey(data: bytes | None, hw: tuple[int, int], key: str = "?", ext: str = SALIENCY_EXT):
    """uint8 (H, W) grey levels of an encoded single-channel image (the saliency map, grey images)."""
    import numpy as np

    if data is None:
        raise ShardFormatError(f"sample {key!r} has no .{ext} component")
    img = _cv2().imdecode(np.frombuffer(data, np.uint8), -1)  # IMREAD_UNCHANGED: 16-bit or colour maps are refused
    if img is None or img.dtype != np.uint8 or img.shape != tuple(hw):
        got = "does not decode" if img is None else f"is {img.shape[1]}x{img.shape[0]} {img.dtype}"
        raise ShardFormatError(f"sample {key!r}: {ext} {got}, the manifest says {hw[1]}x{hw[0]} uint8 grey")
    return img


def decode_saliency(data: bytes | None, image: dict, key: str = "?"):
    """uint8 (H, W) stored saliency levels (value = round((s + 1) * 127.5)) of one sample."""
    return decode_grey(data, (image["height"], image["width"]), key, SALIENCY_EXT)


def _decode_label(data: bytes | None, image: dict, key: str = "?") -> int:
    if data is None:
        raise ShardFormatError(f"sample {key!r} has no .{LABEL_EXT} component")
    try:
        return decode_label(data)
    except ShardFormatError as e:
        raise ShardFormatError(f"sample {key!r}: {e}") from None


# each stored field and its decoder (f(bytes, manifest image dict, key)); the image's ext is the manifest's format
DECODERS = {"jpg": decode_image, "png": decode_image, "raw": decode_image, SALIENCY_EXT: decode_saliency,
            LABEL_EXT: _decode_label, CLS_EXT: lambda data, image, key="?": data.decode("ascii", "replace").strip(),
            META_EXT: lambda data, image, key="?": json.loads(data)}


@dataclass
class Sample:
    key: str
    image: "np.ndarray"  # uint8 (H, W, C), RGB for C = 3
    saliency: "np.ndarray"  # uint8 (H, W) stored levels
    label: int


def decode_sample(sample: dict, image: dict) -> Sample:
    """Decode the image, saliency and label of one sample read by `iter_tar_samples`."""
    key = sample.get("__key__", "?")
    fmt = image["format"]
    return Sample(key, DECODERS[fmt](sample.get(fmt), image, key), decode_saliency(sample.get(SALIENCY_EXT), image, key),
                  _decode_label(sample.get(LABEL_EXT), image, key))


def missing_components(sample: dict, image: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """Components a sample lacks, of the image (by the manifest's format), saliency, label and `extra`."""
    return [e for e in (image["format"], *REQUIRED, *extra) if e not in sample]

