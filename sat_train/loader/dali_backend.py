"""DALI backend: the epoch's plan fed through `fn.external_source` -> decode (mixed on CUDA, CPU otherwise)
-> shared crop/flip.

One pipeline serves every epoch of the loader. Building one costs ~2 s on a GPU (decoder and memory
pool set-up; measured on an H200: rebuilding per epoch held a 32x32 epoch of 16k images to ~5k img/s,
against ~15-20k once built), so the plan is fed from Python instead of baking it into a reader:
a small source object reads each planned sample's bytes from its tar (one `os.pread` per sample,
at the offsets of the shard's DALI index, checked against the manifest when the set was opened)
and hands DALI the encoded image, the encoded saliency and, per sample, the augmentation draws.
At the end of the plan it raises StopIteration, which ends DALI's epoch; `set_epoch` + the next
pass reset the pipeline and the source starts the next plan. Labels and keys never enter DALI: the
source queues them per batch, and batches come out in the order they went in.

The draws (one crop anchor and one coin per sample, shared by image and saliency) come from
numpy seeded by (seed, epoch, rank), so an epoch's augmentation does not depend on what the
pipeline did before (a resumed run sees the same draws as an uninterrupted one). A pass that is
abandoned half way (a `break`) leaves DALI mid-epoch; the next pass then builds a fresh pipeline.

Decode placement on CUDA (`decode=`): "gpu" = DALI's mixed decoder (nvJPEG, pixels stay on the GPU),
"cpu" = DALI's CPU threads decode and the uint8 result is copied to the GPU once before the crop/flip
(no host round trip either way), "auto" = "cpu" for images of at most 64x64 pixels, where the mixed
decoder's per-image overhead costs more than it saves (see bench/loader.py's GPU table), else "gpu".
"""
from __future__ import annotations

import collections
import os
import weakref

import numpy as np
import torch

from shards.format import LABEL_EXT, SALIENCY_EXT, ShardFormatError
from shards.reading import DECODERS, index_key

from . import Loader
from .plan import LoaderError

SMALL_IMAGE_PIXELS = 64 * 64  # "auto": decode images up to this size on the CPU threads
MAX_OPEN_TARS = 16  # file descriptors the source keeps (a set may have thousands of shards)


