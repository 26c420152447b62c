"""FastShardWriter: `shards.writer.ShardWriter` with tar headers patched from a template.

Why: tarfile builds every member header through TarInfo copies, pax checks and per-field encoding;
for small samples (5 members each, a few KB) that was more than half of a Fashion-MNIST build and
~15-25% of a COCO build. All members of a shard share every header field except name, size and
checksum, so one header made by tarfile itself serves as the template and only those three fields
are rewritten. The bytes are identical to ShardWriter's (webdataset TarWriter) output -- tested in
tests/preprocess/test_tar_fast.py -- and the DALI index, temp-name + rename and ShardInfo are
ShardWriter's own code. A member the template cannot express (a name over 100 bytes or not ASCII,
a size of 8 GiB or more) is added the way TarWriter adds it (TarInfo + tarfile.addfile).
"""
from __future__ import annotations

import io
import tarfile

from shards.format import FIXED_MTIME
from shards.writer import ShardWriter

_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_BLOCK = tarfile.BLOCKSIZE


class _TemplateTar:
    """Stands in for ShardWriter's TarWriter: same `write(sample)`, `tarstream`, `close()`, same bytes.

    The stream is opened as TarWriter opens it (`tarfile.open(fileobj=..., mode="w|")`); members
    that miss the fast path are added exactly as TarWriter adds them (TarInfo + addfile)."""

    def __init__(self, fileobj, mode: int = 0o444, user: str = "satpipe", group: str = "satpipe"):
        self.tarstream = tarfile.open(fileobj=fileobj, mode="w|")
        self.mode, self.user, self.group = mode, user, group
        ts = self.tarstream
        self._template = bytearray(self._info("x", 0).tobuf(ts.format, ts.encoding, ts.errors))
        if len(self._template) != _BLOCK:  # tarfile added an extended header: no fast path
            self._template = None
            return
        # the checksum is the byte sum with its own field as spaces: precompute the fixed part
        self._template[_NAME] = bytes(100)
        self._template[_SIZE] = bytes(12)
        self._template[_CHKSUM] = b"        "
        self._base_sum = sum(self._template)

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)  # the fields webdataset's TarWriter sets, in its way
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, FIXED_MTIME, self.mode, self.user, self.group
        return ti

    def _header(self, name: bytes, size: int) -> bytes:
        h = bytearray(self._template)
        size_field = b"%011o\0" % size
        h[: len(name)] = name  # the rest of the name field is already NUL
        h[_SIZE] = size_field
        # stored like tarfile does: 6 octal digits, NUL, and the field's last space kept
        h[148:155] = b"%06o\0" % (self._base_sum + sum(name) + sum(size_field))
        return bytes(h)

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        parts = []
        for ext in sorted(k for k in sample if k != "__key__"):  # the order TarWriter uses
            data = sample[ext]
            name = f"{key}.{ext}"
            if self._template is None or len(name) > 100 or len(data) >= 8 ** 11 or not name.isascii():
                self._flush(parts)
                self.tarstream.addfile(self._info(name, len(data)), io.BytesIO(data))  # general path
                continue
            parts.append(self._header(name.encode("ascii"), len(data)))
            parts.append(bytes(data))
            pad = -len(data) % _BLOCK
            if pad:
                parts.append(b"\0" * pad)
        self._flush(parts)

    def _flush(self, parts: list) -> None:
        if parts:
            blob = b"".join(parts)
            self.tarstream.fileobj.write(blob)
            self.tarstream.offset += len(blob)
            parts.clear()

    def close(self) -> None:
        self.tarstream.close()


class FastShardWriter(ShardWriter):
    """Drop-in ShardWriter (same write, close, info, temp-name + rename, index) with template tar
    headers, and without `import webdataset` (which imports torch: ~3 s per worker process, more than
    a small build takes)."""

    def __init__(self, tar_path):
        super().__init__(tar_path, make_tar=lambda f: _TemplateTar(f, user="satpipe", group="satpipe"))
