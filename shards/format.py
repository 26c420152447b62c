"""The satpipe shard format: the one contract between `preprocess` (writer) and `sat_train` (reader).

A shard set is a folder holding

    <split>-000000.tar   WebDataset tar: one sample = files sharing a key, e.g.
                           k.jpg | k.png | k.raw   the image (raw = H*W*C uint8, HWC, shape in the manifest)
                           k.sal.png                saliency, 8-bit grey, value = round((s + 1) * 127.5), s in [-1, 1]
                           k.label.i64              class index, 8 bytes little-endian int64 (DALI batches it)
                           k.cls                    class index as ASCII text (webdataset's convention)
                           k.json                   {"source_id": ..., "boxes": [[x, y, w, h], ...], ...}
    <split>-000000.idx   DALI index (v1.2) for the tar, written while the tar is written
    manifest.json        written last: config, input fingerprint, classes, per-shard size/sha256/count, counts

Writing is atomic per file (temp name, fsync, rename), so a file with its final name is complete.
Readers check sha256 (the default: every byte; the shards are hashed by parallel threads) or only
sizes (opt-in, cheap) against the manifest before opening tars: DALI segfaults on truncated tars,
so nothing corrupt may reach it. Shard and index names in a manifest are plain file names inside
its folder (`read_manifest` refuses `../x.tar`, `/etc/hostname`, ...).

(Over 350 lines on purpose: the whole contract, names, writing, reading and checking, is this one
file, so a change of the format touches one place; issue 15 moves the remaining readers here too.)
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_NAME = "satpipe-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("jpg", "png", "raw")
SALIENCY_EXT = "sal.png"
LABEL_EXT = "label.i64"
CLS_EXT = "cls"
META_EXT = "json"
DALI_INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
MAX_KEY_LEN = 80  # keeps every member name under USTAR's 100 chars, so each header is one block
FIXED_MTIME = 0  # fixed tar member times make builds byte-identical
VERIFY_MODES = ("sha256", "size")  # how readers check shard files before use: every byte (default) | sizes only
HASH_THREADS = 8  # hashlib and file reads release the GIL: shards are hashed in parallel threads
SHARD_KEYS = {"tar": str, "index": str, "samples": int, "bytes": int, "sha256": str, "index_bytes": int,
              "index_sha256": str}


class ShardFormatError(Exception):
    """A shard set or one of its files does not match the format or its manifest."""


# ----------------------------------------------------------------------------- keys, labels, saliency

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(raw: str) -> str:
    """Make a WebDataset sample key: no dots (they split key from extension), no slashes, short.

    Long keys keep a hash suffix so two different long ids never collide."""
    key = _KEY_BAD.sub("_", str(raw)).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.sha1(str(raw).encode()).hexdigest()[:12]
        key = key[: MAX_KEY_LEN - 13] + "_" + digest
    return key


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


# ----------------------------------------------------------------------------- atomic files

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_name(path: Path) -> Path:
    """Temp name in the same folder (so rename is atomic); never matches a final shard name."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- writing one shard