def _dali_cause(message: str) -> str:
    """The operator and the cause from DALI's multi-line error ("Error in CPU operator `...`" ... "encountered:" ...)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    op = next((ln.rstrip(",") for ln in lines if ln.startswith("Error in")), "")
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines[-1:]
    cause = next((ln for ln in after if not ln.startswith("Current pipeline")), "")
    return "; ".join(part for part in (op, cause) if part) or (lines[0] if lines else "unknown error")


class _PlanSource:
    """`fn.external_source` input (batch mode, iterable): one epoch's plan, batch by batch."""

    def __init__(self, loader: "DaliLoader"):
        self.tars = [str(p) for p in loader.manifest.tar_paths()]
        self.entries = loader.shard_set.entries
        image = self.image = loader.manifest.image
        self.fmt = image["format"]
        self.raw_bytes = image.get("height", 0) * image.get("width", 0) * image["channels"]
        self.batch_size = loader.batch_size
        self.augment, self.padding, self.flip = loader.augment, loader.crop_padding, loader.flip
        self.seed, self.rank = loader.seed, loader.layout.rank
        self.with_keys = loader.with_keys
        self.files: dict[int, int] = {}  # shard -> open file descriptor
        self.where: dict[int, list[tuple]] = {}  # shard -> per-sample read layout (see _where)
        self.batches: list[list[tuple[int, int]]] = []
        self.pending: collections.deque = collections.deque()  # (labels, keys) per batch handed to DALI
        self.position = 0
        self.rng = np.random.default_rng(0)

    def start_epoch(self, plan, epoch: int) -> None:
        flat = [(seg.shard, o) for seg in plan for o in seg.ordinals]
        self.batches = [flat[i:i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
        self.rng = np.random.default_rng([self.seed, epoch, self.rank, 2])
        self.pending.clear()
        self.position = 0

    def __iter__(self):
        self.position = 0  # DALI calls iter() after each reset; start_epoch set the plan before that
        return self

    def _where(self, shard: int) -> list[tuple]:
        """Per sample of a shard: one read (start, length) covering its components, and where the
        image, saliency and label lie inside that read. Made once per shard, on first use."""
        where = self.where.get(shard)
        if where is None:
            where = []  # cached only when complete: a bad sample raises, and the table is not kept
            for sample in self.entries[shard]:
                comp = {ext: (off, size) for ext, off, size, _ in sample}
                start = min(off for off, _ in comp.values())
                end = max(off + size for off, size in comp.values())
                key = index_key(sample)
                (io, isz), (so, ssz), (lo, lsz) = (comp[e] for e in (self.fmt, SALIENCY_EXT, LABEL_EXT))
                if lsz != 8 or (self.fmt == "raw" and isz != self.raw_bytes):
                    what = f"label has {lsz} bytes, not 8" if lsz != 8 else \
                        f"raw image has {isz} bytes, the manifest's shape needs {self.raw_bytes}"
                    raise LoaderError(f"{self.tars[shard]}: sample {key!r}: {what}")
                where.append((start, end - start, io - start, isz, so - start, ssz, lo - start, key))
            self.where[shard] = where
        return where

    def __next__(self):
        if self.position >= len(self.batches):
            raise StopIteration
        batch = self.batches[self.position]
        self.position += 1
        n = len(batch)
        images, saliency, labels, keys = [None] * n, [None] * n, np.empty(n, np.int64), []
        frombuffer, u8 = np.frombuffer, np.uint8
        for i, (shard, ordinal) in enumerate(batch):
            start, length, io, isz, so, ssz, lo, key = self._where(shard)[ordinal]
            data = self._read(shard, start, length, key)
            images[i] = frombuffer(data, u8, isz, io)
            saliency[i] = frombuffer(data, u8, ssz, so)
            labels[i] = int.from_bytes(data[lo:lo + 8], "little", signed=True)
            keys.append(key)
        self.pending.append((labels, keys if self.with_keys else None, batch))
        out = [images, saliency]
        if self.augment:
            p = self.padding
            out.append(self.rng.integers(-p, p + 1, (n, 2), dtype=np.int32))  # (dy, dx) anchor per sample
            out.append((self.rng.integers(0, 2, n) if self.flip else np.zeros(n)).astype(np.int32))
        return out

    def _read(self, shard: int, start: int, length: int, key: str) -> bytes:
        """One sample's components in one read (they lie together in the tar)."""
        fd = self.files.get(shard)
        try:
            if fd is None:
                if len(self.files) >= MAX_OPEN_TARS:  # plans read shard by shard: the oldest is done with
                    os.close(self.files.pop(next(iter(self.files))))
                fd = self.files[shard] = os.open(self.tars[shard], os.O_RDONLY)
            data = os.pread(fd, length, start)
        except OSError as e:
            raise LoaderError(f"{self.tars[shard]}: cannot read ({e.strerror or e})") from None
        if len(data) != length:
            raise LoaderError(f"{self.tars[shard]}: ends before sample {key!r} (truncated after the set was opened?)")
        return data

    def find_undecodable(self, batches) -> str | None:
        """'TAR: sample KEY: COMPONENT does not decode' for the first sample of `batches` that OpenCV cannot
        decode to the manifest's shape. DALI's decode errors name no sample (nvImageCodec's '#4' is a
        status code), so after one the batches DALI held are decoded again here (shards.reading's
        decoders) to find the culprit."""
        for batch in batches:
            for shard, ordinal in batch:
                start, length, io, isz, so, ssz, _lo, key = self._where(shard)[ordinal]
                data = self._read(shard, start, length, key)
                parts = [(SALIENCY_EXT, data[so:so + ssz])]
                if self.fmt != "raw":
                    parts.insert(0, (self.fmt, data[io:io + isz]))
                for ext, blob in parts:
                    try:
                        DECODERS[ext](blob, self.image, key)
                    except ShardFormatError:
                        return f"{self.tars[shard]}: sample {key!r}: {ext} does not decode"
        return None

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, *args, decode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)  # `decode` was checked by make_loader
        image = self.manifest.image
        small = image.get("height", 0) * image.get("width", 0) <= SMALL_IMAGE_PIXELS
        self.gpu_decode = self.device.type == "cuda" and (decode == "gpu" or (decode == "auto" and not small))
        self._source = self._pipe = self._iter = None
        self._mid_epoch = False

    def close(self) -> None:
        """Drop the pipeline and close the tars; the source (and its per-shard read tables) stays."""
        self._iter = self._pipe = None
        if self._source is not None:
            self._source.close()

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        image = self.manifest.image
        fmt, h, w, c = image["format"], image.get("height"), image.get("width"), image["channels"]
        gpu = self.device.type == "cuda"
        # the pipeline's own seed only matters for operators that draw; none does (the draws come from the source)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                        device_id=self.device.index if gpu else None, seed=self.seed, prefetch_queue_depth=2)
        outputs = 4 if self.augment else 2
        with pipe:
            fed = fn.external_source(source=self._source, num_outputs=outputs, batch=True, cycle=False,
                                     dtype=[types.UINT8, types.UINT8, types.INT32, types.INT32][:outputs])
            enc, sal = fed[0], fed[1]
            decode = "mixed" if self.gpu_decode else "cpu"
            if fmt == "raw":
                x = fn.reshape(enc, shape=[h, w, c], layout="HWC")
            else:
                x = fn.decoders.image(enc, device=decode, output_type=types.RGB if c == 3 else types.GRAY)
            s = fn.decoders.image(sal, device=decode, output_type=types.GRAY)
            if gpu:  # CPU-decoded (or raw) uint8 pixels go to the GPU once; the rest runs there
                x, s = (t if t.device == "gpu" else t.gpu() for t in (x, s))
            if self.augment:
                anchor, coin = fed[2], fed[3]
                if self.crop_padding:
                    # named arguments: DALI keeps argument inputs on the CPU, also for a GPU slice
                    x, s = (fn.slice(t, start=anchor, shape=[h, w], axis_names="HW", out_of_bounds_policy="pad",
                                     fill_values=0) for t in (x, s))
                if self.flip:
                    x, s = fn.flip(x, horizontal=coin), fn.flip(s, horizontal=coin)
            # finish in DALI's threads: NCHW float32, x / 255 and s / 127.5 - 1 (as augment.uint8_to_float)
            x = fn.transpose(x, perm=[2, 0, 1]) / np.float32(255.0)
            s = fn.transpose(s, perm=[2, 0, 1]) / np.float32(127.5) - np.float32(1.0)
            pipe.set_outputs(x, s)
        return pipe

    def _batches(self, plan, epoch):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        try:
            if self._mid_epoch:  # the last pass was abandoned: DALI cannot be reset mid-epoch, start over
                self.close()
            if self._source is None:
                self._source = _PlanSource(self)
                weakref.finalize(self, self._source.close)  # file descriptors go with the loader
            self._source.start_epoch(plan, epoch)  # before the pipeline (re)starts and prefetches
            self._mid_epoch = True
            if self._iter is None:
                self._pipe = self._build()
                self._pipe.build()
                self._iter = DALIGenericIterator(self._pipe, ["x", "s"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                                 auto_reset=False)
            else:
                self._iter.reset()
            pending = self._source.pending
            for out in self._iter:
                labels, keys, _ = pending.popleft()
                yield out[0]["x"], out[0]["s"], torch.from_numpy(labels), keys
            self._mid_epoch = False
        except LoaderError:
            self.close()
            raise
        except RuntimeError as e:  # DALI reports decode/read failures as RuntimeError with a long trace
            cause = _dali_cause(str(e))
            try:
                culprit = self._source.find_undecodable([b for *_, b in self._source.pending]) if self._source else None
            except LoaderError as found:  # the re-read itself failed: that names the sample too
                culprit = str(found)
            self.close()
            if culprit:
                raise LoaderError(f"{culprit} (DALI: {cause})") from None
            raise LoaderError(f"DALI failed reading {self.manifest.root}: {cause} (preprocess verify "
                              f"{self.manifest.root} checks every sample)") from None
