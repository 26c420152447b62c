"""Fashion-MNIST / MNIST in their original IDX files (`.gz` or raw), e.g. Debian's dataset-fashion-mnist.

    <root>/train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]     (split train)
    <root>/t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]      (split test)

Split val exists only with the source option --val-size N: the last N records of the train files
(train is then the records before them), so validation data never overlaps training data.

(`train-images.idx3-ubyte`, as some mirrors name them, is accepted too.) IDX is a big-endian header
(2 zero bytes, a type code, the number of dims, one uint32 per dim) followed by the values.
The whole image file is read at once: 60k x 28 x 28 bytes is 47 MB, and a numpy view over it
is far faster than decoding records one by one.
"""
from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.storage import sha256_file

from preprocess.sources.base import RawSample, Skip, Source, SourceError, WorkItem

# IDX type codes -> big-endian numpy dtypes (from the format's description on Yann LeCun's page)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
DEFAULT_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class IdxFormatError(ValueError):
    """An IDX file is missing, truncated or not IDX; the message names the file."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, header bytes) of an IDX file."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise IdxFormatError(f"{path}: truncated IDX header ({len(head)} bytes)")
            if head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
                raise IdxFormatError(f"{path}: not an IDX file (magic bytes {head.hex()})")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise IdxFormatError(f"{path}: truncated IDX header (expected {ndim} dimensions)")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IdxFormatError(f"{path}: cannot read ({e})") from None
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    return np.dtype(IDX_DTYPES[head[2]]), dims, 4 + 4 * ndim


def read_idx(path: str | Path, limit: int | None = None) -> np.ndarray:
    """The array stored in an IDX file, first dimension cut to `limit` records if given.

    Reads only the bytes needed for `limit` records (a gzip stream is decompressed that far)."""
    path = Path(path)
    dtype, dims, header = read_idx_header(path)
    if not dims:
        raise IdxFormatError(f"{path}: IDX file with zero dimensions")
    n = dims[0] if limit is None else min(dims[0], max(0, int(limit)))
    record = math.prod(dims[1:]) * dtype.itemsize  # Python ints: a crafted header cannot overflow
    want = n * record
    if path.suffix != ".gz" and header + want > path.stat().st_size:
        raise IdxFormatError(f"{path}: truncated: header promises {dims[0]} records of {record} bytes, "
                             f"file holds {(path.stat().st_size - header) // max(record, 1)}")
    try:
        with _open(path) as f:
            f.seek(header)  # gzip emulates a forward seek by decompressing
            data = _read_up_to(f, want)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        # a gzip stream cut short raises EOFError here ("Compressed file ended before the end-of-stream")
        raise IdxFormatError(f"{path}: truncated or corrupt ({e})") from None
    if len(data) < want:
        raise IdxFormatError(f"{path}: truncated: header promises {dims[0]} records of {record} bytes, "
                             f"file holds {len(data) // max(record, 1)}")
    return np.frombuffer(data, dtype=dtype).reshape((n,) + dims[1:]).astype(dtype.newbyteorder("="), copy=False)


def _read_up_to(f, want: int, chunk: int = 1 << 26) -> bytes:
    """Up to `want` bytes, read in chunks: a header promising terabytes allocates only what the
    file really holds (one `read(want)` would reserve `want` bytes first)."""
    parts, got = [], 0
    while got < want:
        part = f.read(min(chunk, want - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def find_idx_pair(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX paths of `split` under root; IdxFormatError names what is missing."""
    root = Path(root)
    if split not in SPLIT_PREFIX:
        raise IdxFormatError(f"{root}: MNIST-style IDX sets have splits train and test, not {split!r}")
    if not root.is_dir():
        raise IdxFormatError(f"{root}: no such folder (give the folder holding the IDX files)")
    prefix = SPLIT_PREFIX[split]
    found = []
    for kind, rank in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
        candidates = [root / (n + gz) for n in names for gz in (".gz", "")]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise IdxFormatError(f"{root}: no {prefix}-{kind}-idx{rank}-ubyte[.gz] for split {split!r}")
        found.append(hit)
    return found[0], found[1]


