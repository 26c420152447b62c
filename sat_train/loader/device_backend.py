"""Device-resident backend: the whole shard set decoded once into uint8 tensors on the training device.

For small images the per-epoch decode is what bounds a GPU (README: ~25-36k img/s from DALI at
32x32 against ~49k img/s of resnet18 compute on an H200), while the decoded set is small (CIFAR-10
with saliency: 50k x 32x32x4 bytes = 200 MB). So this backend decodes every sample once, when the
loader is made, and afterwards an epoch is index arithmetic on the device.

Memory layout (one allocation per set, on `device`; host memory on CPU):
    pixels  uint8 (N, C + 1, H, W)   channels 0..C-1 the image, channel C the saliency map's stored
                                     levels, so one gather serves both and they cannot drift apart
    labels  int64 (N,)
    keys    list of N str (host; only read for `with_keys`)
Sample n is the manifest's n-th sample (shards in manifest order, tar order inside a shard).

Decoding reuses the torch backend's tar reader and cv2 decoder (`_PlanDataset`, its DataLoader
workers), unaugmented and uint8, over a plan that lists every sample in manifest order: one decode
path for the project, the same pixels as the other backends.

Every epoch follows `plan.epoch_plan` exactly like the other backends (shuffle, rank split,
drop-last), turned into sample numbers. Augmentation uses the DALI backend's draws, to the bit:
a numpy generator seeded by (seed, epoch, rank, 2), per batch in plan order one (dy, dx) anchor per
sample then one coin per sample (dali_backend._PlanSource.__next__). Applied as augment.py defines it,
so on CPU this backend yields the very tensors the DALI backend yields. (The torch backend draws per
DataLoader worker, so it shares the distribution, not the draws.) The draws are made for the whole
epoch at its start and copied to the device once; on CUDA each batch is then one gather kernel
(augment.crop_flip_gather: sample pick + crop + flip + zero padding for image and saliency at once)
plus the float conversion, with no host synchronisation. On CPU a Numba loop does the same gather
and writes float32 directly (exact: it reads the conversion from 256-entry tables made with the very
torch ops of `to_model_inputs`), several times cheaper there than torch's advanced indexing.

DDP: the plan moves samples between ranks from epoch to epoch (the shard order is permuted before
the set is cut into rank slices), so every rank holds the whole set. On CUDA each rank has its own
device; on CPU the ranks of one host share its RAM, so the budget is divided by LOCAL_WORLD_SIZE.

Memory budget: before decoding, N * (H * W * (C + 1) + 8) bytes are compared with
`memory_fraction` of the free device memory (CUDA) or of the available host RAM (CPU); a set over
the budget is refused with a LoaderError naming both numbers.
"""
from __future__ import annotations

import os
import sys

import numba
import numpy as np
import torch
from torch.utils.data import DataLoader

from . import Loader
from .augment import crop_flip_gather
from .plan import Layout, LoaderError, epoch_plan, stripe_batches
from .torch_backend import TorchLoader, _PlanDataset

AUTO_MAX_PIXELS = 64 * 64  # "auto" picks this backend on CUDA for images up to this size (that fit)
DECODE_CHUNK = 256  # samples per decode task of the one-off decode pass
LABEL_BYTES = 8


# ----------------------------------------------------------------------------- the memory budget

def footprint_bytes(image: dict, num_samples: int) -> int:
    """Bytes the resident set needs: uint8 image + saliency planes and an int64 label per sample."""
    return num_samples * (image["height"] * image["width"] * (image["channels"] + 1) + LABEL_BYTES)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes this process may plan with, where they are) before the fraction is applied."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    avail = _mem_available()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return avail // local, "available host RAM" + (f" / {local} local ranks" if local > 1 else "")


