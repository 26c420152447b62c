"""Shards -> batches (x, s, y) on the training device, through DALI or plain PyTorch.

    from sat_train.loader import make_loader
    loader = make_loader("shards/fashion-mnist/train", 128, train=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, s, y in loader:   # x float32 [0,1] NCHW, s float32 [-1,1] N1HW, y int64 N, on loader.device
            ...

Backends: "dali" (one pipeline fed the planned samples through fn.external_source; decode on the
GPU or DALI's CPU threads on CUDA, CPU pipeline otherwise; see dali_backend.py),
"torch" (webdataset tar reading + DataLoader workers, cv2 decode), "device" (the whole set decoded
once into uint8 tensors on the training device, or host memory on CPU; batches are gathered,
cropped and flipped there; refused when the set exceeds `memory_fraction` of the free memory; see
device_backend.py), "auto" (on CUDA "device" for images up to 64x64 that fit the budget, else DALI
when it imports, else torch). All follow the same per-epoch plan (see plan.py for the exact epoch,
shuffle and distributed semantics) and the same augmentation (augment.py; the device backend even
uses DALI's draws, so the two agree bit for bit). The epoch is explicit: iterating twice without
`set_epoch` gives the same order again. Shards are checked against the manifest before anything
reads them (safety.py); problems raise `LoaderError` with a one-line message naming the file.

A shard set may be a URL (s3://bucket/prefix, https://host/path; shards/storage.py): the torch and
device backends stream its tars through fsspec (one sequential read per shard), the DALI backend
reads a local copy that stage.py makes and checks (sha256 of every byte) in a size-bounded cache.
"""
from __future__ import annotations

import sys

import torch

from shards.format import ShardFormatError
from shards.manifest import read_manifest
from shards.storage import is_url

from .augment import to_model_inputs
from .plan import Layout, LoaderError, epoch_plan
from .safety import open_shard_set

__all__ = ["make_loader", "LoaderError", "Loader", "dali_available"]

BACKENDS = ("auto", "dali", "torch", "device")  # TrainConfig / EvalConfig validate against this
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
                verify: str = "sha256", with_keys: bool = False, decode: str = "auto",
                memory_fraction: float = 0.5) -> Loader:
    """Loader over the shard set in `shard_dir` (a folder with manifest.json, or a URL: s3://bucket/prefix,
    https://host/path; the torch and device backends stream its tars, DALI reads a checked local copy made
    by stage.py).

    train=True: shuffled per epoch, augmented, last partial batch dropped (defaults; override with
    `augment`/`drop_last`). train=False: manifest order, no augmentation, every sample once.
    `with_keys=True` yields a fourth item, the list of sample keys (for checks and debugging).
    `decode` places DALI's decoding on a CUDA target: "gpu" (mixed), "cpu" (DALI's threads, then one
    copy of the uint8 pixels), "auto" (cpu up to 64x64 images, gpu above; see dali_backend.py).
    `memory_fraction`: the device backend (and "auto" on CUDA) may use this share of the free device
    memory (CUDA) or available host RAM (CPU) for the decoded set.
    Raises LoaderError (one-line message naming the file) on a bad shard set or layout."""
    if backend not in BACKENDS:
        raise LoaderError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if decode not in DECODES:
        raise LoaderError(f"decode must be one of {DECODES}, got {decode!r}")
    if crop_padding < 0 or num_workers < 0:
        raise LoaderError("crop_padding and num_workers must be >= 0")
    if not 0 < memory_fraction <= 1:
        raise LoaderError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    augment = train if augment is None else bool(augment)
    drop_last = train if drop_last is None else bool(drop_last)
    rank, world_size = _resolve_rank(rank, world_size)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    staged = None
    if is_url(shard_dir):  # s3://, https://: torch and device stream the tars, DALI reads a staged local copy
        if backend == "auto":
            backend = _say_auto(_auto_backend(_remote_manifest(shard_dir), device, memory_fraction), rank)
        if backend == "dali":
            from .stage import stage_shard_set

            staged = stage_shard_set(str(shard_dir), log=(lambda m: print(m, file=sys.stderr)) if rank == 0 else None)
    # verify: "sha256" (every byte) | "size" (see safety.py); a staged copy was hashed while it was fetched
    shard_set = open_shard_set(staged.folder if staged else shard_dir, "size" if staged else verify,
                               source=str(shard_dir))
    shard_set.hold = staged
    layout = Layout(shard_set.shard_sizes, int(batch_size), rank, world_size, shuffle=train, drop_last=drop_last)
    layout.check(str(shard_set.manifest.root))

    if backend == "auto":
        backend = _say_auto(_auto_backend(shard_set.manifest, device, memory_fraction), rank)
    if backend == "device":
        from .device_backend import DeviceLoader
        cls, extra = DeviceLoader, {"memory_fraction": float(memory_fraction)}
    elif backend == "dali":
        if not dali_available():
            raise LoaderError("backend 'dali' requested but nvidia.dali does not import (pip install satpipe[dali])")
        from .dali_backend import DaliLoader
        cls, extra = DaliLoader, {"decode": decode}
    else:
        from .torch_backend import TorchLoader
        cls, extra = TorchLoader, {}
    return cls(shard_set, layout, seed=int(seed), augment=augment, crop_padding=int(crop_padding), flip=bool(flip),
               device=device, num_workers=int(num_workers), with_keys=with_keys, **extra)


def _say_auto(choice: tuple[str, str], rank: int) -> str:
    if rank == 0:
        print(f"loader: backend auto -> {choice[0]} ({choice[1]})", file=sys.stderr)
    return choice[0]


def _remote_manifest(url):
    try:
        return read_manifest(url)
    except ShardFormatError as e:
        raise LoaderError(str(e)) from None


def _auto_backend(manifest, device: torch.device, memory_fraction: float) -> tuple[str, str]:
    """(backend, why): "device" on CUDA for small images whose set fits the budget, else DALI, else torch."""
    if device.type == "cuda":
        from .device_backend import AUTO_MAX_PIXELS, budget_check

        image = manifest.image
        small = (image.get("height") or 0) * (image.get("width") or 0) <= AUTO_MAX_PIXELS
        fits, text = budget_check(manifest, device, memory_fraction) if small else (False, "")
        if fits:
            return "device", text
        reason = f"does not fit: {text}" if small else "images larger than 64x64"
    else:
        reason = "the device backend is picked on CUDA only"
    if dali_available():
        return "dali", reason
    return "torch", f"{reason}; nvidia.dali does not import"