def load_idx_split(root: str | Path, split: str, limit: int | None = None,
                   num_classes: int = 10) -> tuple[np.ndarray, np.ndarray, tuple[Path, Path]]:
    """(images N x H x W uint8, labels N int64, (image path, label path)) checked for consistency."""
    img_path, lbl_path = find_idx_pair(root, split)
    images = read_idx(img_path, limit)
    labels = read_idx(lbl_path, limit)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(f"{img_path}: expected N x H x W unsigned bytes, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise IdxFormatError(f"{lbl_path}: expected one label per record, got shape {labels.shape}")
    n_img, n_lbl = read_idx_header(img_path)[1][0], read_idx_header(lbl_path)[1][0]
    if n_img != n_lbl:
        raise IdxFormatError(f"{lbl_path}: {n_lbl} labels for {n_img} images in {img_path.name}")
    return images, labels.astype(np.int64), (img_path, lbl_path)


# ----------------------------------------------------------------------------- the Source


class FashionMnistSource(Source):
    """Fashion-MNIST (the project's default dataset; Debian's dataset-fashion-mnist by default).

        preprocess build-shards fashion-mnist --split train --out shards/fashion-mnist/train

    Samples are the native 28x28 grey images, stored `raw` unless --image-format says otherwise
    (decoding a 784-byte PNG costs more than the bytes it saves). Unannotated: saliency comes from
    --saliency foreground (garments on black: a real weak map) or none (control)."""

    name = "fashion-mnist"
    not_pickled = ("_images",)
    channels = 1
    units = ("image",)
    class_names = FASHION_MNIST_CLASSES
    # BuildConfig values for flags the user did not give: native size, raw pixels, one sample per image
    config_defaults = {"unit": "image", "size": 28, "image_format": "raw"}

    @dataclass
    class Options:
        limit: int = field(default=0, metadata={"help": "use only the first N records of the split (0 = all)"})
        val_size: int = field(default=0, metadata={
            "help": "hold out the last N train records as split 'val' (give the same N to the train build)"})

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.options
        if o.limit < 0 or o.val_size < 0:
            raise SourceError(f"{self.name}: --limit and --val-size must be >= 0")
        if cfg.split == "val" and not o.val_size:
            raise SourceError(f"{self.name}: no val files; hold out train records with --val-size N "
                              "(and build train with the same --val-size)")
        self.root = Path(cfg.root or DEFAULT_ROOTS[self.name])
        try:
            self.paths = find_idx_pair(self.root, "train" if cfg.split == "val" else cfg.split)
            dtype, dims, _ = read_idx_header(self.paths[0])
            ldtype, ldims, _ = read_idx_header(self.paths[1])
        except IdxFormatError as e:
            raise SourceError(str(e)) from None
        if len(dims) != 3 or dtype != np.uint8 or 0 in dims[1:]:
            raise SourceError(f"{self.paths[0]}: expected an N x H x W ubyte image file, got {dtype} {dims}")
        if dims[1] * dims[2] > cfg.max_pixels:
            raise SourceError(f"{self.paths[0]}: records of {dims[2]}x{dims[1]} pixels, more than --max-pixels {cfg.max_pixels}")
        if ldtype.kind not in "iu":
            raise SourceError(f"{self.paths[1]}: labels must be integers, the header says {ldtype}")
        if len(ldims) != 1 or ldims[0] != dims[0]:
            raise SourceError(f"{self.paths[1]}: {ldims[0] if ldims else 0} labels for {dims[0]} images in {self.paths[0].name}")
        # records [start, stop) of the files form this split; --limit keeps the first N of them
        total = dims[0]
        if o.val_size and cfg.split in ("train", "val"):
            if o.val_size >= total:
                raise SourceError(f"{self.paths[0]}: --val-size {o.val_size} leaves no training records (file has {total})")
            self.start, self.stop = (total - o.val_size, total) if cfg.split == "val" else (0, total - o.val_size)
        else:
            self.start, self.stop = 0, total
        if o.limit:
            self.stop = min(self.stop, self.start + o.limit)
        self.count = self.stop - self.start
        self._images = None  # read lazily, once per worker process (see _arrays); never pickled

    def classes(self) -> list[str]:
        return list(self.class_names)

    def fingerprint(self) -> dict:
        return {"files": [p.name for p in self.paths], "sha256": [sha256_file(p) for p in self.paths],
                "records": [self.start, self.stop]}

    def _arrays(self) -> np.ndarray:
        if self._images is None:
            try:
                self._images = read_idx(self.paths[0], self.stop)
            except IdxFormatError as e:
                raise SourceError(str(e)) from None
        return self._images

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        try:
            labels = read_idx(self.paths[1], self.stop)
        except IdxFormatError as e:
            raise SourceError(str(e)) from None
        items, skips = [], []
        for i, label in enumerate(labels.tolist()[self.start:], start=self.start):
            if not 0 <= label < len(self.class_names):
                skips.append(Skip(f"{self.cfg.split}_{i:05d}", "label out of range",
                                  f"{self.paths[1]}: record {i} has label {label}"))
                continue
            items.append(WorkItem(f"{self.cfg.split}_{i:05d}", 1, (i, int(label))))
        return items, skips

    def load(self, item: WorkItem):
        i, label = item.data
        yield RawSample(key=item.id, image=self._arrays()[i], label=label,
                        meta={"source_id": f"{self.paths[0].name}#{i}"})


class MnistSource(FashionMnistSource):
    """MNIST digits in the same IDX layout (root: the folder holding the four IDX files).

        preprocess build-shards mnist --root /path/to/mnist --split train --out shards/mnist/train"""

    name = "mnist"
    class_names = MNIST_CLASSES
