"""The Source interface: how a dataset enters `preprocess build-shards`.

A source does three cheap things up front and one expensive thing per work item:

1. `__init__(cfg)` checks the inputs exist and reads its index (annotation file, folder listing);
   a user mistake raises `SourceError("<file>: <problem>")`, shown as one line, exit 2.
2. `classes()` -> class names; class index = position (contiguous 0..C-1).
3. `fingerprint()` -> JSON-able dict describing the inputs (e.g. annotation file sha256, image list
   with sizes). A resumed or multi-node build refuses to mix outputs from different inputs.
4. `items()` -> (work items, plan-time skips). A `WorkItem` holds ids and annotations but never
   pixels; the list must be deterministic (sorted) and cheap to hold (the planner shuffles it with
   the seed and packs items into shards by `expected` sample count). Plan-time skips are things
   dropped while reading annotations (unknown ids, empty boxes...), each a `Skip`.
5. `load(item)` -> iterator of `RawSample` and `Skip`: decodes the pixels of one item and yields
   its samples (an object-unit COCO image yields one sample per object; a CIFAR record yields
   one). Samples + skip counts should add up to `item.expected`. Raise nothing for bad data:
   yield `Skip(item.id, reason, detail, count)` instead (`geometry.ImageError` carries a reason).
   Read image files with `self.read_image(path, root)`: it applies --max-pixels and, unless
   --allow-outside-root, refuses paths that resolve outside `root` (symlinks included).
   A path built from annotation data (a file name in a JSON/XML/text file) is first checked with
   `path_problem(name)` while planning, so `../../x` or `/etc/passwd` is a counted skip ("path
   outside root") and is never opened, not even stat'ed for the fingerprint.
6. `item_files(item)` (optional) -> the files `load(item)` reads; with `item_file_keys`, the
   fingerprint keys that summarize only those files (names and sizes), a rerun after the user fixed
   files that had been skipped (an empty image...) rebuilds only the shards of those items instead
   of needing --overwrite (preprocess/plan.py, `carry_over`). Keep both complete or leave them unset.

The shared pipeline (`preprocess/pipeline.py`) then crops with `RawSample.window`, resizes, renders
saliency (`--saliency mask|box|foreground|none`) and encodes. A source never resizes or blurs.

A Source instance is pickled to every worker process: keep only light state on it (paths,
options, id maps), not the item list and never pixels.

Options of one source: declare a dataclass `Options` on the class; every field becomes a CLI flag
`--<name-with-dashes>` (help text from `field(metadata={"help": ...})`) and is saved under
`config.source_options`. Unknown keys are rejected.

Registering a source: one module under `preprocess/sources/` + one line in `sources/__init__.py`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from preprocess.geometry import Decoded, read_image

PATH_OUTSIDE_ROOT = "path outside root"
INVALID_FILE_NAME = "invalid file name"


class SourceError(Exception):
    """Inputs that cannot be built at all; the message names the file and the problem."""


def path_problem(name: object, allow_outside_root: bool = False) -> str | None:
    """Why a file name taken from annotation data cannot be joined below its folder, or None.

    Lexical only (no file-system access, so nothing outside is touched): not a non-empty string,
    a NUL byte or a character the file system cannot encode -> INVALID_FILE_NAME; an absolute
    path or one whose '..' climbs out -> PATH_OUTSIDE_ROOT (unless allowed). Symlinks are
    checked when the file is read (`Source.read_image`)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return INVALID_FILE_NAME
    try:
        os.fsencode(name)
    except UnicodeError:
        return INVALID_FILE_NAME
    if allow_outside_root:
        return None
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        return PATH_OUTSIDE_ROOT
    return None


@dataclass(frozen=True)
class Skip:
    """`count` planned samples of item `id` were dropped for `reason` (a short stable phrase,
    used as the key in the manifest's skip counts); `detail` says which file / what exactly."""

    id: str
    reason: str
    detail: str = ""
    count: int = 1


@dataclass
class WorkItem:
    """One unit of loading work: `id` unique and stable, `expected` samples it should yield,
    `data` anything picklable and small the source needs to load it (file name, annotations)."""

    id: str
    expected: int
    data: Any = None


