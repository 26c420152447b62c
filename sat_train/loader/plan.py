"""Which samples a rank reads in one epoch, and in what order: the same plan drives both backends.

Semantics (tested in tests/sat_train/test_loader_plan.py):

* Training (`shuffle=True`): every epoch the shard order is permuted with a generator seeded by
  (seed, epoch) -- identical on every rank -- and the shards are laid end to end. Rank r of W takes
  the r-th contiguous slice of `N // W` samples of that sequence, so the ranks are disjoint and
  together cover the set; the `N % W` samples at the very end (a different few each epoch, since the
  shard order changes) are skipped that epoch so that every rank has the same count. Inside each run
  of one shard, the rank permutes its samples with a generator seeded by (seed, epoch, rank). With
  `drop_last` the last `count % batch_size` samples of the rank's (shuffled) order are dropped, so all
  ranks see the same number of full batches -- DDP needs that.
* Evaluation (`shuffle=False`): shards and samples in manifest order, rank r gets the r-th slice of a
  near-even split (the first `N % W` ranks hold one sample more), nothing is dropped unless asked:
  every sample exactly once over all ranks, in order. Rank counts may then differ by one sample (so
  by one batch): evaluation must not run a collective per batch; reduce totals after the loop.
* Ranks split samples, not shards: fewer shards than ranks is fine (both backends read just the
  planned samples of a tar, at the offsets of its index). A layout in which some rank would get no batch at all is refused up
  front with the same `LoaderError` on every rank, so no rank waits for another that never starts.

Reading order is shard by shard (sequential I/O, which both DALI and webdataset want), so a batch
holds samples of one or two shards. That mixes well because `preprocess build-shards` makes each
shard a random subset (items are shuffled across shards before writing); the order inside a shard
is reshuffled here every epoch anyway.

A plan is a list of `Segment(shard, ordinals)`: sample positions inside one tar, in read order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LoaderError(Exception):
    """A shard set, its files or the requested layout cannot be loaded; the message says why."""


@dataclass(frozen=True)
class Segment:
    shard: int  # position of the shard in the manifest
    ordinals: tuple[int, ...]  # sample positions inside that shard's tar, in the order they are read


@dataclass(frozen=True)
class Layout:
    """What does not change between epochs: the numbers `len(loader)` is made of."""

    shard_sizes: tuple[int, ...]
    batch_size: int
    rank: int
    world_size: int
    shuffle: bool
    drop_last: bool

    @property
    def total(self) -> int:
        return sum(self.shard_sizes)

    def rank_slice(self, rank: int) -> tuple[int, int]:
        """[start, stop) of `rank` in the epoch's concatenated sample sequence."""
        n, w = self.total, self.world_size
        if self.shuffle:  # equal counts; the tail n % w is skipped
            per = n // w
            return rank * per, (rank + 1) * per
        per, extra = divmod(n, w)  # near-even split, nothing skipped
        start = rank * per + min(rank, extra)
        return start, start + per + (1 if rank < extra else 0)

    def samples_before_drop(self, rank: int | None = None) -> int:
        start, stop = self.rank_slice(self.rank if rank is None else rank)
        return stop - start

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        n = self.samples_before_drop()
        return n - n % self.batch_size if self.drop_last else n

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def check(self, where: str) -> None:
        """Refuse, identically on every rank, a layout where some rank would get no batch (a DDP hang)."""
        if self.batch_size < 1:
            raise LoaderError(f"{where}: batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise LoaderError(f"{where}: rank {self.rank} is outside world size {self.world_size}")
        for r in range(self.world_size):
            n = self.samples_before_drop(r)
            batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
            if batches == 0:
                raise LoaderError(
                    f"{where}: {self.total} samples are too few for {self.world_size} rank(s) with batch size "
                    f"{self.batch_size}{' and drop_last' if self.drop_last else ''}: rank {r} would get {n} "
                    f"sample(s) and no batch")


def _shard_sequence(layout: Layout, seed: int, epoch: int) -> list[int]:
    order = list(range(len(layout.shard_sizes)))
    if layout.shuffle:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(order)]
    return order


def epoch_plan(layout: Layout, seed: int, epoch: int) -> list[Segment]:
    """This rank's segments for one epoch (see the module docstring for the semantics)."""
    start, stop = layout.rank_slice(layout.rank)
    rng = np.random.default_rng([seed, epoch, layout.rank, 1])
    segments: list[Segment] = []
    pos = 0  # position of the current shard's first sample in the concatenated sequence
    for shard in _shard_sequence(layout, seed, epoch):
        size = layout.shard_sizes[shard]
        lo, hi = max(start, pos), min(stop, pos + size)
        if lo < hi:
            ordinals = np.arange(lo - pos, hi - pos)
            if layout.shuffle:
                ordinals = rng.permutation(ordinals)
            segments.append(Segment(shard, tuple(int(i) for i in ordinals)))
        pos += size
    if layout.drop_last:
        segments = _truncate(segments, layout.num_samples)
    return segments


def _truncate(segments: list[Segment], keep: int) -> list[Segment]:
    out = []
    for seg in segments:
        if keep <= 0:
            break
        out.append(Segment(seg.shard, seg.ordinals[:keep]))
        keep -= len(out[-1].ordinals)
    return out


def stripe_batches(segments: list[Segment], batch_size: int, num_workers: int) -> list[list[list[tuple[int, int]]]]:
    """Cut a plan into batches of (shard, ordinal) and deal batch b to worker b % num_workers.

    DataLoader collects worker outputs round-robin, so this keeps the plan's exact order."""
    flat = [(seg.shard, o) for seg in segments for o in seg.ordinals]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    k = max(1, num_workers)
    return [batches[w::k] for w in range(k)]
