"""ShardWriter: write one shard (tar + DALI index) atomically; its manifest entry (ShardInfo)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from shards.format import DALI_INDEX_VERSION, FIXED_MTIME, TAR_BLOCK, ShardFormatError, sanitize_key
from shards.storage import AtomicFile, atomic_write_bytes, sha256_file


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


def webdataset_tar(fileobj):
    """webdataset's TarWriter with the format's fixed member fields (imported here: it imports torch,
    which kernels/sources never need)."""
    import webdataset as wds

    return wds.TarWriter(fileobj, encoder=False, mtime=FIXED_MTIME, user="satpipe", group="satpipe")


class ShardWriter:
    """Write one shard (tar + DALI index) atomically.

    Samples are dicts {"__key__": str, ext: bytes, ...}. Member offsets are tracked while
    writing, so the DALI index needs no second pass over the tar (and is never built from a
    corrupt one, as `wds2idx` would). Use as a context manager; on an exception nothing with
    the final names is left behind. `make_tar(fileobj)` makes the tar stream (default: webdataset's
    TarWriter; preprocess/tar_fast.py passes a faster one writing the same bytes).

        with ShardWriter(out_dir / "train-000000.tar") as w:
            w.write({"__key__": "k", "jpg": b"...", "sal.png": b"...", "label.i64": encode_label(3)})
        info = w.info
    """

    def __init__(self, tar_path: str | os.PathLike, make_tar=webdataset_tar):
        self.tar_path = Path(tar_path)
        self.idx_path = self.tar_path.with_suffix(".idx")
        self._out = AtomicFile(self.tar_path)
        self._writer = make_tar(self._out.file)
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
        index = f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        atomic_write_bytes(self.idx_path, index.encode())
        self._out.commit()  # the tar's final name appears last
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
        self._out.abort()

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