def _mem_available() -> int:
    """Linux MemAvailable (free + reclaimable page cache); plain free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_check(manifest, device: torch.device, memory_fraction: float) -> tuple[bool, str]:
    """(fits, one-line explanation) for holding the whole set of `manifest` on `device`."""
    image = manifest.image
    if not all(isinstance(image.get(k), int) and image[k] > 0 for k in ("height", "width")):
        return False, f"{manifest.root / 'manifest.json'}: the device loader needs a fixed image height and width"
    need = footprint_bytes(image, manifest.num_samples)
    avail, where = available_bytes(device)
    budget = int(avail * memory_fraction)
    text = (f"{manifest.num_samples} samples of {image['height']}x{image['width']}x{image['channels']} + saliency "
            f"need {_size(need)}, budget {_size(budget)} ({memory_fraction:g} of {_size(avail)} {where})")
    return need <= budget, text


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes} bytes"


# ----------------------------------------------------------------------------- decoding once

class _WholeSetDataset(_PlanDataset):
    """The torch backend's reader and decoder, unaugmented, always shipping uint8 NCHW chunks."""

    def __init__(self, reader: TorchLoader, parts):
        super().__init__(reader, parts, epoch=0)
        self.augment, self.host_float = False, False


def _decode_all(loader: "DeviceLoader"):
    """(pixels (N, C+1, H, W) uint8, labels (N,) int64, keys) on loader.device, in manifest order."""
    from tqdm import tqdm

    sizes = loader.shard_set.shard_sizes
    whole = Layout(sizes, DECODE_CHUNK, 0, 1, shuffle=False, drop_last=False)
    reader = TorchLoader(loader.shard_set, whole, seed=0, augment=False, crop_padding=0, flip=False,
                         device=loader.device, num_workers=loader.num_workers, with_keys=True)
    parts = stripe_batches(epoch_plan(whole, 0, 0), DECODE_CHUNK, loader.num_workers)
    image = loader.manifest.image
    c, h, w, n = image["channels"], image["height"], image["width"], whole.total
    try:
        pixels = torch.empty((n, c + 1, h, w), dtype=torch.uint8, device=loader.device)
        labels = torch.empty(n, dtype=torch.int64, device=loader.device)
    except torch.OutOfMemoryError:
        raise LoaderError(f"{loader.manifest.root}: out of memory on {loader.device} allocating the device loader's "
                          f"{n} samples; use --loader-backend dali or torch") from None
    keys: list[str] = []
    # its own generator: DataLoader draws a seed from torch's global one otherwise, and fit seeds the
    # model's initial weights from that after making the loader (same weights whatever the backend)
    chunks = DataLoader(_WholeSetDataset(reader, parts), batch_size=None, num_workers=loader.num_workers,
                        pin_memory=loader.device.type == "cuda", prefetch_factor=4 if loader.num_workers else None,
                        generator=torch.Generator())
    pos = 0
    bar = tqdm(total=n, desc="loader: decoding the set once", unit="img", leave=False,
               disable=True if loader.layout.rank else None)
    try:
        for x, s, y, k in chunks:
            m = len(y)
            pixels[pos:pos + m, :c].copy_(x, non_blocking=True)
            pixels[pos:pos + m, c:].copy_(s, non_blocking=True)
            labels[pos:pos + m].copy_(y, non_blocking=True)
            keys.extend(k)
            pos += m
            bar.update(m)
    except LoaderError as e:  # from a worker the message carries its traceback: keep the last line
        last = str(e).strip().splitlines()[-1]
        raise LoaderError(last.split("LoaderError: ", 1)[-1]) from None
    finally:
        bar.close()
    return pixels, labels, keys


# ----------------------------------------------------------------------------- CPU batch assembly

@numba.njit(cache=True, nogil=True, boundscheck=False)
def _gather_crop_flip_float(pixels, idx, dy, dx, mirror, lut_x, lut_s, out_x, out_s):
    """out_x[b] / out_s[b] = crop/flip (augment.py) of pixels[idx[b]], converted through the tables."""
    channels, h, w = out_x.shape[1], out_x.shape[2], out_x.shape[3]
    for b in range(idx.shape[0]):
        n, oy, ox, m = idx[b], dy[b], dx[b], mirror[b]
        for k in range(channels + 1):
            for y in range(h):
                sy = y + oy
                row_in = 0 <= sy < h
                for x in range(w):
                    sx = (w - 1 - x if m else x) + ox
                    v = pixels[n, k, sy, sx] if row_in and 0 <= sx < w else 0
                    if k < channels:
                        out_x[b, k, y, x] = lut_x[v]
                    else:
                        out_s[b, 0, y, x] = lut_s[v]


