"""Plain-PyTorch backend: webdataset's tar reader + DataLoader worker processes, cv2 decode.

The epoch plan (plan.py) is cut into batches and batch b goes to worker b % num_workers; DataLoader
collects worker outputs round-robin, so batches arrive in exactly the plan's order -- the same order
the DALI backend reads. Each worker streams each tar it needs once (shards.reading.iter_tar_samples:
only the image, saliency and label members are read; a tar may be a local file or a URL, read as
one stream through fsspec), decodes with shards.reading's decoders (cv2, one thread per worker:
the workers are the parallelism), applies the shared crop/flip
(augment.py, draws seeded by (seed, epoch, rank, worker)) and ships whole uint8 batches. This is
the benchmark baseline, so it is built to be fast: uint8 across processes, one decode per sample,
no per-sample IPC.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import LABEL_EXT, SALIENCY_EXT, ShardFormatError, decode_label
from shards.reading import decode_image, decode_saliency, index_key, iter_tar_samples
from shards.storage import location

from . import Loader
from .augment import crop_flip, draw, uint8_to_float
from .plan import LoaderError, stripe_batches


class _PlanDataset(IterableDataset):
    """One epoch of one rank: worker w yields the uint8 chunks of parts[w]."""

    def __init__(self, loader: "TorchLoader", parts, epoch: int):
        self.parts, self.epoch = parts, epoch
        # names, not file-system objects: an S3/HTTP client made before DataLoader forks is not fork-safe,
        # so each worker makes its own (shards.storage.location, per process)
        self.tars = [str(p) for p in loader.manifest.tar_paths()]
        self.keys = loader.keys
        image = self.image = loader.manifest.image
        self.fmt, self.shape = image["format"], (image["height"], image["width"], image["channels"])
        self.num_classes = loader.manifest.num_classes
        self.batch_size = loader.batch_size
        self.augment, self.padding, self.flip = loader.augment, loader.crop_padding, loader.flip
        self.seed, self.rank = loader.seed, loader.layout.rank
        self.host_float = loader.device.type != "cuda"

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        cv2.setNumThreads(1)  # one decode thread per worker process: workers are the parallelism
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 3, worker])
        batches = self.parts[worker]
        wanted: dict[int, list[int]] = {}  # shard -> ordinals this worker needs, shards in plan order
        for batch in batches:
            for shard, o in batch:
                wanted.setdefault(shard, []).append(o)
        held: dict[tuple[int, int], tuple[str, dict]] = {}
        next_batch = 0
        for shard, ordinals in wanted.items():  # each tar streamed once, in plan order
            held.update(zip(((shard, o) for o in ordinals), self._read_samples(shard, ordinals)))
            while next_batch < len(batches) and all(t in held for t in batches[next_batch]):
                yield self._decode([held.pop(t) for t in batches[next_batch]], rng)
                next_batch += 1

    def _read_samples(self, shard: int, ordinals: list[int]) -> list[tuple[str, dict]]:
        """The listed samples of one tar, in the listed order; stops reading once all are found."""
        tar = self.tars[shard]
        want = {self.keys[shard][o]: i for i, o in enumerate(ordinals)}
        found: list = [None] * len(want)
        exts = (self.fmt, SALIENCY_EXT, LABEL_EXT)
        left = len(want)
        try:
            for sample in iter_tar_samples(location(tar), exts=exts, keys=want):  # streamed: local file or URL
                i = want.get(sample["__key__"])
                if i is None or found[i] is not None:
                    continue
                lacking = [e for e in exts if e not in sample]
                if lacking:  # the index has them (checked at open), so the tar is damaged
                    raise LoaderError(f"{tar}: sample {sample['__key__']!r} lacks {', '.join(lacking)} in the "
                                      f"tar (damaged after the check at start? preprocess verify names every problem)")
                found[i] = (sample["__key__"], sample)
                left -= 1
                if left == 0:
                    break
        except ShardFormatError as e:
            raise LoaderError(str(e)) from None
        if left:
            missing = next(k for k, i in want.items() if found[i] is None)
            raise LoaderError(f"{tar}: sample {missing!r} from the index is not in the tar (replaced after the check at "
                              f"start? preprocess verify names every problem)")
        return found

    def _decode(self, chunk, rng):
        n, (h, w, c) = len(chunk), self.shape
        x = np.empty((n, h, w, c), np.uint8)
        s = np.empty((n, h, w, 1), np.uint8)
        y = np.empty(n, np.int64)
        try:
            for i, (key, sample) in enumerate(chunk):
                x[i] = decode_image(sample.get(self.fmt), self.image, key)
                s[i, ..., 0] = decode_saliency(sample.get(SALIENCY_EXT), self.image, key)
                y[i] = decode_label(sample[LABEL_EXT])
        except ShardFormatError as e:
            raise LoaderError(str(e)) from None
        bad = np.flatnonzero((y < 0) | (y >= self.num_classes))
        if len(bad):  # checked at open for local sets; remote sets opened with --verify-shards size reach here
            raise LoaderError(f"sample {chunk[bad[0]][0]!r} has label {int(y[bad[0]])}, outside 0..{self.num_classes - 1}")
        if self.augment:
            dy, dx, mirror = draw(rng, n, self.padding, self.flip)
            x, s = crop_flip(x, dy, dx, mirror, self.padding), crop_flip(s, dy, dx, mirror, self.padding)
        x, s = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in (x, s))  # NCHW here, in the worker
        if self.host_float:  # CPU target: convert here too (see augment.py); CUDA target: on the GPU
            x, s = uint8_to_float(x, saliency=False), uint8_to_float(s, saliency=True)
        return torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(y), [k for k, _ in chunk]


class TorchLoader(Loader):
    backend = "torch"

    @functools.cached_property
    def keys(self) -> list[list[str]]:
        """Sample keys per shard, in tar order (from the index: what to pick while streaming a tar)."""
        return [[index_key(e) for e in shard] for shard in self.shard_set.entries]

    def _batches(self, plan, epoch):
        parts = stripe_batches(plan, self.batch_size, self.num_workers)
        loader = DataLoader(_PlanDataset(self, parts, epoch), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.num_workers else None)
        try:
            yield from loader
        except LoaderError as e:  # from a worker, the message carries its traceback: keep the last line
            last = str(e).strip().splitlines()[-1]
            raise LoaderError(last.split("LoaderError: ", 1)[-1]) from None
