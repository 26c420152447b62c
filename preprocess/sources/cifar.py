"""CIFAR-10 / CIFAR-100 in the "python version" pickle batches from the dataset's home page.

    CIFAR-10   <root>[/cifar-10-batches-py]/data_batch_1..5, test_batch, batches.meta
    CIFAR-100  <root>[/cifar-100-python]/train, test, meta

Splits train and test; val only with --val-size N (the last N train records, removed from train).

Each batch is a pickled dict with bytes keys: b"data" (N x 3072 uint8, row-major, the 1024 red
values then green then blue of a 32x32 image), b"labels" (CIFAR-10) or b"fine_labels" and
b"coarse_labels" (CIFAR-100), b"filenames". Class names live in batches.meta (b"label_names")
or meta (b"fine_label_names", b"coarse_label_names").

Pickles can run code when loaded, so batches are read with an unpickler that only builds plain
containers and numpy arrays: a crafted file gets a clear error instead of running.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.storage import sha256_file

from preprocess.sources.base import RawSample, Skip, Source, SourceError, WorkItem

CIFAR_SIDE = 32
LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "meta": "batches.meta",
                "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}},
    "cifar100": {"folder": "cifar-100-python", "meta": "meta",
                 "splits": {"train": ["train"], "test": ["test"]}},
}
# the only globals a CIFAR pickle needs: numpy's array reconstruction (numpy 1 and 2 module names)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol 2 written by Python 3 stores bytes as codecs.encode(str, "latin1")
}


class CifarFormatError(ValueError):
    """A CIFAR batch or folder is missing or malformed; the message names the file."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def load_pickle(path: str | Path) -> dict:
    """A CIFAR pickle as a dict with bytes keys (batches were written by Python 2 cPickle)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise CifarFormatError(f"{path}: missing") from None
    except IsADirectoryError:
        raise CifarFormatError(f"{path}: a folder, not a batch file") from None
    except (Exception, RecursionError) as e:  # noqa: BLE001 - garbage makes the unpickler raise almost anything
        raise CifarFormatError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # files written by Python 3 pickle have str keys; the originals have bytes keys
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _names(values, path: Path, key: str) -> list[str]:
    """A list of names (bytes as written by Python 2, or str)."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (bytes, str)) for v in values):
        raise CifarFormatError(f"{path}: {key!r} is not a list of names")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def read_batch(path: str | Path, label_key: bytes = b"labels") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N x 32 x 32 x 3 uint8 RGB, labels N int64, file names) of one batch file."""
    path = Path(path)
    d = load_pickle(path)
    for key in (b"data", label_key):
        if key not in d:
            raise CifarFormatError(f"{path}: no {key.decode()!r} entry (has {sorted(k.decode() for k in d)})")
    data = np.asarray(d[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise CifarFormatError(f"{path}: 'data' is {data.dtype} {data.shape}, expected N x 3072 uint8")
    labels = d[label_key]
    if not isinstance(labels, (list, tuple, np.ndarray)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise CifarFormatError(f"{path}: {label_key.decode()!r} is not a list of integer labels")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise CifarFormatError(f"{path}: {label_key.decode()!r} holds a label too large for int64") from None
    if len(labels) != len(data):
        raise CifarFormatError(f"{path}: {len(labels)} labels for {len(data)} images")
    try:
        names = _names(d.get(b"filenames", []), path, "filenames")
    except CifarFormatError:
        names = []
    if len(names) != len(data):  # absent, malformed or not one per image: only metadata, name by position
        names = [f"{path.name}_{i}" for i in range(len(data))]
    # planar RGB rows -> HWC images (a view transpose; the copy happens per image when encoded)
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels, names


def find_cifar_root(root: str | Path, variant: str) -> Path:
    """The folder holding the batch files: `root` itself or its cifar-*-python subfolder."""
    root = Path(root)
    layout = LAYOUTS[variant]
    for cand in (root, root / layout["folder"]):
        if (cand / layout["meta"]).is_file():
            return cand
    if not root.is_dir():
        raise CifarFormatError(f"{root}: no such folder")
    raise CifarFormatError(f"{root}: no {layout['meta']} here or in {layout['folder']}/ (not a {variant} python-version folder)")


def cifar_classes(root: Path, variant: str, label_type: str = "fine") -> list[str]:
    meta_path = root / LAYOUTS[variant]["meta"]
    meta = load_pickle(meta_path)
    key = b"label_names" if variant == "cifar10" else f"{label_type}_label_names".encode()
    if key not in meta:
        raise CifarFormatError(f"{meta_path}: no {key.decode()!r} entry")
    return _names(meta[key], meta_path, key.decode())


def batch_files(root: Path, variant: str, split: str) -> list[Path]:
    splits = LAYOUTS[variant]["splits"]
    if split not in splits:
        raise CifarFormatError(f"{root}: {variant} has splits {sorted(splits)}, not {split!r}")
    paths = [root / n for n in splits[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CifarFormatError(f"{root}: missing batch file(s) {', '.join(missing)} for split {split!r}")
    return paths


def label_key(variant: str, label_type: str = "fine") -> bytes:
    if variant == "cifar10":
        return b"labels"
    if label_type not in ("fine", "coarse"):
        raise CifarFormatError(f"CIFAR-100 label type must be 'fine' or 'coarse', not {label_type!r}")
    return f"{label_type}_labels".encode()


# ----------------------------------------------------------------------------- the Source

class Cifar10Source(Source):
    """CIFAR-10 from the python-version batches (root: cifar-10-batches-py or the folder above it).

        preprocess build-shards cifar10 --root data/cifar-10-batches-py --split train --out shards/cifar10/train

    Native 32x32 RGB; unannotated, so saliency comes from --saliency foreground or none.
    All batches of the split stay in memory in each worker (150 MB for train): a shuffled
    build touches every batch all the time, so reading them once is far cheaper than per item."""

    name = "cifar10"
    not_pickled = ("_batches",)
    variant = "cifar10"
    channels = 3
    units = ("image",)
    # BuildConfig values for flags the user did not give: native size, raw pixels, one sample per image
    config_defaults = {"unit": "image", "size": CIFAR_SIDE, "image_format": "raw"}

    @dataclass
    class Options:
        limit: int = field(default=0, metadata={"help": "use only the first N records of the split (0 = all)"})
        label_type: str = field(default="fine", metadata={"help": "CIFAR-100 only: fine (100 classes) or coarse (20)"})
        val_size: int = field(default=0, metadata={
            "help": "hold out the last N train records as split 'val' (give the same N to the train build)"})

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.options.limit < 0 or self.options.val_size < 0:
            raise SourceError(f"{self.name}: --limit and --val-size must be >= 0")
        if cfg.split == "val" and not self.options.val_size:
            raise SourceError(f"{self.name}: no val batches; hold out train records with --val-size N "
                              "(and build train with the same --val-size)")
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR (the unpacked python-version folder) is required")
        if self.variant == "cifar10" and self.options.label_type != "fine":
            raise SourceError(f"{self.name}: --label-type applies to cifar100 only")
        try:
            self.key = label_key(self.variant, self.options.label_type)
            self.root = find_cifar_root(cfg.root, self.variant)
            self.paths = batch_files(self.root, self.variant, "train" if cfg.split == "val" else cfg.split)
            self._classes = cifar_classes(self.root, self.variant, self.options.label_type)
        except CifarFormatError as e:
            raise SourceError(str(e)) from None
        self._batches = None  # [(images, labels, names)] read lazily per process; never pickled

    def fingerprint(self) -> dict:
        files = self.paths + [self.root / LAYOUTS[self.variant]["meta"]]
        return {"files": [p.name for p in files], "sha256": [sha256_file(p) for p in files],
                "label_type": self.options.label_type, "limit": self.options.limit, "val_size": self.options.val_size}

    def _read(self):
        if self._batches is None:
            try:
                self._batches = [read_batch(p, self.key) for p in self.paths]
            except CifarFormatError as e:
                raise SourceError(str(e)) from None
        return self._batches

    def _range(self, total: int) -> tuple[int, int]:
        """Records [start, stop) (numbered across the split's batches) that form this split."""
        o, split = self.options, self.cfg.split
        start, stop = 0, total
        if o.val_size and split in ("train", "val"):
            if o.val_size >= total:
                raise SourceError(f"{self.root}: --val-size {o.val_size} leaves no training records ({total} in train)")
            start, stop = (total - o.val_size, total) if split == "val" else (0, total - o.val_size)
        return start, (min(stop, start + o.limit) if o.limit else stop)

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        items, skips, n = [], [], 0
        batches = self._read()
        start, stop = self._range(sum(len(labels) for _, labels, _ in batches))
        for b, (_, labels, names) in enumerate(batches):
            for row, label in enumerate(labels.tolist()):
                item_id = f"{self.cfg.split}_{n:05d}"
                n += 1
                if not start <= n - 1 < stop:
                    continue
                if not 0 <= label < len(self._classes):
                    skips.append(Skip(item_id, "label out of range",
                                      f"{self.paths[b]}: record {row} ({names[row]}) has label {label}"))
                    continue
                items.append(WorkItem(item_id, 1, (b, row, int(label))))
        self._batches = None  # the planner holds no pixels; loading reads the batches again, once
        return items, skips

    def load(self, item: WorkItem):
        b, row, label = item.data
        images, _, names = self._read()[b]
        yield RawSample(key=item.id, image=np.ascontiguousarray(images[row]), label=label,
                        meta={"source_id": f"{self.paths[b].name}#{row}", "file": names[row]})


class Cifar100Source(Cifar10Source):
    """CIFAR-100 from the python-version files train/test/meta (--label-type fine|coarse).

        preprocess build-shards cifar100 --root data/cifar-100-python --split test --out shards/cifar100/test"""

    name = "cifar100"
    variant = "cifar100"
