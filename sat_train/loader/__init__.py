"""Shards -> batches (x, s, y) on the training device, through DALI or plain PyTorch.

    from sat_train.loader import make_loader
    loader = make_loader("shards/fashion-mnist/train", 128, train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, s, y in loader:   # x float32 [0,1] NCHW, s float32 [-1,1] N1HW, y int64 N, on loader.device
            ...

Backends: "dali" (one pipeline fed the planned samples through fn.external_source; decode on the
GPU or DALI's CPU threads on CUDA, CPU pipeline otherwise; see dali_backend.py),
"torch" (webdataset tar reading + DataLoader workers, cv2 decode), "auto" (DALI when it imports).
Both follow the same per-epoch plan (see plan.py for the exact epoch, shuffle and distributed
semantics) and the same augmentation (augment.py). The epoch is explicit: iterating twice without
`set_epoch` gives the same order again. Shards are checked against the manifest before anything
reads them (safety.py); problems raise `LoaderError` with a one-line message naming the file.
"""
from __future__ import annotations

import sys

import torch

from .augment import to_model_inputs
from .plan import Layout, LoaderError, epoch_plan
from .safety import open_shard_set

__all__ = ["make_loader", "LoaderError", "Loader", "dali_available"]

BACKENDS = ("auto", "dali", "torch")
DECODES = ("auto", "gpu", "cpu")  # where DALI decodes on a CUDA target (see make_loader)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # an absent or broken install both mean "use torch"
        return False
    return True


class Loader:
    """Common part of both backends: layout, epochs, length, and the final float conversion.

    Subclasses implement `_batches(plan, epoch)` yielding (x NCHW, s N1HW, y, keys); x and s are uint8
    or already float (see augment.py)."""

    backend = ""

    def __init__(self, shard_set, layout: Layout, *, seed: int, augment: bool, crop_padding: int, flip: bool,
                 device: torch.device, num_workers: int, with_keys: bool):
        self.shard_set = shard_set
        self.manifest = shard_set.manifest
        self.layout = layout
        self.seed, self.epoch = seed, 0
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.device = device
        self.num_workers = num_workers
        self.with_keys = with_keys

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return self.layout.num_samples

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.layout.num_batches

    def __iter__(self):
        plan = epoch_plan(self.layout, self.seed, self.epoch)
        for x, s, y, keys in self._batches(plan, self.epoch):
            batch = to_model_inputs(x, s, y, self.device)
            yield (*batch, keys) if self.with_keys else batch

    def close(self) -> None:
        """Release what the backend holds between epochs (safe to call twice)."""

    def _batches(self, plan, epoch):
        raise TypeError(f"{type(self).__name__} is not a backend; use make_loader")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.manifest.root}, backend={self.backend}, batch_size={self.batch_size}, "
                f"rank={self.layout.rank}/{self.layout.world_size}, samples={self.num_samples}, batches={len(self)}, "
                f"augment={self.augment}, device={self.device})")


def _resolve_rank(rank, world_size) -> tuple[int, int]:
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    return int(rank), int(world_size)


def make_loader(shard_dir, batch_size: int, *, train: bool, backend: str = "auto", augment: bool | None = None,
                crop_padding: int = 4, flip: bool = True, seed: int = 0, drop_last: bool | None = None,
                rank: int | None = None, world_size: int | None = None, device=None, num_workers: int = 2,
                verify: str = "size", with_keys: bool = False, decode: str = "auto") -> Loader:
    """Loader over the shard set in `shard_dir` (a folder with manifest.json).

    train=True: shuffled per epoch, augmented, last partial batch dropped (defaults; override with
    `augment`/`drop_last`). train=False: manifest order, no augmentation, every sample once.
    `with_keys=True` yields a fourth item, the list of sample keys (for checks and debugging).
    `decode` places DALI's decoding on a CUDA target: "gpu" (mixed), "cpu" (DALI's threads, then one
    copy of the uint8 pixels), "auto" (cpu up to 64x64 images, gpu above; see dali_backend.py).
    Raises LoaderError (one-line message naming the file) on a bad shard set or layout."""
    if backend not in BACKENDS:
        raise LoaderError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if decode not in DECODES:
        raise LoaderError(f"decode must be one of {DECODES}, got {decode!r}")
    if crop_padding < 0 or num_workers < 0:
        raise LoaderError("crop_padding and num_workers must be >= 0")
    augment = train if augment is None else bool(augment)
    drop_last = train if drop_last is None else bool(drop_last)
    rank, world_size = _resolve_rank(rank, world_size)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    shard_set = open_shard_set(shard_dir, verify)
    layout = Layout(shard_set.shard_sizes, int(batch_size), rank, world_size, shuffle=train, drop_last=drop_last)
    layout.check(str(shard_set.manifest.root))

    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
        if rank == 0:
            print(f"loader: backend auto -> {backend}" + ("" if backend == "dali" else " (nvidia.dali does not import)"),
                  file=sys.stderr)
    if backend == "dali":
        if not dali_available():
            raise LoaderError("backend 'dali' requested but nvidia.dali does not import (pip install satpipe[dali])")
        from .dali_backend import DaliLoader
        cls, extra = DaliLoader, {"decode": decode}
    else:
        from .torch_backend import TorchLoader
        cls, extra = TorchLoader, {}
    return cls(shard_set, layout, seed=int(seed), augment=augment, crop_padding=int(crop_padding), flip=bool(flip),
               device=device, num_workers=int(num_workers), with_keys=with_keys, **extra)
