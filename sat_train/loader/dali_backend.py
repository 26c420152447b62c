"""DALI backend: fn.readers.webdataset -> decode (mixed on CUDA, CPU otherwise) -> shared crop/flip.

Per epoch the loader writes, for each segment of this rank's plan (plan.py), a DALI index file that
lists exactly those samples of one tar in the plan's order, and builds a fresh pipeline over them
with `random_shuffle=False`. So DALI reads every planned sample exactly once, in the planned order,
and the epoch ends exactly at the plan's end (`reader_name` + `LastBatchPolicy.PARTIAL`). DALI's own
shuffle buffer is not used: it mixes samples across the epoch boundary. The random crop/flip draws
come from the pipeline seed, derived from (seed, epoch, rank); one coin and one pair of offsets per
sample feed both the image and the saliency branch. On CUDA the decoded pixels stay on the GPU.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import numpy as np

from . import Loader
from .plan import LoaderError
from .safety import sample_key

READER = "reader"


def _write_index(path: str, entries) -> None:
    lines = [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in sample) for sample in entries]
    with open(path, "w") as f:
        f.write(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")


def _dali_cause(message: str) -> str:
    """The operator and the cause from DALI's multi-line error ("Error in CPU operator `...`" ... "encountered:" ...)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    op = next((ln.rstrip(",") for ln in lines if ln.startswith("Error in")), "")
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines[-1:]
    cause = next((ln for ln in after if not ln.startswith("Current pipeline")), "")
    return "; ".join(part for part in (op, cause) if part) or (lines[0] if lines else "unknown error")


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tmp = tempfile.mkdtemp(prefix="satpipe-loader-")  # per-epoch DALI index files
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)

    def close(self) -> None:
        self._cleanup()

    def _pipeline_seed(self, epoch: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, self.layout.rank, 2]).generate_state(1)[0]
        return int(state % (2**31 - 1))

    def _build(self, paths, index_paths, epoch):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        image = self.manifest.image
        fmt, h, w, c = image["format"], image.get("height"), image.get("width"), image["channels"]
        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                        device_id=self.device.index if gpu else None, seed=self._pipeline_seed(epoch),
                        prefetch_queue_depth=2)
        with pipe:
            enc, sal, label = fn.readers.webdataset(
                paths=paths, index_paths=index_paths, ext=[fmt, "sal.png", "label.i64"],
                dtypes=[types.UINT8, types.UINT8, types.INT64], missing_component_behavior="error",
                random_shuffle=False, name=READER)
            decode_device = "mixed" if gpu else "cpu"
            if fmt == "raw":
                x = fn.reshape(enc.gpu() if gpu else enc, shape=[h, w, c], layout="HWC")
            else:
                x = fn.decoders.image(enc, device=decode_device, output_type=types.RGB if c == 3 else types.GRAY)
            s = fn.decoders.image(sal, device=decode_device, output_type=types.GRAY)
            if self.augment:
                p = self.crop_padding
                if p:
                    offsets = list(range(-p, p + 1))
                    dy = fn.random.uniform(values=offsets, dtype=types.INT32)
                    dx = fn.random.uniform(values=offsets, dtype=types.INT32)
                    start = fn.stack(dy, dx)  # one anchor for both branches
                    # named arguments: DALI keeps argument inputs on the CPU, also for a GPU slice
                    x, s = (fn.slice(t, start=start, shape=[h, w], axis_names="HW", out_of_bounds_policy="pad",
                                     fill_values=0) for t in (x, s))
                if self.flip:
                    coin = fn.random.coin_flip(dtype=types.INT32)  # one coin for both branches
                    x, s = fn.flip(x, horizontal=coin), fn.flip(s, horizontal=coin)
            # finish in DALI's threads: NCHW float32, x / 255 and s / 127.5 - 1 (as augment.uint8_to_float)
            x = fn.transpose(x, perm=[2, 0, 1]) / np.float32(255.0)
            s = fn.transpose(s, perm=[2, 0, 1]) / np.float32(127.5) - np.float32(1.0)
            outputs = [x, s, label]
            if self.with_keys:  # "tar:offset:member" bytes, padded to one length per batch
                outputs.append(fn.pad(fn.get_property(enc, key="source_info")))
            pipe.set_outputs(*outputs)
        return pipe

    def _batches(self, plan, epoch):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        entries, tars = self.shard_set.entries, self.manifest.tar_paths()
        # own folder per pass: an abandoned pass (a `break`, cleaned up later) never shares files with a new one
        os.makedirs(self._tmp, exist_ok=True)  # a /tmp cleaner may have removed it between epochs
        folder = tempfile.mkdtemp(prefix=f"r{self.layout.rank}-e{epoch}-", dir=self._tmp)
        paths, index_paths = [], []
        for i, seg in enumerate(plan):
            idx = os.path.join(folder, f"{i:05d}.idx")
            _write_index(idx, [entries[seg.shard][o] for o in seg.ordinals])
            paths.append(str(tars[seg.shard]))
            index_paths.append(idx)
        names = ["x", "s", "y"] + (["key"] if self.with_keys else [])
        pipe = it = None
        try:
            pipe = self._build(paths, index_paths, epoch)
            pipe.build()
            it = DALIGenericIterator(pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL,
                                     auto_reset=False)
            for out in it:
                d = out[0]
                keys = None
                if self.with_keys:
                    keys = [sample_key(bytes(row.cpu().numpy()).rstrip(b"\0").decode().rsplit(":", 1)[-1])
                            for row in d["key"]]
                yield d["x"], d["s"], d["y"], keys
        except RuntimeError as e:  # DALI reports decode/read failures as RuntimeError with a long trace
            raise LoaderError(f"DALI failed reading {self.manifest.root}: {_dali_cause(str(e))} "
                              f"(find the sample with backend='torch', or check files with verify='sha256')") from None
        finally:
            del it, pipe
            shutil.rmtree(folder, ignore_errors=True)