@dataclass
class Shape:
    """One object's saliency geometry, in source pixel coordinates (x right, y down).

    `box` (x0, y0, x1, y1) is always set (clipped to the image). Finer geometry, when the source has
    it, in one of: `polygons` (list of rings, each a flat COCO [x0, y0, x1, y1, ...] list or an (n, 2)
    array; rings with < 3 points or NaNs are ignored; even-odd holes),
    `rle` (COCO RLE dict, compressed or not, over the full source image), or `mask` (array over the
    full source image: uint8 {0, 1}, or float32 in [0, 1] where 0.5 means "unknown" -> saliency 0)."""

    box: tuple[float, float, float, float]
    polygons: list | None = None
    rle: dict | None = None
    mask: np.ndarray | None = None

    @property
    def has_mask(self) -> bool:
        return self.polygons is not None or self.rle is not None or self.mask is not None


@dataclass
class RawSample:
    """A decoded sample before cropping/resizing.

    image   uint8 HxWx3 RGB (or HxW grey for 1-channel sources), possibly decoded reduced
    scale   image px per source px (1.0 unless decoded reduced)
    window  (x0, y0, side) square in source px to cut out (may reach outside: zero padding);
            None = the whole image, padded to a square
    shapes  objects whose union is salient; empty = no annotation (saliency from --saliency)
    meta    small JSON-able dict stored in the sample's .json (source_id at least)
    """

    key: str
    image: np.ndarray
    label: int
    scale: float = 1.0
    window: tuple[float, float, float] | None = None
    shapes: list[Shape] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


class Source:
    """Base class; see the module docstring. Subclasses set `name`, `channels`, `Options`,
    `has_masks`/`has_boxes` (which --saliency kinds make sense) and implement the methods."""

    name = "base"
    channels = 3  # 3 = RGB samples, 1 = grey samples
    has_masks = False  # shapes carry polygons / RLE / masks (--saliency mask)
    has_boxes = False  # shapes carry boxes (--saliency box)
    units = ("image",)  # sample units this source supports; the first is the default
    # BuildConfig values for flags the user did not give (CLI), e.g. {"size": 28, "image_format": "raw"};
    # a programmatic BuildConfig with unit "auto" / size 0 also takes unit / size from here
    config_defaults: dict = {}
    # attributes holding big, lazily (re)loaded state (parsed JSON, pixel arrays): left out of the
    # pickle that carries the source to each worker, which reloads them on first use if it needs them
    not_pickled: tuple[str, ...] = ()
    # fingerprint() keys that summarize only the files item_files() names (see 6. above)
    item_file_keys: tuple[str, ...] = ()

    @dataclass
    class Options:
        pass

    @classmethod
    def resolve_saliency(cls, kind: str) -> str:
        """Check a --saliency kind against what this source has; 'auto' becomes the best it has
        (mask > box > foreground), so the manifest names the kind that was really built. Lives here,
        not in pipeline.py, so the main process of a parallel build never imports the kernels."""
        if kind == "auto":
            return "mask" if cls.has_masks else "box" if cls.has_boxes else "foreground"
        if kind == "mask" and not cls.has_masks:
            raise ValueError(f"source {cls.name!r} has no masks; use --saliency "
                             + ("box|" if cls.has_boxes else "") + "foreground|none")
        if kind == "box" and not (cls.has_boxes or cls.has_masks):
            raise ValueError(f"source {cls.name!r} has no boxes; use --saliency foreground|none")
        return kind

    def __init__(self, cfg):
        self.cfg = cfg
        self.options = self.Options(**cfg.source_options)
        self._classes: list[str] = []

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self.not_pickled:
            state[name] = None
        return state

    def classes(self) -> list[str]:
        """Class names in label order (subclasses fill `self._classes` or override this)."""
        if not self._classes:
            raise SourceError(f"source {self.name!r} does not list its classes")
        return list(self._classes)

    def read_image(self, path: str | Path, root: str | Path, reduce=1) -> Decoded:
        """Decode one image file of this source (see `geometry.read_image`): --max-pixels applies,
        and `path` must resolve inside `root` unless --allow-outside-root. Raises ImageError."""
        cfg = self.cfg
        return read_image(path, self.channels, reduce, max_pixels=cfg.max_pixels,
                          root=None if cfg.allow_outside_root else root)

    def path_problem(self, name: object) -> str | None:
        """`path_problem` with this build's --allow-outside-root."""
        return path_problem(name, self.cfg.allow_outside_root)

    def item_files(self, item: WorkItem) -> list[Path] | None:
        """Every file `load(item)` reads, or None when the source cannot say (see 6. above)."""
        return None

    def fingerprint(self) -> dict:
        raise SourceError(f"source {self.name!r} has no input fingerprint")

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        raise SourceError(f"source {self.name!r} cannot list its items")

    def load(self, item: WorkItem) -> Iterator[RawSample | Skip]:
        raise SourceError(f"source {self.name!r} cannot load items")