def _conversion_tables() -> tuple[np.ndarray, np.ndarray]:
    """float32 of every uint8 level, made with augment.to_model_inputs's own ops (so bit-identical)."""
    from .augment import to_model_inputs

    levels = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(256, 1, 1, 1)
    x, s, _ = to_model_inputs(levels, levels, torch.zeros(1), torch.device("cpu"))
    return x.reshape(256).numpy().copy(), s.reshape(256).numpy().copy()


# ----------------------------------------------------------------------------- the loader

class DeviceLoader(Loader):
    backend = "device"

    def __init__(self, *args, memory_fraction: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        fits, text = budget_check(self.manifest, self.device, memory_fraction)
        if not fits:  # before any decoding
            raise LoaderError(f"{self.manifest.root}: too large for the device loader: {text}; use --loader-backend "
                              f"dali or torch, or raise --loader-memory-fraction")
        if self.layout.rank == 0:
            print(f"loader: device backend on {self.device}: {text}", file=sys.stderr)
        self.channels = self.manifest.image["channels"]
        self.pixels, self.labels, self.keys = _decode_all(self)
        sizes = self.shard_set.shard_sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # shard -> first sample number
        self.tables = _conversion_tables() if self.device.type == "cpu" else None

    def close(self) -> None:
        """Nothing to release between epochs; the tensors go with the loader."""

    def _order(self, plan) -> np.ndarray:
        """The epoch's sample numbers, in plan order."""
        parts = [self.offsets[seg.shard] + np.asarray(seg.ordinals, np.int64) for seg in plan]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _draws(self, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dy, dx, mirror) for the epoch's n samples: the DALI backend's draws, batch by batch."""
        dy, dx, mirror = (np.zeros(n, np.int64) for _ in range(3))
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, self.layout.rank, 2])
            p = self.crop_padding
            for start in range(0, n, self.batch_size):
                m = min(self.batch_size, n - start)
                anchor = rng.integers(-p, p + 1, (m, 2), dtype=np.int32)
                coin = rng.integers(0, 2, m) if self.flip else np.zeros(m)
                dy[start:start + m], dx[start:start + m] = anchor[:, 0], anchor[:, 1]
                mirror[start:start + m] = coin.astype(np.int32)
        return dy, dx, mirror

    def _batches(self, plan, epoch):
        order = self._order(plan)
        dy, dx, mirror = self._draws(epoch, len(order))
        bs = self.batch_size
        if self.device.type == "cpu":
            batches = self._cpu_batches(order, dy, dx, mirror)
        else:
            batches = self._device_batches(order, dy, dx, mirror)
        for start, (x, s, y) in zip(range(0, len(order), bs), batches):
            keys = [self.keys[i] for i in order[start:start + bs]] if self.with_keys else None
            yield x, s, y, keys

    def _cpu_batches(self, order, dy, dx, mirror):
        pixels, labels = self.pixels.numpy(), self.labels
        lut_x, lut_s = self.tables
        mirror = mirror.astype(np.bool_)
        c, (h, w) = self.channels, pixels.shape[2:]
        for start in range(0, len(order), self.batch_size):
            sl = slice(start, start + self.batch_size)
            idx = order[sl]
            x = torch.empty((len(idx), c, h, w), dtype=torch.float32)
            s = torch.empty((len(idx), 1, h, w), dtype=torch.float32)
            _gather_crop_flip_float(pixels, idx, dy[sl], dx[sl], mirror[sl], lut_x, lut_s, x.numpy(), s.numpy())
            yield x, s, labels[torch.from_numpy(idx)]

    def _device_batches(self, order, dy, dx, mirror):
        dev, c = self.device, self.channels
        idx_all = torch.from_numpy(order).to(dev, non_blocking=True)
        dy_all, dx_all = (torch.from_numpy(a).to(dev, non_blocking=True) for a in (dy, dx))
        mirror_all = torch.from_numpy(mirror.astype(np.bool_)).to(dev, non_blocking=True)
        for start in range(0, len(order), self.batch_size):
            sl = slice(start, start + self.batch_size)
            idx = idx_all[sl]
            out = crop_flip_gather(self.pixels, idx, dy_all[sl], dx_all[sl], mirror_all[sl])
            yield out[:, :c], out[:, c:], self.labels.index_select(0, idx)  # uint8: to_model_inputs converts