@dataclass
class ShardInfo:
    """One shard's manifest entry."""

    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Write one shard (tar + DALI index) atomically with webdataset's TarWriter.

    Samples are dicts {"__key__": str, ext: bytes, ...}. Member offsets are tracked while
    writing, so the DALI index needs no second pass over the tar (and is never built from a
    corrupt one, as `wds2idx` would). Use as a context manager; on an exception nothing with
    the final names is left behind.

        with ShardWriter(out_dir / "train-000000.tar") as w:
            w.write({"__key__": "k", "jpg": b"...", "sal.png": b"...", "label.i64": encode_label(3)})
        info = w.info
    """

    def __init__(self, tar_path: str | os.PathLike):
        import webdataset as wds  # imported here: it imports torch, which kernels/sources never need

        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._tmp_tar = tmp_name(self.tar_path)
        self._file = open(self._tmp_tar, "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=FIXED_MTIME, user="satpipe", group="satpipe")
        self._index_lines: list[str] = []
        self._keys: set[str] = set()
        self.info: ShardInfo | None = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if key != sanitize_key(key):
            raise ShardFormatError(f"sample key {key!r} is not sanitized (use shards.format.sanitize_key)")
        if key in self._keys:
            raise ShardFormatError(f"duplicate sample key {key!r} in {self.tar_path.name}")
        self._keys.add(key)
        offset = self._writer.tarstream.offset
        parts = []
        for ext in sorted(k for k in sample if k != "__key__"):  # TarWriter writes in sorted order too
            data = sample[ext]
            name = f"{key}.{ext}"
            parts.append(f"{ext} {offset + TAR_BLOCK} {len(data)} {name}")
            offset += TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        self._writer.write(sample)
        if offset != self._writer.tarstream.offset:  # a header took more than one block: index would lie
            raise ShardFormatError(f"tar offsets drifted while writing {key!r}; member names too long?")
        self._index_lines.append(" ".join(parts))

    def close(self) -> ShardInfo:
        if self.info is not None:
            return self.info
        if not self._index_lines:
            self._abort()
            raise ShardFormatError(f"{self.tar_path.name}: a shard needs at least one sample")
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        atomic_write_bytes(self.idx_path, index.encode())
        os.replace(self._tmp_tar, self.tar_path)  # the tar's final name appears last
        self.info = ShardInfo(
            tar=self.tar_path.name,
            index=self.idx_path.name,
            samples=len(self._index_lines),
            bytes=self.tar_path.stat().st_size,
            sha256=sha256_file(self.tar_path),
            index_bytes=len(index.encode()),
            index_sha256=hashlib.sha256(index.encode()).hexdigest(),
        )
        return self.info

    def _abort(self) -> None:
        try:
            # close the tar stream first, even though its last write may fail again (disk full): else
            # tarfile's _Stream.__del__ flushes into the closed file later ("Exception ignored ... write
            # to closed file" after the one-line error). close() marks it closed before it writes.
            self._writer.close()
        except (OSError, ValueError):
            pass
        try:
            self._file.close()
        finally:
            for p in (self._tmp_tar,):
                if p.exists():
                    p.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()
            except BaseException:  # the last writes fail too (disk full): no temp file left behind
                self._abort()
                raise
        else:
            self._abort()


# ----------------------------------------------------------------------------- reading and checking

@dataclass
class Manifest:
    """A parsed manifest.json. `raw` keeps every field; the common ones are attributes."""

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

    def tar_paths(self) -> list[Path]:
        return [self.root / s["tar"] for s in self.shards]

    def index_paths(self) -> list[Path]:
        return [self.root / s["index"] for s in self.shards]


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Load and sanity-check DIR/manifest.json; ShardFormatError names the file and the problem."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ShardFormatError(f"{root}: not a folder")
    if not path.is_file():
        raise ShardFormatError(f"{path}: no manifest (not a shard set, or its build did not finish)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def _check_shard_entries(path: Path, shards) -> None:
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
    left over from another build, or copied in by hand). Temp files of an unfinished write are not listed."""
    listed = {s[k] for s in manifest.shards for k in ("tar", "index")}
    return sorted(p for p in manifest.root.iterdir()
                  if p.suffix in (".tar", ".idx") and p.name not in listed and p.is_file())


def check_shard_files(manifest: Manifest, full: bool = False, threads: int = HASH_THREADS) -> list[str]:
    """Problems with the shard files on disk, one message per problem (empty list = fine).

    Cheap with full=False (presence and byte sizes: enough to keep truncated tars away from DALI);
    `full=True` also compares the sha256 of every tar and index with the manifest (reads everything,
    in up to `threads` threads: hashing runs outside the GIL, so threads use every core and disk)."""
    problems, to_hash = [], []
    for s in manifest.shards:
        for name, size_key, sha_key in ((s["tar"], "bytes", "sha256"), (s["index"], "index_bytes", "index_sha256")):
            p = manifest.root / name
            if not p.is_file():
                problems.append(f"{p}: missing")
                continue
            size = p.stat().st_size
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


def gather_label_components(tar_path: str | os.PathLike, offsets) -> "np.ndarray":
    """int64 labels read at the given byte offsets of a tar (the `label.i64` components, from its index).

    One mmap and a vectorized gather: a shard's labels can be checked before anything trains on them."""
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


def iter_tar_samples(tar_path: str | os.PathLike):
    """Yield samples {"__key__": key, ext: bytes} of one shard in order, with plain tarfile.

    Raises ShardFormatError (naming the file) on a damaged tar."""
    tar_path = Path(tar_path)
    current: dict | None = None
    try:
        with tarfile.open(tar_path, "r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                data = tf.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardFormatError(f"{tar_path}: damaged tar ({e})") from None
    if current is not None:
        yield current


def read_dali_index(idx_path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a v1.2 DALI index: per sample a list of (ext, offset, size, member name)."""
    idx_path = Path(idx_path)
    lines = idx_path.read_text().splitlines()
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
        raise ShardFormatError(f"{idx_path}: bad DALI index ({e})") from None
    return out
